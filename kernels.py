"""
Fused GPU kernels in Triton: FlashAttention (forward and backward) and a chunked linear + cross-entropy.

The problem: attention is memory-bound, not compute-bound
----------------------------------------------------------
Causal attention for one head, with scale = 1/sqrt(D), is

    S = scale * Q K^T + M      (T, T) scores, M = -inf above the diagonal
    P = softmax(S)             (T, T) row-wise probabilities
    O = P V                    (T, D)

Written out, every one of S and P is a (B, H, T, T) tensor in GPU memory (HBM). With e bytes per
element, the forward alone writes S, reads it, writes P and reads it back:

    naive forward traffic   ~ e * B*H * (4*T*D + 4*T^2)   bytes
    naive extra memory      ~ e * B*H * T^2               bytes (P is kept for the backward)

and the softmax in the middle does a handful of FLOPs per byte, far below what a GPU needs to be
busy (an H100 does ~300 bf16 FLOPs in the time it moves one byte). For (B, H, T, D) = (4, 32,
4096, 64) in bf16 that is ~17 GB moved and 4.3 GB held per layer, for a result O of only 67 MB.
model.naive_attention holds more: its softmax runs in float32, so autograd keeps that float32
output and its e-byte copy P (and a T x T boolean mask), (4 + e) * B*H*T^2 bytes: 12.9 GB here
(tests/test_model.py counts the bytes saved per score).

The idea: tiles and an online softmax (FlashAttention)
------------------------------------------------------
FlashAttention (Dao, Fu, Ermon, Rudra, Re 2022, arXiv:2205.14135) never writes S or P. One program
owns BLOCK_M rows of Q, keeps them on chip (registers / shared memory), and streams K and V past
them in tiles of BLOCK_N rows. The (BLOCK_M, BLOCK_N) tile of scores lives and dies on chip. Q and
O cross HBM once; K and V are read once per query block, T / BLOCK_M times:

    tiled forward traffic   ~ e * B*H * T*D * (2 + 2*T/BLOCK_M)   bytes
                            = e * B*H * (2*T*D + T^2 * 2*D/BLOCK_M)

so the T^2 term shrinks by a factor 4 / (2*D/BLOCK_M) = 2*BLOCK_M/D (4x for BLOCK_M = 128,
D = 64, and those repeated K/V reads mostly hit the L2 cache), and the extra memory drops from
e*B*H*T^2 to the 4*B*H*T bytes of one float32 log-sum-exp per row. The catch: softmax needs the
whole row's maximum and sum before any probability is known. The online softmax (Milakov &
Gimelshein 2018, arXiv:1805.02867; Rabe & Staats 2021, arXiv:2112.05682) removes that need.

The online-softmax recurrence, and why it is exact
--------------------------------------------------
For one query row with scores s_1..s_T split into key tiles 1..J, keep three running values: the
largest score so far m, the sum of exponentials l, and the un-normalised output a (a D-vector).
Start with m_0 = -inf, l_0 = 0, a_0 = 0; for tile j:

    m_j = max(m_{j-1}, max_{k in tile j} s_k)
    l_j = exp(m_{j-1} - m_j) * l_{j-1} + sum_{k in tile j} exp(s_k - m_j)
    a_j = exp(m_{j-1} - m_j) * a_{j-1} + sum_{k in tile j} exp(s_k - m_j) * v_k

and at the end O = a_J / l_J and LSE = m_J + log(l_J).

Proof sketch. Claim: after tile j, l_j = sum_{k seen} exp(s_k - m_j) and a_j = sum_{k seen}
exp(s_k - m_j) v_k. True for j = 0 (empty sums). If true for j-1, multiplying by
exp(m_{j-1} - m_j) turns every term exp(s_k - m_{j-1}) into exp(s_k - m_j): the old sums are
re-based to the new maximum, and the new tile's terms are added on the same base. So the claim
holds for j, and at the end a_J / l_J = sum_k exp(s_k) v_k / sum_k exp(s_k) = softmax(s) V, the
exact result, not an approximation. Every exponent is <= 0, so nothing overflows. The kernel uses
exp2 and scores pre-multiplied by log2(e) (exp(x) = 2^(x log2 e); exp2 is the native instruction).

The backward recomputes instead of storing
------------------------------------------
With dO the gradient of O, and delta_i = sum_j P_ij dP_ij:

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)        (* elementwise)
    dQ = scale * dS K  dK = scale * dS^T Q

delta needs no T x T matrix: sum_j P_ij (dO_i . v_j) = dO_i . (sum_j P_ij v_j) = dO_i . O_i, so
delta = rowsum(dO * O), a small "preprocess" kernel. P itself is *recomputed* tile by tile from Q,
K and the saved LSE, P_ij = exp(scale * q_i . k_j - LSE_i), instead of storing and re-reading
e*T^2 bytes per head (memory that would cap the sequence length). As in FlashAttention-2 (Dao
2023, arXiv:2307.08691), one kernel owns a tile of K/V and loops over query tiles to accumulate dK
and dV. FlashAttention-2 adds each tile's share of dQ into HBM with atomic adds in that same pass;
here, our choice, a second kernel owns a tile of Q and loops over key tiles to accumulate dQ, so no
program writes another's rows (no atomics: deterministic, and no float32 dQ buffer). The price:
both kernels recompute the scores Q K^T and dP = dO V^T, so the backward runs seven T x T x D
matmuls (dK/dV kernel: S^T, dV, dP^T, dK; dQ kernel: S, dP, dQ), three more than one that stored
P, each 2*T^2*D FLOPs per head (cheap on tensor cores next to the memory saved). With grouped-query
attention a K/V tile also loops over the query heads that share it, summing their contributions.

Document masking: skip what another document's tile would add
----------------------------------------------------------------
A packed training window holds several documents (model.py, --doc_mask); query i may read key j
only if j <= i and both lie in the same document. The kernels take the (B, T) document ids as
each position's document span [start, end) (document_spans): the mask inside a tile compares
starts, and since a document is a run of consecutive positions, whole tiles drop out. A query
block [m0, m0 + BLOCK_M) reads keys from start[m0] on (forward, dQ), a key tile
[n0, n0 + BLOCK_N) is read by queries before end[last key] only (dK, dV). Every score in a skipped
tile would be -inf, so P = 0 there and it adds nothing to l, a, dQ, dK or dV: skipping is exact,
not an approximation. With documents of length L much shorter than T the causal work falls from
about T^2/2 scores per head to about T*L/2 (plus the tiles cut by a boundary), as with
FlexAttention's block masks (Dong et al. 2024, arXiv:2412.05496).

What the block sizes trade
--------------------------
A bigger BLOCK_M reuses every K/V tile loaded from memory against more query rows (arithmetic
intensity grows with BLOCK_M, K/V re-reads fall as T/BLOCK_M), and a bigger BLOCK_N makes each
matmul larger. But a tile needs (BLOCK_M + 2*BLOCK_N) * D inputs and a BLOCK_M x D float32
accumulator on chip: past the register file and shared memory the compiler spills, or fewer
programs fit on a streaming multiprocessor to hide latency (num_stages multiplies the shared
memory used to prefetch the next tiles). Short sequences have few tiles: B*H*T/BLOCK_M programs
must still fill all 132 SMs of an H100 SXM. On the causal diagonal up to half a tile is masked work.
There is no single best choice across (T, D) and GPU, so on CUDA `triton.autotune` times a small
set of configurations the first time it sees a shape; the interpreter uses one small config.

The FLOP count used for TFLOP/s
-------------------------------
Forward: two matmuls, S = Q K^T and O = P V, each 2*T*T*D FLOPs per head: 4*B*H*T^2*D, halved
for causal (only the lower triangle is real work): 4*B*H*T^2*D / 2. Backward: five matmuls (the
recomputed Q K^T, dV, dP, dQ, dK) = 2.5x the forward. Forward + backward = 3.5x the forward.
These are the useful FLOPs as the FlashAttention papers count them (softmax exponentials not
counted either), so that TFLOP/s compare across implementations. Our backward executes seven
matmuls (see above), forward + backward 4.5x the forward, so the TFLOP/s reported are 3.5/4.5 of
the rate the tensor cores actually ran at.

A second fused kernel: linear + cross-entropy in chunks
-------------------------------------------------------
The language-model head maps N = B*T positions of width C to V logits and takes a cross-entropy.
Done plainly (model.GPT.forward), it materialises the (N, V) logits, a float32 copy of them for a
stable log-softmax, and in the backward their (N, V) float32 gradient. For GPT-2 small
(N = 16 * 1024 tokens, V = 50304) that is N*V*4 = 3.3 GB for the float32 logits plus 3.3 GB for
their gradient (plus the bf16 logits, 1.6 GB): more than the whole model's activations.
`fused_linear_cross_entropy` (the approach of Liger Kernel, Hsu et al. 2024, arXiv:2410.10989;
see also Cut Cross-Entropy, Wijmans et al. 2024, arXiv:2411.09009) processes the rows in chunks
of `chunk_size`: logits of one chunk by a matmul, then one Triton kernel computes each row's
log-sum-exp (the same online recurrence as above, over vocabulary tiles), its loss, and overwrites
the logits in place with their gradient softmax - onehot(target); two matmuls turn that into the
chunk's dX and its share of dW. All gradients are ready at the end of the forward, so the backward
only scales them by the incoming gradient. The logits take chunk*V*e bytes at a time (one chunk,
reused for its own gradient) instead of N*V*(e + 4 + 4): with the default chunk about as much
memory as X itself. Beside them live the gradients themselves, which the forward computes and
keeps for the backward: dX (N x C) and dW (V x C, accumulated in float32 over the chunks), both
kept in X's dtype. Passes over the logits: plain = write (matmul), read + write (float
cast), read + write (log-softmax), read (gather); backward read + write twice more. Fused = write
(matmul), read twice (max/sum pass, gradient pass) + write once (gradient in place), read twice
(the dX and dW matmuls), each chunk-sized, so it stays in L2 for small chunks.

Running without a GPU
---------------------
Triton compiles for GPUs only, but with TRITON_INTERPRET=1 it runs the same kernel source on the
CPU through numpy, one program at a time (slow, exact enough to test). This module sets that
variable when no CUDA device is visible, before Triton is imported, so tests and CPU users need
nothing special. Two interpreter quirks are handled below: its bfloat16 `tl.dot` is wrong in
triton 3.9 (so 16-bit operands are upcast to float32 there, flag UPCAST) and its float32 ->
bfloat16 stores truncate rather than round (an error of at most one bf16 ulp, within the tests'
1e-2 tolerance).

The same loss without Triton
----------------------------
Where Triton cannot run at full speed (the CPU: the interpreter runs one program at a time in
numpy), `chunked_linear_cross_entropy` keeps the memory saving in plain torch: each chunk's logits
are made, reduced to a summed loss and dropped, and torch.utils.checkpoint makes them again, chunk
by chunk, in the backward (one extra (n, C) x (C, V) matmul per chunk: 2 N C V FLOPs in all, a
third more than the head's 6 N C V for forward and backward). `linear_cross_entropy` is model.py's
entry point (GPTConfig.fused_ce): the Triton kernel on a GPU, the chunked torch version elsewhere.

FP8 matrix products with per-tensor scaling
-------------------------------------------
Ada and Hopper tensor cores multiply 8-bit floats at twice the bf16 rate (H100 SXM: 1979 against
989 TFLOP/s dense, scaling.PEAK_FLOPS). Micikevicius et al. 2022 ("FP8 Formats for Deep
Learning", arXiv:2209.05433) define two formats: E4M3 (4 exponent bits, 3 mantissa bits, largest
finite value 448) for weights and activations, which need precision, and E5M2 (5 and 2, largest
57344) for gradients, which need range. Rounding to nearest keeps a normal number within half a
unit in the last place: 2^-4 relative for E4M3, 2^-3 for E5M2. The range is narrow (E4M3 spans
448 / 2^-9, about 2^18), so each tensor is first scaled into it:

    scale = fp8_max / amax(|X|)      X8 = fp8(clamp(X * scale, -fp8_max, fp8_max))      X ~ X8 / scale

This is per-tensor "dynamic" scaling: the amax of the tensor being cast, torchao's default
(delayed scaling keeps an amax history instead and saves that reduction). A product is then
(X8 W8^T) / (s_x s_w): torch._scaled_mm multiplies the fp8 operands on the tensor cores,
accumulates in float32 and multiplies the result by the two inverse scales. A Linear has three:

    forward       Y  = X W^T       E4M3 x E4M3
    input grad    dX = dY W        E5M2 x E4M3
    weight grad   dW = dY^T X      E5M2 x E4M3

Error bound, per element: |X8 / s - X| <= 2^-4 |X| + 2^-10 / s (values that land below E4M3's
smallest normal, 2^-6, after scaling are subnormals spaced 2^-9 apart, so their error is absolute),
and each term of a product is off by at most (2 * 2^-4 + 2^-8) relative plus those absolute parts;
the tests check Float8Linear against F.linear with exactly this bound. Bytes: an fp8 operand is
half a bf16 one, and the activations kept for the backward are kept in fp8. Cost: per operand and
matmul an amax (one read) and a cast (a read and a write), memory-bound passes that torch.compile
fuses into the kernels that produce the operands; without compile they can eat the gain at GPT-2
small's width. `convert_to_float8(module)` swaps every nn.Linear inside a module for a
Float8Linear holding the same Parameters, as torchao.float8.convert_to_float8_training does, so
the model's code does not change. torch._scaled_mm on a GPU needs compute capability >= 8.9, both
operand dimensions a multiple of 16, the first operand row-major and the second column-major.

Map of this file, in reading order
----------------------------------
interpreter switch and availability -> reference attention (the one to read) -> forward kernel
(_attn_fwd_inner, _attn_fwd_kernel) -> backward kernels (_attn_bwd_preprocess, _attn_bwd_dkdv_*,
_attn_bwd_dq_*) -> autotuning configs -> document_spans -> flash_attention (the autograd function) ->
triton_attention_backend (model.py's seam, with its fallback) -> fused linear + cross-entropy
(kernel, autograd function, reference, the chunked torch version, model.py's entry point) -> FP8
(quantize, the scaled matmul, Float8Linear, convert_to_float8) -> benchmarks -> command line.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

# Triton decides at decoration time (@triton.jit) whether kernels compile for a GPU or run in its
# interpreter, reading TRITON_INTERPRET. So it must be set before Triton is imported; setdefault
# leaves an explicit TRITON_INTERPRET=0/1 from the user alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
except Exception as e:  # no wheel for this platform, or a broken install: the model falls back to SDPA
    triton, tl, TRITON_ERROR = None, None, f"Triton is not importable ({type(e).__name__}: {e}); pip install triton"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if triton is not None and INTERPRET and isinstance(tl.zeros, triton.runtime.jit.JITFunction):
    # Something imported Triton before this module could switch the interpreter on (creating a
    # torch optimizer does), so Triton's own library (tl.zeros, tl.max, ...) was built for GPUs and
    # cannot run on the CPU. Say so, with the fix; model.py imports kernels early to avoid this.
    triton, tl, TRITON_ERROR = None, None, (
        "Triton was imported before kernels.py could turn on its CPU interpreter; set TRITON_INTERPRET=1 "
        "in the environment or import kernels before creating optimizers")
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
MAX_HEAD_DIM = 128  # largest head size: a tile of D columns (padded to a power of two) must fit on chip


def _jit(fn):
    """@triton.jit when Triton imported, else leave the function as plain Python (never launched)."""
    return triton.jit(fn) if triton is not None else fn


def _autotune(configs, key):
    return triton.autotune(configs=configs, key=key) if triton is not None else (lambda fn: fn)


def _config(interpret_meta, cuda_metas):
    """One small config in the interpreter (speed there is meaningless), the sweep on a GPU."""
    if triton is None:
        return []
    if INTERPRET:
        return [triton.Config(interpret_meta, num_warps=1, num_stages=1)]
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in cuda_metas]


# ----------------------------------------------------------------------------------------------
# The reference: what every kernel below must reproduce


def reference_attention(q, k, v, causal: bool = True, sm_scale: float | None = None):
    """softmax(scale * Q K^T + M) V written out, with K/V heads repeated for grouped-query attention.

    q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D). Materialises (B, H, T, T).
    """
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.size(-1))
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, D) x (B, H, D, T) -> (B, H, T, T)
    if causal:
        T = q.size(-2)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    # the softmax in float32 at least (bf16 exponentials are coarse), in float64 for a float64 reference
    p = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1).to(q.dtype)
    return p @ v  # (B, H, T, T) x (B, H, T, D) -> (B, H, T, D)


# ----------------------------------------------------------------------------------------------
# Forward kernel. Grid: (query tiles, B * H). Each program computes BLOCK_M rows of O and LSE.


# EXERCISE: flash-attention (tests/test_kernels.py -k 'flash_attention_and_its_gradients or log_sum_exp or flash_attention_with_documents')
@_jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, qk_scale, T, D,
                    DOCS, doc_q, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DOC_MASK: tl.constexpr):
    """The online-softmax recurrence over key tiles [lo, hi). MASK applies the causal and T masks;
    DOC_MASK, on every tile, the document mask: key j counts for query i only if DOCS[j] == doc_q[i]
    (DOCS points at this row's document starts, doc_q holds the query rows' own).

    Carried per query row, all float32: acc (BLOCK_M, BLOCK_D) the un-normalised output a, l_i the
    sum l and m_i the maximum m of the module docstring, in log2 units (qk_scale = sm_scale log2 e,
    so exp is exp2). q (BLOCK_M, BLOCK_D) is loaded; K and V point at this head's key 0, rows
    stride_kt / stride_vt apart; offs_m are the query positions, offs_d the head's columns (those
    >= D, and keys >= T, read as zeros). Returns the updated (acc, l_i, m_i)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)  # ragged T and padded D read zeros
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        # scores in log2 units: (BLOCK_M, BLOCK_D) x (BLOCK_D, BLOCK_N) -> (BLOCK_M, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if DOC_MASK:  # keys past T read -2, padding queries -1: no match
            doc_k = tl.load(DOCS + offs_n, mask=offs_n < T, other=-2)
            s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_j = max(m_{j-1}, max_k s_k)
        alpha = tl.math.exp2(m_i - m_new)  # exp(m_{j-1} - m_j): re-bases the old sums
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), every entry in [0, 1]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # + P_tile V_tile
        m_i = m_new
    return acc, l_i, m_i


