"""
The GPT: a decoder-only transformer language model, built from its smallest piece up.

What it does
------------
A language model assigns a probability to the next token given the ones before it:

    p(x_1 .. x_T) = prod_t p(x_t | x_<t)

GPT (Radford et al. 2018; GPT-2, Radford et al. 2019) computes every factor at once. Tokens are
embedded into vectors of width C, a stack of L identical blocks mixes information between
positions (attention) and within a position (an MLP), and a final linear map turns each position's
vector back into V logits over the vocabulary. Training minimises the cross-entropy between those
logits and the actual next token, at every position in parallel.

One block, "pre-LayerNorm" (GPT-2 moved the norm in front of each sub-layer, which keeps a clean
residual path from input to output and lets deep stacks train without warm-up tricks):

    x = x + Attention(LN_1(x))
    x = x + MLP(LN_2(x))

Causal self-attention (Vaswani et al. 2017, arXiv:1706.03762), for each of nh heads of size hs:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(hs) + M) V,   M[i, j] = -inf where j > i

The mask M is what makes the model a *causal* language model: position i may only read positions
<= i, so the prediction for token i+1 never sees it. A test checks exactly that property.

The MLP is two linear maps with a GELU between them (tanh approximation, as GPT-2 shipped it),
widening C -> 4C -> C.

GPT-2 exactly as published
--------------------------
Learned absolute position embeddings (wpe), LayerNorm with bias, GELU(tanh), biases on every linear
layer, and the output layer tied to the token embedding (Press & Wolf 2017, arXiv:1608.05859: the
same V x C matrix reads tokens in and writes logits out, saving V*C parameters). Initialisation:
N(0, 0.02) everywhere, and the projections that write into the residual stream (attn.c_proj,
mlp.c_proj) scaled by 1/sqrt(2L), because each of the 2L sub-layers adds to the same residual
and the variance of a sum grows with the number of terms (GPT-2 paper, sec. 2.3). Module names
follow the GPT-2 checkpoint, so `from_hf_state_dict` maps Hugging Face's weights one to one (its
Conv1D layers store weights as (in, out), the transpose of nn.Linear's (out, in)).

Modern options (each off by default, each a GPTConfig field)
------------------------------------------------------------
- RoPE (Su et al. 2021, arXiv:2104.09864): instead of adding a position vector to the input,
  rotate each (q, k) pair of channels by an angle proportional to the position. Then
  q_m . k_n depends only on m - n: attention sees relative position, for free.
- RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): LayerNorm without the mean subtraction and
  bias, x / sqrt(mean(x^2) + eps) * g. Cheaper, and as good in practice (LLaMA uses it).
- SwiGLU MLP (Shazeer 2020, arXiv:2002.05202): (SiLU(x W_gate) * (x W_up)) W_down. A gated MLP;
  its hidden width is 2/3 of 4C, rounded up to a multiple of 64, so it has about the GELU MLP's
  parameter count (exactly when 8C/3 is a multiple of 64, as at C = 768; 12.5% more at C = 128).
- Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): n_kv_head < n_head key/value
  heads, each shared by n_head/n_kv_head query heads. It shrinks the KV cache at inference by the
  same factor; n_kv_head = 1 is multi-query attention (Shazeer 2019).

Mixture of experts (moe_experts > 0)
------------------------------------
The MLP of every moe_every-th block becomes an MoE layer (Shazeer et al. 2017, arXiv:1701.06538;
GShard; Switch): E expert MLPs, a linear router that scores them for each token, and only the k
best-scored experts run on it, their outputs weighed by the scores:

    y = sum over the top k experts i of w_i MLP_i(x)   (+ MLP_shared(x), the shared experts)

Parameters grow with E, the work per token with k: an 8-expert top-2 layer holds 8 MLPs and runs 2.
The router is softmax top-k (Switch, OLMoE) or sigmoid top-k normalised (DeepSeek-V3); experts may
be narrower than the dense MLP (fine-grained) and some may be shared by every token (DeepSeekMoE).
A router left alone overloads a few experts: MoE's docstring gives the two cures (the auxiliary
loss, and the loss-free bias that train.py updates after each step) and the capacity option.
`MoE.forward_loop` is the version to read; the fast path sorts the token-expert slots by expert
and runs every expert as one grouped matmul (torch._grouped_mm, or a padded torch.bmm), equal up
to rounding (tests). `MoE.dispatch` is the seam where parallel.py's expert parallelism sends the
sorted tokens to the ranks that hold their experts. With one expert and k = 1 it is the dense MLP.

The modern recipe (README, "Modern recipe"; each also off by default)
---------------------------------------------------------------------
- QK-norm (Dehghani et al. 2023, arXiv:2302.05442; OLMo 2): RMSNorm on every head's q and k, so
  attention logits stay bounded.
- ReLU^2 MLP (So et al. 2021, Primer, arXiv:2109.08668): max(0, x W_fc)^2 W_proj, GELU's shape.
- Logit soft-capping (Gemma 2): logits -> cap tanh(logits / cap).
- z-loss (PaLM, arXiv:2204.02311): + coef * mean(log^2 Z) in training, so log Z stays near 0.
- Document masking: a packed window attends only within each document (end-of-text starts one),
  positions restarting per document.
- Multi-token prediction (Gloeckle et al. 2024, arXiv:2404.19737): extra heads, a block each,
  predicting tokens t+2, t+3, ...; used in training only. --mtp_style sequential chains them as
  DeepSeek-V3 does (arXiv:2412.19437): depth k reads depth k-1's hidden state and the embedding of
  token t+k (MTPModule).

Attention backends
------------------
`naive` writes the masked softmax out (the one to read), `sdpa` calls torch's
scaled_dot_product_attention (fused kernels: FlashAttention or memory-efficient attention where
the hardware allows), `flex` calls torch's FlexAttention with a BlockMask (Dong et al. 2024,
arXiv:2412.05496), which on a GPU skips the tiles of the score matrix that the causal and document
masks hide wholly. All take q (B, nh, T, hs) and k, v (B, n_kv, T, hs) and return (B, nh, T, hs):
that function signature is the seam where kernels.py adds a Triton backend.

Two options that change how, not what
-------------------------------------
`fused_ce` computes the loss from the final hidden states a chunk of rows at a time
(kernels.linear_cross_entropy), so the (B, T, V) logits, the largest activation of a small model,
are never stored. `activation_checkpointing` keeps only each block's input and runs the block's
forward again during the backward (torch.utils.checkpoint; Chen et al. 2016, arXiv:1604.06174):
less memory for one more forward pass. Both give the loss and gradients of the plain path up to
rounding (tests check it); `python train.py --bench_ablation` measures what each costs and saves.

Generating text: the KV cache, top-k and top-p
----------------------------------------------
`generate` samples one token at a time. Recomputing the whole context for each new token costs a
forward pass over T positions per token; but in a causal model the keys and values of a position
never change once computed (they depend only on tokens at or before it), so `KVCache` keeps them
per layer and each new token needs one position's forward pass plus attention over the stored keys
(`cached_attention`, whose causal mask is shifted by the number of cached positions). That is
exact: greedy decoding gives the same tokens with and without it (a test, over a window that fills
and slides). Once the sequence outgrows block_size the window slides, every kept token moves to a
new position, and both paths recompute the window. The next token is drawn from the softmax of
logits / temperature, optionally restricted to the k most likely tokens (top-k, Fan et al. 2018)
and to the nucleus, the fewest most likely tokens holding probability >= p (top-p, Holtzman et al.
2020, arXiv:1904.09751). `python model.py --bench_generate` times both paths.

The model in the Hugging Face format
------------------------------------
`python model.py export --ckpt out/ckpt.pt --out DIR` writes a directory that transformers'
from_pretrained and lm-eval-harness read (tested; vLLM takes the same directories, not run here):
GPT-2-shaped models as GPT2LMHeadModel (a model without biases gets zero biases, the same
function), RoPE + RMSNorm + SwiGLU models (with any number of key/value heads, tied or not) as
LlamaForCausalLM, and the tokenizer as a tokenizer.json that splits and merges exactly as tiktoken does. `GPT.from_pretrained_dir(DIR)` reads such a
directory back (also one that transformers saved), refusing in one line a shape GPTConfig cannot
express. Tests check logits against transformers to 1e-4 in float32 and token ids on random text.
An MoE, QK-norm, soft-capped logits and a --doc_mask model (attention by document, positions
restarting at each end-of-text) have no such class: export refuses them in one line.

Map of this file, in reading order
----------------------------------
GPTConfig, MODEL_PRESETS -> LayerNorm, RMSNorm -> rope_cache, apply_rope -> naive_attention,
sdpa_attention, document masking, flex_attention (flex_block_mask), attend, cached_attention ->
CausalSelfAttention -> MLP -> mixture of experts (grouped_matmul, Experts, init_experts, MoE) -> Block -> MTPModule ->
GPT (init, forward, the MTP losses, parameter count, generate, GPT-2 and Llama state dicts,
from_pretrained_dir) -> KVCache, filter_logits -> the Hugging Face directory (config.json, weights,
tokenizer.json, export_hf) -> a small command line (--device's check, which train.py and evaluate.py
use too; describe a preset, --bench_generate, export).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """The shape of the model. Field names follow nanoGPT's where they exist."""

    vocab_size: int = 50304  # V: number of token ids (GPT-2's 50257, padded to a multiple of 64 by nanoGPT)
    block_size: int = 1024  # T_max: longest context the model can attend over
    n_layer: int = 12  # L: number of transformer blocks
    n_head: int = 12  # nh: attention (query) heads per block
    n_embd: int = 768  # C: width of the residual stream; head size hs = C / nh
    dropout: float = 0.0  # dropout on attention weights and residual branches (0 for pretraining)
    bias: bool = True  # biases in Linear layers and LayerNorm, as GPT-2 had them
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 means n_head (plain multi-head)
    rope: bool = False  # rotary position embeddings instead of learned absolute positions
    rope_theta: float = 10000.0  # RoPE base frequency (Su et al. 2021)
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (LLaMA)
    mlp: str = "gelu"  # gelu (GPT-2: C -> 4C -> C), swiglu (gated, hidden 2/3 * 4C rounded up to a multiple of 64) or relu2 (ReLU(x)^2, C -> 4C -> C; So et al. 2021, Primer)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the scores (Dehghani et al. 2023; OLMo 2)
    logit_softcap: float = 0.0  # cap the output logits smoothly at +-C: C tanh(logits / C) (Gemma 2 uses 30); 0: off
    z_loss: float = 0.0  # add COEF * mean(log^2 Z) to the training loss, Z the softmax's normaliser (PaLM: 1e-4); 0: off
    doc_mask: bool = False  # packed sequences attend only within their own document (an end-of-text token starts one), positions restarting at each (every attention backend; also with --cp, --tp, --pp and --zero 3)
    eot_id: int = -1  # the end-of-text id that starts a document (train.py sets it from the corpus for --doc_mask)
    mtp: int = 0  # multi-token prediction: N extra heads predicting tokens t+2 .. t+N+1, a transformer block each, sharing ln_f and the output layer (Gloeckle et al. 2024); training only
    mtp_style: str = "parallel"  # --mtp: parallel (Gloeckle et al. 2024: every head reads the trunk's last hidden state) or sequential (DeepSeek-V3: module k reads module k-1's hidden state and the embedding of token t+k, a causal chain)
    mtp_weight: float = 0.3  # --mtp: the training loss is the next-token loss plus this times the mean of the extra heads' losses (DeepSeek-V3's lambda: 0.3, later 0.1)
    tie_embeddings: bool = True  # share the token embedding with the output layer (GPT-2 does)
    attention: str = "sdpa"  # attention backend: naive (explicit softmax), sdpa (torch fused), flex (FlexAttention's block mask: masked tiles skipped; trains on CUDA); kernels.py adds triton
    fused_ce: bool = False  # loss from the final hidden states in chunks (kernels.linear_cross_entropy): the (B, T, V) logits are never stored
    activation_checkpointing: bool = False  # keep only each block's input and recompute its inside in the backward (less memory, one more forward)
    moe_experts: int = 0  # E: routed experts per MoE layer (0: a dense MLP in every block)
    moe_topk: int = 2  # k: experts each token is sent to (Mixtral: 2 of 8; OLMoE: 8 of 64)
    moe_every: int = 1  # an MoE layer replaces the MLP in every n-th block (blocks n-1, 2n-1, ...; GShard and Switch: every 2nd)
    moe_shared: int = 0  # S: shared experts every token passes through, beside the k routed ones (DeepSeekMoE)
    moe_expert_frac: float = 1.0  # each expert's hidden width as a fraction of the dense MLP's (below 1: fine-grained experts, DeepSeekMoE)
    moe_router: str = "softmax"  # softmax (Switch, OLMoE: the top-k softmax probabilities) or sigmoid (DeepSeek-V3: top-k sigmoid scores, normalised)
    moe_capacity: float = 0.0  # capacity factor: in training each expert takes at most ceil(factor k N / E) of the N tokens, the rest dropped (0: dropless; evaluation and sampling are always dropless)
    moe_aux: float = 0.0  # coefficient of the Switch/GShard load-balancing loss E sum_i f_i P_i (Switch: 0.01; 0: off)
    moe_zloss: float = 0.0  # coefficient of the router z-loss mean(logsumexp(logits)^2) (ST-MoE: 0.001; 0: off)
    moe_bias_update: float = 0.001  # loss-free balancing: after each step b_i += rate sign(mean load - load_i) (DeepSeek-V3: 0.001; 0: off)

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick n_embd a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: each key/value head serves a whole group of query heads")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE rotates channel pairs, so the head size must be even, not {self.n_embd // self.n_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm '{self.norm}': use layernorm or rmsnorm")
        if self.mlp not in ("gelu", "swiglu", "relu2"):
            raise ValueError(f"unknown mlp '{self.mlp}': use gelu, swiglu or relu2")
        if self.fused_ce and self.logit_softcap:
            raise ValueError("--logit_softcap with --fused_ce: the fused loss has no soft-capping; drop one of the two")
        if self.attention not in ATTENTION_BACKENDS and self.attention != "triton":
            raise ValueError(f"unknown attention backend '{self.attention}': use one of {sorted(ATTENTION_BACKENDS) + ['triton']}")
        if self.attention == "flex" and not flex_available():
            raise ValueError(f"--attention flex needs FlexAttention (torch >= 2.5), not in torch {torch.__version__}: "
                             "use --attention sdpa")
        if self.attention == "flex" and self.dropout:
            raise ValueError("--attention flex has no attention dropout: set --dropout 0 or use --attention sdpa")
        if self.moe_experts and not 1 <= self.moe_topk <= self.moe_experts:
            raise ValueError(f"--moe_topk {self.moe_topk} must be between 1 and --moe_experts {self.moe_experts}")
        if self.moe_experts and self.activation_checkpointing:
            raise ValueError("--activation_checkpointing with --moe_experts: the recomputed forward would count each "
                             "expert's load twice; drop one of the two")
        if self.mtp_style not in ("parallel", "sequential"):
            raise ValueError(f"unknown mtp_style '{self.mtp_style}': use parallel or sequential")
        if self.mtp >= self.block_size:  # head k has a target at the first T - k positions only
            raise ValueError(f"--mtp {self.mtp} with --block_size {self.block_size}: the last head would have no position "
                             "with a target; use --mtp below --block_size")
        if self.moe_router not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown moe_router '{self.moe_router}': use softmax or sigmoid")

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i holds an MoE layer instead of the MLP: every moe_every-th block."""
        return self.moe_experts > 0 and i % self.moe_every == self.moe_every - 1

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# Model sizes as plain overrides of GPTConfig. The GPT-2 family is from Radford et al. (2019),
# Table 2 (with the corrected counts from nanoGPT's README); "laptop" is ours.
MODEL_PRESETS = {
    # trains on a 2-core CPU in minutes: 0.59M parameters in the blocks, plus a 2048 x 128 token
    # embedding (train.py's BPE of 2048) and a 256 x 128 position embedding: 0.886M in all (a test).
    # Three layers and that vocabulary, not four and 4096: at this budget (1000 steps) the smaller
    # model is better per second (README, "Reference run")
    "laptop": dict(n_layer=3, n_head=4, n_embd=128, block_size=256, bias=False),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}


# ----------------------------------------------------------------------------------------------
# Normalisation


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 if it is a 16-bit float, unchanged if float32 or float64. Reductions (a norm's
    mean of squares, a softmax, a log-sum-exp) need more than bf16's 8 mantissa bits, and a float64
    model must stay float64 throughout: it is what the tests use as the exact reference."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's nn.LayerNorm cannot drop only the bias).

    y = (x - mean(x)) / sqrt(var(x) + eps) * g + b, over the last dimension (Ba et al. 2016).
    """

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    # EXERCISE: layernorm (tests/test_model.py -k 'layernorm_matches')
    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)  # eps 1e-5: GPT-2's


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019). No centring, no bias."""

    def __init__(self, ndim: int, eps: float = 1e-6):  # eps 1e-6: LLaMA's
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

    # EXERCISE: rmsnorm (tests/test_model.py -k 'rmsnorm_matches')
    def forward(self, x):
        # compute the statistic in float32 at least, even under bf16 autocast: a mean of squares
        # loses precision quickly in 8 mantissa bits (float64 stays float64: it is the tests' reference)
        xf = at_least_float32(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else LayerNorm(config.n_embd, config.bias)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_cache(block_size: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (T_max, hs/2).

    Channel pair i rotates at frequency theta^(-2i/hs): fast for the first pairs, slow for the last,
    so nearby and distant positions are both distinguishable (Su et al. 2021, eq. 15).
    """
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)  # (T_max, hs/2)
    return angles.cos().float(), angles.sin().float()  # float32 buffers: every device has float32


