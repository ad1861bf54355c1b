"""
Scaling: the arithmetic that plans a pretraining run before anyone spends a GPU-hour.

The problem
-----------
A pretraining run is decided on paper: how many parameters N, how many training tokens D, how many
FLOPs C that costs, how long it takes on G accelerators at a given utilisation, whether the model,
its gradients, its optimizer state and its activations fit in each accelerator's memory under a
parallel layout, and which (N, D) gives the lowest loss for the compute one has. Each answer is a
short formula. This file writes each one down once, checks it against the real model (model.py)
and against torch's own counters, and ends with a small scaling study you can run on a laptop.

Parameters (exact, from a GPTConfig alone)
------------------------------------------
Per block: two norms (C gains, plus C biases for a LayerNorm with bias), attention's fused QKV
projection C x (nh + 2 n_kv) hs and its output projection C x C, and the MLP (GELU: C x 4C and
4C x C; SwiGLU: C x 2H and H x C with H = model.mlp_hidden(config)), each with an optional bias.
Around the blocks: the token embedding V x C, learned positions T_max x C (absent with RoPE), a
final norm, and an output layer V x C that is the token embedding itself when tied. "Non-embedding"
N drops the token and position embeddings (Kaplan et al. 2020's convention), as GPT.num_params does.

FLOPs per token
---------------
A matmul of (m x k) by (k x n) costs 2mkn FLOPs (a multiply and an add). Per token, the forward
pass costs 2 FLOPs per weight of every matmul, and the backward pass twice that (one matmul for the
input's gradient, one for the weight's), hence the famous

    C_train ~= 6 N D                                  (Kaplan et al. 2020, sec. 2.1)

Attention adds matmuls with no weights: Q K^T and A V cost 2 T C each per token and layer in the
forward pass (T keys per query, nh heads of size hs, nh hs = C), so

    flops/token ~= 6 N + 12 L C T                     (Chowdhery et al. 2022, PaLM, appendix B)

The exact count (`flops_per_token_exact`) adds the operations one by one, as Hoffmann et al. 2022
(Chinchilla, arXiv:2203.15556) do in their appendix F: embeddings (Chinchilla counts the lookup as
a one-hot matmul, 2 V C; torch does a gather and counts 0), QKV (with grouped-query sizes), the
logits Q K^T, the softmax (Chinchilla: 3 nh T; not a matmul), A V, the output projection, the MLP
and the output logits (2 C V); backward = 2 x forward.
Causal masking: a query at position i needs only i + 1 keys, (T + 1)/2 on average, so a kernel
that skips masked blocks (FlashAttention) does half of the T^2 work. torch's FlopCounterMode
counts matmuls only, as 2mnk, and counts the full T^2: `sdpa_flop_count` has no causal argument
(CUDA's flash, efficient and cuDNN SDPA kernels are registered that way), and on the CPU torch
dispatches SDPA to `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode does not
register at all, so it counts 0 FLOPs for attention there. `measure_flops_per_token` therefore
counts the real model with the naive backend (explicit matmuls) on the meta device: exact, free,
and equal to our count with causal=False (the tests check it on real CPU tensors too).

MFU
---
Model FLOPs utilisation = tokens/s x flops/token / peak FLOP/s (Chowdhery et al. 2022, app. B).
The peak is the vendor's dense (no sparsity) tensor-core figure for the dtype the matmuls run in
(a table below, each row with its data sheet); an unknown device gets None, never a guess.

Memory per GPU
--------------
Model states, with Psi parameters, mixed-precision Adam (Rajbhandari et al. 2020, ZeRO,
arXiv:1910.02054, sec. 3.1): 2 Psi (bf16 weights) + 2 Psi (bf16 gradients) + K Psi with K = 12
(fp32 master weights, Adam's m and v). ZeRO shards across the dp data-parallel ranks:

    stage 0: (2 + 2 + K) Psi      stage 1: 2 Psi + 2 Psi + K Psi / dp
    stage 2: 2 Psi + (2 + K) Psi / dp      stage 3: (2 + 2 + K) Psi / dp

and tensor and pipeline parallelism divide Psi by tp and pp first. Activations per layer, 16-bit
(Korthikanti et al. 2022, arXiv:2205.05198, sec. 4), with s tokens per sequence, b sequences, h
width, a heads, t tensor-parallel degree:

    no parallelism: s b h (34 + 5 a s / h)
    tensor parallel: s b h (10 + 24/t + 5 a s / (h t))
    + sequence parallel: s b h (34 + 5 a s / h) / t
    full recomputation: 2 s b h (only each layer's input is kept)

Scaling laws
------------
Kaplan et al. 2020 (arXiv:2001.08361): L(N) = (N_c/N)^alpha_N, L(D) = (D_c/D)^alpha_D,
L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D, and N_opt ~ C^0.73.
Hoffmann et al. 2022 (Chinchilla): L(N, D) = E + A/N^alpha + B/D^beta; minimising it under
C = 6 N D gives (their eq. 4)

    N_opt = G (C/6)^a,  D_opt = (C/6)^b / G,  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta/(alpha+beta),  b = alpha/(alpha+beta)

with their published coefficients, and with those of the Epoch AI replication (Besiroglu et al.
2024, arXiv:2404.10102), who refit the same data and found the original rounded fit inconsistent
with the paper's own ~20 tokens per parameter.

Mixture of experts: total and active parameters
-----------------------------------------------
An MoE layer (model.MoE) holds E routed experts of hidden width H_e = moe_expert_frac H, a router
C x E, and optionally S shared experts (one MLP of width S H_e); a token passes through the router,
k experts and the shared ones. So the total count grows with E and the active count, the one that
sets FLOPs per token, with k:

    N_total  = N_dense_part + sum over MoE layers of (C E + E P_e + P_shared)
    N_active = N_dense_part + sum over MoE layers of (C E + k P_e + P_shared),   P_e = one expert's weights
    flops/token ~= 6 N_active(matmul) + 12 L C T         (the router's 2 C E per token included)

Memory follows N_total (every expert's weights, gradients and Adam state live somewhere): expert
parallelism over ep ranks divides the expert part by ep, `memory --ep` (each rank's experts whole,
outside any ZeRO shard), and `plan` gives an MoE the layouts train.py runs it with: data and expert
parallelism, ZeRO 0-2 (plan_layouts), the all-to-alls counted (expert_parallel_bytes). Scaling-law note: at a fixed
compute budget, loss depends on both counts, not on one N. Clark et al. 2022 ("Unified Scaling
Laws for Routed Language Models", arXiv:2202.01169) fit loss as a function of the dense-equivalent
size and the number of experts, and find the gain from more experts shrinking as the dense size
grows; Abnar et al. 2025 ("Parameters vs FLOPs: Scaling Laws for Optimal Sparsity for Mixture-of-
Experts Language Models", arXiv:2501.12370) find that, for a fixed compute budget, the best
sparsity (1 - k/E) grows with the total parameter count one can afford. Neither law was fitted
at our laptop scale; the README's MoE ablation measures what it buys here.

Your own scaling law
--------------------
`python scaling.py sweep` trains a grid of small models at a few budgets C with train.py (run as a
program: this file never imports the trainer), each for the steps that make 6 N D = C, and fits
the measured losses twice, as Hoffmann et al. do: per budget a parabola in log N whose vertex is
N_opt (approach 2, then N_opt ~ C^a), and the parametric law above (approach 3: Huber loss on
log L, L-BFGS from a grid of starts), with bootstrap intervals over the points (as Epoch AI do).

Map of this file, in reading order
----------------------------------
parameter counts -> FLOPs (6N, exact, measured) -> peak table and MFU -> memory (model states,
activations) -> scaling laws (Kaplan, Chinchilla, Epoch) -> plan (time, memory and communication
per layout) -> fitting (IsoFLOP parabolas, Huber + L-BFGS parametric fit, bootstrap) -> the sweep
(train.py as a subprocess) -> command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from model import GPT, MODEL_PRESETS, GPTConfig, expert_hidden, mlp_hidden

HERE = os.path.dirname(os.path.abspath(__file__))
PF_DAY = 1e15 * 86400  # FLOPs in a petaflop/s-day, Kaplan et al.'s unit of compute


# ----------------------------------------------------------------------------------------------
# Parameters


def make_config(preset: str | None = None, **overrides) -> GPTConfig:
    """A GPTConfig from a model.MODEL_PRESETS name plus overrides (None values are ignored)."""
    if preset is not None and preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset '{preset}': choose one of {', '.join(MODEL_PRESETS)}")
    base = dict(MODEL_PRESETS[preset]) if preset else {}
    return GPTConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def param_tensors(config: GPTConfig) -> list[tuple[str, int]]:
    """Every distinct parameter tensor of model.GPT(config) as (name, numel), in model order.

    Written from the model's structure, not by building it: this is the count a planner needs
    for a 70B model that would not fit in this machine's memory.
    """
    C, hs, V = config.n_embd, config.head_size, config.vocab_size
    n_kv = config.n_kv_head or config.n_head
    qkv_out = (config.n_head + 2 * n_kv) * hs  # fused q (nh heads) and k, v (n_kv heads each)
    hidden = mlp_hidden(config)

    def norm(name):  # RMSNorm has a gain only; LayerNorm a gain and (with bias) a bias
        with_bias = config.norm == "layernorm" and config.bias
        return [(f"{name}.weight", C)] + ([(f"{name}.bias", C)] if with_bias else [])

    def linear(name, n_in, n_out):
        return [(f"{name}.weight", n_in * n_out)] + ([(f"{name}.bias", n_out)] if config.bias else [])

    def mlp(name, width):  # an MLP of hidden width `width` (SwiGLU's c_fc holds gate and up)
        return linear(f"{name}.c_fc", C, 2 * width if config.mlp == "swiglu" else width) + linear(f"{name}.c_proj", width, C)

    def moe(name):  # model.MoE: the router, E stacked experts, the shared experts
        E, h = config.moe_experts, expert_hidden(config)
        fc = 2 * h if config.mlp == "swiglu" else h
        out = [(f"{name}.router.weight", C * E), (f"{name}.experts.w_fc", E * C * fc), (f"{name}.experts.w_proj", E * h * C)]
        out += [(f"{name}.experts.b_fc", E * fc), (f"{name}.experts.b_proj", E * C)] if config.bias else []
        return out + (mlp(f"{name}.shared", config.moe_shared * h) if config.moe_shared else [])

    def block(p, sparse=False):  # one transformer block's tensors (sparse: its MLP is an MoE)
        out = norm(f"{p}.ln_1") + linear(f"{p}.attn.c_attn", C, qkv_out) + linear(f"{p}.attn.c_proj", C, C)
        if config.qk_norm:  # one RMSNorm gain of width hs each for queries and keys, shared by the heads
            out += [(f"{p}.attn.q_norm.weight", hs), (f"{p}.attn.k_norm.weight", hs)]
        return out + norm(f"{p}.ln_2") + (moe(f"{p}.mlp") if sparse else mlp(f"{p}.mlp", hidden))

    tensors = [("transformer.wte.weight", V * C)]
    if not config.rope:
        tensors.append(("transformer.wpe.weight", config.block_size * C))
    for i in range(config.n_layer):
        tensors += block(f"transformer.h.{i}", config.is_moe_layer(i))
    tensors += norm("transformer.ln_f")
    if not config.tie_embeddings:  # tied: lm_head.weight *is* wte.weight, one tensor
        tensors.append(("lm_head.weight", V * C))
    for k in range(config.mtp):  # multi-token prediction: a block per extra head (ln_f and lm_head are shared)
        if config.mtp_style == "sequential":  # model.MTPModule: two norms and M_k (2C -> C, no bias) before the block
            p = f"mtp_heads.{k}"
            tensors += norm(f"{p}.norm_h") + norm(f"{p}.norm_e") + [(f"{p}.proj.weight", 2 * C * C)] + block(f"{p}.block")
        else:
            tensors += block(f"mtp_heads.{k}")
    return tensors


def count_params(config: GPTConfig) -> dict:
    """Parameter counts by part. total == GPT(config).num_params(), non_embedding ==
    num_params(exclude_embeddings=True); matmul counts every weight a token is multiplied by
    (non-embedding plus a tied output layer, whose V x C matmul is real). For an MoE, active ==
    num_params(active=True): the routed experts count k of E (and active_matmul likewise);
    experts: every routed expert's weights (what expert parallelism splits)."""
    tensors = param_tensors(config)
    total = sum(n for _, n in tensors)
    embedding = sum(n for name, n in tensors if name in ("transformer.wte.weight", "transformer.wpe.weight"))
    per_layer = sum(n for name, n in tensors if name.startswith("transformer.h.0."))
    head = config.vocab_size * config.n_embd
    experts = sum(n for name, n in tensors if ".experts." in name)
    idle = experts * (config.moe_experts - config.moe_topk) // config.moe_experts if config.moe_experts else 0
    matmul = total - embedding + head * config.tie_embeddings
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "per_layer": per_layer, "blocks": sum(n for name, n in tensors if name.startswith("transformer.h.")),
            "lm_head": head, "lm_head_tied": config.tie_embeddings, "matmul": matmul, "tensors": len(tensors),
            "experts": experts, "active": total - idle, "active_matmul": matmul - idle}