FWD_CONFIGS = _config(
    {"BLOCK_M": 32, "BLOCK_N": 16},  # unequal on purpose, so the CPU tests cover the general tiling
    [({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages)
     for bm, bn in ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128)) for warps in (4, 8) for stages in (2, 3, 4)],
)


@_autotune(FWD_CONFIGS, key=["T", "D", "CAUSAL", "DOC_MASK"])
@_jit
def _attn_fwd_kernel(Q, K, V, O, LSE, DOC_START, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                     qk_scale, H, T, D, GROUP, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, DOC_MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: offsets of big tensors pass 2^31
    kvh = h // GROUP  # grouped-query attention: GROUP query heads share one K/V head
    Q, O = Q + b * sqb + h * sqh, O + b * sob + h * soh
    K, V = K + b * skb + kvh * skh, V + b * svb + kvh * svh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D: D rounded up to a power of two, the extra columns masked
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if DOC_MASK:
        # A row of a later document can meet a whole tile with no key of its own (every score
        # -inf): from m = -inf, alpha = exp2(-inf + inf) would be NaN. Start m at a finite floor
        # instead: such a tile gives alpha = exp2(0) = 1 on sums that are still 0 and p = 0, and the
        # first real score (any score above -1e30) gives alpha = exp2(-1e30 - m) = 0. Same result.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Two stages: key tiles in [0, mid) need no mask (all keys < T and, if causal, left of every row
    # of this tile); tiles in [mid, hi) hold the diagonal and/or the ragged end and are masked.
    if CAUSAL:
        mid, hi = start_m // BLOCK_N * BLOCK_N, tl.minimum(T, start_m + BLOCK_M)
    else:
        mid, hi = T // BLOCK_N * BLOCK_N, T
    lo = 0
    DOCS = DOC_START + b * T  # this row's document starts, (B, T) int32 contiguous
    doc_q = tl.zeros([BLOCK_M], tl.int32)
    if DOC_MASK:
        doc_q = tl.load(DOCS + offs_m, mask=offs_m < T, other=-1)  # each query's document (its first position)
        # Skip the key tiles before the first query's document: documents are runs of positions, so
        # every key j < DOCS[start_m] belongs to an earlier document than every query of this block
        # (they sit at >= start_m, in that document or later ones). Each of their scores would be
        # -inf, i.e. exp(-inf) = 0 added to l and to a and no change to m: leaving those tiles out
        # gives the same l, a, m, bit for bit. From lo on, every tile holds a key of the first
        # query's document or a later one up to the diagonal, so nothing else can be skipped whole.
        lo = tl.load(DOCS + start_m) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, lo, mid, qk_scale, T, D,
                                    DOCS, doc_q, False, CAUSAL, BLOCK_N, UPCAST, PRECISION, DOC_MASK)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, offs_d, mid, hi, qk_scale, T, D,
                                    DOCS, doc_q, True, CAUSAL, BLOCK_N, UPCAST, PRECISION, DOC_MASK)
    # every row sees key 0 (with documents: its own key, on the diagonal), so l_i >= 1 and m_i is
    # finite: no 0/0, except for document-masked padding rows past T, which see nothing and store nothing
    if DOC_MASK:
        l_i = tl.where(l_i > 0, l_i, 1.0)
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # back from log2 units: LSE = m + ln(l)
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# ----------------------------------------------------------------------------------------------
# Backward kernels: delta = rowsum(dO * O), then dK/dV (one K/V tile per program), then dQ.