# EXERCISE: rope (tests/test_model.py -k 'rope_matches or rope_scores')
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by the angles for positions 0..T-1.

    The pair split is "first half with second half" (the GPT-NeoX / LLaMA-in-HF layout); any fixed
    pairing gives the same relative-position property.
    """
    T = x.size(-2)
    if cos.dim() == 2:  # a table by position (T_max, hs/2): rows 0..T-1; else already (B, 1, T, hs/2), per row
        cos, sin = cos[:T], sin[:T]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # broadcast over B and nh
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    # a 2-D rotation of every pair: [x1, x2] -> [x1 cos - x2 sin, x1 sin + x2 cos]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention backends: f(q (B, nh, T, hs), k, v (B, n_kv, T, hs), dropout_p) -> (B, nh, T, hs)


# EXERCISE: repeat-kv (tests/test_model.py -k 'repeat_kv or grouped_query_attention_equals')
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hs) -> (B, n_kv * n_rep, T, hs): each key/value head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# EXERCISE: attention (tests/test_model.py -k naive)
def naive_attention(q, k, v, dropout_p: float = 0.0, doc_ids=None):
    """softmax(Q K^T / sqrt(hs) + M) V with the causal mask written out. Materialises (B, nh, T, T).
    doc_ids (B, T): also mask every key of another document (document_mask)."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T = q.size(-2)
    # 1/sqrt(hs) keeps the logits' variance ~1 when q and k have unit-variance entries (Vaswani et al. 2017)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # True above the diagonal: j > i
    att = att.masked_fill(future, float("-inf"))  # exp(-inf) = 0: no weight on future tokens
    if doc_ids is not None:
        att = att.masked_fill(~document_mask(doc_ids), float("-inf"))
    # softmax in float32 at least (bf16's 8 mantissa bits lose small probabilities); float64 stays float64
    att = F.softmax(at_least_float32(att), dim=-1).type_as(q)
    att = F.dropout(att, p=dropout_p) if dropout_p > 0 else att
    return att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)


def sdpa_attention(q, k, v, dropout_p: float = 0.0, doc_ids=None):
    """torch's fused scaled_dot_product_attention: same maths, no (T, T) matrix kept for backward.
    doc_ids (B, T): the block-diagonal causal mask of document_mask, as a boolean attn_mask (torch
    then leaves out the FlashAttention kernel, which takes no mask)."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    if doc_ids is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids) & causal(q.size(-2), q.device),
                                              dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def causal(T: int, device) -> torch.Tensor:
    """(T, T) True on and below the diagonal: query i may read keys j <= i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# Document masking (--doc_mask). A training window is cut from a stream of documents joined by
# end-of-text tokens, so it usually holds the end of one document and the start of the next: with
# the plain causal mask, the next one's tokens attend to the previous one's, which at inference
# time never precedes it. Masking keys of other documents makes the window a batch of independent
# documents (the Llama 3 report does this; modded-nanogpt's speedrun too, with
# FlexAttention's block masks, which also skip the masked blocks' work). The end-of-text token
# starts its document: sampling starts a document the same way (train.sample_text), and the
# token after it is predicted from it alone. The naive and SDPA backends apply the (T, T) mask
# below; FlexAttention (--attention flex) writes it as a function and builds a BlockMask from it
# (flex_block_mask, after these); kernels.flash_attention (--attention triton) takes the (B, T) ids,
# masks inside each tile and skips the tiles that lie wholly in other documents; parallel.py's ring
# attention (--cp) sends each block's ids round the ring with its keys and values.


def document_ids(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) document number of each position: how many end-of-text tokens
    are at or before it, so each one starts a new document."""
    return torch.cumsum(idx == eot_id, dim=1)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document numbers -> (B, T) position of each token inside its document (0 at its first
    token): t minus the index where its document starts (the running maximum of the starts)."""
    T = doc_ids.size(1)
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = doc_ids != torch.cat([doc_ids[:, :1], doc_ids[:, :-1]], dim=1)  # (B, T) True where a document begins
    return t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document numbers -> (B, 1, T, T) True where query i and key j are in the same
    document (block-diagonal; broadcast over heads). Combined with the causal mask by the caller."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


# FlexAttention (--attention flex; Dong et al. 2024, arXiv:2412.05496; torch >= 2.5). The mask is a
# function, mask_mod(b, h, q_idx, kv_idx) -> True where query q_idx of row b may read key kv_idx, here
# "not in the future, and in the same document". create_block_mask cuts the (T, T) grid into tiles of
# 128 x 128 positions and records, per query tile, which key tiles are full (every score visible),
# which are partial (some visible) and, by leaving them out, which are empty: that record is a
# BlockMask. The fused kernel torch.compile writes for flex_attention loops over the full and
# partial tiles only, calling mask_mod element by element in the partial ones (the diagonal, a
# document's edges); an empty tile, wholly in the future or in another document, costs no load and no
# matmul. SDPA with a boolean (T, T) mask computes every tile, and leaves FlashAttention out. On the
# CPU this file calls flex_attention eagerly, unfused (the whole score matrix, the same numbers):
# torch has no CPU backward for it, compiled or not, so it evaluates and samples there, and train.py
# refuses to train with it.


def flex_available() -> bool:
    """Whether this torch has FlexAttention (torch.nn.attention.flex_attention, torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(doc_ids, T: int, device):
    """The BlockMask of the causal mask over T positions, block-diagonal by document too when doc_ids
    (B, T) is given (document_mask's, written as a function). Built anew in every layer's call: one
    evaluation of mask_mod per (row, query, key), cheap beside attention's nh hs multiply-adds per score."""
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:
        return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=device)

    def causal_same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(causal_same_document, doc_ids.size(0), None, T, T, device=device)  # None: every head alike


@functools.cache
def compiled_flex_attention():
    """flex_attention through torch.compile, once per process: on a GPU that is what writes the fused
    Triton kernel (called eagerly, torch computes the whole score matrix instead)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, dropout_p: float = 0.0, doc_ids=None):
    """FlexAttention with a BlockMask: causal, and by document with doc_ids (B, T). Grouped-query heads
    are read in place (enable_gqa), not repeated. No attention dropout (GPTConfig refuses it)."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex_attention

    if dropout_p > 0:
        raise ValueError("--attention flex has no attention dropout: set --dropout 0 or use --attention sdpa")
    block_mask, gqa = flex_block_mask(doc_ids, q.size(-2), q.device), q.size(1) != k.size(1)
    if torch.compiler.is_compiling():  # inside a compiled model (--compile): compiled with the rest of it
        return eager_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if q.device.type == "cuda":
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # torch's note that this path is unfused: chosen, on the CPU
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return eager_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


ATTENTION_BACKENDS = {"naive": naive_attention, "sdpa": sdpa_attention, "flex": flex_attention}