# ----------------------------------------------------------------------------------------------
# FLOPs per token


def flops_per_token_6n(config: GPTConfig, seq_len: int | None = None, attention: bool = True) -> float:
    """6 N_matmul + 12 L C T (Chowdhery et al. 2022, PaLM, appendix B); train.py's MFU uses it.

    N_matmul counts the output layer even when tied (its V x C matmul runs every token), and an
    MoE's routed experts k of E (the active count). attention=False gives the bare 6N of Kaplan et
    al. (2020, sec. 2.1).
    """
    T = seq_len or config.block_size
    # --mtp: each extra head's block (and a sequential module's projection) is in N_matmul already;
    # its use of the shared output layer is not. (That sequential depth k runs T - k positions of
    # the T is left to the exact count.)
    n = count_params(config)["active_matmul"] + config.mtp * config.vocab_size * config.n_embd
    return 6 * n + (12 * (config.n_layer + config.mtp) * config.n_embd * T if attention else 0)


def flops_per_token_exact(config: GPTConfig, seq_len: int | None = None, causal: bool = False,
                          convention: str = "matmul") -> dict:
    """Forward FLOPs per token, operation by operation, in the manner of Chinchilla's appendix F.

    convention "matmul" counts what FlopCounterMode counts (2 m n k per matmul, nothing else);
    "chinchilla" adds their embedding (2 V C, a one-hot matmul) and softmax (3 nh T) terms.
    causal=True counts the (T + 1)/2 keys a query really attends to on average, the work a
    block-skipping kernel does; False counts the full T x T score matrix, as naive attention and
    FlopCounterMode do. Returns per-op forward FLOPs plus "forward", "backward" (= 2 x forward:
    one matmul for the input gradient, one for the weight gradient) and "train".
    """
    if convention not in ("matmul", "chinchilla"):
        raise ValueError(f"unknown convention '{convention}': use matmul or chinchilla")
    T = seq_len or config.block_size
    C, V, hs = config.n_embd, config.vocab_size, config.head_size
    n_kv = config.n_kv_head or config.n_head
    keys = lambda t: (t + 1) / 2 if causal else t  # keys per query over t positions, averaged over them
    # --mtp: each extra head is one more block and one more pass through the output layer, on the
    # share of the T positions it runs on (mtp_positions)
    positions = mtp_positions(config, T)
    shares = [1 if t == T else t / T for t in positions]  # 1 (an int, so the counts stay integers) or (T - k) / T
    L = config.n_layer + sum(shares)  # blocks, an MTP block counted by its share of the positions
    attended = config.n_layer * keys(T) + sum(s * keys(t) for s, t in zip(shares, positions))  # keys per token, all blocks
    hidden = mlp_hidden(config)
    # GELU: C -> H -> C (2 matmuls); SwiGLU: gate and up C -> H, down H -> C (3 matmuls)
    mlp = lambda h: 2 * C * 2 * h + 2 * h * C if config.mlp == "swiglu" else 2 * 2 * C * h
    n_moe = sum(map(config.is_moe_layer, range(config.n_layer)))
    h_e = expert_hidden(config) if n_moe else 0
    ops = {
        "embedding": 2 * V * C if convention == "chinchilla" else 0,
        "qkv": L * 2 * C * (config.n_head + 2 * n_kv) * hs,  # GQA shrinks K and V's share
        "attention_logits": 2 * attended * C,  # Q K^T: nh heads x hs x keys, (nh hs = C), summed over blocks
        "attention_softmax": 3 * config.n_head * attended if convention == "chinchilla" else 0,
        "attention_values": 2 * attended * C,  # A V
        "attention_out": L * 2 * C * C,
        # dense blocks' MLPs (the --mtp heads' blocks are dense); an MoE layer's k routed experts of width
        # H_e and its shared ones of width S H_e
        "mlp": (L - n_moe) * mlp(hidden) + n_moe * (config.moe_topk * mlp(h_e) + mlp(config.moe_shared * h_e)),
        "moe_router": n_moe * 2 * C * config.moe_experts,  # (C) -> (E) logits
        "mtp_projection": (sum(shares) if config.mtp_style == "sequential" else 0) * 2 * 2 * C * C,  # M_k: (2C) -> (C)
        "logits": (1 + sum(shares)) * 2 * C * V,
    }
    forward = sum(ops.values())
    return {**ops, "forward": forward, "backward": 2 * forward, "train": 3 * forward}


def mtp_positions(config: GPTConfig, T: int) -> list[int]:
    """The positions each --mtp extra block runs on, of a window of T: all T for a parallel head
    (its loss keeps the first T - k), T - k for DeepSeek-V3's sequential module k, which runs only
    where token i+k exists (model.GPT.sequential_mtp_losses)."""
    if config.mtp_style == "sequential":
        return [T - k for k in range(1, config.mtp + 1)]
    return [T] * config.mtp


def measure_flops_per_token(config: GPTConfig, seq_len: int | None = None, batch: int = 1, device: str = "meta") -> float:
    """Forward + backward FLOPs per token of the real model.GPT, counted by torch's FlopCounterMode.

    The naive attention backend makes attention explicit matmuls that FlopCounterMode sees (on the
    CPU, its SDPA kernel is invisible to it); the meta device runs shapes only, so a 1.5B model at
    T = 8192 is counted in a second without allocating a byte.
    """
    from torch.utils.flop_counter import FlopCounterMode

    T = seq_len or config.block_size
    cfg = dataclasses.replace(config, attention="naive", dropout=0.0, block_size=max(T, config.block_size))
    with torch.device(device):
        model = GPT(cfg)
        idx = torch.randint(0, cfg.vocab_size, (batch, T))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops() / (batch * T)


def flops_table(config: GPTConfig, seq_lens) -> list[dict]:
    """For each T: the measured count and how far the approximations are from it."""
    rows = []
    n_kaplan = count_params(config)["non_embedding"]
    for T in seq_lens:
        measured = measure_flops_per_token(config, T)
        exact = flops_per_token_exact(config, T)["train"]
        approx = {"6N": 6 * n_kaplan, "6N_matmul": flops_per_token_6n(config, T, attention=False),
                  "6N_matmul+12LCT": flops_per_token_6n(config, T)}
        rows.append({"seq_len": T, "measured": measured, "exact": exact,
                     "exact_causal": flops_per_token_exact(config, T, causal=True)["train"],
                     **approx,
                     **{f"{k}_error": v / measured - 1 for k, v in approx.items()}})
    return rows


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s and MFU

# Dense (no sparsity) peak FLOP/s per GPU, by the dtype the matmuls run in. "tf32" is float32
# matmuls on tensor cores (torch.set_float32_matmul_precision("high")); "float32" is plain FP32.
# NVIDIA's data sheets print tensor-core figures "with sparsity"; the dense ones are half of them.
PEAK_FLOPS = {
    "A100 SXM": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12, "memory_gb": 80,
                 "source": "NVIDIA A100 Tensor Core GPU data sheet, A100 80GB SXM column (dense)"},
    "A100 PCIe": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12, "memory_gb": 80,
                  "source": "NVIDIA A100 Tensor Core GPU data sheet, A100 80GB PCIe column (dense)"},
    "H100 SXM": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12, "fp8": 1978.9e12,
                 "memory_gb": 80, "source": "NVIDIA H100 Tensor Core GPU data sheet, H100 SXM column (sparsity figures halved)"},
    "H100 PCIe": {"float32": 51e12, "tf32": 378e12, "bfloat16": 756e12, "float16": 756e12, "fp8": 1513e12,
                  "memory_gb": 80, "source": "NVIDIA H100 Tensor Core GPU data sheet, H100 PCIe column (sparsity figures halved)"},
    "H100 NVL": {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12, "float16": 835.5e12, "fp8": 1670.5e12,
                 "memory_gb": 94, "source": "NVIDIA H100 Tensor Core GPU data sheet, H100 NVL column (sparsity figures halved)"},
    "H200 SXM": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12, "float16": 989.4e12, "fp8": 1978.9e12,
                 "memory_gb": 141, "source": "NVIDIA H200 Tensor Core GPU data sheet, H200 SXM column (sparsity figures halved)"},
    "H200 NVL": {"float32": 60e12, "tf32": 417.5e12, "bfloat16": 835.5e12, "float16": 835.5e12, "fp8": 1670.5e12,
                 "memory_gb": 141, "source": "NVIDIA H200 Tensor Core GPU data sheet, H200 NVL column (sparsity figures halved)"},
    "B200": {"float32": 75e12, "tf32": 1.125e15, "bfloat16": 2.25e15, "float16": 2.25e15, "fp8": 4.5e15, "memory_gb": 180,
             "source": "NVIDIA HGX B200 data sheet: 8-GPU figures divided by 8, sparsity figures halved"},
    "MI300X": {"float32": 163.4e12, "tf32": 653.7e12, "bfloat16": 1307.4e12, "float16": 1307.4e12, "fp8": 2614.9e12,
               "memory_gb": 192, "source": "AMD Instinct MI300X data sheet (peak dense, without sparsity)"},
    "L4": {"float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12, "float16": 121e12, "fp8": 242.5e12, "memory_gb": 24,
           "source": "NVIDIA L4 Tensor Core GPU data sheet (sparsity figures halved)"},
}
# The CPU has no row: no vendor publishes one "peak" for a CPU's matmuls, because it depends on how
# many cores torch uses, their clock and their vector units. cpu_peak_flops computes it instead.