@_jit
def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, H, T, D,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,) = dO_i . O_i
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


# EXERCISE: flash-backward (tests/test_kernels.py -k 'flash_attention_and_its_gradients or grouped_query_attention_forward_and_backward or flash_attention_with_documents')
@_jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sqt, sdot, offs_n, offs_d, lo, hi, qk_scale, T, D,
                         DOCS, doc_k, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, DOC_MASK: tl.constexpr):
    """Accumulate one query head's share of dK, dV for this K/V tile over query tiles [lo, hi).

    Works on transposed tiles (keys along rows) so dK and dV come out as (BLOCK_N, BLOCK_D).
    Query rows past T load q = dO = delta = 0, so they add exactly zero: only the causal
    diagonal needs an explicit mask.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + offs_m[:, None] * sdot + offs_d[None, :], mask=row_mask, other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634  # log2 units
        delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T
        if MASK and CAUSAL:
            s_t = tl.where(offs_n[:, None] <= offs_m[None, :], s_t, float("-inf"))
        if DOC_MASK:  # P = 0 between documents, so dS = 0 there: nothing flows across a boundary
            doc_q = tl.load(DOCS + offs_m, mask=offs_m < T, other=-1)
            s_t = tl.where(doc_k[:, None] == doc_q[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])  # P^T recomputed from the saved LSE
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T = V dO^T, (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - delta)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q (scale applied once, later)
    return dk, dv


DKDV_CONFIGS = _config(
    {"BLOCK_M": 16, "BLOCK_N": 32},  # few query rows per step, many keys per program (FlashAttention-2)
    [({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages)
     for bm, bn in ((16, 64), (32, 64), (32, 128), (64, 64), (64, 128)) for warps in (4, 8) for stages in (2, 3)],
)


@_autotune(DKDV_CONFIGS, key=["T", "D", "CAUSAL", "DOC_MASK"])
@_jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END, sqb, sqh, sqt, skb, skh, skt,
                          svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, sm_scale, qk_scale,
                          H, T, D, GROUP, CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr, DOC_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, bkv = tl.program_id(0), tl.program_id(1)  # grid: (key tiles, B * H_kv)
    H_kv = H // GROUP
    b, kvh = (bkv // H_kv).to(tl.int64), (bkv % H_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # causal: query tiles before lo cannot see these keys; tiles in [lo, mid) straddle the diagonal
    # (masked); tiles from mid on see every key of the tile (unmasked)
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
    else:
        lo, mid = 0, 0
    hi = T
    DOCS = DOC_START + b * T
    doc_k = tl.zeros([BLOCK_N], tl.int32)
    if DOC_MASK:
        doc_k = tl.load(DOCS + offs_n, mask=offs_n < T, other=-2)
        # Skip the query tiles after the last key's document (the forward's skip seen from the keys):
        # a query i >= DOC_END[last key] lies in a later document than every key of this tile, so
        # its P_ij = 0 for all of them and it adds exactly zero to dK and dV.
        hi = tl.load(DOC_END + b * T + tl.minimum(start_n + BLOCK_N, T) - 1)
    for g in range(GROUP):  # the query heads sharing this K/V head all add to its gradient
        h = kvh * GROUP + g
        Qh, DOh = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh
        row0 = (b * H + h) * T  # LSE and DELTA are (B, H, T) contiguous
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, sqt, sdot, offs_n, offs_d,
                                      lo, mid, qk_scale, T, D, DOCS, doc_k, True, CAUSAL, BLOCK_M, UPCAST, PRECISION,
                                      DOC_MASK)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, sqt, sdot, offs_n, offs_d,
                                      mid, hi, qk_scale, T, D, DOCS, doc_k, False, CAUSAL, BLOCK_M, UPCAST, PRECISION,
                                      DOC_MASK)
    dk = dk * sm_scale  # dK = scale * dS^T Q: the scale sits on S = scale * Q K^T
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


# EXERCISE: flash-backward
@_jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, lo, hi, qk_scale, T, D,
                       DOCS, doc_q, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, DOC_MASK: tl.constexpr):
    """Accumulate dQ for this query tile over key tiles [lo, hi): dQ += dS K."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if DOC_MASK:
            doc_k = tl.load(DOCS + offs_n, mask=offs_n < T, other=-2)
            s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