def attend(backend: str, q, k, v, dropout_p: float = 0.0, doc_ids=None):
    """Dispatch to an attention backend by name. `triton` lives in kernels.py, imported only when
    asked for; where its kernel cannot run (dropout, no GPU and no interpreter) it falls back to
    sdpa_attention, the one SDPA call in the project. doc_ids: --doc_mask's document numbers."""
    if backend in ATTENTION_BACKENDS:
        if doc_ids is not None:
            return ATTENTION_BACKENDS[backend](q, k, v, dropout_p, doc_ids=doc_ids)
        return ATTENTION_BACKENDS[backend](q, k, v, dropout_p)
    import kernels  # lazily: the model must not need Triton unless this backend is chosen

    return kernels.triton_attention_backend(q, k, v, dropout_p, fallback=sdpa_attention, doc_ids=doc_ids)


def cached_attention(q, k, v):
    """Causal attention for queries that come after cached positions: q (B, nh, T_q, hs) holds the
    last T_q of the T_k positions in k, v (B, n_kv, T_k, hs), so query i sits at position
    T_k - T_q + i and may read keys j <= T_k - T_q + i. The mask is the causal one moved right by
    T_k - T_q; when T_q = T_k (an empty cache) it is the plain causal mask, when T_q = 1 (one new
    token) it masks nothing. (SDPA's is_causal aligns the mask top-left, right only for T_q = T_k.)"""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T_q, T_k = q.size(-2), k.size(-2)
    allowed = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T_q)  # True: may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


# ----------------------------------------------------------------------------------------------
# The layers


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_size
        # one matmul produces q (nh heads) and k, v (n_kv heads each): (C) -> (nh + 2 n_kv) hs
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.hs, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True  # writes into the residual stream: GPT-2's 1/sqrt(2L)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend = config.attention
        if self.backend == "triton":
            # import now, not at the first forward: without a GPU, kernels.py switches Triton to its
            # CPU interpreter, which only works if it runs before anything else imports Triton
            # (creating a torch optimizer does)
            import kernels  # noqa: F401
        self.rope = config.rope
        # QK-norm: one RMSNorm of width hs shared by the heads, for queries and one for keys. It bounds
        # each score q.k / sqrt(hs) by max|g_q| max|g_k| sqrt(hs) (|q|, |k| <= max|g| sqrt(hs); a test),
        # so no logit of the softmax can grow without limit (the attention-entropy collapse behind loss
        # spikes: Dehghani et al. 2023, arXiv:2302.05442; Wortsman et al. 2023, arXiv:2309.14322);
        # OLMo 2 (arXiv:2501.00656) trains with it
        self.q_norm = RMSNorm(self.hs) if config.qk_norm else None
        self.k_norm = RMSNorm(self.hs) if config.qk_norm else None
        if config.rope:
            cos, sin = rope_cache(config.block_size, self.hs, config.rope_theta)
            # non-persistent: derived from the config, so not part of the checkpoint
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # EXERCISE: self-attention (tests/test_model.py -k 'numpy_gpt2 or grouped_query_attention_equals or causal_mask or order_of_earlier or kv_cache')
    def forward(self, x, kv_cache=None, doc_ids=None, positions=None):
        """x (B, T, C) -> (B, T, C): one projection to q (nh heads) and k, v (n_kv heads each), RoPE on
        q and k when configured, causal attention with the configured backend, the heads side by side
        again, the output projection. With a kv_cache (a LayerKV), x holds the positions after those
        already cached: their keys and values join the cache, and the queries attend over all of it.
        doc_ids, positions (B, T): --doc_mask's document numbers and positions inside documents."""
        B, T, C = x.size()
        start = kv_cache.length if kv_cache is not None else 0  # the position of x's first token
        qkv = self.c_attn(x)  # (B, T, C) -> (B, T, (nh + 2 n_kv) hs)
        q, k, v = qkv.split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.q_norm is not None:  # over each head's hs channels, before RoPE (OLMo 2's order)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:  # the angles of positions start, start+1, ... (rows start.. of the tables)
            cos, sin = self.rope_cos[start:], self.rope_sin[start:]
            if positions is not None:  # each row's own positions, restarting at every document: (B, 1, T, hs/2)
                cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:
            y = attend(self.backend, q, k, v, self.dropout if self.training else 0.0, doc_ids)  # (B, nh, T, hs)
        else:
            k, v = kv_cache.append(k, v)  # (B, n_kv, start + T, hs): every position so far
            y = cached_attention(q, k, v)  # (B, nh, T, hs)
        # re-assemble heads side by side: (B, T, C). -1, not C: under tensor parallelism (parallel.py) a rank
        # holds only nh/tp of the heads, so its y is (B, T, C/tp)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        self.swiglu, self.relu2 = config.mlp == "swiglu", config.mlp == "relu2"
        hidden = hidden or mlp_hidden(config)  # another width: an MoE's shared experts
        # for SwiGLU, c_fc holds both the gate and the up projection, side by side
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        """x (B, T, C) -> (B, T, C): GELU(x W_fc) W_proj (GPT-2), or SwiGLU (Shazeer 2020),
        (silu(x W_gate) * (x W_up)) W_proj, with W_gate and W_up side by side in c_fc (gate first)."""
        h = self.c_fc(x)  # (B, T, C) -> (B, T, hidden) or (B, T, 2 hidden)
        if self.swiglu:
            # EXERCISE BEGIN swiglu (tests/test_model.py -k 'swiglu_mlp_matches')
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # the gate decides, per channel, how much of `up` passes
            # EXERCISE END swiglu
        elif self.relu2:
            # ReLU squared (So et al. 2021, Primer, arXiv:2109.08668): found by their architecture search,
            # it beat GELU at equal compute; the modded-nanogpt speedrun uses it. Exactly zero for h < 0,
            # so most of the hidden activations are sparse
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        return self.dropout(self.c_proj(h))  # (B, T, hidden) -> (B, T, C)


def swiglu_hidden(n_embd: int) -> int:
    """2/3 of 4C, rounded up to a multiple of 64: three matrices of C x hidden then hold about as
    many parameters as GELU's two of C x 4C (Shazeer 2020), and 64 keeps the matmuls aligned."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def mlp_hidden(config: GPTConfig) -> int:
    """The MLP's hidden width H, the one place it is decided (parallel.py splits it, scaling.py
    counts it): 4C for GELU (GPT-2), swiglu_hidden(C) for SwiGLU."""
    return swiglu_hidden(config.n_embd) if config.mlp == "swiglu" else 4 * config.n_embd


# ----------------------------------------------------------------------------------------------
# Mixture of experts: E expert MLPs, k of them per token


def expert_hidden(config: GPTConfig) -> int:
    """One routed expert's hidden width: moe_expert_frac of the dense MLP's H (mlp_hidden), at least 1.
    Below 1 the experts are "fine-grained" (DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066): more,
    narrower experts at the same FLOPs when k grows by the same factor."""
    return max(1, round(config.moe_expert_frac * mlp_hidden(config)))


_GROUPED_MM_WORKS = {}  # (device type, dtype, K, N) -> whether torch._grouped_mm ran forward and backward there


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm (torch >= 2.8) runs on this device, dtype and shape: it needs rows
    aligned to 16 bytes on CUDA and bf16 on most GPUs; the CPU has a reference kernel. Tried once
    on a tiny problem of the same shape (forward and backward) and remembered."""
    if not hasattr(torch, "_grouped_mm") or torch.compiler.is_compiling():
        return False
    key = (x.device.type, x.dtype, w.size(1), w.size(2))
    if key not in _GROUPED_MM_WORKS:
        try:
            a = torch.zeros(16, w.size(1), device=x.device, dtype=x.dtype, requires_grad=True)
            b = torch.zeros(2, w.size(1), w.size(2), device=x.device, dtype=x.dtype, requires_grad=True)
            y = torch._grouped_mm(a, b, offs=torch.tensor([8, 16], device=x.device, dtype=torch.int32))
            y.backward(torch.ones_like(y))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul runs in here: autocast's (bf16 under train.py's autocast), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def padded_batched_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_matmul as one torch.bmm: the groups copied into an (E, max count, K) tensor, zero
    rows after each group's own, times w (E, K, N), and the real rows read back. Pads every group
    to the largest, so it costs E x max count rows of work: more the worse the balance."""
    n, E = x.size(0), w.size(0)
    start = counts.cumsum(0) - counts  # (E,) first row of each group
    group = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=n)  # (n,) group of each row
    slot = torch.arange(n, device=x.device) - start[group]  # (n,) row within its group
    padded = x.new_zeros(E, int(counts.max()) if n else 0, x.size(1))
    padded = padded.index_put((group, slot), x)  # (E, max count, K)
    return torch.bmm(padded, w.to(padded.dtype))[group, slot]  # (E, m, K) x (E, K, N) -> (E, m, N) -> (n, N)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (n, K) holds E consecutive groups of rows, counts[e] in group e; group e is multiplied by
    w[e] (K, N): -> (n, N). One torch._grouped_mm kernel where it runs (offsets = the groups' ends),
    else padded_batched_matmul."""
    dtype = matmul_dtype(x)
    x, w = x.to(dtype), w.to(dtype)
    if not grouped_mm_usable(x, w):
        return padded_batched_matmul(x, w, counts)
    y = torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    if y.requires_grad:  # the CPU kernel's backward refuses a broadcast (stride 0) gradient, as y.sum() gives
        y.register_hook(lambda g: g.contiguous())
    return y