def cpu_peak_flops(threads: int | None = None, cpuinfo: str | None = None) -> float | None:
    """Float32 peak of the cores torch uses, from the instruction set: threads x clock x FLOPs/cycle.

    FLOPs/cycle per core = 2 (a fused multiply-add is two FLOPs) x 2 FMA units x lanes, where lanes
    = vector bits / 32: 16 with AVX-512, 8 with AVX2 + FMA, 4 with SSE (Intel's and AMD's
    optimisation manuals: two FMA pipes per core since Haswell and Zen). This is an upper bound: a
    core that runs 512-bit instructions as two 256-bit halves (AMD Zen 4) reaches half of it, and
    the clock under load is not the one /proc/cpuinfo reports. None off Linux (no /proc/cpuinfo).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if not flags or not mhz:
        return None
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    threads = threads or torch.get_num_threads()
    return threads * float(mhz.group(1)) * 1e6 * 2 * 2 * lanes

# torch.cuda.get_device_name -> table row, most specific pattern first. Examples of real names:
# "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB",
# "AMD Instinct MI300X". GH200 and GB200 run at other clocks and power: not matched, hence unknown.
DEVICE_NAME_PATTERNS = [
    (r"H100.*NVL", "H100 NVL"), (r"H100.*PCIe", "H100 PCIe"), (r"(?<!G)H100", "H100 SXM"),
    (r"(?<!G)H200.*NVL", "H200 NVL"), (r"(?<!G)H200", "H200 SXM"),
    (r"A100.*PCIe", "A100 PCIe"), (r"A100", "A100 SXM"),
    (r"(?<!G)B200", "B200"), (r"MI300X", "MI300X"), (r"\bL4\b", "L4"),
]
# what a user may type for --gpu: the row names, case and spaces ignored, plus these short forms
GPU_ALIASES = {"h100": "H100 SXM", "h200": "H200 SXM", "a100": "A100 SXM"}


def gpu_row(device_name: str) -> str | None:
    """The PEAK_FLOPS row for a torch.cuda.get_device_name string, or None if not in the table."""
    for pattern, row in DEVICE_NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return row
    return None


def resolve_gpu(name: str) -> str:
    """A user's --gpu (e.g. "H100", "h100-sxm", "MI300X") -> the PEAK_FLOPS row; ValueError if unknown."""
    key = re.sub(r"[\s_-]", "", name.lower())
    rows = {re.sub(r"\s", "", row.lower()): row for row in PEAK_FLOPS}
    if key in rows or key in GPU_ALIASES:
        return rows.get(key) or GPU_ALIASES[key]
    raise ValueError(f"unknown GPU '{name}': use one of {', '.join(PEAK_FLOPS)} (or give the peak with --peak)")


def peak_from_flags(gpu: str | None, dtype: str = "bfloat16", peak: float | None = None) -> float | None:
    """--peak if given; else the table's peak for --gpu; None for "cpu" (no vendor peak) or no --gpu."""
    if peak is not None:
        check_positive(peak=peak)
        return peak
    if gpu is None or gpu.lower() == "cpu":
        return None
    return PEAK_FLOPS[resolve_gpu(gpu)].get(dtype)


def dtype_key(dtype: torch.dtype) -> str:
    """The PEAK_FLOPS column that matmuls in `dtype` run at. float32 matmuls use TF32 tensor cores
    only when torch allows it (set_float32_matmul_precision "high" or "medium")."""
    if dtype == torch.float32:
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "float32"
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))


def peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s for a device name and dtype, or None (unknown device or dtype): never a guess."""
    row = gpu_row(device_name)
    key = dtype if isinstance(dtype, str) else dtype_key(dtype)
    return PEAK_FLOPS[row].get(key) if row else None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak for a torch device: looked up by torch.cuda.get_device_name; on a CPU computed by
    cpu_peak_flops for float32 (None for other dtypes); None on MPS."""
    if device.type == "cpu":
        return cpu_peak_flops() if dtype == torch.float32 else None
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), dtype)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (PaLM, appendix B). None without a peak."""
    return tokens_per_s * flops_per_token / peak if peak else None


# ----------------------------------------------------------------------------------------------
# Memory: model states (ZeRO) and activations (Korthikanti et al.)

# bytes per parameter: (weights, gradients, optimizer state) for Adam
STATE_BYTES = {
    # pure fp32 training, and torch autocast (which keeps fp32 weights and gradients): 4 + 4 + (m, v) 8
    "fp32": (4, 4, 8),
    # mixed precision as in the ZeRO paper (sec. 3.1): bf16/fp16 weights and gradients, and
    # K = 12 bytes of fp32 master weights, m and v
    "mixed": (2, 2, 12),
}


def model_state_bytes(n_params: float, precision: str = "mixed", zero: int = 0, dp: int = 1, tp: int = 1,
                      pp: int = 1, n_tensors: int = 0) -> dict:
    """Bytes of weights, gradients and Adam state held by one GPU.

    Psi = n_params / (tp pp): tensor and pipeline parallelism split the weights first; ZeRO stage
    1 shards the optimizer state over dp ranks, stage 2 also the gradients, stage 3 also the
    weights (Rajbhandari et al. 2020, Figure 1). n_tensors adds torch.optim.AdamW's per-tensor
    `step` counter (a float32 scalar each), which makes the fp32 count exact to the byte.
    """
    if precision not in STATE_BYTES:
        raise ValueError(f"unknown precision '{precision}': use one of {', '.join(STATE_BYTES)}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, not {zero}")
    if min(dp, tp, pp) < 1 or n_params <= 0:
        raise ValueError("--params, --dp, --tp and --pp must be positive")
    w, g, o = STATE_BYTES[precision]
    psi = n_params / (tp * pp)
    weights = w * psi / (dp if zero >= 3 else 1)
    grads = g * psi / (dp if zero >= 2 else 1)
    optimizer = (o * psi + 4 * n_tensors) / (dp if zero >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "total": weights + grads + optimizer}


def activation_bytes_per_layer(seq_len: int, batch: int, n_embd: int, n_head: int, tp: int = 1, sp: bool = False,
                               recompute: str = "none", bytes_per_value: int = 2, dropout: bool = True,
                               kv_ratio: float = 1.0, mlp_values: float = 8.0, mask_bytes: int = 1) -> float:
    """Bytes saved for backward by one transformer layer (Korthikanti et al. 2022, sec. 4.1-4.2).

    The paper's s b h (34 + 5 a s / h) is a count of 16-bit values plus 1-byte dropout masks:
      replicated under TP: 2 LayerNorm inputs, QKV input, MLP input (4 values) + 2 dropout masks
      split under TP: Q, K, V, out-projection input (4 values), GELU input and output (4h + 4h)
      attention scores, split: softmax output, its dropout mask and dropout output (a s^2 b each)
    With e = bytes_per_value and m = mask_bytes if dropout else 0, that is
      s b h (4e + 2m) + s b h e (2 + 2 kv_ratio + mlp_values) / t + a s^2 b (e + m + [dropout] e) / t
    which is the paper's formula for e = 2, m = 1 (a test checks it). A GPU's fused dropout keeps a
    1-byte bool mask; torch's CPU dropout keeps a float mask of the activation's dtype (m = e).
    kv_ratio = n_kv/n_head for
    GQA; mlp_values = 8 for GELU, 4 H / h for SwiGLU (gate and up, SiLU(gate), their product).
    Sequence parallelism also splits the replicated part by t. Recomputation: "selective" drops
    the s^2 terms (recomputed in backward), "full" keeps only the layer's input, s b h e (/ t with sp).
    """
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"unknown recompute '{recompute}': use none, selective or full")
    s, b, h, a, t, e, m = seq_len, batch, n_embd, n_head, tp, bytes_per_value, mask_bytes * int(dropout)
    if recompute == "full":
        return s * b * h * e / (t if sp else 1)
    replicated = s * b * h * (4 * e + 2 * m)
    split = s * b * h * e * (2 + 2 * kv_ratio + mlp_values)
    scores = 0 if recompute == "selective" else a * s * s * b * (e + m + int(dropout) * e)
    return (replicated + split + scores) / t if sp else replicated + (split + scores) / t


def mlp_values_for(config: GPTConfig) -> float:
    """Values per s b h that the MLP saves: GELU's 4h input and 4h output; SwiGLU's 4 H."""
    return 4 * mlp_hidden(config) / config.n_embd if config.mlp == "swiglu" else 8.0


def activation_bytes(config: GPTConfig, seq_len: int, batch: int, tp: int = 1, sp: bool = False,
                     recompute: str = "none", bytes_per_value: int = 2, dropout: bool | None = None,
                     mask_bytes: int = 1) -> dict:
    """Activation bytes of the whole model for one micro-batch.

    L layers: with pipeline parallelism and the 1F1B schedule the first stage keeps pp micro-batches
    of L/pp layers in flight, L layers' worth again (Korthikanti et al. 2022, sec. 4.2.3), so pp
    does not divide this. Outside the layers (sec. 4.3): the embedding's dropout mask, the final
    norm's and the output layer's inputs, and the float32 logits the cross-entropy keeps (4 s b V).
    With sp the mask and the two inputs are split by t: parallel.py applies the embedding's dropout
    after the reduce-scatter, to this rank's T/t positions (split_positions_and_dropout).
    """
    drop = config.dropout > 0 if dropout is None else dropout
    kv_ratio = (config.n_kv_head or config.n_head) / config.n_head
    per_layer = activation_bytes_per_layer(seq_len, batch, config.n_embd, config.n_head, tp, sp, recompute,
                                           bytes_per_value, drop, kv_ratio, mlp_values_for(config), mask_bytes)
    s_b_h = seq_len * batch * config.n_embd
    outside = (s_b_h * mask_bytes * int(drop) + 2 * s_b_h * bytes_per_value) / (tp if sp else 1) \
        + 4 * seq_len * batch * config.vocab_size / tp
    if recompute == "full":  # the layer being recomputed holds its full activations once
        outside += activation_bytes_per_layer(seq_len, batch, config.n_embd, config.n_head, tp, sp, "none",
                                              bytes_per_value, drop, kv_ratio, mlp_values_for(config), mask_bytes)
    layers = config.n_layer * per_layer
    return {"per_layer": per_layer, "layers": layers, "outside_layers": outside, "total": layers + outside}


def measure_saved_activation_bytes(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward during model(idx, idx), parameters excluded.

    saved_tensors_hooks sees every tensor packed for backward; storages are deduplicated (a tensor
    and its views count once) and parameters' storages are skipped (they are not activations).
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    return sum(seen.values())


def memory_estimate(config: GPTConfig, n_params: float | None = None, precision: str = "mixed", zero: int = 0,
                    dp: int = 1, tp: int = 1, pp: int = 1, seq_len: int | None = None, micro_batch: int = 1,
                    sp: bool = False, recompute: str = "none", gpu: str | None = None, ep: int = 1) -> dict:
    """Model states + activations per GPU, and whether they fit in `gpu`'s memory. ep: expert
    parallelism keeps 1/ep of an MoE's routed experts per GPU (parallel.ExpertParallel), so the
    states are those of N - N_experts (1 - 1/ep) parameters ("params", per GPU), the N_experts / ep
    of its own experts kept whole outside any ZeRO shard (ZeRO shards the rest, as parallel.py
    does). Activations are the dense formula's (an MoE's expert activations follow its k N routed
    slots; not modelled here)."""
    n = n_params or count_params(config)["total"]
    n_total, own_experts = n, 0.0
    if ep > 1:
        if not config.moe_experts or config.moe_experts % ep or dp % ep:
            raise ValueError(f"--ep {ep} splits the experts of an MoE over data-parallel ranks: give --moe_experts "
                             f"and --dp, multiples of {ep}")
        own_experts = count_params(config)["experts"] / ep
        n -= count_params(config)["experts"] - own_experts
    T = seq_len or config.block_size
    states = model_state_bytes(n - own_experts, precision, zero, dp, tp, pp)
    if own_experts:  # whole on each rank: no ZeRO stage shards them
        whole = model_state_bytes(own_experts, precision, 0, 1, tp, pp)
        states = {k: states[k] + whole[k] for k in states}
    act_bytes = 2 if precision == "mixed" else 4
    acts = activation_bytes(config, T, micro_batch, tp, sp, recompute, act_bytes)
    total = states["total"] + acts["total"]
    out = {"params": n, "params_total": n_total, "ep": ep, "states": states, "activations": acts, "total": total}
    if gpu:
        row = resolve_gpu(gpu)
        capacity = PEAK_FLOPS[row]["memory_gb"] * 1e9
        out.update(gpu=row, gpu_memory=capacity, fits=total <= USABLE_FRACTION * capacity)
    return out


# Leave 10% of a GPU's memory for the CUDA context, temporary buffers, communication buckets and
# allocator fragmentation, none of which the formulas above count (a rule of thumb, not a law).
USABLE_FRACTION = 0.9


# ----------------------------------------------------------------------------------------------
# Scaling laws

# Kaplan et al. 2020, Table 5 / sec. 1.2 (N without embeddings, D in tokens, C in PF-days)
KAPLAN = {"alpha_N": 0.076, "N_c": 8.8e13, "alpha_D": 0.095, "D_c": 5.4e13, "alpha_C_min": 0.050,
          "C_c_min": 3.1e8, "N_opt_coef": 1.3e9, "N_opt_exp": 0.73}  # N_opt = 1.3e9 C_min^0.73 (Fig. 14)
# Hoffmann et al. 2022, eq. 10 (approach 3); Besiroglu et al. 2024 (Epoch AI), Table 1
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
EPOCH = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
# Hoffmann et al. 2022, Table 2, approach 1 (minimum over training curves): N_opt ~ C^0.50 and
# D_opt ~ C^0.50. The paper publishes exponents, not the prefactor, so we anchor the power law at
# the one budget it names in the text, Gopher's 5.76e23 FLOPs -> 67B parameters (Table 3).
APPROACH1 = {"a": 0.50, "C_0": 5.76e23, "N_0": 67e9}
# Hoffmann et al. 2022, Table 3 (from approach 1): parameters, training FLOPs, training tokens
CHINCHILLA_TABLE3 = [
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


def kaplan_loss(N: float | None = None, D: float | None = None) -> float:
    """L(N) (eq. 1.1), L(D) (eq. 1.2) or L(N, D) (eq. 1.5) of Kaplan et al. 2020, in nats per token."""
    k = KAPLAN
    if N is not None and D is not None:
        return ((k["N_c"] / N) ** (k["alpha_N"] / k["alpha_D"]) + k["D_c"] / D) ** k["alpha_D"]
    if N is not None:
        return (k["N_c"] / N) ** k["alpha_N"]
    if D is not None:
        return (k["D_c"] / D) ** k["alpha_D"]
    raise ValueError("give --params and/or --tokens")


def kaplan_optimal(compute: float) -> dict:
    """Kaplan's compute-optimal allocation: N_opt = 1.3e9 (C/PF-day)^0.73 (Fig. 14), D = C / 6N,
    and L(C_min) = (C_c_min / C_min)^0.050 (eq. 1.4)."""
    check_positive(compute=compute)
    c_pf = compute / PF_DAY
    n = KAPLAN["N_opt_coef"] * c_pf ** KAPLAN["N_opt_exp"]
    d = compute / (6 * n)
    return {"N": n, "D": d, "tokens_per_param": d / n, "loss": (KAPLAN["C_c_min"] / c_pf) ** KAPLAN["alpha_C_min"]}


def parametric_loss(N: float, D: float, law: dict = CHINCHILLA) -> float:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""
    return law["E"] + law["A"] / N ** law["alpha"] + law["B"] / D ** law["beta"]


# EXERCISE: chinchilla (tests/test_scaling.py -k parametric_optimum)
def parametric_optimal(compute: float, law: dict = CHINCHILLA) -> dict:
    """argmin L(N, D) subject to 6 N D = C, in closed form (Hoffmann et al. 2022, eq. 4):
    {"N", "D", "tokens_per_param": D / N, "loss": L(N, D)}."""
    check_positive(compute=compute)
    alpha, beta = law["alpha"], law["beta"]
    G = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
    n = G * (compute / 6) ** (beta / (alpha + beta))
    d = (compute / 6) ** (alpha / (alpha + beta)) / G
    return {"N": n, "D": d, "tokens_per_param": d / n, "loss": parametric_loss(n, d, law)}


def approach1_optimal(compute: float) -> dict:
    """Chinchilla approach 1: N_opt = N_0 (C / C_0)^a with a = 0.50, D_opt = C / (6 N_opt)."""
    check_positive(compute=compute)
    n = APPROACH1["N_0"] * (compute / APPROACH1["C_0"]) ** APPROACH1["a"]
    d = compute / (6 * n)
    return {"N": n, "D": d, "tokens_per_param": d / n}


def chinchilla_table() -> list[dict]:
    """Chinchilla's Table 3 beside what approach 1, approach 3 and the Epoch refit predict for its budgets."""
    rows = []
    for n, c, d in CHINCHILLA_TABLE3:
        rows.append({"paper_N": n, "paper_C": c, "paper_D": d, "approach1": approach1_optimal(c),
                     "approach3": parametric_optimal(c, CHINCHILLA), "epoch": parametric_optimal(c, EPOCH)})
    return rows


def check_positive(**values):
    for name, v in values.items():
        if v is None or not (v > 0) or math.isinf(v):
            raise ValueError(f"--{name} must be a positive number, got {v}")


# ----------------------------------------------------------------------------------------------
# Plan: time, memory and communication for a run