DQ_CONFIGS = _config(
    {"BLOCK_M": 32, "BLOCK_N": 16},
    [({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages)
     for bm, bn in ((64, 16), (64, 32), (128, 32), (128, 64), (64, 64)) for warps in (4, 8) for stages in (2, 3)],
)


@_autotune(DQ_CONFIGS, key=["T", "D", "CAUSAL", "DOC_MASK"])
@_jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                        sdob, sdoh, sdot, sdqb, sdqh, sdqt, sm_scale, qk_scale, H, T, D, GROUP,
                        CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, DOC_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)  # grid: (query tiles, B * H)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    kvh = h // GROUP
    K, V = K + b * skb + kvh * skh, V + b * svb + kvh * svh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    row0 = bh.to(tl.int64) * T
    lse = tl.load(LSE + row0 + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row0 + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # the same two stages as the forward
        mid, hi = start_m // BLOCK_N * BLOCK_N, tl.minimum(T, start_m + BLOCK_M)
    else:
        mid, hi = T // BLOCK_N * BLOCK_N, T
    lo = 0
    DOCS = DOC_START + b * T
    doc_q = tl.zeros([BLOCK_M], tl.int32)
    if DOC_MASK:  # the forward's skip: key tiles before the first query's document hold only P = 0
        doc_q = tl.load(DOCS + offs_m, mask=offs_m < T, other=-1)
        lo = tl.load(DOCS + start_m) // BLOCK_N * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, lo, mid, qk_scale, T, D,
                            DOCS, doc_q, False, CAUSAL, BLOCK_N, UPCAST, PRECISION, DOC_MASK)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, offs_d, mid, hi, qk_scale, T, D,
                            DOCS, doc_q, True, CAUSAL, BLOCK_N, UPCAST, PRECISION, DOC_MASK)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# ----------------------------------------------------------------------------------------------
# The autograd function and its launchers