class Experts(nn.Module):
    """E expert MLPs stacked: w_fc (E, C, F) with F = H (GELU) or 2H (SwiGLU: gate and up side by
    side), w_proj (E, H, C), biases (E, F) and (E, C) when config.bias. Stored (in, out), the
    transpose of nn.Linear's (out, in): w_fc[e] is expert e's first matrix as x @ w_fc[e] uses it,
    and the stack is a grouped matmul's right operand as it is. first: the global index of w_fc[0]
    (expert parallelism keeps a slice of the experts on each rank; parallel.py)."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int, swiglu: bool, bias: bool, relu2: bool = False):
        super().__init__()
        width = 2 * hidden if swiglu else hidden
        self.swiglu, self.relu2, self.first = swiglu, relu2, 0
        self.w_fc = nn.Parameter(torch.empty(n_experts, n_embd, width))
        self.w_proj = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.b_fc = nn.Parameter(torch.zeros(n_experts, width)) if bias else None
        self.b_proj = nn.Parameter(torch.zeros(n_experts, n_embd)) if bias else None

    def activation(self, h):
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.relu2:
            return F.relu(h).square()
        return F.gelu(h, approximate="tanh")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e (a local index) on its tokens x (n, C) -> (n, C): the dense MLP's maths with its own weights."""
        h = x @ self.w_fc[e] + (self.b_fc[e] if self.b_fc is not None else 0)  # (n, C) x (C, F) -> (n, F)
        return self.activation(h) @ self.w_proj[e] + (self.b_proj[e] if self.b_proj is not None else 0)  # (n, H) -> (n, C)

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert at once on x (n, C), its tokens sorted by expert, counts[e] for (local) expert e -> (n, C)."""
        h = grouped_matmul(x, self.w_fc, counts)  # (n, F)
        if self.b_fc is not None:
            h = h + self.b_fc.repeat_interleave(counts, dim=0, output_size=x.size(0))
        y = grouped_matmul(self.activation(h), self.w_proj, counts)  # (n, C)
        if self.b_proj is not None:
            y = y + self.b_proj.repeat_interleave(counts, dim=0, output_size=x.size(0))
        return y


def init_experts(experts: Experts, n_layer: int) -> None:
    """Each expert as GPT initialises the dense MLP: N(0, 0.02), and w_proj, which writes into the
    residual stream, N(0, 0.02 / sqrt(2 L)) (GPT-2, sec. 2.3). Biases stay zero."""
    torch.nn.init.normal_(experts.w_fc, mean=0.0, std=0.02)
    torch.nn.init.normal_(experts.w_proj, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class MoE(nn.Module):
    """A mixture-of-experts layer in place of the MLP: (B, T, C) -> (B, T, C).

    Route (a linear router, logits z = x W_r, E per token):
        softmax (Switch, Fedus et al. 2021, arXiv:2101.03961; OLMoE, Muennighoff et al. 2024,
        arXiv:2409.02060): p = softmax(z); the k largest p_i pick the experts and weigh them as they are
        sigmoid (DeepSeek-V3, arXiv:2412.19437, sec. 2.1.2): s = sigmoid(z); the k largest pick the
        experts, weighed by s_i / sum of the k chosen s_j
    and the layer's output is  y = sum over the k chosen i of w_i Expert_i(x)  (+ Shared(x), DeepSeekMoE).
    With E = k = 1 the weight is 1 and y is the dense MLP (a test checks logits and gradients).

    Balance. A router left alone sends most tokens to a few experts, which then learn fastest and
    are chosen even more. Two cures, each a flag:
      the auxiliary loss (Switch, GShard: Lepikhin et al. 2020, arXiv:2006.16668)
          L_aux = E sum_i f_i P_i,  f_i = tokens sent to i / (k N),  P_i = mean over tokens of p_i
      (sigmoid: of s_i / sum_j s_j), 1 when balanced, E when one expert takes all (k = 1); added to the loss
      times --moe_aux. It pulls the router towards balance and away from what the LM loss wants.
      the loss-free bias (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3): a per-expert bias b is
      added to the scores only to *choose* the experts (never to weigh them), and after each step
          b_i <- b_i + u sign(mean_j load_j - load_i)   (u = --moe_bias_update)
      so an overloaded expert is chosen less next step. No gradient touches it: a buffer, updated by
      update_bias, saved in checkpoints. Optionally the router z-loss (ST-MoE, Zoph et al. 2022,
      arXiv:2202.08906) mean_t logsumexp(z_t)^2 keeps the logits small.

    Dropless by default: every token reaches its k experts. With a capacity factor c, expert i takes
    at most ceil(c k N / E) of its tokens, first choices first then second choices, each in token
    order (GShard's priority); the rest are dropped (the residual stream carries the token on) and counted.
    The capacity binds in training only: in eval mode the layer is dropless (others give evaluation a
    capacity factor of its own, DeepSpeed's and TF Model Garden's eval_capacity_factor; none is the
    limit of a large one). A capacity counted over the N tokens of a batch would make one sequence's
    output depend on what it is batched with, on padding, and on whether the KV cache feeds one token
    at a time: tests check that none of the three changes an eval-mode output.

    Two ways to run the experts, equal up to rounding (a test): forward_loop, the one to read (for
    each expert, find its tokens, run it, add the weighted result back), and the fast one: the N k
    (token, expert) slots sorted by expert, every expert run at once as two grouped matmuls, the
    results added back with one index_add. `dispatch` is the seam where expert parallelism
    (parallel.py) sends the sorted tokens to the ranks that hold their experts and back.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        E, hidden = config.moe_experts, expert_hidden(config)
        self.n_experts, self.topk, self.router_kind, self.capacity_factor = E, config.moe_topk, config.moe_router, config.moe_capacity
        self.aux_coef, self.zloss_coef, self.bias_rate = config.moe_aux, config.moe_zloss, config.moe_bias_update
        self.router = nn.Linear(config.n_embd, E, bias=False)  # (C) -> (E) logits
        self.experts = Experts(E, config.n_embd, hidden, config.mlp == "swiglu", config.bias, relu2=config.mlp == "relu2")
        # S shared experts of width hidden are one MLP of width S hidden (DeepSeekMoE, sec. 3.2)
        self.shared = MLP(config, hidden=config.moe_shared * hidden) if config.moe_shared else None
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("expert_bias", torch.zeros(E))  # the loss-free balancer's b: persistent, so checkpointed
        self.register_buffer("load", torch.zeros(E), persistent=False)  # tokens routed to each expert since reset_stats
        self.register_buffer("dropped", torch.zeros(()), persistent=False)  # (token, expert) slots dropped since then
        self.register_buffer("aux_sum", torch.zeros(()), persistent=False)  # sum of L_aux over the forwards since then
        self.forwards = 0  # training forwards since reset_stats
        self.loss = None  # the last training forward's weighted balancing losses, which GPT.forward adds
        self.impl = "fast"  # fast, or loop (forward_loop); tests switch it
        self.dispatch = None  # expert parallelism: f(sorted tokens, counts per expert) -> expert outputs
        # the experts drawn as GPT draws them, so that an MoE built on its own has finite weights; from a
        # fork of the RNG, because a GPT draws every weight again in _init_weights and a seed must keep
        # giving it the weights it always did (drawing here would shift the stream those draws read)
        with torch.random.fork_rng(devices=[]):
            init_experts(self.experts, config.n_layer)

    # EXERCISE: moe-router (tests/test_model.py -k 'routes_weighs_and_balances or one_expert_equals_the_dense')
    def route(self, x: torch.Tensor):
        """x (N, C) -> logits (N, E), router probabilities (N, E), chosen experts (N, k), their weights (N, k)."""
        logits = at_least_float32(self.router(x))  # float32 at least: a softmax over E in bf16 is coarse
        probs = F.softmax(logits, dim=-1) if self.router_kind == "softmax" else torch.sigmoid(logits)
        chosen = torch.topk(probs.detach() + self.expert_bias, self.topk, dim=-1).indices  # the bias only chooses
        weights = probs.gather(-1, chosen)  # (N, k)
        if self.router_kind == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)  # DeepSeek-V3 normalises the chosen scores
        return logits, probs, chosen, weights

    def capacity(self, n_tokens: int) -> int | None:
        """Slots per expert, ceil(c k N / E), or None (dropless)."""
        if not self.capacity_factor:
            return None
        return math.ceil(self.capacity_factor * self.topk * n_tokens / self.n_experts)

    def forward(self, x):
        B, T, C = x.size()
        x = x.reshape(B * T, C)
        logits, probs, chosen, weights = self.route(x)
        capacity = self.capacity(B * T) if self.training else None  # dropless at inference (docstring)
        y = self.forward_loop(x, chosen, weights, capacity) if self.impl == "loop" else \
            self.forward_sorted(x, chosen, weights, capacity)
        if self.shared is not None:
            y = y + self.shared(x)  # (N, C): every token, no routing
        if self.training:
            self.record(logits, probs, chosen, capacity)
        return self.dropout(y.view(B, T, C))

    # EXERCISE: moe-loop (tests/test_model.py -k 'sorted_grouped_path or capacity_drops')
    def forward_loop(self, x, chosen, weights, capacity):
        """The readable version: for each expert, its tokens (first choices first, then second
        choices, each in token order; only the first `capacity` with a capacity), its MLP on them,
        the weighted results added back at their tokens. x (N, C), chosen and weights (N, k)."""
        y = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, weights.dtype))
        for e in range(self.n_experts):
            choice, token = torch.nonzero(chosen.t() == e, as_tuple=True)  # (k, N) row-major: choice-major order
            if capacity is not None:
                choice, token = choice[:capacity], token[:capacity]
            out = self.experts.expert(e, x[token])  # (n_e, C)
            y = y.index_add(0, token, out * weights[token, choice].unsqueeze(-1))
        return y

    def sort_slots(self, chosen, capacity):
        """The N k (token, expert) slots, choice-major (slot s = j N + t: token t's j-th choice),
        sorted by expert (stably, so each expert's slots keep the loop's order), those past an
        expert's capacity dropped: (kept slot ids in sorted order, kept slots per expert (E,))."""
        expert = chosen.t().reshape(-1)  # (k N,)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.n_experts)  # (E,)
        if capacity is not None:
            first = counts.cumsum(0) - counts  # where each expert's slots start in `order`
            rank = torch.arange(order.numel(), device=order.device) - first[expert[order]]  # rank within its expert
            order = order[rank < capacity]
            counts = counts.clamp(max=capacity)
        return order, counts

    def forward_sorted(self, x, chosen, weights, capacity):
        """The fast version: sort the slots by expert, gather their tokens into one (n, C) tensor,
        all experts as grouped matmuls (or, under expert parallelism, on the ranks that hold them),
        weigh, and add back at the tokens with one index_add."""
        N = x.size(0)
        order, counts = self.sort_slots(chosen, capacity)
        token = order % N  # slot s belongs to token s mod N
        weight = weights.t().reshape(-1)[order]  # (n,) the weight of each kept slot
        xs = x[token]  # (n, C) tokens sorted by expert
        ys = self.dispatch(xs, counts) if self.dispatch is not None else self.experts.grouped(xs, counts)
        y = torch.zeros(N, x.size(1), device=x.device, dtype=torch.promote_types(ys.dtype, weight.dtype))
        return y.index_add(0, token, ys * weight.unsqueeze(-1))  # (N, C)

    def record(self, logits, probs, chosen, capacity):
        """A training forward's statistics (load, dropped slots, L_aux), and the weighted balancing
        losses in self.loss for GPT.forward to add (None if both coefficients are 0)."""
        N, E, k = logits.size(0), self.n_experts, self.topk
        counts = torch.bincount(chosen.reshape(-1), minlength=E)  # (E,) slots routed to each expert
        f = counts.to(probs.dtype) / (k * N)  # fraction of the slots
        P = (probs if self.router_kind == "softmax" else probs / probs.sum(-1, keepdim=True)).mean(0)  # (E,)
        aux = E * (f * P).sum()
        self.loss = None
        if self.aux_coef:
            self.loss = self.aux_coef * aux
        if self.zloss_coef:
            z = self.zloss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.loss = z if self.loss is None else self.loss + z
        with torch.no_grad():
            self.load += counts
            if capacity is not None:
                self.dropped += (counts - capacity).clamp(min=0).sum()
            self.aux_sum += aux.detach()
            self.forwards += 1

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor):
        """The loss-free balancer's step: b_i += u sign(mean load - load_i), with load (E,) the
        tokens each expert was routed in the step (summed over every data-parallel rank)."""
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)

    def reset_stats(self):
        self.load.zero_()
        self.dropped.zero_()
        self.aux_sum.zero_()
        self.forwards = 0


class Block(nn.Module):
    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if moe else MLP(config)  # the name stays: an MoE is the block's MLP, made sparse

    def forward(self, x, kv_cache=None, doc_ids=None, positions=None):
        x = x + self.attn(self.ln_1(x), kv_cache, doc_ids, positions)  # communicate between positions
        x = x + self.mlp(self.ln_2(x))  # compute within each position
        return x


# ----------------------------------------------------------------------------------------------
# Multi-token prediction, DeepSeek-V3's way: a chain of modules


