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
  its hidden width is 2/3 of 4C so it has the same parameter count as the GELU MLP.
- Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): n_kv_head < n_head key/value
  heads, each shared by n_head/n_kv_head query heads. It shrinks the KV cache at inference by the
  same factor; n_kv_head = 1 is multi-query attention (Shazeer 2019).

Attention backends
------------------
`naive` writes the masked softmax out (the one to read), `sdpa` calls torch's
scaled_dot_product_attention (fused kernels: FlashAttention or memory-efficient attention where
the hardware allows). Both take q (B, nh, T, hs) and k, v (B, n_kv, T, hs) and return (B, nh, T, hs):
that function signature is the seam where kernels.py adds a Triton backend.

Two options that change how, not what
-------------------------------------
`fused_ce` computes the loss from the final hidden states a chunk of rows at a time
(kernels.linear_cross_entropy), so the (B, T, V) logits, the largest activation of a small model,
are never stored. `activation_checkpointing` keeps only each block's input and runs the block's
forward again during the backward (torch.utils.checkpoint; Chen et al. 2016, arXiv:1604.06174):
less memory for one more forward pass. Both give the loss and gradients of the plain path up to
rounding (tests check it); `python train.py --bench_ablation` measures what each costs and saves.

Map of this file, in reading order
----------------------------------
GPTConfig, MODEL_PRESETS -> LayerNorm, RMSNorm -> rope_cache, apply_rope -> naive_attention,
sdpa_attention, attend -> CausalSelfAttention -> MLP -> Block -> GPT (init, forward, parameter
count, generate, Hugging Face conversion) -> a small command line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields

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
    mlp: str = "gelu"  # gelu (GPT-2: C -> 4C -> C) or swiglu (gated, hidden 2/3 * 4C)
    tie_embeddings: bool = True  # share the token embedding with the output layer (GPT-2 does)
    attention: str = "sdpa"  # attention backend: naive (explicit softmax), sdpa (torch fused); kernels.py adds triton
    fused_ce: bool = False  # loss from the final hidden states in chunks (kernels.linear_cross_entropy): the (B, T, V) logits are never stored
    activation_checkpointing: bool = False  # keep only each block's input and recompute its inside in the backward (less memory, one more forward)

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
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"unknown mlp '{self.mlp}': use gelu or swiglu")
        if self.attention not in ATTENTION_BACKENDS and self.attention != "triton":
            raise ValueError(f"unknown attention backend '{self.attention}': use one of {sorted(ATTENTION_BACKENDS) + ['triton']}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# Model sizes as plain overrides of GPTConfig. The GPT-2 family is from Radford et al. (2019),
# Table 2 (with the corrected counts from nanoGPT's README); "laptop" is ours.
MODEL_PRESETS = {
    # trains on a 2-core CPU in minutes: 0.8M parameters in the blocks plus a 4096 x 128 embedding;
    # measured at ~330 ms per 16 x 256-token step here, so ~1000 steps fit in about 6-7 minutes
    "laptop": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, bias=False),
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

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)  # eps 1e-5: GPT-2's


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019). No centring, no bias."""

    def __init__(self, ndim: int, eps: float = 1e-6):  # eps 1e-6: LLaMA's
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

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
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)  # (T, hs/2), broadcast over B and nh
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    # a 2-D rotation of every pair: [x1, x2] -> [x1 cos - x2 sin, x1 sin + x2 cos]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention backends: f(q (B, nh, T, hs), k, v (B, n_kv, T, hs), dropout_p) -> (B, nh, T, hs)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hs) -> (B, n_kv * n_rep, T, hs): each key/value head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# EXERCISE: attention (tests/test_model.py -k naive)
def naive_attention(q, k, v, dropout_p: float = 0.0):
    """softmax(Q K^T / sqrt(hs) + M) V with the causal mask written out. Materialises (B, nh, T, T)."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T = q.size(-2)
    # 1/sqrt(hs) keeps the logits' variance ~1 when q and k have unit-variance entries (Vaswani et al. 2017)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # True above the diagonal: j > i
    att = att.masked_fill(future, float("-inf"))  # exp(-inf) = 0: no weight on future tokens
    # softmax in float32 at least (bf16's 8 mantissa bits lose small probabilities); float64 stays float64
    att = F.softmax(at_least_float32(att), dim=-1).type_as(q)
    att = F.dropout(att, p=dropout_p) if dropout_p > 0 else att
    return att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)