def _strides(x):
    """(batch, head, time) strides; the head dimension is made unit-stride by _last_dim_contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x):
    # model.py hands over transposed views (B, T, H, D) -> (B, H, T, D): strided rows are fine,
    # only the D axis must be contiguous for the kernels' pointer arithmetic
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_flags(q):
    """Compile-time flags shared by every attention kernel, derived from the input."""
    return dict(
        BLOCK_D=max(16, triton.next_power_of_2(q.size(-1))),  # tl.dot needs every dimension >= 16
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong (triton 3.9)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 in must mean fp32 math, not tf32
    )


def document_spans(doc_ids: torch.Tensor):
    """(B, T) document ids -> (start, end), each (B, T) int32: position t's document is the
    positions [start[t], end[t]) of its row. A document is a run of equal ids (model.document_ids
    counts end-of-text tokens, so its ids only grow and each id is one run). The start is itself a
    document id, one the kernels can also use as a bound: they compare starts to mask, and read
    start (forward, dQ) and end (dK/dV) to skip tiles."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    first = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # True where a document begins
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]  # True where a document ends
    start = torch.where(first, t, 0).cummax(dim=1).values  # the latest beginning at or before t
    end = torch.where(last, t + 1, T).flip(1).cummin(dim=1).values.flip(1)  # the earliest ending at or after t, + 1
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _flash_forward(q, k, v, causal: bool, sm_scale: float, doc_start=None):
    B, H, T, D = q.shape
    o = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # 4 bytes per row: all the backward keeps
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    docs = doc_start if doc_start is not None else lse  # without documents: a placeholder, never read
    _attn_fwd_kernel[grid](q, k, v, o, lse, docs, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                           sm_scale * LOG2E, H, T, D, H // k.size(1), CAUSAL=causal,
                           DOC_MASK=doc_start is not None, **_kernel_flags(q))
    return o, lse


def _flash_backward(q, k, v, o, lse, do, causal: bool, sm_scale: float, doc_start=None, doc_end=None):
    B, H, T, D = q.shape
    H_kv, flags = k.size(1), _kernel_flags(q)
    delta = torch.empty_like(lse)  # (B, H, T) float32
    _attn_bwd_preprocess[(triton.cdiv(T, 32), B * H)](o, do, delta, *_strides(o), *_strides(do), H, T, D,
                                                      BLOCK_M=32, BLOCK_D=flags["BLOCK_D"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (sm_scale, sm_scale * LOG2E, H, T, D, H // H_kv)
    flags["DOC_MASK"] = doc_start is not None
    start, end = (doc_start, doc_end) if doc_start is not None else (lse, lse)  # placeholders, never read
    grid_kv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, start, end, *_strides(q), *_strides(k),
                                   *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), *common,
                                   CAUSAL=causal, **flags)
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, start, *_strides(q), *_strides(k), *_strides(v),
                                *_strides(do), *_strides(dq), *common, CAUSAL=causal, **flags)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """O = softmax(scale * Q K^T + M) V with a Triton forward and backward; saves only O and LSE."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, doc_start=None, doc_end=None):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        o, lse = _flash_forward(q, k, v, causal, sm_scale, doc_start)
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
        dq, dk, dv = _flash_backward(q, k, v, o, lse, _last_dim_contiguous(do), ctx.causal, ctx.sm_scale,
                                     doc_start, doc_end)
        return dq, dk, dv, None, None, None, None


def triton_unusable_reason(t: torch.Tensor) -> str | None:
    """Why Triton cannot run on tensor t here (not installed, or a CPU tensor without the
    interpreter), or None where it can. Every entry point asks this one question."""
    if triton is None:
        return TRITON_ERROR
    if t.device.type != "cuda" and not INTERPRET:
        return "tensors are on the CPU but Triton compiles for CUDA: set TRITON_INTERPRET=1 or move them to a GPU"
    return None


def check_attention_inputs(q, k, v):
    """Raise ValueError, one line, for inputs the kernels do not handle."""
    if reason := triton_unusable_reason(q):
        raise ValueError(reason)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"k and v must be (B, H_kv, T, D) like q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.size(1) % k.size(1):
        raise ValueError(f"{q.size(1)} query heads do not divide into groups over {k.size(1)} key/value heads")
    if not 1 <= q.size(-1) <= MAX_HEAD_DIM:
        raise ValueError(f"head size {q.size(-1)} is not supported: use 1..{MAX_HEAD_DIM}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}")


def flash_attention(q, k, v, causal: bool = True, sm_scale: float | None = None, doc_ids=None):
    """FlashAttention-2 in Triton: q (B, H, T, D), k and v (B, H_kv, T, D) -> (B, H, T, D).

    H_kv may divide H (grouped-query attention, forward and backward); sm_scale defaults to
    1/sqrt(D). Any T >= 1; D in 1..128; float16/bfloat16/float32; the maths inside is float32.
    doc_ids (B, T) integers, causal only: query i reads key j only inside its own document (a run of
    equal ids, document_spans), the block-diagonal causal mask of model.document_mask.
    """
    check_attention_inputs(q, k, v)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.size(-1))
    if doc_ids is None:
        return FlashAttention.apply(q, k, v, causal, scale)
    if not causal or doc_ids.shape != (q.size(0), q.size(2)):
        raise ValueError(f"doc_ids must be (B, T) = {(q.size(0), q.size(2))} with causal=True; got "
                         f"{tuple(doc_ids.shape)}, causal={causal}")
    return FlashAttention.apply(q, k, v, causal, scale, *document_spans(doc_ids))


# ----------------------------------------------------------------------------------------------
# model.py's seam: attend("triton", q, k, v, dropout_p)

_warned = set()  # the reasons already reported in this process: each is said once, not once per layer per step


def _warn_once(reason: str):
    """One line on stderr per distinct reason and process (a warning would point at torch's frames)."""
    if reason not in _warned:
        _warned.add(reason)
        print(f"kernels.py: attention=triton falls back to torch SDPA: {reason}", file=sys.stderr)


def fallback_reason(q, dropout_p: float) -> str | None:
    """Why the Triton kernel cannot serve this call, or None if it can."""
    if reason := triton_unusable_reason(q):
        return reason
    if dropout_p > 0:
        return f"the Triton kernel has no attention dropout (dropout_p={dropout_p}); train with --dropout 0 to use it"
    if q.size(-1) > MAX_HEAD_DIM:
        return f"head size {q.size(-1)} is above the kernel's {MAX_HEAD_DIM}"
    return None


@torch.compiler.disable  # torch.compile would trace into the launcher; run the kernels as they are
def triton_attention_backend(q, k, v, dropout_p: float = 0.0, *, fallback, doc_ids=None):
    """Causal attention for model.attend: q (B, nh, T, hs), k/v (B, n_kv, T, hs) -> (B, nh, T, hs);
    doc_ids (B, T): --doc_mask's document numbers (flash_attention's document mask).

    Uses flash_attention, or `fallback` (model.py passes its sdpa_attention) where the kernel cannot
    serve the call, saying why once per process.
    """
    reason = fallback_reason(q, dropout_p)
    if reason is not None:
        _warn_once(reason)
        return fallback(q, k, v, dropout_p) if doc_ids is None else fallback(q, k, v, dropout_p, doc_ids=doc_ids)
    return flash_attention(q, k, v, causal=True, doc_ids=doc_ids)


# ----------------------------------------------------------------------------------------------
# Fused linear + cross-entropy. One program per row of a chunk of logits.


# EXERCISE: cross-entropy (tests/test_kernels.py -k 'fused_linear_cross_entropy_and_gradients or every_target_ignored or logits_in_the_thousands')
@_jit
def _ce_rows_kernel(LOGITS, TARGETS, LOSS, stride_row, V, ignore_index, z_coef, BLOCK_V: tl.constexpr):
    """Per row: loss = LSE - logit[target] + z_coef LSE^2; logits overwritten by its gradient,
    softmax (1 + 2 z_coef LSE) - onehot(target) (d LSE / d logit = softmax, so the z-loss PaLM
    adds, z_coef (log Z)^2, contributes 2 z_coef LSE softmax).

    Two passes over the row's V logits in tiles of BLOCK_V: the online max/sum (the recurrence of
    the attention kernel with no value vectors), then the gradient. Ignored rows get 0 and 0.
    """
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max and sum, merged at the end
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen only padding (V < BLOCK_V) keeps m = -inf, and exp(-inf - -inf) is
        # NaN: re-base such lanes on 0 instead, where exp(-inf - 0) = 0 gives the right empty sum
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.math.exp2((m - base) * 1.4426950408889634) + tl.math.exp2((x - base) * 1.4426950408889634)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.math.log2(tl.sum(s * tl.math.exp2((m - m_row) * 1.4426950408889634), 0)) / 1.4426950408889634
    valid = target != ignore_index
    target_logit = tl.load(ptr + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target_logit + z_coef * lse * lse, 0.0))
    softmax_factor = 1.0 + 2.0 * z_coef * lse
    for start in range(0, V, BLOCK_V):  # second pass: the gradient d loss_row / d logits, in place
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
        grad = tl.math.exp2((x - lse) * 1.4426950408889634) * softmax_factor - tl.where(offs == target, 1.0, 0.0)
        grad = tl.where(valid, grad, 0.0)
        tl.store(ptr + offs, grad.to(LOGITS.dtype.element_ty), mask=offs < V)