class MTPModule(nn.Module):
    """One depth of DeepSeek-V3's sequential multi-token prediction (DeepSeek-AI 2024,
    arXiv:2412.19437, sec. 2.2), used with --mtp N --mtp_style sequential.

    What. Module k (k = 1..N) predicts token i+k+1 at position i. It reads two things there: the
    hidden state h^{k-1}_i of the depth before it (h^0: the trunk's last hidden state, before ln_f)
    and the embedding of token i+k (the shared input embedding wte), normalises each, concatenates
    them and projects 2C -> C with its own matrix M_k, then runs one transformer block of its own:

        h'^k_i = M_k [Norm(h^{k-1}_i); Norm(Emb(t_{i+k}))]      (M_k: C x 2C, no bias: a matrix)
        h^k_{1:T-k} = Block_k(h'^k_{1:T-k})                       (causal, like the trunk's blocks)
        p^k_{i+k+1} = softmax(lm_head(ln_f(h^k_i)))               (the shared output head)
        L_MTP = mtp_weight x (1/N) sum_k CE(p^k, t_{k+2..T+1})    (DeepSeek-V3's lambda / D)

    with positions 1..T of the window and its targets up to t_{T+1}: depth k runs only on the T - k
    positions whose token i+k and target i+k+1 exist, one fewer than the depth before it. Its
    cross-entropy is the mean over those T - k positions, as the parallel heads' is (the paper
    divides the sum by T instead, a constant factor).

    Why. Every position now trains on N + 1 targets instead of one, a denser signal from the same
    tokens, which (the paper argues) may also let the trunk pre-plan its hidden states for the
    tokens after the next. Unlike Gloeckle et al.'s parallel heads (GPT.mtp_heads in the default
    style: N blocks that each read the trunk's h^0 alone), depth k is given the token t_{i+k} that
    depth k-1 was asked to predict, and depth k-1's hidden state: the causal chain of predictions is
    kept at every depth, as the main model keeps it for the next token. So depth 1 predicting token
    i+2 knows token i+1, an easier task than a parallel head's, which must guess through it. The
    price is the chain itself: the depths run one after another, and each has a C x 2C projection
    and two norms more than a parallel head.

    Choices here. The paper normalises with RMSNorm, as its whole model does; we use the model's own
    norm (make_norm: RMSNorm with --norm rmsnorm, LayerNorm in GPT-2's recipe), so that the module's
    inputs are normalised as every other sub-layer's are, and --norm rmsnorm gives the paper's
    module exactly. The embedding is the token's alone (wte, no learned position): the position is
    in h^{k-1}, and in RoPE's rotation inside the block. DeepSeek-V3's released weights call the
    three new tensors hnorm, enorm and eh_proj (its README_WEIGHTS.md); the order of the
    concatenation here is the paper's formula, hidden state first.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm_h = make_norm(config)  # on the previous depth's hidden state h^{k-1}
        self.norm_e = make_norm(config)  # on the embedding of token i+k
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)  # M_k: (2C) -> (C)
        self.block = Block(config)  # dense, as the parallel heads' blocks are

    def forward(self, h, emb, doc_ids=None, positions=None):
        """h (B, T', C) the previous depth's hidden states, emb (B, T', C) the embeddings of the
        tokens k further on -> (B, T', C), this depth's hidden states h^k. doc_ids, positions (B, T'):
        --doc_mask's, for the block's attention (None without it)."""
        x = torch.cat([self.norm_h(h), self.norm_e(emb)], dim=-1)  # (B, T', 2C)
        return self.block(self.proj(x), None, doc_ids, positions)  # (B, T', 2C) -> (B, T', C) -> one block


# ----------------------------------------------------------------------------------------------
# Two changes at the output: soft-capped logits and the z-loss


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap), in float32 (Gemma 2, arXiv:2408.00118, caps its final logits at 30):
    about the identity while |logit| << cap, never beyond +-cap, so a few runaway logits cannot make
    the softmax overconfident; the gradient 1 - tanh^2 fades smoothly as a logit nears the cap."""
    logits = at_least_float32(logits)
    return cap * torch.tanh(logits / cap)


def z_loss(logits: torch.Tensor, targets: torch.Tensor, coef: float, ignore_index: int = -1) -> torch.Tensor:
    """coef * mean over the counted rows of (log Z)^2, Z = sum_v exp(logit_v) (PaLM, Chowdhery et al.
    2022, arXiv:2204.02311: coef 1e-4). Cross-entropy is unchanged when every logit of a row
    moves by the same amount, so nothing stops log Z from drifting far from 0, where float16/bfloat16
    logits lose precision; this term pulls it back to 0 at almost no cost to the fit. logits (N, V),
    targets (N,): rows whose target is ignore_index are left out, as cross-entropy leaves them."""
    keep = targets != ignore_index
    lse = torch.logsumexp(at_least_float32(logits), dim=-1)  # (N,): log Z per row
    return coef * (lse.square() * keep).sum() / keep.sum()


def mtp_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of an MTP head's logits (B, T', V) against its targets (B, T'), in float32
    at least (as the next-token loss), targets of -1 ignored."""
    return F.cross_entropy(at_least_float32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# ----------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding (V, C)
                # learned absolute positions (T_max, C); RoPE puts positions inside attention instead
                wpe=None if config.rope else nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, config.is_moe_layer(i)) for i in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # (C) -> (V) logits
        # multi-token prediction: head k (1-based) reads the trunk's last hidden state at position t
        # through one block of its own and predicts token t+1+k with the shared ln_f and lm_head;
        # --mtp_style sequential: DeepSeek-V3's chain of modules instead (MTPModule)
        mtp_head = MTPModule if config.mtp_style == "sequential" else Block
        self.mtp_heads = nn.ModuleList([mtp_head(config) for _ in range(config.mtp)]) if config.mtp else None
        # (N,) each head's loss summed over the training forwards since pop_mtp_loss_sum (torch.compile makes
        # two graphs of the forward when several run between pops: the first one's, where it is None, and the rest's)
        self.mtp_loss_sum = None
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one matrix, two roles (Press & Wolf 2017)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02  # GPT-2's initialiser range
            if getattr(module, "residual_scaled_init", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)  # 2 residual additions per block
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
        if isinstance(module, Experts):
            init_experts(module, self.config.n_layer)

    def forward(self, idx, targets=None, kv_cache=None, doc_ids=None, positions=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given.

        Targets equal to -1 are ignored (padding, or positions without a next token). With
        config.fused_ce and targets, the logits are not computed and None is returned in their place.
        With a kv_cache (a KVCache), idx holds the tokens after the kv_cache.length already cached:
        they are placed at those positions, and their keys and values are added to the cache.
        The three steps are methods of their own so that parallel.py's pipeline stages run exactly
        this code on their share of the layers. With config.doc_mask, doc_ids and positions (B, T)
        are computed from idx; a caller whose idx is cut out of a longer window (context
        parallelism gives each rank some of its positions) passes the window's, cut alike.
        """
        start = kv_cache.length if kv_cache is not None else 0
        # (generation reads its context as one document)
        doc_ids, positions = self.document_inputs(idx, doc_ids, positions) if kv_cache is None else (None, None)
        x = self.run_blocks(self.embed(idx, start, positions), kv_cache=kv_cache, doc_ids=doc_ids, positions=positions)
        if kv_cache is not None:
            kv_cache.length += idx.size(1)  # every layer has stored these positions
        logits, loss = self.head(x, targets, idx, doc_ids, positions)
        if loss is not None and self.training:  # the MoE layers' balancing losses (--moe_aux, --moe_zloss) join the objective
            for moe in self.moe_layers():
                loss = loss if moe.loss is None else loss + moe.loss
        return logits, loss

    def document_inputs(self, idx, doc_ids=None, positions=None) -> tuple:
        """--doc_mask's (B, T) document numbers and positions inside documents of the tokens idx, or
        (None, None) without it. Those given are kept (context parallelism passes the whole window's,
        cut like its tokens). parallel.py's pipeline stages call it too: every stage holds the
        micro-batch's tokens, so each computes the numbers itself and only activations travel."""
        if not self.config.doc_mask:
            return None, None
        doc_ids = document_ids(idx, self.config.eot_id) if doc_ids is None else doc_ids
        return doc_ids, document_positions(doc_ids) if positions is None else positions

    def moe_layers(self) -> list:
        """The MoE layers, in block order (empty for a dense model)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def embed(self, idx, start: int = 0, positions=None):
        """(B, T) token ids at positions start..start+T-1 (or at positions (B, T), --doc_mask's) ->
        (B, T, C): token embedding, plus the learned position (GPT-2), dropout."""
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T) -> (B, T, C)
        if self.transformer.wpe is not None and positions is not None:
            x = x + self.transformer.wpe(positions)  # (B, T, C): each document from position 0
        elif self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))  # (T, C) broadcast over B
        return self.transformer.drop(x)

    def run_blocks(self, x, lo: int = 0, hi: int | None = None, kv_cache=None, doc_ids=None, positions=None):
        """(B, T, C) -> (B, T, C) through blocks lo..hi-1 (all of them by default)."""
        if kv_cache is not None:  # inference: each block reads and extends its layer of the cache
            for i, block in enumerate(self.transformer.h[lo:hi], start=lo):
                x = block(x, kv_cache=kv_cache.layer(i))
            return x
        for block in self.transformer.h[lo:hi]:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                # store the block's (B, T, C) input, not the activations inside it (about 34 B T C
                # bytes in 16-bit, Korthikanti et al. 2022, sec. 4.1); the backward runs the block's
                # forward again first
                x = torch.utils.checkpoint.checkpoint(block, x, None, doc_ids, positions, use_reentrant=False)
            else:
                x = block(x, None, doc_ids, positions)
        return x

    def head(self, x, targets=None, idx=None, doc_ids=None, positions=None):
        """(B, T, C) trunk output -> final norm -> logits (B, T, V), and the loss against targets if
        given. With mtp heads, in training, the loss adds mtp_weight x the mean of their losses
        (mtp_losses; the sequential modules also read the input tokens idx (B, T); under --doc_mask
        their blocks attend by document as the trunk's do, doc_ids and positions (B, T)); evaluation
        and sampling use the next-token head alone."""
        logits, loss = self.next_token_head(x, targets)
        if targets is not None and self.mtp_heads is not None and self.training:
            extra = torch.stack(self.mtp_losses(x, targets, idx, doc_ids, positions))  # (N,)
            self.last_mtp_losses = extra.detach()  # each head's loss in this forward
            self.mtp_loss_sum = self.last_mtp_losses + (0 if self.mtp_loss_sum is None else self.mtp_loss_sum)
            loss = loss + self.config.mtp_weight * extra.mean()
        return logits, loss

    def pop_mtp_loss_sum(self):
        """Each extra head's loss (N,), unweighted, summed over the training forwards since the last
        call (None if there were none), and the sum starts again: a caller that runs several forwards
        (micro-batches) reads their total once, as the MoE layers' reset_stats lets it read their load."""
        total, self.mtp_loss_sum = self.mtp_loss_sum, None
        return total

    def next_token_head(self, x, targets=None):
        """Final norm, logits (B, T, V) (soft-capped if configured), and the mean cross-entropy
        (plus the z-loss in training) against targets if given."""
        B, T, _ = x.size()
        x = self.transformer.ln_f(x)
        z_coef = self.config.z_loss if self.training else 0.0  # validation reports the cross-entropy alone
        if targets is not None and self.config.fused_ce:
            # the same mean cross-entropy straight from the hidden states, a chunk of rows at a time:
            # the (B, T, V) logits, their float32 copy and their gradient never exist (kernels.py
            # explains the bytes saved)
            import kernels  # lazily: the model needs kernels.py only when this option is on

            loss = kernels.linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), ignore_index=-1,
                                                z_loss=z_coef)
            return None, loss  # no logits: that is the point
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        if self.config.logit_softcap:
            logits = softcap(logits, self.config.logit_softcap)
        loss = None
        if targets is not None:
            # cross-entropy in float32: under bf16 autocast the logits are bf16, and log-softmax
            # over 50k classes needs more precision than 8 mantissa bits
            flat, flat_targets = at_least_float32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1)
            loss = F.cross_entropy(flat, flat_targets, ignore_index=-1)
            if z_coef:
                loss = loss + z_loss(flat, flat_targets, z_coef)
        return logits, loss

    def mtp_losses(self, x, targets, idx=None, doc_ids=None, positions=None) -> list:
        """Multi-token prediction (Gloeckle et al. 2024, arXiv:2404.19737): from the trunk's hidden
        states x (B, T, C), head k's (k = 1..N) cross-entropy against the token k further on than the
        next. targets (B, T) hold token t+1 at position t, so head k's target at t is targets[:, t + k],
        token t+1+k; its last k positions have none. Each head computes all T positions (its block is
        causal like the trunk's, so scaling.py counts it as one more layer) and its loss keeps the
        first T - k. Gloeckle et al. found the gain grows with model size (small models can even
        lose), so the ablation at the laptop size says little about large ones. With --mtp_style
        sequential, DeepSeek-V3's chain instead (sequential_mtp_losses; it needs the tokens idx).
        doc_ids, positions (B, T): --doc_mask's document numbers and positions, which the heads'
        blocks use as the trunk's do (GPT.document_inputs; None without it)."""
        if self.config.mtp_style == "sequential":
            return self.sequential_mtp_losses(x, targets, idx, doc_ids, positions)
        T = x.size(1)
        losses = []
        for k, block in enumerate(self.mtp_heads, start=1):
            logits = self.mtp_logits(block(x, None, doc_ids, positions))  # (B, T, C) -> (B, T, V), the shared output layer
            losses.append(mtp_cross_entropy(logits[:, :T - k], targets[:, k:]))  # the positions with a target
        return losses

    def sequential_mtp_losses(self, x, targets, idx, doc_ids=None, positions=None) -> list:
        """DeepSeek-V3's sequential MTP (arXiv:2412.19437, sec. 2.2; MTPModule has the formula): depth
        k's cross-entropy, k = 1..N. At position i it reads h^{k-1}_i (h^0 = x, the trunk's output)
        and token i+k (idx[:, i + k]) and predicts token i+k+1 (targets[:, i + k]). Only the T - k
        positions with that token run: the window shrinks by one position per depth. Dropping the
        last position of h^{k-1} changes none of the others, since every block is causal, so the
        kept positions are exactly those a full-length run would compute. Under --doc_mask depth k's
        block attends by the documents of its positions i (doc_ids and positions cut alike)."""
        T = x.size(1)
        if idx is None or T <= len(self.mtp_heads):
            raise ValueError(f"--mtp_style sequential needs the input tokens idx (given: {idx is not None}) and a window "
                             f"longer than --mtp {len(self.mtp_heads)} (T = {T})")
        cut = lambda t, k: None if t is None else t[:, :T - k]  # --doc_mask's numbers of positions 1..T-k
        h, losses = x, []
        for k, module in enumerate(self.mtp_heads, start=1):
            h = module(h[:, :T - k], self.transformer.wte(idx[:, k:]), cut(doc_ids, k), cut(positions, k))  # (B, T-k, C): h^k
            losses.append(mtp_cross_entropy(self.mtp_logits(h), targets[:, k:]))  # token i+k+1 at position i
        return losses

    def mtp_logits(self, h):
        """The shared output head of the MTP heads: ln_f, lm_head, soft-cap if configured (no z-loss)."""
        logits = self.lm_head(self.transformer.ln_f(h))  # (B, T', C) -> (B, T', V)
        return softcap(logits, self.config.logit_softcap) if self.config.logit_softcap else logits

    # --- counting ---------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Exact number of distinct parameters (a tied matrix counts once); active=True: those one
        token uses, each MoE layer's routed experts counted k of E (the rest are total, not active).

        exclude_embeddings drops the token and position embeddings, the convention of Kaplan et al.
        (2020), whose scaling laws use non-embedding N. With tied embeddings the output layer *is*
        the token embedding, so it is excluded too; an untied lm_head is a real matmul and stays in.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if active:  # a token meets k of each MoE layer's E routed experts (and the router and shared experts)
            n -= sum(sum(p.numel() for p in m.experts.parameters()) * (m.n_experts - m.topk) // m.n_experts
                     for m in self.moe_layers())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
        return n

    # --- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None,
                 top_p: float | None = None, use_cache: bool = True):
        """Append max_new_tokens sampled tokens to idx (B, T), one at a time.

        temperature divides the logits (below 1 sharpens, above 1 flattens; 0 means greedy);
        top_k keeps only the k most likely tokens (Fan et al. 2018), top_p the nucleus, the fewest
        most likely tokens whose probabilities sum to at least p (Holtzman et al. 2020,
        arXiv:1904.09751); both may be given (top-k first, as Hugging Face's generate does).

        use_cache keeps each layer's keys and values (a KVCache), so each new token costs one
        position's forward pass instead of the whole context's. Once the sequence is longer than
        block_size the window slides: every kept token then sits at a new position and sees one
        token fewer, so no cached key stays valid, and each step recomputes the last block_size
        tokens exactly as use_cache=False does. The tokens are the same either way (a test checks
        greedy decoding); only the time differs (`python model.py --bench_generate`).
        """
        check_sampling(temperature, top_k, top_p)
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.config.block_size:
                if cache is None:  # prefill: the whole prompt once, filling the cache
                    cache = KVCache(self.config)
                    logits = self.next_token_logits(idx, cache)
                else:  # only the newest token; its position is cache.length
                    logits = self.next_token_logits(idx[:, cache.length :], cache)
            else:
                logits = self.next_token_logits(idx[:, -self.config.block_size :])  # the model only sees its context window
            logits = logits.float()
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def next_token_logits(self, idx, kv_cache=None):
        """idx (B, T) -> (B, V), the logits of the token after idx. Only the last position predicts
        it, so only that one goes through the output layer (V x C multiply-adds per position: for
        GPT-2 small, 39M of its 124M parameters' worth)."""
        start = kv_cache.length if kv_cache is not None else 0
        x = self.run_blocks(self.embed(idx, start), kv_cache=kv_cache)
        if kv_cache is not None:
            kv_cache.length += idx.size(1)
        return self.head(x[:, -1:])[0][:, -1]  # (B, 1, C) -> (B, 1, V) -> (B, V)

    # --- Hugging Face conversion: GPT-2 and Llama layouts ----------------------------------------

    # transformers' GPT-2 uses Conv1D for these: weight (in, out), the transpose of nn.Linear's
    HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf_state_dict(cls, sd: dict, config: GPTConfig | None = None) -> "GPT":
        """Build a GPT from a transformers.GPT2LMHeadModel state dict (tensors only; no transformers import).

        Without a config, the shape is read off the tensors (n_head cannot be, so it is taken from
        the GPT-2 family table by width, else an error asks for a config). With config.bias=False
        the biases must all be zero (what to_hf_state_dict writes for a model without them).
        """
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old HF mask buffers
        if config is None:
            config = config_from_hf_shapes(sd)
        if hf_architecture(config) != "gpt2":
            raise ValueError("GPT-2 weights need the plain GPT-2 architecture: rope=False, norm=layernorm, mlp=gelu, n_kv_head=n_head")
        if not config.bias:
            nonzero = [k for k, v in sd.items() if k.endswith(".bias") and v.abs().max() > 0]
            if nonzero:
                raise ValueError(f"{nonzero[0]} is not zero but the config has bias=False: build it with bias=True")
            sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
        model = cls(config)
        ours = model.state_dict()
        hf = {k: v for k, v in sd.items() if k != "lm_head.weight" or not config.tie_embeddings}
        expected = {k for k in ours if not (config.tie_embeddings and k == "lm_head.weight")}
        check_keys(hf, expected)
        with torch.no_grad():
            for k, v in hf.items():
                v = v.t() if k.endswith(cls.HF_TRANSPOSED) else v
                if v.shape != ours[k].shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the config's {tuple(ours[k].shape)}")
                ours[k].copy_(v)
        return model

    def to_hf_state_dict(self) -> dict:
        """The inverse: a state dict that transformers.GPT2LMHeadModel.load_state_dict accepts.
        GPT-2 has a bias on every linear layer and LayerNorm; a model without them gets zeros there,
        which computes exactly the same function."""
        sd = {}
        for k, v in self.state_dict().items():
            sd[k] = (v.t() if k.endswith(self.HF_TRANSPOSED) else v).detach().clone()
        sd["lm_head.weight"] = self.lm_head.weight.detach().clone()  # HF keeps the tied key too
        if not self.config.bias:
            with torch.device("meta"):  # the names and shapes of a biased twin, without allocating it
                twin = GPT(GPTConfig(**{**asdict(self.config), "bias": True, "attention": "sdpa"}))
            for k, v in twin.state_dict().items():
                if k.endswith(".bias") and k not in sd:
                    sd[k] = torch.zeros(v.shape, dtype=self.lm_head.weight.dtype)
        return sd

    def to_llama_state_dict(self) -> dict:
        """A state dict that transformers.LlamaForCausalLM.load_state_dict accepts (RoPE, RMSNorm,
        SwiGLU models). The fused matrices split: c_attn's rows are q (nh hs), k (n_kv hs), v
        (n_kv hs), as q_proj, k_proj, v_proj; c_fc's are gate then up, as gate_proj, up_proj.

        The rotary pairing needs no change: ours rotates channel i with channel i + hs/2 (apply_rope),
        and so does Hugging Face's Llama (rotate_half: cat(-x2, x1) over the two halves), with the
        same frequencies theta^(-2i/hs). (Meta's original checkpoints pair adjacent channels (2i,
        2i+1); that is why HF's conversion script permutes the q and k rows. Ours are already in
        HF's layout; the logits test against transformers checks it.)"""
        c, ours = self.config, self.state_dict()
        split = [c.n_head * c.head_size, c.n_kv_head * c.head_size, c.n_kv_head * c.head_size]
        sd = {"model.embed_tokens.weight": ours["transformer.wte.weight"], "model.norm.weight": ours["transformer.ln_f.weight"],
              "lm_head.weight": ours["lm_head.weight"]}
        for i in range(c.n_layer):
            o, h = f"transformer.h.{i}.", f"model.layers.{i}."
            for kind in ("weight", "bias") if c.bias else ("weight",):
                q, k, v = ours[f"{o}attn.c_attn.{kind}"].split(split)
                gate, up = ours[f"{o}mlp.c_fc.{kind}"].chunk(2)
                sd |= {f"{h}self_attn.q_proj.{kind}": q, f"{h}self_attn.k_proj.{kind}": k, f"{h}self_attn.v_proj.{kind}": v,
                       f"{h}self_attn.o_proj.{kind}": ours[f"{o}attn.c_proj.{kind}"],
                       f"{h}mlp.gate_proj.{kind}": gate, f"{h}mlp.up_proj.{kind}": up, f"{h}mlp.down_proj.{kind}": ours[f"{o}mlp.c_proj.{kind}"]}
            sd[f"{h}input_layernorm.weight"] = ours[f"{o}ln_1.weight"]
            sd[f"{h}post_attention_layernorm.weight"] = ours[f"{o}ln_2.weight"]
        return {k: v.detach().clone() for k, v in sd.items()}  # clones: split views would share storage

    @classmethod
    def from_llama_state_dict(cls, sd: dict, config: GPTConfig) -> "GPT":
        """Build a GPT from a transformers.LlamaForCausalLM state dict: the inverse of to_llama_state_dict."""
        if hf_architecture(config) != "llama":
            raise ValueError("Llama weights need rope=True, norm=rmsnorm, mlp=swiglu")
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints stored the frequencies
        if config.tie_embeddings:  # the embedding is the output layer; HF omits lm_head.weight when tied
            sd.pop("lm_head.weight", None)
        model = cls(config)
        names = model.to_llama_state_dict()  # every name and shape to expect
        check_keys(sd, {k for k in names if not (config.tie_embeddings and k == "lm_head.weight")})
        for k, v in sd.items():
            if v.shape != names[k].shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the config's {tuple(names[k].shape)}")
        ours = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
                "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
        for i in range(config.n_layer):
            o, h = f"transformer.h.{i}.", f"model.layers.{i}."
            for kind in ("weight", "bias") if config.bias else ("weight",):
                ours[f"{o}attn.c_attn.{kind}"] = torch.cat([sd[f"{h}self_attn.{p}_proj.{kind}"] for p in "qkv"])
                ours[f"{o}attn.c_proj.{kind}"] = sd[f"{h}self_attn.o_proj.{kind}"]
                ours[f"{o}mlp.c_fc.{kind}"] = torch.cat([sd[f"{h}mlp.gate_proj.{kind}"], sd[f"{h}mlp.up_proj.{kind}"]])
                ours[f"{o}mlp.c_proj.{kind}"] = sd[f"{h}mlp.down_proj.{kind}"]
            ours[f"{o}ln_1.weight"] = sd[f"{h}input_layernorm.weight"]
            ours[f"{o}ln_2.weight"] = sd[f"{h}post_attention_layernorm.weight"]
        model.load_state_dict(ours)
        return model

    @classmethod
    def from_pretrained_dir(cls, path, **overrides) -> "GPT":
        """Build a GPT from a Hugging Face model directory (config.json and model.safetensors or
        pytorch_model.bin, possibly sharded): a GPT2LMHeadModel or a LlamaForCausalLM whose shape
        GPTConfig can express, such as the ones `python model.py export` writes. A shape it cannot
        map raises one ValueError line. overrides set fields that do not change the weights'
        shapes (dropout, attention, fused_ce, activation_checkpointing)."""
        config = config_from_pretrained_dir(path, **overrides)
        sd = read_hf_weights(Path(path))
        if hf_architecture(config) == "gpt2":
            if not any(k.startswith("transformer.") for k in sd):  # GPT2Model files (the hub's gpt2) lack the prefix
                sd = {k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in sd.items()}
            return cls.from_hf_state_dict(sd, config)
        return cls.from_llama_state_dict(sd, config)


# ----------------------------------------------------------------------------------------------
# Sampling: the KV cache and the filters on the next-token distribution


class KVCache:
    """The keys and values of every position processed so far, one (B, n_kv, block_size, hs) pair
    of buffers per layer, filled from the left: positions 0..length-1 are valid.

    Why it is exact: a causal model's keys and values at position t depend only on tokens <= t, so
    they do not change when later tokens arrive; a new token needs only its own query, key and
    value, and attention over the stored ones. Per generated token that is one position's matmuls,
    O(N) FLOPs for N parameters, instead of the whole context's O(N T) (plus attention over T keys
    either way). The price is memory: 2 L B n_kv T hs numbers, which grouped-query attention
    divides by n_head / n_kv_head (Ainslie et al. 2023). The buffers are allocated at the first
    append, in the dtype and on the device of the keys.
    """

    def __init__(self, config: GPTConfig):
        self.config = config
        self.length = 0  # positions filled, the same in every layer (GPT.forward advances it)
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self, i)


class LayerKV:
    """Layer i's view of a KVCache, the object CausalSelfAttention.forward receives."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    @property
    def length(self) -> int:
        return self.cache.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hs) at positions length..length+T-1; return every stored
        position's keys and values, (B, n_kv, length + T, hs) each."""
        c, i, start, T = self.cache, self.i, self.cache.length, k.size(2)
        if c.keys[i] is None:
            shape = (k.size(0), k.size(1), c.config.block_size, k.size(3))
            c.keys[i] = torch.empty(shape, dtype=k.dtype, device=k.device)
            c.values[i] = torch.empty(shape, dtype=v.dtype, device=v.device)
        c.keys[i][:, :, start : start + T] = k
        c.values[i][:, :, start : start + T] = v
        return c.keys[i][:, :, : start + T], c.values[i][:, :, : start + T]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for all tokens), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")