def sdpa_attention(q, k, v, dropout_p: float = 0.0):
    """torch's fused scaled_dot_product_attention: same maths, no (T, T) matrix kept for backward."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


ATTENTION_BACKENDS = {"naive": naive_attention, "sdpa": sdpa_attention}


def attend(backend: str, q, k, v, dropout_p: float = 0.0):
    """Dispatch to an attention backend by name. `triton` lives in kernels.py, imported only when
    asked for; where its kernel cannot run (dropout, no GPU and no interpreter) it falls back to
    sdpa_attention, the one SDPA call in the project."""
    if backend in ATTENTION_BACKENDS:
        return ATTENTION_BACKENDS[backend](q, k, v, dropout_p)
    import kernels  # lazily: the model must not need Triton unless this backend is chosen

    return kernels.triton_attention_backend(q, k, v, dropout_p, fallback=sdpa_attention)


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
        if config.rope:
            cos, sin = rope_cache(config.block_size, self.hs, config.rope_theta)
            # non-persistent: derived from the config, so not part of the checkpoint
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    # EXERCISE: self-attention (tests/test_model.py -k 'numpy_gpt2 or grouped_query_attention_equals or causal_mask or order_of_earlier')
    def forward(self, x):
        """x (B, T, C) -> (B, T, C): one projection to q (nh heads) and k, v (n_kv heads each), RoPE on
        q and k when configured, causal attention with the configured backend, the heads side by side
        again, the output projection."""
        B, T, C = x.size()
        qkv = self.c_attn(x)  # (B, T, C) -> (B, T, (nh + 2 n_kv) hs)
        q, k, v = qkv.split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.rope:
            q, k = apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)
        y = attend(self.backend, q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        # re-assemble heads side by side: (B, T, C). -1, not C: under tensor parallelism (parallel.py) a rank
        # holds only nh/tp of the heads, so its y is (B, T, C/tp)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = mlp_hidden(config)
        # for SwiGLU, c_fc holds both the gate and the up projection, side by side
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, C) -> (B, T, hidden) or (B, T, 2 hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # the gate decides, per channel, how much of `up` passes
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


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # communicate between positions
        x = x + self.mlp(self.ln_2(x))  # compute within each position
        return x


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
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # (C) -> (V) logits
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

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given.

        Targets equal to -1 are ignored (padding, or positions without a next token). With
        config.fused_ce and targets, the logits are not computed and None is returned in their place.
        The three steps are methods of their own so that parallel.py's pipeline stages run exactly
        this code on their share of the layers.
        """
        return self.head(self.run_blocks(self.embed(idx)), targets)

    def embed(self, idx):
        """(B, T) token ids -> (B, T, C): token embedding, plus the learned position (GPT-2), dropout."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T) -> (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        return self.transformer.drop(x)

    def run_blocks(self, x, lo: int = 0, hi: int | None = None):
        """(B, T, C) -> (B, T, C) through blocks lo..hi-1 (all of them by default)."""
        for block in self.transformer.h[lo:hi]:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                # store the block's (B, T, C) input, not the activations inside it (about 34 B T C
                # bytes in 16-bit, Korthikanti et al. 2022, sec. 4.1); the backward runs the block's
                # forward again first
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def head(self, x, targets=None):
        """(B, T, C) -> final norm -> logits (B, T, V), and the loss against targets if given."""
        B, T, _ = x.size()
        x = self.transformer.ln_f(x)
        if targets is not None and self.config.fused_ce:
            # the same mean cross-entropy straight from the hidden states, a chunk of rows at a time:
            # the (B, T, V) logits, their float32 copy and their gradient never exist (kernels.py
            # explains the bytes saved)
            import kernels  # lazily: the model needs kernels.py only when this option is on

            loss = kernels.linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), ignore_index=-1)
            return None, loss  # no logits: that is the point
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        loss = None
        if targets is not None:
            # cross-entropy in float32: under bf16 autocast the logits are bf16, and log-softmax
            # over 50k classes needs more precision than 8 mantissa bits
            loss = F.cross_entropy(at_least_float32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- counting ---------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact number of distinct parameters (a tied matrix counts once).

        exclude_embeddings drops the token and position embeddings, the convention of Kaplan et al.
        (2020), whose scaling laws use non-embedding N. With tied embeddings the output layer *is*
        the token embedding, so it is excluded too; an untied lm_head is a real matmul and stays in.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
        return n

    # --- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T), one at a time.

        temperature divides the logits (below 1 sharpens, above 1 flattens; 0 means greedy);
        top_k keeps only the k most likely tokens before sampling (Fan et al. 2018).
        """
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # the model only sees its context window
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V): only the last position predicts the next token
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # --- Hugging Face GPT-2 conversion ---------------------------------------------------------

    # transformers' GPT-2 uses Conv1D for these: weight (in, out), the transpose of nn.Linear's
    HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf_state_dict(cls, sd: dict, config: GPTConfig | None = None) -> "GPT":
        """Build a GPT from a transformers.GPT2LMHeadModel state dict (tensors only; no transformers import).

        Without a config, the shape is read off the tensors (n_head cannot be, so it is taken from
        the GPT-2 family table by width, else an error asks for a config).
        """
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old HF mask buffers
        if config is None:
            config = config_from_hf_shapes(sd)
        if config.rope or config.norm != "layernorm" or config.mlp != "gelu" or config.n_kv_head != config.n_head:
            raise ValueError("GPT-2 weights need the plain GPT-2 architecture: rope=False, norm=layernorm, mlp=gelu, n_kv_head=n_head")
        model = cls(config)
        ours = model.state_dict()
        hf = {k: v for k, v in sd.items() if k != "lm_head.weight" or not config.tie_embeddings}
        expected = {k for k in ours if not (config.tie_embeddings and k == "lm_head.weight")}
        if set(hf) != expected:
            missing, extra = sorted(expected - set(hf)), sorted(set(hf) - expected)
            raise ValueError(f"state dict does not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for k, v in hf.items():
                v = v.t() if k.endswith(cls.HF_TRANSPOSED) else v
                if v.shape != ours[k].shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)} does not match the config's {tuple(ours[k].shape)}")
                ours[k].copy_(v)
        return model

    def to_hf_state_dict(self) -> dict:
        """The inverse: a state dict that transformers.GPT2LMHeadModel.load_state_dict accepts."""
        sd = {}
        for k, v in self.state_dict().items():
            sd[k] = (v.t() if k.endswith(self.HF_TRANSPOSED) else v).detach().clone()
        sd["lm_head.weight"] = self.lm_head.weight.detach().clone()  # HF keeps the tied key too
        return sd


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
# Command line: describe a preset without training it


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a GPT from a preset and print its shape and parameter count.")
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(MODEL_PRESETS), help="model size")
    for f in fields(GPTConfig):
        if f.type in ("int", "float", "str"):
            parser.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type], default=None,
                                help=f"override the preset's {f.name}")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    try:
        config = GPTConfig(**{**MODEL_PRESETS[args.preset], **overrides})
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    model = GPT(config)
    print(asdict(config))
    print(f"parameters: {model.num_params():,} total, {model.num_params(exclude_embeddings=True):,} without embeddings")


if __name__ == "__main__":
    main()