def _ce_block_v(V: int) -> int:
    # a GPU program holds one BLOCK_V tile in registers: 4096 float32 lanes over 8 warps is 16 per
    # thread (Liger uses up to 32768 with 32 warps); 256 keeps the interpreter's numpy arrays small
    return min(256 if INTERPRET else 4096, triton.next_power_of_2(V))


def default_chunk_size(N: int, C: int, V: int) -> int:
    """Rows per chunk such that a chunk's (chunk, V) logits hold about as many elements as x's (N, C).
    Plain integer arithmetic (the next power of two of ceil(N / ceil(V / C))), so the torch version
    below can use it where Triton is not importable."""
    rows = -(-N // -(-V // C))  # ceil(N / ceil(V / C)); -(-a // b) is ceil(a / b) for integers
    return max(1, 1 << (rows - 1).bit_length()) if rows > 0 else 1


# EXERCISE: fused-ce-chunk (tests/test_kernels.py -k 'fused_linear_cross_entropy_and_gradients or only_ever_holds or logits_in_the_thousands')
def _linear_ce_forward(x, weight, targets, ignore_index: int, chunk_size: int, with_grads: bool = True, z_loss: float = 0.0):
    """(loss, grad_x, grad_w) chunk by chunk; without with_grads (evaluation) the two matmuls and the
    gradients' memory are skipped, and the gradients are None."""
    N, V = x.size(0), weight.size(0)
    if with_grads:
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)  # accumulated over chunks
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    for start in range(0, N, chunk_size):
        end = min(N, start + chunk_size)
        x_chunk = x[start:end]  # (n, C)
        logits = x_chunk @ weight.t()  # (n, C) x (C, V) -> (n, V): the only logits that ever exist
        _ce_rows_kernel[(end - start,)](logits, targets[start:end], losses[start:end], logits.stride(0), V,
                                        ignore_index, float(z_loss), BLOCK_V=_ce_block_v(V), num_warps=1 if INTERPRET else 8)
        if with_grads:
            grad_logits = logits  # overwritten in place: (n, V) of softmax - onehot
            grad_x[start:end] = grad_logits @ weight  # (n, V) x (V, C) -> (n, C)
            grad_w += grad_logits.t() @ x_chunk  # (V, n) x (n, C) -> (V, C), added in float32 in place
    n_valid = (targets != ignore_index).sum()  # a tensor: no host sync; 0 valid rows gives 0/0 = nan, like torch
    loss = losses.sum() / n_valid
    if not with_grads:
        return loss, None, None
    grad_x = (grad_x.float() / n_valid).to(x.dtype)
    grad_w = (grad_w / n_valid).to(weight.dtype)
    return loss, grad_x, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of x @ weight^T against targets; the gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_size, with_grads, z_loss=0.0):
        # with_grads is decided by the caller: inside forward autograd is off, and needs_input_grad
        # stays True under torch.no_grad() (evaluation), which would waste the two gradient matmuls
        loss, grad_x, grad_w = _linear_ce_forward(x, weight, targets, ignore_index, chunk_size, with_grads, z_loss)
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        # the loss is a scalar, so its gradient is grad_loss times the stored ones (chain rule)
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None


def fused_linear_cross_entropy(x, weight, targets, ignore_index: int = -1, chunk_size: int | None = None,
                               z_loss: float = 0.0):
    """F.cross_entropy(x @ weight^T, targets, ignore_index) without the (N, V) logits in memory,
    plus z_loss * mean((log Z)^2) over the same rows when z_loss > 0 (model.z_loss's term).

    x (N, C), weight (V, C), targets (N,) int64 -> scalar mean loss over targets != ignore_index.
    chunk_size rows of logits exist at a time (default: default_chunk_size).
    """
    if reason := triton_unusable_reason(x):
        raise ValueError(reason)
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1) or targets.shape != (x.size(0),):
        raise ValueError(f"need x (N, C), weight (V, C), targets (N,); got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    N, C, V = x.size(0), x.size(1), weight.size(0)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, C, V)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    with_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(x, weight.to(x.dtype), targets.contiguous(), ignore_index, chunk, with_grads, z_loss)


def reference_linear_cross_entropy(x, weight, targets, ignore_index: int = -1):
    """The plain version: the full (N, V) logits, upcast to float32, then torch's cross-entropy."""
    return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=ignore_index)


def _chunk_loss_sum(x_chunk, weight, targets_chunk, ignore_index: int, z_loss: float = 0.0):
    # the (n, V) logits of one chunk, in float32 for the log-softmax as in model.GPT.forward, summed
    logits = (x_chunk @ weight.t()).float()
    loss = F.cross_entropy(logits, targets_chunk, ignore_index=ignore_index, reduction="sum")
    if z_loss:  # z_loss (log Z)^2 per counted row, summed like the cross-entropy
        loss = loss + z_loss * (torch.logsumexp(logits, dim=-1).square() * (targets_chunk != ignore_index)).sum()
    return loss