# EXERCISE: sampling (tests/test_model.py -k 'top_p_filter or top_k_filter or top_p_sampling or top_k_sampling')
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits with every token outside the top k, then outside the nucleus, set to -inf.

    The nucleus (Holtzman et al. 2020) is the smallest set of most likely tokens whose probability
    sums to at least top_p: sort descending, and drop a token when the tokens before it already
    hold top_p. The most likely token is always kept, so some token can be sampled.
    """
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # never the first: its mass_before is 0 < top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def config_from_hf_shapes(sd: dict) -> GPTConfig:
    """Infer a GPT-2 GPTConfig from the tensors of a Hugging Face state dict."""
    vocab_size, n_embd = sd["transformer.wte.weight"].shape
    block_size = sd["transformer.wpe.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    heads_by_width = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # the GPT-2 family (Radford et al. 2019)
    if n_embd not in heads_by_width:
        raise ValueError(f"cannot infer n_head for width {n_embd}: pass a GPTConfig")
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=heads_by_width[n_embd],
                     n_embd=n_embd, bias="transformer.ln_f.bias" in sd, attention="sdpa")


# ----------------------------------------------------------------------------------------------
# Hugging Face format: a directory that transformers and lm-eval-harness read (vLLM too, untested here)
#
#   config.json             the architecture and its shape, in transformers' field names
#   model.safetensors       the tensors in HF's names (pytorch_model.bin without the optional
#                           safetensors package)
#   tokenizer.json          the byte-level BPE, converted from tiktoken's ranks (below)
#   tokenizer_config.json   tells AutoTokenizer to load tokenizer.json as it is (no BOS added)
#
# Two of transformers' classes cover our options: GPT2LMHeadModel (learned positions, LayerNorm,
# GELU-tanh, plain multi-head attention) and LlamaForCausalLM (RoPE, RMSNorm, SwiGLU, any number
# of key/value heads). Mixtures of the two (RoPE with LayerNorm, SwiGLU with learned positions...)
# have no class there, and are refused.

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's pre-tokenizer (tiktoken's gpt2 encoding)


def hf_architecture(config: GPTConfig) -> str:
    """'gpt2' or 'llama': the transformers class that computes exactly this model, or a ValueError."""
    if config.moe_experts:
        raise ValueError("an MoE model has no Hugging Face class here (GPT-2 and Llama are dense): export a model trained without --moe_experts")
    if config.qk_norm or config.logit_softcap:  # (z_loss only shapes training: the weights export as they are)
        raise ValueError(f"no Hugging Face GPT-2 or Llama class computes {'QK-norm' if config.qk_norm else 'soft-capped logits'}"
                         " (qk_norm, logit_softcap): export a model trained without them")
    if not config.rope and config.norm == "layernorm" and config.mlp == "gelu" and config.n_kv_head == config.n_head:
        return "gpt2"
    if config.rope and config.norm == "rmsnorm" and config.mlp == "swiglu":
        return "llama"
    raise ValueError(f"no Hugging Face class has this shape (rope={config.rope}, norm={config.norm}, mlp={config.mlp}, "
                     f"n_kv_head={config.n_kv_head} of {config.n_head}): GPT-2 needs learned positions, layernorm, gelu and "
                     "n_kv_head=n_head; Llama needs rope, rmsnorm and swiglu")


def check_keys(sd: dict, expected: set) -> None:
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ValueError(f"state dict does not match the config: missing {missing[:3]}, unexpected {extra[:3]}")


def hf_config(config: GPTConfig, eot_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers, with our GPTConfig kept beside it under "nanopretrain"."""
    arch = hf_architecture(config)
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings, "bos_token_id": eot_id,
              "eos_token_id": eot_id, "torch_dtype": str(dtype).removeprefix("torch."), "nanopretrain": asdict(config)}
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": config.block_size,
                "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
                "activation_function": "gelu_new",  # GELU, tanh approximation (HF's name for it)
                "layer_norm_epsilon": 1e-5, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
                "attn_pdrop": config.dropout, "scale_attn_weights": True, **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": config.block_size,
            "hidden_size": config.n_embd, "intermediate_size": mlp_hidden(config), "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head, "head_dim": config.head_size,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": config.rope_theta, "attention_bias": config.bias,
            "mlp_bias": config.bias, "attention_dropout": config.dropout, **common}