def shape_for_params(n_params: float, head_size: int = 128, aspect: int = 128) -> dict:
    """A plausible (L, C, nh) for N ~= 12 L C^2 with width C = aspect x L (LLaMA-7B: 4096 = 128 x 32),
    C a multiple of head_size. Only used when the user gives a parameter count without a shape."""
    check_positive(params=n_params)
    L = max(1, round((n_params / (12 * aspect**2)) ** (1 / 3)))
    C = max(head_size, head_size * round(math.sqrt(n_params / (12 * L)) / head_size))
    return {"n_layer": L, "n_embd": C, "n_head": C // head_size}


def data_parallel_bytes(n_params: float, zero: int, dp: int, bytes_per_value: float = 2, n_root: float = 0) -> float:
    """Bytes one rank sends per optimizer step to keep dp data-parallel replicas in step, as
    parallel.py implements each ZeRO stage (ring collectives: an all-reduce sends 2 (d-1)/d of the
    tensor, a reduce-scatter or all-gather (d-1)/d; Patarasuk & Yuan 2009), with Psi = n_params
    values of bytes_per_value each (pass the count as stored: ZeRO pads it to a multiple of dp):

        stage 0 (DDP)  all-reduce the gradients                              2 (d-1)/d Psi
        stage 1        all-reduce the gradients, all-gather updated weights   3 (d-1)/d Psi
        stage 2        reduce-scatter the gradients, all-gather the weights   2 (d-1)/d Psi
        stage 3        all-gather each block's weights in forward and again
                       in backward (recomputed), reduce-scatter its gradient  3 (d-1)/d Psi

    Stage 1 all-reduces in parallel.py, so that each stage adds one idea to the one before;
    DeepSpeed's stage 1 reduce-scatters like stage 2 and sends 2 (d-1)/d Psi. Rajbhandari et al.
    (2020, sec. 7) give 3 (d-1)/d Psi for stage 3; parallel.py gathers its root (embeddings, final
    norm: n_root of the n_params) once per step and keeps it until backward: 3 Psi - n_root.
    """
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, not {zero}")
    values = {0: 2 * n_params, 1: 3 * n_params, 2: 2 * n_params, 3: 3 * n_params - n_root}[zero]
    return values * (dp - 1) / dp * bytes_per_value


def tensor_parallel_bytes(config: GPTConfig, tokens: int, tp: int, bytes_per_value: float = 2, layers: float | None = None,
                          ends: bool = True) -> float:
    """Bytes one rank sends per micro-batch of `tokens` positions under Megatron tensor parallelism
    (Shoeybi et al. 2019, sec. 3): per layer, 2 all-reduces of the (tokens, C) activations forward
    (after attention and after the MLP) and 2 backward, 2 (t-1)/t of them each; with ends, also the
    vocabulary-parallel embedding's and output layer's all-reduces and the loss's three of (tokens)
    numbers (max, sum of exponentials, target logit). Sequence parallelism replaces each all-reduce
    by an all-gather plus a reduce-scatter: the same volume (Korthikanti et al. 2022, sec. 4.2.2)."""
    layers = config.n_layer if layers is None else layers
    values = (4 * layers + (2 if ends else 0)) * tokens * config.n_embd + (3 * tokens if ends else 0)
    return 2 * (tp - 1) / tp * values * bytes_per_value


def comm_bytes_per_step(n_params: float, config: GPTConfig, seq_len: int, sequences_per_rank: int, zero: int,
                        dp: int, tp: int, pp: int, grad_bytes: int = 2, ep: int = 1) -> dict:
    """Bytes each GPU sends per optimizer step (ring collectives; what it receives is the same):
    data_parallel_bytes for the gradient sync over Psi = n_params / (tp pp) values,
    tensor_parallel_bytes for its stage's layers in bf16, and pipeline parallelism's s b h
    activations forward and their gradients backward per micro-batch and stage boundary. With ep
    (an MoE): the dense part syncs over the dp ranks under its ZeRO stage, each rank's N_experts / ep
    are all-reduced over the dp/ep ranks that hold the same experts, and expert_parallel_bytes."""
    own_experts = count_params(config)["experts"] / ep if ep > 1 else 0.0
    psi = (n_params - own_experts * ep) / (tp * pp)
    data_parallel = data_parallel_bytes(psi, zero, dp, grad_bytes)
    if ep > 1:
        data_parallel += data_parallel_bytes(own_experts, 0, dp // ep, grad_bytes)
    sbh = seq_len * config.n_embd * 2  # one sequence's activations in bf16
    tensor_parallel = tensor_parallel_bytes(config, sequences_per_rank * seq_len, tp, 2, config.n_layer / pp, ends=pp == 1)
    pipeline = sequences_per_rank * 2 * sbh if pp > 1 else 0
    experts = expert_parallel_bytes(config, sequences_per_rank * seq_len, ep) if ep > 1 else 0
    return {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel, "pipeline": pipeline,
            "expert_parallel": experts, "total": data_parallel + tensor_parallel + pipeline + experts}


def plan_layouts(gpus: int, moe_experts: int = 0) -> list[dict]:
    """The layouts the plan compares; the tensor-parallel ones use ZeRO-1 over the rest (common practice).
    An MoE trains here with data and expert parallelism and ZeRO 0-2 only (train.py's check_moe_flags):
    its rows are dp, zero1, zero2, and epN+zero1 for each N > 1 that divides both the experts and the GPUs."""
    layouts = [dict(name="dp", zero=0, dp=gpus, tp=1, pp=1, ep=1)]
    layouts += [dict(name=f"zero{z}", zero=z, dp=gpus, tp=1, pp=1, ep=1) for z in ((1, 2) if moe_experts else (1, 2, 3))]
    if moe_experts:
        return layouts + [dict(name=f"ep{e}+zero1", zero=1, dp=gpus, tp=1, pp=1, ep=e)
                          for e in range(2, min(moe_experts, gpus) + 1) if moe_experts % e == 0 and gpus % e == 0]
    if gpus % 8 == 0:
        layouts.append(dict(name="tp8+zero1", zero=1, dp=gpus // 8, tp=8, pp=1, ep=1))
    if gpus % 32 == 0:
        layouts.append(dict(name="tp8+pp4+zero1", zero=1, dp=gpus // 32, tp=8, pp=4, ep=1))
    return layouts


def expert_parallel_bytes(config: GPTConfig, tokens: int, ep: int, bytes_per_value: float = 2) -> float:
    """Bytes one rank sends per micro-batch of `tokens` positions in the all-to-alls of expert
    parallelism when the load is even (parallel.py's docstring): per MoE layer 4 (ep-1)/ep tokens k C
    values, dispatch and combine forward and both again backward."""
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.n_layer))
    return moe_layers * 4 * (ep - 1) / ep * tokens * config.moe_topk * config.n_embd * bytes_per_value


def plan(n_params: float | None, tokens: float, gpus: int, gpu: str | None, mfu_fraction: float, seq_len: int = 2048,
         batch_tokens: float = 4 * 2**20, config: GPTConfig | None = None, peak: float | None = None,
         compute: float | None = None, active_params: float | None = None) -> dict:
    """Wall-clock, GPU-hours, memory per GPU and communication per step for a few layouts.

    Compute = 6 N D (or the budget given), with N the active parameters for an MoE (active_params:
    FLOPs follow the k experts a token uses, memory all E of them). Memory assumes bf16 mixed precision with Adam, one
    sequence per micro-batch, sequence parallelism with tensor parallelism; a layout "fits" without
    recomputation, "with recompute" if full activation recomputation makes it fit, else not.
    batch_tokens: tokens per optimizer step (LLaMA's 4M, Touvron et al. 2023).
    """
    if n_params is None and compute is None:
        raise ValueError("give --params (or --preset), or --compute")
    if n_params is None:  # a budget alone: take the Chinchilla-optimal size (approach 1, ~20 tokens/param)
        n_params = approach1_optimal(compute)["N"]
        tokens = tokens or compute / (6 * n_params)
    check_positive(params=n_params, tokens=tokens, gpus=gpus, mfu=mfu_fraction, seq_len=seq_len, batch_tokens=batch_tokens)
    if mfu_fraction > 1:
        raise ValueError(f"--mfu is a fraction of the peak (e.g. 0.4), got {mfu_fraction}")
    row = resolve_gpu(gpu) if gpu and gpu.lower() != "cpu" else None
    peak = peak_from_flags(gpu, "bfloat16", peak)
    if peak is None:
        raise ValueError("no peak FLOP/s: a CPU has no vendor peak; give --peak, or --gpu with one of the table")
    if config is None:
        config = GPTConfig(**shape_for_params(n_params), vocab_size=32000, block_size=seq_len, bias=False)
    flops = 6 * (active_params or n_params) * tokens
    seconds = flops / (gpus * peak * mfu_fraction)
    sequences_per_step = batch_tokens / seq_len
    rows = []
    for lay in plan_layouts(gpus, config.moe_experts):
        sp = lay["tp"] > 1
        shape = (lay["zero"], lay["dp"], lay["tp"], lay["pp"], seq_len, 1, sp)
        mem = memory_estimate(config, n_params, "mixed", *shape, "none", ep=lay["ep"])
        full = memory_estimate(config, n_params, "mixed", *shape, "full", ep=lay["ep"])
        comm = comm_bytes_per_step(n_params, config, seq_len, math.ceil(sequences_per_step / lay["dp"]), lay["zero"],
                                   lay["dp"], lay["tp"], lay["pp"], ep=lay["ep"])
        capacity = PEAK_FLOPS[row]["memory_gb"] * 1e9 * USABLE_FRACTION if row else None
        fits = None if capacity is None else ("yes" if mem["total"] <= capacity else
                                              "with recompute" if full["total"] <= capacity else "no")
        rows.append({**lay, "states": mem["states"]["total"], "activations": mem["activations"]["total"],
                     "activations_recompute": full["activations"]["total"], "total": mem["total"],
                     "total_recompute": full["total"], "fits": fits, "comm": comm})
    return {"params": n_params, "active_params": active_params or n_params, "tokens": tokens, "flops": flops, "gpus": gpus, "gpu": row, "peak": peak,
            "mfu": mfu_fraction, "days": seconds / 86400, "gpu_hours": gpus * seconds / 3600,
            "steps": tokens / batch_tokens, "seq_len": seq_len, "batch_tokens": batch_tokens,
            "shape": {k: getattr(config, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")},
            "gpu_memory": PEAK_FLOPS[row]["memory_gb"] * 1e9 if row else None, "layouts": rows}


# ----------------------------------------------------------------------------------------------
# Fitting scaling laws to measured losses


# EXERCISE: isoflop-fit (tests/test_scaling.py -k isoflop_fit)
def fit_isoflop(points: list[dict]) -> dict:
    """Chinchilla approach 2: per budget, a parabola in log N through the losses; its vertex is that
    budget's N_opt. Then N_opt = k C^a by least squares in log-log (and D_opt = C / 6 N_opt, b = 1 - a).

    points: dicts with "C", "N", "loss". A budget with fewer than 3 sizes, whose lowest loss is at
    the smallest or largest size (the minimum is not bracketed), whose parabola opens downwards, or
    whose vertex lies outside its sizes, has no minimum and is left out of the power law (listed
    with N_opt None and the reason).
    """
    minima = []
    for C in sorted({p["C"] for p in points}):
        pts = [p for p in points if p["C"] == C]
        if len({p["N"] for p in pts}) < 3:
            minima.append({"C": C, "N_opt": None, "reason": "fewer than 3 sizes"})
            continue
        x = np.log([p["N"] for p in pts])
        best = min(pts, key=lambda p: p["loss"])["N"]
        if best in (min(p["N"] for p in pts), max(p["N"] for p in pts)):  # no bracketed minimum to fit
            minima.append({"C": C, "N_opt": None, "reason": f"lowest loss at the edge of the grid (N = {best:,}): widen --sizes"})
            continue
        c2, c1, c0 = np.polyfit(x, [p["loss"] for p in pts], 2)
        if c2 <= 0:
            minima.append({"C": C, "N_opt": None, "reason": "no minimum (parabola opens downwards)"})
            continue
        x_opt = -c1 / (2 * c2)
        if not x.min() <= x_opt <= x.max():  # an extrapolated vertex says little: widen the grid instead
            minima.append({"C": C, "N_opt": None, "reason": f"minimum outside the grid (vertex at N = {np.exp(x_opt):.3g})"})
            continue
        minima.append({"C": C, "N_opt": float(np.exp(x_opt)), "loss_opt": float(c0 + c1 * x_opt + c2 * x_opt**2)})
    good = [m for m in minima if m["N_opt"] is not None]
    result = {"minima": minima, "a": None, "b": None}
    if len(good) >= 2:
        a, log_k = np.polyfit(np.log([m["C"] for m in good]), np.log([m["N_opt"] for m in good]), 1)
        result.update(a=float(a), b=float(1 - a), k=float(np.exp(log_k)))
    return result


# EXERCISE: chinchilla-fit (tests/test_scaling.py -k 'huber or parametric_fit')
def huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    """Quadratic for |r| <= delta, linear beyond: a few bad runs cannot drag the fit (Huber 1964)."""
    return torch.where(r.abs() <= delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta))


def fit_parametric(N, D, loss, delta: float = 1e-3, inits=None, max_iter: int = 200) -> dict:
    """Fit L = E + A/N^alpha + B/D^beta as Hoffmann et al. (2022, sec. 3.3) do: minimise

        sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3

    over (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta) with L-BFGS, from a grid of
    initialisations, keeping the best. Fitting in log space keeps A and B positive and the
    residuals relative. Returns E, A, B, alpha, beta and the objective.
    """
    logN, logD, logL = (torch.tensor(np.log(np.asarray(v, dtype=np.float64))) for v in (N, D, loss))
    if inits is None:  # a coarser version of the paper's grid (theirs: 6 x 6 x 5 x 5 x 5 starts)
        inits = [(a, b, e, al, be) for a in (0.0, 5.0, 10.0) for b in (0.0, 5.0, 10.0) for e in (-1.0, 0.0, 1.0)
                 for al in (0.2, 0.5) for be in (0.2, 0.5)]

    # EXERCISE: chinchilla-fit
    def huber_objective(theta):
        a, b, e, alpha, beta = theta
        # log L_hat = log(A/N^alpha + B/D^beta + E), computed stably as a log-sum-exp
        pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]), dim=0)
        return huber(pred - logL, delta).sum()

    def minimise(init, iters):
        theta = torch.tensor(init, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = huber_objective(theta)
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            value = float(huber_objective(theta))
        return (value if math.isfinite(value) else math.inf), theta.detach()

    # a short run from every start, then the three best polished to convergence (cheaper than
    # converging from every start, and the same minimum in practice)
    coarse = sorted((minimise(init, 20) for init in inits), key=lambda r: r[0])[:3]
    best = min((minimise(theta.tolist(), max_iter) for _, theta in coarse), key=lambda r: r[0])
    if not math.isfinite(best[0]):
        raise ValueError("the parametric fit diverged from every start: check the losses are positive and finite")
    a, b, e, alpha, beta = best[1].tolist()
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta, "objective": best[0]}


def bootstrap(points: list[dict], fit, n: int, seed: int = 0) -> list:
    """Refit on n resamples of the points (with replacement), as Besiroglu et al. 2024 do for their
    confidence intervals; fits that fail on a degenerate resample are skipped."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(n):
        sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        try:
            results.append(fit(sample))
        except (ValueError, np.linalg.LinAlgError, TypeError):
            continue
    return results


def summarise(fits: list[dict], keys) -> dict:
    """Median and central 68% interval (16th-84th percentile: +-1 sigma for a normal) of each key over
    the bootstrap fits; percentiles, not a standard deviation, so a few wild refits do not dominate."""
    out = {}
    for k in keys:
        vals = np.array([f[k] for f in fits if f.get(k) is not None and math.isfinite(f[k])])
        if len(vals) > 1:
            lo, med, hi = np.percentile(vals, [16, 50, 84])
            out[k] = {"median": float(med), "p16": float(lo), "p84": float(hi), "n": len(vals)}
        else:
            out[k] = None
    return out


def fit_sweep(points: list[dict], n_bootstrap: int = 100, seed: int = 0) -> dict:
    """Both fits on the sweep's points, with bootstrap uncertainties."""
    iso = fit_isoflop(points)
    N, D, L = ([p[k] for p in points] for k in ("N", "D", "loss"))
    param = fit_parametric(N, D, L)
    start = [tuple(math.log(param[k]) for k in ("A", "B", "E")) + (param["alpha"], param["beta"])]

    def refit(sample):  # warm-started from the full fit: the grid search once is enough
        return fit_parametric([p["N"] for p in sample], [p["D"] for p in sample], [p["loss"] for p in sample], inits=start)

    param_boot = bootstrap(points, refit, n_bootstrap, seed)
    for f in param_boot:  # the compute-optimal exponents this law implies: a = beta/(alpha+beta)
        f["a"] = f["beta"] / (f["alpha"] + f["beta"])
    iso_boot = bootstrap(points, fit_isoflop, n_bootstrap, seed)
    param["a"] = param["beta"] / (param["alpha"] + param["beta"])
    return {"isoflop": iso, "isoflop_bootstrap": summarise(iso_boot, ["a"]), "parametric": param,
            "parametric_bootstrap": summarise(param_boot, ["E", "alpha", "beta", "a"])}


# ----------------------------------------------------------------------------------------------
# The sweep: train a grid of small models with train.py and fit the laws to their losses

# Default grid, sized for a shared 2-core CPU in under 15 minutes: three budgets, each trained at
# four sizes (layers x width, head size 16), 8 x 64 tokens per step. Chinchilla's ~20 tokens per
# parameter would put the optimum at 16K-50K non-embedding parameters, but runs this short are
# limited by the number of optimizer steps: measured here (README), the IsoFLOP optimum runs from
# below 3K to ~17K (~170 tokens per parameter), so the sizes run from 3K to 55K. Most of the time
# goes to the smallest model.
SWEEP_BUDGETS = (3e10, 1e11, 3e11)
SWEEP_SIZES = ("1x16", "1x32", "2x32", "2x48")


def parse_size(text: str) -> dict:
    """'3x80' -> 3 layers of width 80 with heads of size 16."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 16 or int(m.group(2)) % 16:
        raise ValueError(f"size '{text}' should be LAYERSxWIDTH with LAYERS at least 1 and WIDTH a positive multiple "
                         "of 16, e.g. 2x64")
    L, C = int(m.group(1)), int(m.group(2))
    return {"n_layer": L, "n_embd": C, "n_head": C // 16}


def sweep_points(budgets, sizes, args) -> list[dict]:
    """One run per (budget, size): steps = C / (6 N tokens_per_step), N non-embedding (Kaplan's)."""
    tokens_per_step = args.batch_size * args.block_size
    # train.py's --pad_vocab 64 applied to the tokenizer's size (bytes: 256 values + end-of-text = 257 -> 320)
    vocab = 64 * math.ceil((args.vocab_size if args.tokenizer == "bpe" else 257) / 64)
    points = []
    for C in budgets:
        for size in sizes:
            shape = parse_size(size)
            config = GPTConfig(vocab_size=vocab, block_size=args.block_size, bias=False, **shape)
            N = count_params(config)["non_embedding"]
            steps = max(1, round(C / (6 * N * tokens_per_step)))
            points.append({"C": C, "size": size, **shape, "N": N, "steps": steps, "D": steps * tokens_per_step})
    return points


def train_command(point: dict, args, out_dir: str) -> list[str]:
    """The train.py invocation for one point (train.py sits beside this file)."""
    return [sys.executable, os.path.join(HERE, "train.py"), "--preset", "laptop", "--data", "stdlib",
            "--tokenizer", args.tokenizer, "--vocab_size", str(args.vocab_size), "--data_dir", args.data_dir,
            "--max_data_bytes", str(args.max_data_bytes), "--out_dir", out_dir, "--overwrite", "--device", "cpu",
            "--dtype", "float32", "--n_layer", str(point["n_layer"]), "--n_embd", str(point["n_embd"]),
            "--n_head", str(point["n_head"]), "--block_size", str(args.block_size), "--bias", "false",
            "--batch_size", str(args.batch_size), "--max_iters", str(point["steps"]),
            # warm up over 5% of the run; cosine to 10% at the end of the run, whose length matches
            # the token count (Hoffmann et al. 2022, sec. 3.1 / Figure A1)
            "--warmup_iters", str(max(1, point["steps"] // 20)), "--learning_rate", str(args.learning_rate),
            "--eval_interval", str(point["steps"]), "--eval_iters", str(args.eval_iters),
            "--log_interval", str(point["steps"]), "--sample_tokens", "1", "--seed", str(args.seed)]


def final_val_loss(out_dir: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    if not evals:
        raise ValueError(f"{out_dir}/metrics.jsonl has no evaluation")
    return evals[-1]["val_loss"]


def run_sweep(args) -> dict:
    """Train every point (args.jobs at a time, each with args.threads CPU threads), fit, write sweep.json.
    With args.fit_only, refit the points of an existing sweep.json without training."""
    if args.fit_only:
        path = os.path.join(args.out_dir, "sweep.json")
        if not os.path.exists(path):
            raise ValueError(f"no {path} to refit: run the sweep first (without --fit_only)")
        with open(path) as f:
            result = json.load(f)
        result["fits"] = fit_sweep([p for p in result["points"] if p["loss"] is not None], args.bootstrap, args.seed)
        write_json_atomic(result, path)
        result["plot"] = plot_sweep(result["points"], result["fits"], args.out_dir)
        return result
    budgets = [float(c) for c in args.budgets.split(",")]
    check_positive(budgets=min(budgets))
    points = sweep_points(budgets, args.sizes.split(","), args)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # 1 thread per run: no thread contention
    # the cheapest point first and alone (it tokenizes the corpus), then the longest first, so that
    # the long runs of the smallest models do not start last and leave a core idle at the end
    by_steps = sorted(points, key=lambda p: p["steps"])
    pending, running, done = [by_steps[0]] + by_steps[:0:-1], [], 0
    with children_stopped_on_exit(running):
        while pending or running:
            done = sweep_tick(pending, running, done, points, args, env)
    trained = [p for p in points if p["loss"] is not None]
    if len(trained) < 2:
        raise ValueError(f"only {len(trained)} of {len(points)} runs finished: see the logs in {args.out_dir}")
    fits = fit_sweep(trained, args.bootstrap, args.seed)
    result = {"points": points, "fits": fits, "seconds": time.perf_counter() - t_start,
              "settings": {k: v for k, v in vars(args).items() if k not in ("func", "json")}}
    write_json_atomic(result, os.path.join(args.out_dir, "sweep.json"))
    result["plot"] = plot_sweep(points, fits, args.out_dir)
    return result


def sweep_tick(pending: list, running: list, done: int, points: list, args, env: dict) -> int:
    """Start runs up to args.jobs at a time, collect the ones that finished; returns the count done."""
    # the first run tokenizes the corpus into data_dir (train.py does it, as it would for you);
    # the others start once it is done, and reuse it
    jobs = 1 if done == 0 else args.jobs
    while pending and len(running) < jobs:
        p = pending.pop(0)
        p["out_dir"] = os.path.join(args.out_dir, f"C{p['C']:.0e}-{p['size']}")
        log = open(os.path.join(args.out_dir, f"C{p['C']:.0e}-{p['size']}.log"), "w")
        proc = subprocess.Popen(train_command(p, args, p["out_dir"]), stdout=log, stderr=subprocess.STDOUT, env=env)
        running.append((p, proc, log, time.perf_counter()))
    time.sleep(0.05)
    for item in [r for r in running if r[1].poll() is not None]:
        p, proc, log, t0 = item
        running.remove(item)
        log.close()
        done += 1
        p["seconds"] = time.perf_counter() - t0
        # a failed point is reported and left out of the fits; the others still count
        try:
            p["loss"] = final_val_loss(p["out_dir"]) if proc.returncode == 0 else None
        except (OSError, ValueError):  # stopped early by a signal of its own, before its evaluation
            p["loss"] = None
        outcome = f"val loss {p['loss']:.4f}" if p["loss"] is not None else f"FAILED (see {log.name})"
        print(f"[{done}/{len(points)}] C={p['C']:.0e} size {p['size']:>5} N={p['N']:>8,} D={p['D']:>10,} "
              f"({p['steps']} steps): {outcome} in {p['seconds']:.1f} s", file=sys.stderr, flush=True)
    return done


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so that the sweep's runs are stopped on the way out (its default
    action would end the sweep alone and leave them training, orphaned)."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def children_stopped_on_exit(running: list):
    """On any way out (SIGTERM, Ctrl-C, an error), stop the train.py runs still going: SIGTERM, to
    which train.py answers by checkpointing its current step and exiting, then SIGKILL after 60 s."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        yield
    finally:
        for _, proc, log, _ in running:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        for _, proc, log, _ in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def write_json_atomic(obj, path: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def plot_sweep(points, fits, out_dir) -> str | None:
    """IsoFLOP curves to out_dir/isoflop.png when matplotlib is installed (optional), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for C in sorted({p["C"] for p in points}):
        pts = sorted((p for p in points if p["C"] == C), key=lambda p: p["N"])
        ax.plot([p["N"] for p in pts], [p["loss"] for p in pts], "o-", label=f"C = {C:.0e}")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="validation loss (nats/token)",
           title=f"IsoFLOP curves, N_opt ~ C^{fits['isoflop']['a'] or float('nan'):.2f}")
    ax.legend()
    path = os.path.join(out_dir, "isoflop.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def fmt(x: float | None, unit: str = "") -> str:
    """3 significant digits with an SI-ish suffix: 1.23e9 -> '1.23B'."""
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB"


MOE_FLAGS = (("moe_experts", int), ("moe_topk", int), ("moe_every", int), ("moe_shared", int), ("moe_expert_frac", float))


def config_from_args(args) -> GPTConfig:
    overrides = {k: getattr(args, k, None) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "block_size",
                                                     "norm", "mlp", *(name for name, _ in MOE_FLAGS))}
    for flag in ("rope", "bias", "tie_embeddings"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag) == "true"
    return make_config(args.preset, **overrides)


def add_model_flags(p, preset_default="gpt2-124m"):
    p.add_argument("--preset", default=preset_default, help=f"model size from model.MODEL_PRESETS: {', '.join(MODEL_PRESETS)}")
    for name, kind in (("n_layer", int), ("n_embd", int), ("n_head", int), ("n_kv_head", int), ("vocab_size", int),
                       ("block_size", int), ("norm", str), ("mlp", str)):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"override the preset's {name}")
    for name in ("rope", "bias", "tie_embeddings"):
        p.add_argument(f"--{name}", choices=("true", "false"), default=None, help=f"override the preset's {name}")
    for name, kind in MOE_FLAGS:  # a mixture of experts (model.MoE; 0 experts: dense)
        p.add_argument(f"--{name}", type=kind, default=None, help=f"mixture of experts: {name} (as train.py's flag)")


def cmd_count(args) -> dict:
    config = config_from_args(args)
    out = {"config": dataclasses.asdict(config), **count_params(config)}
    if not args.json:
        print(f"{args.preset} ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, vocab {config.vocab_size})")
        for k in ("total", "embedding", "non_embedding", "per_layer", "blocks", "matmul", "tensors") + \
                (("experts", "active", "active_matmul") if config.moe_experts else ()):
            print(f"  {k:<14} {out[k]:>15,}")
        if config.moe_experts:
            print(f"  {config.moe_topk} of {config.moe_experts} experts per token: {out['active'] / out['total']:.0%} of the "
                  "parameters active (scaling-law note: this file's docstring, Clark et al. 2022, Abnar et al. 2025)")
        print(f"  output layer {'tied to' if config.tie_embeddings else 'separate from'} the token embedding ({out['lm_head']:,})")
        if args.vocab_size is None:  # the presets give a shape, not a vocabulary: train.py's comes from its tokenizer
            print(f"  vocab {config.vocab_size:,} is GPTConfig's default (GPT-2's 50,257 padded to a multiple of 64); "
                  f"train.py's comes from --tokenizer (a BPE of 2048 by default): add --vocab_size 2048 to count that model")
    return out


def cmd_flops(args) -> dict:
    config = config_from_args(args)
    T = args.seq_len or config.block_size
    seq_lens = [int(t) for t in args.seq_lens.split(",")] if args.seq_lens else [128, 256, 512, 1024, 2048, 4096, 8192]
    breakdown = {conv: flops_per_token_exact(config, T, causal=args.causal, convention=conv) for conv in ("matmul", "chinchilla")}
    # FlopCounterMode runs the model on the meta device, which has no values to route an MoE's tokens with
    table = flops_table(config, seq_lens) if not config.moe_experts else []
    out = {"seq_len": T, "causal": args.causal, "breakdown": breakdown, "table": table}
    peak = peak_from_flags(args.gpu, args.dtype, args.peak)
    if args.tokens_per_s is not None:
        out["mfu"] = mfu(args.tokens_per_s, flops_per_token_6n(config, T), peak)
    if args.json:
        return out
    print(f"forward FLOPs per token at T={T} ({'causal half' if args.causal else 'full T x T'} attention):")
    print(f"  {'operation':<18} {'matmul only':>14} {'Chinchilla app. F':>18}")
    for k in breakdown["matmul"]:
        print(f"  {k:<18} {breakdown['matmul'][k]:>14,.0f} {breakdown['chinchilla'][k]:>18,.0f}")
    if config.moe_experts:
        print(f"(MoE: the router and {config.moe_topk} of {config.moe_experts} experts per token, 6 N_active + 12 L C T = "
              f"{flops_per_token_6n(config, T):,.0f} per token; no FlopCounterMode table: routing needs real values)")
        return out
    print("\ntraining FLOPs per token (forward + backward) vs torch FlopCounterMode on the real model:")
    print(f"  {'T':>6} {'measured':>12} {'exact':>12} {'causal':>12} {'6N err':>8} {'6N+head err':>12} {'6N+12LCT err':>13}")
    for r in table:
        print(f"  {r['seq_len']:>6} {fmt(r['measured']):>12} {fmt(r['exact']):>12} {fmt(r['exact_causal']):>12} "
              f"{100 * r['6N_error']:>7.1f}% {100 * r['6N_matmul_error']:>11.1f}% {100 * r['6N_matmul+12LCT_error']:>12.1f}%")
    print("  (6N: N without embeddings; +head: the tied output layer's V x C matmul counted; measured counts the"
          " full T x T, a causal kernel does about half of the attention part)")
    if args.tokens_per_s is not None:
        print(f"MFU at {args.tokens_per_s:,.0f} tokens/s: " + (f"{100 * out['mfu']:.1f}%" if out["mfu"] is not None else
                                                              "unknown (no vendor peak for this device: pass --gpu or --peak)"))
    return out


def model_for_memory(args) -> tuple[GPTConfig, float]:
    """The shape for the activation formula: the preset's, or one derived from --params."""
    if args.params is not None:
        check_positive(params=args.params)
        shape = shape_for_params(args.params)
        shape.update({k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head") if getattr(args, k) is not None})
        return GPTConfig(**shape, vocab_size=args.vocab_size or 32000, block_size=args.seq_len or 2048, bias=False), args.params
    config = config_from_args(args)
    return config, count_params(config)["total"]


def cmd_memory(args) -> dict:
    config, n = model_for_memory(args)
    est = memory_estimate(config, n, args.precision, args.zero, args.dp, args.tp, args.pp, args.seq_len, args.micro_batch,
                          args.sp, args.recompute, args.gpu, args.ep)
    if args.json:
        return est
    s = est["states"]
    per_gpu = f" ({fmt(est['params'])} per GPU: 1/{args.ep} of the experts)" if args.ep > 1 else ""
    print(f"{fmt(n)} parameters{per_gpu}, {config.n_layer} layers x width {config.n_embd}, {args.precision} precision, "
          f"ZeRO-{args.zero}, dp={args.dp}{f' ep={args.ep}' if args.ep > 1 else ''} tp={args.tp} pp={args.pp}")
    print(f"  weights {gb(s['weights'])} + gradients {gb(s['grads'])} + optimizer {gb(s['optimizer'])} = {gb(s['total'])}")
    a = est["activations"]
    print(f"  activations ({args.micro_batch} x {args.seq_len or config.block_size} tokens, recompute {args.recompute}, "
          f"sp {args.sp}): {gb(a['per_layer'])}/layer, {gb(a['total'])} in all")
    print(f"  total {gb(est['total'])}" + (f" of {gb(est['gpu_memory'])} on {est['gpu']}: "
                                          f"{'fits' if est['fits'] else 'does not fit'} (with 10% headroom)" if args.gpu else ""))
    return est


def cmd_chinchilla(args) -> dict:
    if args.compute is not None:
        check_positive(compute=args.compute)
        out = {"compute": args.compute, "approach1": approach1_optimal(args.compute),
               "approach3": parametric_optimal(args.compute, CHINCHILLA), "epoch": parametric_optimal(args.compute, EPOCH)}
        if not args.json:
            print(f"compute-optimal for C = {args.compute:.3g} FLOPs (C = 6 N D):")
            for k, name in (("approach1", "Chinchilla approach 1 (Table 3)"), ("approach3", "Chinchilla parametric fit"),
                            ("epoch", "Epoch AI replication")):
                r = out[k]
                loss = f", loss {r['loss']:.3f}" if "loss" in r else ""
                print(f"  {name:<32} N = {fmt(r['N']):>7}  D = {fmt(r['D']):>7}  {r['tokens_per_param']:5.1f} tokens/param{loss}")
        return out
    rows = chinchilla_table()
    if not args.json:
        print("Chinchilla Table 3 (approach 1) beside the laws, for the same budgets C:")
        print(f"  {'paper N':>8} {'C':>9} {'paper D':>8} | {'appr.1 N':>8} {'D':>7} | {'appr.3 N':>8} {'D':>7} {'D/N':>5} |"
              f" {'Epoch N':>8} {'D':>7} {'D/N':>5}")
        for r in rows:
            a1, a3, ep = r["approach1"], r["approach3"], r["epoch"]
            print(f"  {fmt(r['paper_N']):>8} {r['paper_C']:>9.3g} {fmt(r['paper_D']):>8} | {fmt(a1['N']):>8} {fmt(a1['D']):>7} |"
                  f" {fmt(a3['N']):>8} {fmt(a3['D']):>7} {a3['tokens_per_param']:>5.1f} | {fmt(ep['N']):>8} {fmt(ep['D']):>7}"
                  f" {ep['tokens_per_param']:>5.1f}")
    return {"table3": rows}


def cmd_kaplan(args) -> dict:
    out = {}
    if args.params is not None or args.tokens is not None:
        check_positive(**{k: v for k, v in (("params", args.params), ("tokens", args.tokens)) if v is not None})
        out["loss"] = kaplan_loss(args.params, args.tokens)
    if args.compute is not None:
        out["optimal"] = kaplan_optimal(args.compute)
    if not out:
        raise ValueError("give --params, --tokens and/or --compute")
    if not args.json:
        if "loss" in out:
            print(f"Kaplan L(N={fmt(args.params)}, D={fmt(args.tokens)}) = {out['loss']:.3f} nats/token")
        if "optimal" in out:
            o = out["optimal"]
            print(f"Kaplan compute-optimal for C = {args.compute:.3g} FLOPs: N = {fmt(o['N'])} (non-embedding), "
                  f"D = {fmt(o['D'])}, {o['tokens_per_param']:.2f} tokens/param, L = {o['loss']:.3f}")
    return out


def cmd_plan(args) -> dict:
    config = config_from_args(args) if args.preset is not None else None
    n = count_params(config)["total"] if config is not None else args.params  # None: plan from --compute
    active = count_params(config)["active"] if config is not None and config.moe_experts else None
    seq_len = args.seq_len or (config.block_size if config is not None else 2048)
    out = plan(n, args.tokens, args.gpus, args.gpu, args.mfu, seq_len, args.batch_tokens, config, args.peak, args.compute, active)
    if args.json:
        return out
    if active is not None:
        print(f"MoE: {fmt(active)} of {fmt(n)} parameters active per token; FLOPs count the active ones, memory all of them "
              "(at equal compute an MoE's loss depends on both: Clark et al. 2022, Abnar et al. 2025; see scaling.py's docstring)")
    print(f"{fmt(out['params'])} parameters x {fmt(out['tokens'])} tokens = {out['flops']:.3g} FLOPs on {args.gpus} x "
          f"{out['gpu'] or 'GPU'} ({out['peak'] / 1e12:.0f} TFLOP/s bf16 dense) at {100 * out['mfu']:.0f}% MFU")
    print(f"  {out['days']:.2f} days, {out['gpu_hours']:,.0f} GPU-hours, {out['steps']:,.0f} steps of {fmt(out['batch_tokens'])} tokens")
    print(f"  shape: {out['shape']['n_layer']} layers x width {out['shape']['n_embd']}, seq {out['seq_len']}, one sequence per micro-batch")
    print(f"  {'layout':<15} {'dp':>4} {'tp' if active is None else 'ep':>3} {'pp' if active is None else '':>3} {'states':>9} "
          f"{'activ.':>9} {'total':>9} {'w/ recomp.':>10} {'fits':>15} {'comm/step/GPU':>14}")
    for r in out["layouts"]:
        middle = f"{r['tp']:>3} {r['pp']:>3}" if active is None else f"{r['ep']:>3} {'':>3}"
        print(f"  {r['name']:<15} {r['dp']:>4} {middle} {gb(r['states']):>9} {gb(r['activations']):>9} "
              f"{gb(r['total']):>9} {gb(r['total_recompute']):>10} {r['fits'] or '?':>15} {gb(r['comm']['total']):>14}")
    if active is not None:
        print("  (an MoE trains with --dp and --ep and --zero 0, 1 or 2 only here; epN: each GPU keeps 1/N of the experts)")
    return out


def cmd_sweep(args) -> dict:
    result = run_sweep(args)
    if args.json:
        return result
    print(f"{'C':>8} {'size':>6} {'N':>9} {'D':>11} {'val loss':>9}")
    for p in result["points"]:
        print(f"{p['C']:>8.0e} {p['size']:>6} {p['N']:>9,} {p['D']:>11,} " + (f"{p['loss']:>9.4f}" if p["loss"] is not None else "   failed"))
    fits = result["fits"]
    iso, iso_b = fits["isoflop"], fits["isoflop_bootstrap"]
    for m in iso["minima"]:
        print(f"IsoFLOP C={m['C']:.0e}: N_opt = {fmt(m['N_opt'])}" + (f" [{m['reason']}]" if m["N_opt"] is None else ""))
    if iso["a"] is not None:
        unc = f" (68% bootstrap interval {iso_b['a']['p16']:.2f}..{iso_b['a']['p84']:.2f}, {iso_b['a']['n']} fits)" if iso_b["a"] else ""
        print(f"IsoFLOP fit: N_opt ~ C^{iso['a']:.2f}{unc}, D_opt ~ C^{iso['b']:.2f} (Chinchilla: 0.50 / 0.50)")
    else:
        print("IsoFLOP fit: needs a minimum inside the grid at 2 or more budgets (widen --sizes)")
    p, pb = fits["parametric"], fits["parametric_bootstrap"]
    print(f"parametric fit: L = {p['E']:.2f} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}  "
          f"(Chinchilla: alpha 0.34, beta 0.28; Epoch: 0.35, 0.37)")
    for k in ("alpha", "beta", "a"):
        if pb.get(k):
            print(f"  {k:<5} = {p[k]:.3f}, 68% bootstrap interval {pb[k]['p16']:.3f}..{pb[k]['p84']:.3f} ({pb[k]['n']} refits on resampled points)")
    print(f"sweep took {result['seconds']:.0f} s; results in {os.path.join(args.out_dir, 'sweep.json')}")
    print(f"plot: {result['plot']}" if result["plot"] else "no plot: matplotlib is not installed (pip install matplotlib); the table above is the result")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="Scaling arithmetic: parameters, FLOPs, memory, MFU, scaling laws, plans, and a "
                                       "CPU scaling sweep. Every subcommand takes --json for one JSON object on stdout.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("count", help="parameters of a model config, exactly as model.py counts them")
    add_model_flags(p)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("flops", help="FLOPs per token: exact breakdown, 6N, and FlopCounterMode, as a function of T")
    add_model_flags(p)
    p.add_argument("--seq_len", type=int, default=None, help="T for the breakdown (default: block_size)")
    p.add_argument("--seq_lens", default=None, help="comma-separated T values for the table (default 128..8192)")
    p.add_argument("--causal", action="store_true", help="count only the causal half of attention in the breakdown")
    p.add_argument("--tokens_per_s", type=float, default=None, help="measured throughput: prints MFU")
    p.add_argument("--gpu", default=None, help=f"for MFU: one of {', '.join(PEAK_FLOPS)}")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "tf32", "bfloat16", "float16", "fp8"), help="for MFU")
    p.add_argument("--peak", type=float, default=None, help="for MFU: peak FLOP/s (needed on a CPU: no vendor peak)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("memory", help="memory per GPU: weights, gradients, Adam state (ZeRO), activations")
    add_model_flags(p)
    p.add_argument("--params", type=float, default=None, help="parameter count (instead of a preset; shape derived)")
    p.add_argument("--precision", default="mixed", choices=sorted(STATE_BYTES), help="mixed: bf16 + fp32 master (ZeRO's 16 bytes)")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3")
    for name in ("dp", "tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1, help=f"{name} degree" + (" (expert parallelism: 1/ep of the experts per GPU)"
                                                                                    if name == "ep" else ""))
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: block_size, or 2048 with --params)")
    p.add_argument("--micro_batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--sp", action="store_true", help="sequence parallelism (with --tp)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"), help="activation recomputation")
    p.add_argument("--gpu", default=None, help="compare with this GPU's memory")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("chinchilla", help="compute-optimal N and D (Chinchilla, Epoch AI); no flags: Table 3 side by side")
    p.add_argument("--compute", type=float, default=None, help="training FLOPs C")
    p.set_defaults(func=cmd_chinchilla)

    p = sub.add_parser("kaplan", help="Kaplan et al. 2020: L(N), L(D), L(N, D), compute-optimal N")
    p.add_argument("--params", type=float, default=None, help="non-embedding parameters N")
    p.add_argument("--tokens", type=float, default=None, help="training tokens D")
    p.add_argument("--compute", type=float, default=None, help="training FLOPs C")
    p.set_defaults(func=cmd_kaplan)

    p = sub.add_parser("plan", help="days, GPU-hours, memory and communication per GPU for several layouts")
    add_model_flags(p, preset_default=None)
    p.add_argument("--params", type=float, default=None, help="parameter count (or --preset, or --compute)")
    p.add_argument("--compute", type=float, default=None, help="a FLOPs budget instead of --params (Chinchilla-optimal N)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens D")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    p.add_argument("--gpu", default="H100", help=f"GPU kind: {', '.join(PEAK_FLOPS)}")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s per GPU, overriding the table")
    p.add_argument("--mfu", type=float, default=0.4, help="expected model FLOPs utilisation (fraction)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the preset's block_size, else 2048)")
    p.add_argument("--batch_tokens", type=float, default=4 * 2**20, help="tokens per optimizer step (LLaMA: 4M)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="train a grid of small models on the CPU with train.py and fit scaling laws")
    p.add_argument("--budgets", default=",".join(f"{c:.0e}" for c in SWEEP_BUDGETS), help="compute budgets C = 6 N D")
    p.add_argument("--sizes", default=",".join(SWEEP_SIZES), help="model sizes LAYERSxWIDTH (head size 16)")
    p.add_argument("--out_dir", default="out-sweep", help="one run directory per point, and sweep.json")
    p.add_argument("--data_dir", default="data_cache", help="tokenized corpus, shared by all points (and train.py)")
    p.add_argument("--tokenizer", default="bpe", choices=("bpe", "bytes"), help="as train.py")
    p.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary")
    p.add_argument("--max_data_bytes", type=int, default=0, help="cap on corpus bytes per domain (0: all)")
    p.add_argument("--block_size", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="peak learning rate for every point")
    p.add_argument("--eval_iters", type=int, default=20, help="validation batches for the final loss")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (OMP_NUM_THREADS)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the uncertainties")
    p.add_argument("--seed", type=int, default=1337, help="seed of every run")
    p.add_argument("--fit_only", action="store_true", help="refit out_dir/sweep.json without training")
    p.set_defaults(func=cmd_sweep)

    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


# The range of every numeric flag of every subcommand, in interval notation ("[" includes the end,
# "(" leaves it out), checked once in main before any work, so the message names the flag
FLAG_RANGES = {
    "n_layer": "[1, inf)", "n_embd": "[1, inf)", "n_head": "[1, inf)", "n_kv_head": "[0, inf)", "vocab_size": "[1, inf)",
    "block_size": "[1, inf)", "seq_len": "[1, inf)", "tokens_per_s": "(0, inf)", "peak": "(0, inf)", "params": "(0, inf)",
    "zero": "[0, 3]", "dp": "[1, inf)", "tp": "[1, inf)", "pp": "[1, inf)", "micro_batch": "[1, inf)", "compute": "(0, inf)",
    "tokens": "(0, inf)", "gpus": "[1, inf)", "mfu": "(0, 1]", "batch_tokens": "(0, inf)", "max_data_bytes": "[0, inf)",
    "batch_size": "[1, inf)", "learning_rate": "(0, inf)", "eval_iters": "[1, inf)", "jobs": "[1, inf)",
    "threads": "[1, inf)", "bootstrap": "[0, inf)", "seed": "[0, inf)", "ep": "[1, inf)",
    "moe_experts": "[0, inf)", "moe_topk": "[1, inf)", "moe_every": "[1, inf)", "moe_shared": "[0, inf)",
    "moe_expert_frac": "(0, inf)",
}


def check_flag_ranges(args):
    """One line for the first given flag outside its FLAG_RANGES interval (NaN is inside none)."""
    values = [(k, v) for k, v in vars(args).items() if k in FLAG_RANGES and v is not None]
    if getattr(args, "seq_lens", None):
        try:
            values += [("seq_lens", int(t)) for t in args.seq_lens.split(",")]
        except ValueError:
            raise ValueError(f"--seq_lens {args.seq_lens} should be comma-separated whole numbers, e.g. 128,1024") from None
    for name, value in values:
        interval = FLAG_RANGES.get(name, "[1, inf)")  # (seq_lens: each a sequence length)
        low, high = (float(x) for x in interval[1:-1].split(","))
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):
            raise ValueError(f"--{name} must be in {interval}, got {value}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_flag_ranges(args)
        out = args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during a sweep (children_stopped_on_exit)
        by = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        print(f"error: stopped by {by}; the runs in progress were stopped too", file=sys.stderr)
        sys.exit(143 if by == "SIGTERM" else 130)
    if args.json:
        print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