def chunked_linear_cross_entropy(x, weight, targets, ignore_index: int = -1, chunk_size: int | None = None,
                                 z_loss: float = 0.0):
    """The fused loss in plain torch: the same value, at most one chunk of (chunk, V) logits alive.

    x (N, C), weight (V, C), targets (N,) -> mean cross-entropy over targets != ignore_index. Each
    chunk runs under torch.utils.checkpoint (use_reentrant=False): the forward keeps only its
    inputs, and the backward makes that chunk's logits again, takes their gradient and drops them.
    """
    N, C, V = x.size(0), x.size(1), weight.size(0)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, C, V)
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, N, chunk):
        total = total + torch.utils.checkpoint.checkpoint(_chunk_loss_sum, x[start:start + chunk], weight,
                                                          targets[start:start + chunk], ignore_index, z_loss,
                                                          use_reentrant=False)
    return total / (targets != ignore_index).sum()  # a tensor, no host sync; no valid target gives nan, like torch


@torch.compiler.disable  # a graph break: torch.compile must not trace into the Triton launcher or the checkpoints
def linear_cross_entropy(x, weight, targets, ignore_index: int = -1, z_loss: float = 0.0):
    """model.py's fused loss (GPTConfig.fused_ce): F.cross_entropy(x @ weight^T, targets) without the (N, V) logits.

    The Triton kernel where it compiles (a CUDA GPU); elsewhere the chunked torch version, since the
    interpreter is exact but runs one row at a time in numpy, far too slow to train with.
    """
    if x.is_cuda and triton_unusable_reason(x) is None and not INTERPRET:
        return fused_linear_cross_entropy(x, weight, targets, ignore_index, z_loss=z_loss)
    return chunked_linear_cross_entropy(x, weight, targets, ignore_index, z_loss=z_loss)


# ----------------------------------------------------------------------------------------------
# FP8 matmuls with per-tensor scaling (Micikevicius et al. 2022), applied to a model from outside

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2  # activations and weights; gradients (the paper's choice)
AMAX_FLOOR = 1e-12  # an all-zero tensor would give scale = max / 0; torchao clamps amax at the same 1e-12


def quantize_fp8(x: torch.Tensor, fp8_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x8, inv_scale) with x ~ x8 * inv_scale; the scale maps amax(|x|) onto the format's largest value."""
    fp8_max = torch.finfo(fp8_dtype).max  # 448 for E4M3, 57344 for E5M2
    amax = x.detach().abs().amax().float().clamp(min=AMAX_FLOOR)  # one read of x (and a tiny reduction)
    scale = fp8_max / amax
    # clamp first: the cast would turn anything past fp8_max into NaN (E4M3 has no infinity)
    x8 = (x.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)  # one read, one 1-byte write
    return x8, scale.reciprocal()