def _refuse(field: str, value, wanted) -> ValueError:
    return ValueError(f"config.json has {field}={value!r}, which nanopretrain's GPT cannot express (it needs {wanted})")


def config_from_hf_config(hf: dict, **overrides) -> GPTConfig:
    """The GPTConfig that computes what transformers computes for this config.json, or a ValueError
    naming the first field it cannot express. overrides: fields that do not change shapes."""
    shape_fields = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "n_kv_head", "rope", "rope_theta",
                    "norm", "mlp", "tie_embeddings"}
    if shape_fields & set(overrides):
        raise ValueError(f"{sorted(shape_fields & set(overrides))} come from the weights' shapes and cannot be overridden")
    ours = hf.get("nanopretrain", {})  # present when we wrote the directory: fields HF has no name for
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _refuse("activation_function", hf["activation_function"], "gelu_new, GELU's tanh approximation")
        if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
            raise _refuse("layer_norm_epsilon", hf["layer_norm_epsilon"], "1e-5")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
            raise _refuse("n_inner", hf["n_inner"], f"4 * n_embd = {4 * hf['n_embd']}")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise _refuse("attention scaling", "non-standard", "scores divided by sqrt(head size) only")
        shape = dict(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=ours.get("bias", True),
                     tie_embeddings=hf.get("tie_word_embeddings", True))
    elif kind == "llama":
        rope = hf.get("rope_parameters") or {}
        if hf.get("hidden_act", "silu") != "silu":
            raise _refuse("hidden_act", hf["hidden_act"], "silu")
        if abs(hf.get("rms_norm_eps", 1e-6) - 1e-6) > 1e-12:
            raise _refuse("rms_norm_eps", hf["rms_norm_eps"], "1e-6, RMSNorm's eps here")
        if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise _refuse("rope scaling", hf.get("rope_scaling") or rope.get("rope_type"), "plain RoPE")
        C, nh = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, C // nh):
            raise _refuse("head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {C // nh}")
        if hf["intermediate_size"] != swiglu_hidden(C):
            raise _refuse("intermediate_size", hf["intermediate_size"], f"{swiglu_hidden(C)}, the SwiGLU width for hidden_size {C}")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise _refuse("attention_bias/mlp_bias", (hf.get("attention_bias"), hf.get("mlp_bias")), "both true or both false")
        shape = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                     n_head=nh, n_embd=C, n_kv_head=hf.get("num_key_value_heads") or nh, bias=hf.get("attention_bias", False),
                     rope=True, rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)), norm="rmsnorm", mlp="swiglu",
                     tie_embeddings=hf.get("tie_word_embeddings", False))
    else:
        raise ValueError(f"config.json has model_type={kind!r}: only gpt2 and llama directories can be read")
    kept = {k: ours[k] for k in ("dropout", "attention", "fused_ce", "activation_checkpointing") if k in ours}
    return GPTConfig(**{**kept, **shape, **overrides})


def config_from_pretrained_dir(path, **overrides) -> GPTConfig:
    """The GPTConfig of a Hugging Face model directory (its config.json), without reading the weights."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a Hugging Face model directory (cannot read config.json: {e})") from None
    return config_from_hf_config(hf, **overrides)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' names, safetensors preferred


def read_hf_weights(path: Path) -> dict:
    """Every tensor of a model directory: one weights file, or the shards its index lists."""
    for name in WEIGHT_FILES:
        index = path / f"{name}.index.json"
        files = [name] if (path / name).exists() else sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
        if files:
            break
    else:
        raise ValueError(f"{path} has neither {WEIGHT_FILES[0]} nor {WEIGHT_FILES[1]}: export a model there first")
    sd = {}
    for f in files:
        if f.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(f"{path / f} needs the optional safetensors package: pip install safetensors") from None
            sd.update(load_file(str(path / f)))
        else:  # weights_only: a weights file cannot run code when unpickled
            sd.update(torch.load(path / f, map_location="cpu", weights_only=True))
    return sd


def write_hf_weights(sd: dict, folder: Path) -> str:
    """model.safetensors if the safetensors package is installed, else pytorch_model.bin; returns the name."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(sd, folder / WEIGHT_FILES[1])
        return WEIGHT_FILES[1]
    save_file(sd, str(folder / WEIGHT_FILES[0]), metadata={"format": "pt"})  # transformers checks "format"
    return WEIGHT_FILES[0]


# --- the tokenizer: tiktoken's ranks as a Hugging Face tokenizers BPE ---------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (Radford et al. 2019,
    encoder.py): printable Latin-1 bytes map to themselves, the other 68 to code points from 256 up.
    Byte-level BPE vocabularies in tokenizer.json are written in these characters (a space is 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def hf_tokenizer_json(enc) -> dict:
    """tokenizer.json (Hugging Face tokenizers) that splits and merges text exactly as the tiktoken
    Encoding enc: the same pre-tokenizer regex, then byte-level BPE with enc's ranks.

    tiktoken has ranks, not merges: to encode a piece it repeatedly joins the adjacent pair whose
    concatenation has the lowest rank, and takes a piece that is itself a token whole. HF's BPE
    joins the adjacent pair listed earliest among its merges. Listing, for every token t of rank r,
    each split t = a + b with a and b tokens, in order of r, gives HF the same choice at every step;
    `ignore_merges` makes it take whole-token pieces whole as tiktoken does. (Hugging Face's own
    TikTokenConverter builds its merges the same way.) A test checks the ids on random Unicode.
    """
    ranks, to_chars = enc._mergeable_ranks, bytes_to_unicode()  # tiktoken's private fields: it has no public accessor
    text = lambda token: "".join(to_chars[b] for b in token)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{text(a)} {text(b)}" for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
    # Oniguruma (HF's regex engine) reads X{1,3}+ as "one or more of X{1,3}", not as a possessive
    # X{1,3}; an atomic group (?>X{1,3}) says what tiktoken's regex means
    pattern = re.sub(r"(\\p\{\w+\}|\[[^\]]*\]|\\.|.)\{(\d+),(\d+)\}\+", r"(?>\1{\2,\3})", enc._pat_str)
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True} for s, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},  # bytes -> characters only
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): r for t, r in ranks.items()}, "merges": merges},
    }


def hf_tokenizer_config(enc, block_size: int) -> dict:
    eot = next((s for s, i in enc._special_tokens.items() if i == enc.eot_token), None)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size, "bos_token": eot, "eos_token": eot,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}


def load_run_tokenizer(prepared_dir):
    """The tiktoken Encoding of a corpus prepared by data.py, read from its files (model.py may not
    import data.py): manifest.json names the tokenizer; a trained BPE is in tokenizer.tiktoken (base64
    token and rank per line, tiktoken's own format) with its pattern and specials in
    tokenizer.tiktoken.json."""
    import tiktoken  # lazily: only exporting needs it
    from tiktoken.load import load_tiktoken_bpe

    prepared_dir = Path(prepared_dir)
    try:
        manifest = json.loads((prepared_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ValueError(f"no prepared corpus at {prepared_dir} to take the tokenizer from: pass --data_dir where "
                         "the run prepared its data, or --no_tokenizer") from None
    kind, eot = manifest["tokenizer"], manifest["eot_id"]
    if kind == "bpe":
        meta = json.loads((prepared_dir / "tokenizer.tiktoken.json").read_text())
        return tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
                                 mergeable_ranks=load_tiktoken_bpe(str(prepared_dir / "tokenizer.tiktoken")))
    if kind == "bytes":  # one token per byte: the pre-tokenizer cannot change the ids, any pattern does
        return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": eot})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        raise ValueError("the gpt2 tokenizer's files are not in tiktoken's cache and cannot be downloaded: set "
                         "TIKTOKEN_CACHE_DIR to a cache that has them, or pass --no_tokenizer") from None


def export_hf(model: GPT, out_dir, enc=None, overwrite: bool = False) -> list[str]:
    """Write model (and the tokenizer enc, a tiktoken Encoding, if given) to out_dir in Hugging Face
    format; returns the file names. Everything is written into a temporary directory first and
    moved in at the end, so an interrupted export leaves no half-written file."""
    out_dir = Path(out_dir)
    arch = hf_architecture(model.config)  # refuse before writing anything
    if model.config.doc_mask:  # (here, not in hf_architecture: --init_from a GPT-2 with --doc_mask is fine)
        raise ValueError("a --doc_mask model has no Hugging Face class here: it attends only within each document and "
                         "restarts positions after every end-of-text token, which GPT-2 and Llama do not (their logits "
                         "differ once one is in the input); export a model trained without --doc_mask")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty: pass --overwrite, or another --out")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sd = model.to_hf_state_dict() if arch == "gpt2" else model.to_llama_state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith("mtp_heads.")}  # --mtp's extra heads: training only
        eot = enc.eot_token if enc is not None else None
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, eot, model.lm_head.weight.dtype), indent=2))
        written = ["config.json", write_hf_weights(sd, tmp)]
        if enc is not None:
            (tmp / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(enc), ensure_ascii=False))
            (tmp / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(enc, model.config.block_size), indent=2))
            written += ["tokenizer.json", "tokenizer_config.json"]
        if not out_dir.exists():
            os.replace(tmp, out_dir)  # one atomic rename of the whole directory
            return written
        for stale in WEIGHT_FILES:  # transformers prefers safetensors: an old file of the other kind must not win
            (out_dir / stale).unlink(missing_ok=True)
        for name in written:
            os.replace(tmp / name, out_dir / name)  # each file appears whole
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The largest sizes a checkpoint's model_config may name, checked before its model is built: each at
# least 40 times the largest preset's (gpt2-1558m: block_size 1024, n_embd 1600, n_layer 48, a
# vocabulary of 50,304), so only an edited or foreign checkpoint reaches them, and it is refused in one
# line instead of failing inside an allocation (RoPE's tables and the sampler's KV cache grow with
# block_size even where no weight does)
CHECKPOINT_SIZE_LIMITS = {"block_size": 2**20, "n_embd": 2**16, "n_layer": 2**12, "vocab_size": 2**24}


def build_checkpoint_model(config: dict, path: str) -> GPT:
    """GPT(GPTConfig(**config)) for a checkpoint's model_config, on the CPU; one line (ValueError) for
    sizes outside CHECKPOINT_SIZE_LIMITS, a config this model.py cannot build, or a model too large
    for this machine's memory."""
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint {path} has no model_config dict: it is not one train.py wrote; use another checkpoint")
    for name, limit in CHECKPOINT_SIZE_LIMITS.items():
        value = config.get(name, 1)  # a missing field is GPTConfig's to report
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ValueError(f"checkpoint {path} has a model_config with {name}={value!r}, outside [1, {limit:,}]: it "
                             "was edited or is not one train.py wrote; use another checkpoint")
    try:
        return GPT(GPTConfig(**config))
    except (TypeError, ValueError, ZeroDivisionError) as e:  # an unknown or missing key, an impossible shape
        raise ValueError(f"checkpoint {path} has a model_config this model.py cannot build ({one_line(e)}): "
                         "use a checkpoint of this version of nanopretrain") from None
    except (RuntimeError, MemoryError) as e:  # inside the limits, but more than this machine holds
        raise ValueError(f"checkpoint {path}: its model does not fit in this machine's memory ({one_line(e)[:120]})") from None


def one_line(e: BaseException) -> str:
    """An exception's message as one line: its first line, with the file name an OSError carries (the
    one-line errors here and train.py's)."""
    text = (getattr(e, "strerror", None) or str(e)).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text += f": {e.filename}"
    return text[:300]


def load_model_checkpoint(path) -> tuple[GPT, dict]:
    """The GPT in a nanopretrain checkpoint (train.py's ckpt.pt), and the checkpoint dict."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no checkpoint at {path}: train first (python train.py), or give the path of a run's ckpt.pt")
    if path.is_dir():  # a sharded checkpoint (--checkpoint_format sharded) is a folder of per-rank files
        raise ValueError(f"{path} is a folder (a sharded checkpoint?): convert it to one file with python train.py "
                         f"--convert_checkpoint {path} --convert_to ckpt.pt, and give that file")
    try:  # weights_only=True: only tensors and plain containers unpickle, so a checkpoint cannot run code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or unsafe ({str(e).strip()[:120] or type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a nanopretrain checkpoint")
    model = build_checkpoint_model(ckpt["model_config"], path)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:  # missing or unexpected keys, a tensor of another shape
        raise ValueError(f"checkpoint {path}: its weights do not fit its model_config ({one_line(e)[:200]})") from None
    return model, ckpt


# ----------------------------------------------------------------------------------------------
# Command line: describe a preset, time generation, export a checkpoint


def check_device_name(name: str):
    """--device's spelling (whether this machine has that device is pick_device's question). Here
    because every command with a --device (model.py's, train.py's, evaluate.py's) asks it alike."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"unknown --device '{name}': use auto, cpu, cuda, cuda:N or mps")


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str) -> torch.device:
    """--device NAME -> a torch.device this machine has, or a ValueError saying what to pass instead."""
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA GPU: use --device cpu (or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if name == "mps" and not mps_available():
        raise ValueError("--device mps asked for, but this torch has no MPS backend (Apple GPUs under macOS): use --device cpu (or auto)")
    return torch.device(name)


def bench_generate(config: GPTConfig, prompt_tokens: int, new_tokens: int, repeats: int, device: str = "cpu") -> dict:
    """Greedy generation from a random prompt with and without the KV cache: the median tokens/s of
    each over `repeats` runs, and whether the two produced the same tokens. The runs alternate
    (uncached, cached, uncached, ...) so that both see the same machine load. A random model runs
    as fast as a trained one of the same shape, so no checkpoint is needed."""
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device)
    times, outputs = {False: [], True: []}, {}
    for _ in range(repeats):
        for use_cache in (False, True):
            t0 = time.perf_counter()
            outputs[use_cache] = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[use_cache].append(time.perf_counter() - t0)
    tok_s = {c: new_tokens / sorted(t)[len(t) // 2] for c, t in times.items()}
    return {"uncached_tok_s": tok_s[False], "cached_tok_s": tok_s[True], "same_tokens": torch.equal(outputs[False], outputs[True]),
            "params": model.num_params()}


def export_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="python model.py export", description=(
        "Write a checkpoint in Hugging Face format (config.json, model.safetensors or pytorch_model.bin, "
        "tokenizer.json), so that transformers' AutoModelForCausalLM/AutoTokenizer.from_pretrained(OUT) "
        "and lm-eval-harness can read it (vLLM too; not tested here). GPT-2-shaped models become GPT2LMHeadModel, RoPE+RMSNorm+SwiGLU "
        "models LlamaForCausalLM; other shapes are refused."))
    parser.add_argument("--ckpt", required=True, help="a nanopretrain checkpoint (a run's out_dir/ckpt.pt)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--data_dir", default=None, help="where the run's corpus was prepared, for its tokenizer "
                        "(default: the run's own --data_dir, as stored in the checkpoint)")
    parser.add_argument("--no_tokenizer", action="store_true", help="write the model only, no tokenizer files")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    args = parser.parse_args(argv)
    try:
        model, ckpt = load_model_checkpoint(args.ckpt)
        enc = None
        if not args.no_tokenizer:
            data_dir = args.data_dir or ckpt.get("train_config", {}).get("data_dir", "data_cache")
            enc = load_run_tokenizer(Path(data_dir) / ckpt.get("data_dir", ""))
        written = export_hf(model, args.out, enc, overwrite=args.overwrite)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {', '.join(written)} to {args.out} ({hf_config(model.config)['architectures'][0]})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = argparse.ArgumentParser(
        description="Build a GPT from a preset and print its shape and parameter count; time generation with "
                    "--bench_generate. `python model.py export --help`: write a checkpoint in Hugging Face format.")
    parser.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                        help="model size (default gpt2-124m; with --bench_generate, laptop and gpt2-124m)")
    for f in fields(GPTConfig):
        if f.type in ("int", "float", "str"):
            parser.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=None,
                                help=f"override the preset's {f.name}")
    parser.add_argument("--bench_generate", action="store_true",
                        help="time greedy generation with and without the KV cache on random weights: tokens/s of each")
    parser.add_argument("--prompt_tokens", type=int, default=16, help="--bench_generate: prompt length")
    parser.add_argument("--new_tokens", type=int, default=240, help="--bench_generate: tokens generated (capped so prompt + new fits the block)")
    parser.add_argument("--bench_repeats", type=int, default=3, help="--bench_generate: runs of each, the median is reported")
    parser.add_argument("--device", default="cpu", help="--bench_generate: cpu, cuda, cuda:N, mps or auto (cuda, then mps, then cpu)")
    parser.add_argument("--threads", type=int, default=0, help="--bench_generate: CPU threads for torch (0: torch's default, one per core)")
    args = parser.parse_args(argv)
    skip = {"preset", "bench_generate", "prompt_tokens", "new_tokens", "bench_repeats", "device", "threads"}
    overrides = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    presets = [args.preset] if args.preset else (["laptop", "gpt2-124m"] if args.bench_generate else ["gpt2-124m"])
    try:
        # the benchmark's laptop shape has the laptop run's 2048-token vocabulary (train.py's default)
        vocab = lambda p: {"vocab_size": 2048} if args.bench_generate and p == "laptop" else {}
        configs = {p: GPTConfig(**{**vocab(p), **MODEL_PRESETS[p], **overrides}) for p in presets}
        if args.bench_generate and min(args.prompt_tokens, args.new_tokens, args.bench_repeats) < 1 or args.threads < 0:
            raise ValueError("--prompt_tokens, --new_tokens and --bench_repeats must be at least 1, --threads at least 0")
        if args.bench_generate and any(args.prompt_tokens >= c.block_size for c in configs.values()):
            raise ValueError(f"--prompt_tokens {args.prompt_tokens} leaves no room to generate in a block of "
                             f"{min(c.block_size for c in configs.values())}: use fewer")
        check_device_name(args.device)
        device = str(pick_device(args.device)) if args.bench_generate else args.device  # only the benchmark uses it
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if not args.bench_generate:
        config = configs[presets[0]]
        model = GPT(config)
        print(asdict(config))
        active = f", {model.num_params(active=True):,} active per token (MoE)" if config.moe_experts else ""
        print(f"parameters: {model.num_params():,} total, {model.num_params(exclude_embeddings=True):,} without embeddings{active}")
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"greedy generation, batch 1, float32, {device}, {torch.get_num_threads()} threads, median of {args.bench_repeats}")
    print(f"{'preset':<12}{'params':>12}{'prompt':>8}{'new':>6}{'uncached tok/s':>16}{'cached tok/s':>14}{'speed-up':>10}{'same tokens':>13}")
    for p, config in configs.items():
        new = min(args.new_tokens, config.block_size - args.prompt_tokens)  # within the window: the cache is used throughout
        r = bench_generate(config, args.prompt_tokens, new, args.bench_repeats, device)
        print(f"{p:<12}{r['params']:>12,}{args.prompt_tokens:>8}{new:>6}{r['uncached_tok_s']:>16.1f}{r['cached_tok_s']:>14.1f}"
              f"{r['cached_tok_s'] / r['uncached_tok_s']:>9.1f}x{'yes' if r['same_tokens'] else 'NO':>13}", flush=True)


if __name__ == "__main__":
    main()