def dequantize_fp8(x8: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    return x8.float() * inv_scale


def fp8_matmul(a8, a_inv_scale, b8, b_inv_scale, out_dtype, fast_accum: bool, emulate: bool) -> torch.Tensor:
    """(a8 * a_inv_scale) @ (b8 * b_inv_scale): a (M, K) row-major, b (K, N) column-major, result (M, N).

    torch._scaled_mm does it on the tensor cores; emulate=True dequantizes to float32 and uses a
    plain matmul (the same rounding of the inputs, for checking the scaling where there are no FP8 units).
    fast_accum lets Hopper accumulate at lower precision inside a K-block (torchao's default uses it
    for the forward only and keeps full float32 accumulation for the two gradient matmuls).
    """
    if emulate:
        with torch.autocast(a8.device.type, enabled=False):  # the product itself must stay float32
            return (dequantize_fp8(a8, a_inv_scale) @ dequantize_fp8(b8, b_inv_scale)).to(out_dtype)
    return torch._scaled_mm(a8, b8, scale_a=a_inv_scale, scale_b=b_inv_scale, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same (R, C) matrix stored column by column (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


class Float8Matmul(torch.autograd.Function):
    """x (N, K) @ weight (M, K)^T with both operands cast to E4M3, and the output gradient to E5M2."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype, emulate):
        x8, x_inv = quantize_fp8(x.contiguous(), E4M3)  # (N, K) row-major, as _scaled_mm wants its first operand
        w8, w_inv = quantize_fp8(weight, E4M3)  # (M, K); w8.t() is (K, M) column-major, as _scaled_mm wants
        # the backward reuses the fp8 copies: 1 byte per element kept instead of x's 2 or 4
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_dtype, ctx.w_dtype, ctx.emulate = x.dtype, weight.dtype, emulate
        return fp8_matmul(x8, x_inv, w8.t(), w_inv, out_dtype, fast_accum=True, emulate=emulate)  # (N, M)

    @staticmethod
    def backward(ctx, grad_out):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = quantize_fp8(grad_out.contiguous(), E5M2)  # (N, M): gradients need range more than precision
        # dX = dY W: (N, M) x (M, K)
        grad_x = fp8_matmul(g8, g_inv, column_major(w8), w_inv, ctx.x_dtype, fast_accum=False, emulate=ctx.emulate)
        # dW = dY^T X: (M, N) x (N, K), accumulated in float32 for the float32 master weights
        grad_w = fp8_matmul(g8.t().contiguous(), g_inv, column_major(x8), x_inv, torch.float32, fast_accum=False,
                            emulate=ctx.emulate)
        return grad_x, grad_w.to(ctx.w_dtype), None, None


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in FP8 (Float8Matmul); the bias is added in the output's precision."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, emulate: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.emulate = emulate

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool = False) -> "Float8Linear":
        with torch.device("meta"):  # no memory for weights that are replaced on the next line
            fp8 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, emulate=emulate)
        # the same Parameter objects: the optimizer, checkpoints and weight tying see no change
        fp8.weight, fp8.bias = linear.weight, linear.bias
        return fp8

    def forward(self, x):
        # under autocast the output has the autocast dtype, as nn.Linear's would
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x2d = x.reshape(-1, x.size(-1))  # (B, T, K) -> (B T, K)
        if not self.emulate and (x2d.size(0) % 16 or self.in_features % 16 or self.out_features % 16):
            raise ValueError(f"FP8 matmuls need every dimension a multiple of 16 (torch._scaled_mm); got tokens "
                             f"{x2d.size(0)}, in {self.in_features}, out {self.out_features}: change --batch_size, "
                             "--block_size or the widths")
        y = Float8Matmul.apply(x2d, self.weight, out_dtype, self.emulate).view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def convert_to_float8(module: nn.Module, emulate: bool = False) -> int:
    """Swap every nn.Linear inside module (in place) for a Float8Linear with the same parameters;
    returns how many. Call it on the blocks (model.transformer.h): the output layer stays in 16 bits,
    as torchao recommends, since the logits feed a softmax over the whole vocabulary."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Float8Linear.from_linear(child, emulate))
                swapped += 1
    return swapped


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on this device, or None where they can."""
    if device.type != "cuda":
        return (f"FP8 matmuls need a CUDA GPU with compute capability >= 8.9 (L4, RTX 4090, H100, H200); "
                f"this run is on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"FP8 matmuls need compute capability >= 8.9 (Ada or Hopper); {torch.cuda.get_device_name(device)} "
                f"has {major}.{minor}")
    return None


# ----------------------------------------------------------------------------------------------
# Benchmarks: the README's four shapes on a GPU; a tiny run through the same code in the interpreter.

# (B, H, T, D): GPT-2 small's attention at batch 16, then longer contexts at head sizes 64 and 128
BENCH_SHAPES = [(16, 12, 1024, 64), (4, 32, 4096, 64), (4, 16, 4096, 128), (1, 16, 16384, 128)]
SMOKE_SHAPES = [(1, 2, 40, 16)]  # the interpreter runs one program at a time: keep it tiny


def attention_flops(B: int, H: int, T: int, D: int, backward: bool) -> float:
    """Causal: 4*B*H*T^2*D/2 forward; the backward is 2.5x that (five matmuls to the forward's two):
    the useful FLOPs as FlashAttention counts them. Our kernels execute seven in the backward (both
    recompute S and dP): with backward=True the tensor cores ran at 4.5/3.5 of the TFLOP/s this gives."""
    forward = 4 * B * H * T * T * D / 2
    return forward * (3.5 if backward else 1.0)


def _time_ms(fn, cuda: bool) -> float:
    """Median milliseconds of fn()."""
    if cuda:
        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):  # the interpreter: wall clock, a median of 3 (this only proves the code path runs)
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _sdpa_with(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def attention_contenders() -> dict:
    return {
        "ours": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "sdpa-flash": _sdpa_with("FLASH_ATTENTION"),
        "sdpa-cudnn": _sdpa_with("CUDNN_ATTENTION"),
        "naive": lambda q, k, v: reference_attention(q, k, v, causal=True),
    }


def _measure(fn, q, k, v, do, cuda: bool):
    """(forward ms, forward+backward ms), or None where the contender cannot run (OOM, no backend)."""
    try:
        fwd = _time_ms(lambda: fn(q, k, v), cuda)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(do)

        return fwd, _time_ms(fwd_bwd, cuda)
    except RuntimeError:  # no kernel for this device/dtype, or out of memory
        if cuda:
            torch.cuda.empty_cache()
        return None


def bench_attention(shapes, device: str, dtype):
    """Print, per shape, median forward and forward+backward times and TFLOP/s of each contender."""
    cuda = device == "cuda"
    print(f"causal attention, {dtype}, {torch.cuda.get_device_name() if cuda else 'CPU (Triton interpreter)'}")
    print(f"{'B,H,T,D':>18} {'kernel':>11} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} {'f+b TF/s':>9}")
    rows = []
    for B, H, T, D in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        results = {}
        for name, fn in attention_contenders().items():
            results[name] = _measure(fn, q, k, v, do, cuda)
            rows.append(((B, H, T, D), name, results[name]))
            print(_bench_line((B, H, T, D), name, results[name]))
        ours, ref = results["ours"], results["sdpa-flash"]
        if ours and ref:
            print(f"{'':>18} ours/sdpa-flash time: fwd {ours[0] / ref[0]:.2f}x, fwd+bwd {ours[1] / ref[1]:.2f}x"
                  " (below 1: ours is faster)")
        del q, k, v, do
    return rows


def _bench_line(shape, name, result) -> str:
    label = ",".join(map(str, shape))
    if result is None:
        return f"{label:>18} {name:>11} {'n/a':>9} {'n/a':>9} {'n/a':>9} {'n/a':>9}"
    fwd, fwd_bwd = result
    tf = lambda ms, bwd: attention_flops(*shape, backward=bwd) / (ms * 1e-3) / 1e12  # noqa: E731
    return f"{label:>18} {name:>11} {fwd:9.3f} {tf(fwd, False):9.1f} {fwd_bwd:9.3f} {tf(fwd_bwd, True):9.1f}"


def bench_cross_entropy(N: int, C: int, V: int, device: str, dtype):
    """Forward+backward time and peak memory of the fused linear+CE vs linear then F.cross_entropy."""
    cuda = device == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = (0.02 * torch.randn(V, C, device=device, dtype=dtype, generator=gen)).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=gen)
    print(f"linear + cross-entropy, N={N} C={C} V={V}, {dtype}")
    results = {}
    for name, fn in (("fused", fused_linear_cross_entropy), ("torch", reference_linear_cross_entropy)):
        def step():
            x.grad = w.grad = None
            fn(x, w, t).backward()

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        try:
            ms = _time_ms(step, cuda)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
            results[name] = (ms, peak)
            print(f"{name:>8}: fwd+bwd {ms:9.3f} ms, peak extra memory {peak:9.1f} MiB")
        except RuntimeError:  # out of memory (a RuntimeError) or no kernel
            results[name] = None
            print(f"{name:>8}: n/a (out of memory or no kernel)")
    return results


# ----------------------------------------------------------------------------------------------
# Command line


def demo():
    """Check one small case against the reference, forward and backward, and print the errors."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qd, kd, vd = (t.to(device, torch.float32).requires_grad_() for t in (q, k, v))
    o = flash_attention(qd, kd, vd, causal=True)
    o.backward(torch.ones_like(o))
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ref = reference_attention(q, k, v, causal=True)
    ref.backward(torch.ones_like(ref))
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    print(f"flash_attention vs float64 reference, (1, 2, 37, 32) causal float32 on {device}"
          f"{' (Triton interpreter)' if INTERPRET else ''}: relative error O {rel(o, ref):.1e}, dQ "
          f"{rel(qd.grad, q.grad):.1e}, dK {rel(kd.grad, k.grad):.1e}, dV {rel(vd.grad, v.grad):.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Triton FlashAttention and fused linear+cross-entropy. Without flags: check one small case "
                    "against the float64 reference and print the errors.")
    parser.add_argument("--bench", action="store_true",
                        help="time ours vs SDPA (flash, cuDNN) and naive at the README's four shapes, and the fused CE (needs CUDA)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="with --bench: run the benchmark code on tiny shapes in the Triton interpreter")
    args = parser.parse_args(argv)
    try:
        if triton is None:
            raise ValueError(TRITON_ERROR)
        if not args.bench:
            demo()
        elif args.cpu_smoke:
            if not INTERPRET:
                raise ValueError("--cpu-smoke runs in the Triton interpreter: set TRITON_INTERPRET=1")
            bench_attention(SMOKE_SHAPES, "cpu", torch.float32)
            bench_cross_entropy(16, 16, 300, "cpu", torch.float32)
        elif not torch.cuda.is_available() or INTERPRET:
            raise ValueError("--bench needs a CUDA GPU (and TRITON_INTERPRET unset); on a CPU try --bench --cpu-smoke")
        else:
            bench_attention(BENCH_SHAPES, "cuda", torch.bfloat16)
            bench_cross_entropy(16 * 1024, 768, 50304, "cuda", torch.bfloat16)  # GPT-2 small's head, batch 16 x 1024
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
