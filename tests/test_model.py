"""Tests for model.py: every piece of the GPT against an independent reference or a property."""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model
from model import GPT, GPTConfig

# Float32 comparisons of the same maths computed in a different order agree to about 1e-6
# relative; 1e-5 absolute on O(1) logits leaves room for the sums over C that differ in order.
ATOL32 = 1e-5

OPTIONS = {
    "gpt2": {},
    "rope": {"rope": True},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "untied_nobias": {"tie_embeddings": False, "bias": False},
    "all_modern": {"rope": True, "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False},
    # the modern recipe's model options (README, "Modern recipe")
    "recipe": {"rope": True, "qk_norm": True, "mlp": "relu2", "logit_softcap": 10.0, "z_loss": 1e-4, "bias": False},
    "doc_mask": {"doc_mask": True, "eot_id": 3},  # random tokens hold id 3 now and then: documents of random lengths
}


def small_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return GPTConfig(**{**base, **overrides})


def random_tokens(config, B=2, T=None, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    return torch.randint(0, config.vocab_size, (B, T or config.block_size), generator=g)


# ---------------------------------------------------------------------------------------------
# Parameter counts


def test_gpt2_124m_parameter_count_matches_published():
    # 124,439,808: GPT-2 small with its 50257-token vocabulary (nanoGPT README; HF gpt2 has the same)
    config = GPTConfig(**model.MODEL_PRESETS["gpt2-124m"], vocab_size=50257)
    assert GPT(config).num_params() == 124_439_808


@pytest.mark.parametrize("name", OPTIONS)
def test_num_params_counts_each_distinct_tensor_once(name):
    m = GPT(small_config(**OPTIONS[name]))
    distinct = {id(p): p.numel() for p in m.parameters()}
    assert m.num_params() == sum(distinct.values())
    # excluding embeddings removes exactly wte (and wpe when positions are learned)
    emb = m.transformer.wte.weight.numel() + (0 if m.config.rope else m.transformer.wpe.weight.numel())
    assert m.num_params(exclude_embeddings=True) == m.num_params() - emb


def test_swiglu_keeps_the_gelu_mlp_parameter_count():
    # 3 * C * (8C/3) == 2 * C * 4C when 8C/3 is a multiple of 64 (C = 192 -> hidden 512)
    gelu = GPT(small_config(n_embd=192, n_head=4, mlp="gelu", bias=False)).num_params()
    swiglu = GPT(small_config(n_embd=192, n_head=4, mlp="swiglu", bias=False)).num_params()
    assert gelu == swiglu


# ---------------------------------------------------------------------------------------------
# Attention


def reference_attention(q, k, v):
    """Causal attention in float64, one query position at a time, GQA by index arithmetic."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(H):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(T):
            scores = (q[:, h, i : i + 1] @ kh[:, : i + 1].transpose(-1, -2)) / math.sqrt(D)  # only j <= i
            out[:, h, i] = (scores.softmax(-1) @ vh[:, : i + 1])[:, 0]
    return out


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flex"])
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_backend_matches_float64_reference(backend, n_kv):
    q = torch.randn(2, 4, 13, 8)
    k, v = torch.randn(2, n_kv, 13, 8), torch.randn(2, n_kv, 13, 8)
    got = model.ATTENTION_BACKENDS[backend](q, k, v)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v), atol=ATOL32, rtol=1e-5)


@pytest.mark.parametrize("n_kv", [4, 1])
def test_naive_attention_in_float64_is_a_float64_reference(n_kv):
    # a float64 input must never pass through float32 (a softmax upcast that was float(), not "at
    # least float32", made the naive/SDPA difference 1.6e-7); float64 rounding in these sums is ~1e-15
    q = torch.randn(2, 4, 17, 8, dtype=torch.float64)
    k, v = torch.randn(2, n_kv, 17, 8, dtype=torch.float64), torch.randn(2, n_kv, 17, 8, dtype=torch.float64)
    got = model.naive_attention(q, k, v)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_attention(q, k, v), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", OPTIONS)
def test_whole_model_in_float64_agrees_between_naive_and_sdpa_to_1e_12(name):
    # both backends and every norm, MLP and loss in float64: they agree to float64's rounding, not float32's
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    naive = GPT(small_config(**OPTIONS[name], attention="naive")).double()
    sdpa = GPT(small_config(**OPTIONS[name], attention="sdpa")).double()
    sdpa.load_state_dict(naive.state_dict())
    idx = random_tokens(naive.config)
    (la, loss_a), (lb, loss_b) = naive(idx, idx), sdpa(idx, idx)
    assert la.dtype == loss_a.dtype == torch.float64
    torch.testing.assert_close(la, lb, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_causal_mask_hides_future_tokens(name, backend):
    m = GPT(small_config(**OPTIONS[name], attention=backend)).eval()
    idx = random_tokens(m.config, B=1)
    t = int(torch.randint(1, m.config.block_size - 1, ()))
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % m.config.vocab_size
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(changed)
    assert torch.equal(a[:, :t], b[:, :t]), "a change at position t altered logits before t"
    assert not torch.allclose(a[:, t], b[:, t]), "the changed token should affect its own position"


@pytest.mark.parametrize("name", OPTIONS)
def test_naive_and_sdpa_models_agree(name):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    naive = GPT(small_config(**OPTIONS[name], attention="naive"))
    sdpa = GPT(small_config(**OPTIONS[name], attention="sdpa"))
    sdpa.load_state_dict(naive.state_dict())
    idx = random_tokens(naive.config)
    la, loss_a = naive(idx, idx)
    lb, loss_b = sdpa(idx, idx)
    torch.testing.assert_close(la, lb, atol=ATOL32, rtol=1e-5)
    loss_a.backward()
    loss_b.backward()
    # float32, the same attention summed in another order: measured worst 9e-8 absolute on gradients over
    # three fresh runs of every option, 1/20 of this bound (the earlier 1e-5 + 1e-4|g| was 100x looser)
    for (n, pa), pb in zip(naive.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_grouped_query_attention_equals_multihead_with_repeated_kv_heads():
    # A GQA model is an MHA model whose key/value heads are copies within each group.
    gqa = GPT(small_config(n_kv_head=2, attention="naive"))
    mha = GPT(small_config(n_kv_head=4, attention="naive"))
    sd = gqa.state_dict()
    C, hs = 32, 8
    for i in range(2):
        w = sd[f"transformer.h.{i}.attn.c_attn.weight"]  # rows: q (4 heads), k (2), v (2)
        b = sd[f"transformer.h.{i}.attn.c_attn.bias"]
        q, k, v = w.split([C, 2 * hs, 2 * hs])
        qb, kb, vb = b.split([C, 2 * hs, 2 * hs])
        rep = lambda t: t.view(2, hs, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * hs, *t.shape[1:])
        sd[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, rep(k), rep(v)])
        sd[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([qb, rep(kb), rep(vb)])
    mha.load_state_dict(sd)
    idx = random_tokens(gqa.config)
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=ATOL32, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Norms, RoPE, MLP


def test_layernorm_matches_torch_layernorm():
    x = torch.randn(3, 5, 16)
    ln = model.LayerNorm(16, bias=True)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = torch.nn.LayerNorm(16, eps=1e-5)
    ref.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x), ref(x))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_float64_formula_with_and_without_bias(bias):
    # the formula of the class docstring in float64: (x - mean) / sqrt(biased var + 1e-5) * g + b;
    # float32 against float64 over 24 channels: ~1e-6 relative
    x = torch.randn(4, 3, 24) * 3 + 1.5  # a mean and a scale away from 0 and 1: centring and the variance both show
    ln = model.LayerNorm(24, bias=bias)
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    ref = (xd - mean) / torch.sqrt(((xd - mean) ** 2).mean(-1, keepdim=True) + 1e-5) * ln.weight.double()
    if bias:
        ref = ref + ln.bias.double()
    torch.testing.assert_close(ln(x).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_rmsnorm_matches_float64_formula(scale):
    # scale 1e-3: the mean square (~1e-6) is as large as eps, so where eps goes (inside the root) shows
    x = torch.randn(3, 5, 16) * scale
    rn = model.RMSNorm(16)
    with torch.no_grad():
        rn.weight.normal_()
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * rn.weight.double()
    torch.testing.assert_close(rn(x).double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_rep", [1, 3])
def test_repeat_kv_gives_query_head_h_the_key_head_h_div_n_rep(n_rep):
    # grouped-query attention: query heads h = g n_rep .. g n_rep + n_rep - 1 share key/value head g
    x = torch.randn(2, 4, 5, 6)
    out = model.repeat_kv(x, n_rep)
    assert out.shape == (2, 4 * n_rep, 5, 6)
    for h in range(4 * n_rep):
        assert torch.equal(out[:, h], x[:, h // n_rep]), h


def test_rope_matches_complex_rotation():
    # reference: pair (x_i, x_{i+D/2}) as the complex number x_i + i x_{i+D/2}, times e^{i m theta_i}
    T, D, theta = 11, 8, 10000.0
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    cos, sin = model.rope_cache(T + 5, D, theta)  # a table longer than T, like the model's (block_size rows): rows 0..T-1 apply
    got = model.apply_rope(x, cos.double(), sin.double())
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :]) * torch.polar(torch.ones(T, D // 2, dtype=torch.float64),
                                                                           torch.outer(torch.arange(T, dtype=torch.float64), freqs))
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), atol=1e-6, rtol=1e-6)  # cache is float32


def test_rope_scores_depend_only_on_relative_position():
    T, D = 16, 8
    cos, sin = model.rope_cache(T, D, 10000.0)
    q, k = torch.randn(D), torch.randn(D)
    # place the same q at position m and k at n, for two pairs with the same m - n
    def score(m, n):
        Q = torch.zeros(1, 1, T, D); Q[0, 0, m] = q
        K = torch.zeros(1, 1, T, D); K[0, 0, n] = k
        return (model.apply_rope(Q, cos, sin)[0, 0, m] @ model.apply_rope(K, cos, sin)[0, 0, n]).item()
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_swiglu_mlp_matches_formula():
    cfg = small_config(mlp="swiglu", bias=False)
    mlp = model.MLP(cfg)
    x = torch.randn(2, 3, cfg.n_embd)
    gate_w, up_w = mlp.c_fc.weight.chunk(2, dim=0)
    ref = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ mlp.c_proj.weight.T
    torch.testing.assert_close(mlp(x), ref)


def test_relu2_mlp_matches_formula():
    cfg = small_config(mlp="relu2")
    mlp = model.MLP(cfg).double()
    x = torch.randn(2, 3, cfg.n_embd, dtype=torch.float64)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    ref = torch.where(h > 0, h * h, torch.zeros_like(h)) @ mlp.c_proj.weight.T + mlp.c_proj.bias  # max(0, h)^2
    torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-12)
    assert model.mlp_hidden(cfg) == 4 * cfg.n_embd  # GELU's shape: the same parameters, only the activation differs


def test_qk_norm_attention_matches_float64_formula():
    # the layer by hand: RMSNorm with its own gain on every head's q and k (before RoPE), then causal attention
    cfg = small_config(qk_norm=True, rope=True, attention="naive", n_kv_head=2)
    attn = model.CausalSelfAttention(cfg).double()
    with torch.no_grad():
        attn.q_norm.weight.normal_()  # not ones: each gain must be applied to its own channel
        attn.k_norm.weight.normal_()
    B, T, C, nh, nkv, hs = 2, 7, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_size
    x = torch.randn(B, T, C, dtype=torch.float64)
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
    q, k, v = (t.reshape(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
    rms = lambda t, g: t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-6) * g
    q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k = model.apply_rope(q, attn.rope_cos, attn.rope_sin), model.apply_rope(k, attn.rope_cos, attn.rope_sin)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs) + torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    ref = y @ attn.c_proj.weight.T + attn.c_proj.bias
    torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)


def test_softcapped_logits_match_the_formula_and_stay_below_the_cap():
    m = GPT(small_config(logit_softcap=2.0)).double()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(50)  # logits far beyond the cap
    idx = random_tokens(m.config)
    logits, _ = m(idx)
    raw = m.lm_head(m.transformer.ln_f(m.run_blocks(m.embed(idx))))
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0), rtol=1e-12, atol=1e-12)
    assert raw.abs().max() > 10 and logits.abs().max() <= 2.0  # tanh rounds to exactly 1 in float64 far out


def test_z_loss_adds_coef_times_mean_squared_log_normaliser_in_training_only():
    m = GPT(small_config(z_loss=0.01)).double()
    idx, targets = random_tokens(m.config), random_tokens(m.config)
    targets[1, :4] = -1  # ignored rows count in neither term
    logits, loss = m(idx, targets)
    keep = targets != -1
    log_z = logits.exp().sum(-1).log()[keep]  # (rows,) log sum_v exp(logit_v), written out
    ce = (log_z - logits[keep].gather(-1, targets[keep][:, None])[:, 0]).mean()
    assert loss.item() == pytest.approx((ce + 0.01 * (log_z ** 2).mean()).item(), rel=1e-12)
    m.eval()  # validation reports the cross-entropy alone, comparable with runs without it
    assert m(idx, targets)[1].item() == pytest.approx(ce.item(), rel=1e-12)


def test_fused_loss_with_z_loss_gives_the_plain_loss_and_gradients():
    a, b = twin(small_config(z_loss=0.01), fused_ce=True)
    idx, targets = random_tokens(a.config), random_tokens(a.config)
    (la, ga), (lb, gb) = loss_and_grads(a, idx, targets), loss_and_grads(b, idx, targets)
    # float32 sums in another order: measured worst 4.8e-7 on a loss of ~4.6 (float32's epsilon) and
    # 2.2e-8 absolute on gradients over six fresh runs; the bounds leave margins of 20 and 14
    assert abs(la - lb) < 1e-5
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-7)


def test_mtp_head_loss_is_cross_entropy_against_the_token_two_ahead():
    m = GPT(small_config(mtp=1, mtp_weight=0.3)).double()
    B, T, V = 2, m.config.block_size, m.config.vocab_size
    seq = torch.randint(0, V, (B, T + 1))
    x, y = seq[:, :T], seq[:, 1:].clone()  # the trainer's pair: y[t] = token t+1
    y[0, 5] = -1  # an ignored target is ignored by the extra head too (it is token t+2 of position 4)
    logits, loss = m(x, y)
    h = m.run_blocks(m.embed(x))
    extra = m.lm_head(m.transformer.ln_f(m.mtp_heads[0](h)))  # the extra head's logits (B, T, V)
    # by hand: position t predicts seq[t + 2]; the last position has no such token
    logp, target = torch.log_softmax(extra[:, :T - 1], -1), seq[:, 2:].clone()
    target[0, 4] = -1
    keep = target != -1
    hand = -logp[keep].gather(-1, target[keep][:, None]).mean()
    assert m.last_mtp_losses[0].item() == pytest.approx(hand.item(), rel=1e-12)
    logp_main = torch.log_softmax(logits, -1)
    main = -logp_main[y != -1].gather(-1, y[y != -1][:, None]).mean()
    assert loss.item() == pytest.approx((main + 0.3 * hand).item(), rel=1e-12)  # the weighted sum trains
    m.eval()
    assert m(x, y)[1].item() == pytest.approx(main.item(), rel=1e-12)  # evaluation: the next-token head alone


def hand_norm(x, norm):
    """The model's norm written out: RMSNorm x / sqrt(mean(x^2) + 1e-6) g, or LayerNorm (x - mean) /
    sqrt(var + 1e-5) g + b (their eps: LLaMA's and GPT-2's)."""
    if isinstance(norm, model.RMSNorm):
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight + norm.bias


def hand_cross_entropy(logits, target):
    """-mean log softmax(logits)[target] over the rows whose target is not -1."""
    logp, keep = torch.log_softmax(logits, -1), target != -1
    return -logp[keep].gather(-1, target[keep][:, None]).mean()


def sequential_mtp_model(**overrides) -> GPT:
    """A float64 model with sequential MTP modules whose norms have random gains and biases, so that
    swapping the two norms, or the halves of the concatenation, changes the numbers."""
    m = GPT(small_config(mtp_style="sequential", **overrides)).double()
    with torch.no_grad():
        for name, p in m.mtp_heads.named_parameters():
            if ".norm_" in name:
                p.copy_(torch.randn_like(p))
    return m


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_sequential_mtp_loss_is_deepseek_v3s_module_written_out(norm):
    m = sequential_mtp_model(mtp=1, mtp_weight=0.3, norm=norm)
    module, (B, T, V, C) = m.mtp_heads[0], (2, m.config.block_size, m.config.vocab_size, m.config.n_embd)
    seq = torch.randint(0, V, (B, T + 1))
    x, y = seq[:, :T], seq[:, 1:].clone()
    y[0, 5] = -1  # an ignored target: the module still reads token 6 from x, and ignores its own target at 4
    logits, loss = m(x, y)
    # by hand, DeepSeek-V3 sec. 2.2 with k = 1: position i (i < T - 1) reads the trunk's h_i and the
    # embedding of token i+1, and predicts token i+2
    h = m.run_blocks(m.embed(x))[:, :T - 1]  # (B, T-1, C): h^0, before ln_f
    emb = m.transformer.wte.weight[seq[:, 1:T]]  # (B, T-1, C): tokens 1..T-1
    joined = torch.cat([hand_norm(h, module.norm_h), hand_norm(emb, module.norm_e)], -1)  # (B, T-1, 2C)
    h1 = module.block(joined @ module.proj.weight.T)  # M_1 (C, 2C), then the model's own Block
    target = seq[:, 2:].clone()
    target[0, 4] = -1
    hand = hand_cross_entropy(m.lm_head(hand_norm(h1, m.transformer.ln_f)), target)
    # float64 throughout, the same operations in another order: agreement to 1e-12 relative (4e-16
    # measured over 40 draws)
    assert m.last_mtp_losses[0].item() == pytest.approx(hand.item(), rel=1e-12)
    main = hand_cross_entropy(logits, y)
    assert loss.item() == pytest.approx((main + 0.3 * hand).item(), rel=1e-12)
    m.eval()
    assert m(x, y)[1].item() == pytest.approx(main.item(), rel=1e-12)  # evaluation: the next-token head alone
    # the last position, which has no token i+1, is left out; as the block is causal, the kept
    # positions equal those of a run over all T positions (any token standing in at the end)
    padded = torch.cat([x[:, 1:], x[:, :1]], 1)
    full = module(m.run_blocks(m.embed(x)), m.transformer.wte(padded))[:, :T - 1]
    torch.testing.assert_close(full, h1, rtol=0, atol=1e-12)


def test_sequential_mtp_depth_two_reads_depth_ones_hidden_state():
    m = sequential_mtp_model(mtp=2, mtp_weight=0.5)
    T, V = m.config.block_size, m.config.vocab_size
    seq = torch.randint(0, V, (2, T + 1))
    x, y = seq[:, :T], seq[:, 1:]
    m(x, y)
    h0, wte = m.run_blocks(m.embed(x)), m.transformer.wte
    h1 = m.mtp_heads[0](h0[:, :T - 1], wte(x[:, 1:]))  # depth 1: positions 0..T-2
    h2 = m.mtp_heads[1](h1[:, :T - 2], wte(x[:, 2:]))  # depth 2 reads h^1 and token i+2: positions 0..T-3
    depth2 = hand_cross_entropy(m.lm_head(m.transformer.ln_f(h2)), seq[:, 3:])  # token i+3
    assert m.last_mtp_losses[1].item() == pytest.approx(depth2.item(), rel=1e-12)
    # a second depth reading the trunk's h^0 instead (parallel heads fed with tokens) gives another
    # loss (at least 1e-4 away over 20 draws, so 1e-6 is far above float64's rounding and below the gap)
    from_h0 = m.mtp_heads[1](h0[:, :T - 2], wte(x[:, 2:]))
    assert abs(hand_cross_entropy(m.lm_head(m.transformer.ln_f(from_h0)), seq[:, 3:]).item() - depth2.item()) > 1e-6
    # the chain in the gradients: depth 2's loss reaches module 1, depth 1's loss never reaches module 2
    first, second = m.mtp_losses(h0, y, x)
    g1 = torch.autograd.grad(second, m.mtp_heads[0].proj.weight, retain_graph=True)[0]
    assert g1.abs().max() > 0
    assert torch.autograd.grad(first, m.mtp_heads[1].proj.weight, allow_unused=True)[0] is None


def test_mtp_refuses_heads_without_a_target_in_the_window():
    for style in ("parallel", "sequential"):
        with pytest.raises(ValueError, match="--mtp 32 with --block_size 32"):  # head 32 of a 32-token window
            small_config(mtp=32, mtp_style=style)
    m, x = GPT(small_config(mtp=3, mtp_style="sequential")), torch.randint(0, 97, (1, 3))
    with pytest.raises(ValueError, match="longer than --mtp 3"):  # depth 3 of a 3-token window: no position
        m(x, x)


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_mtp_heads_are_dropped_at_sampling_and_export(tmp_path, style):
    with_heads = GPT(small_config(mtp=2, mtp_style=style))
    plain = GPT(small_config())
    plain.load_state_dict({k: v for k, v in with_heads.state_dict().items() if not k.startswith("mtp_heads.")})
    idx = random_tokens(plain.config, B=1, T=4)
    assert torch.equal(with_heads.generate(idx, 8, temperature=0), plain.generate(idx, 8, temperature=0))
    model.export_hf(with_heads, tmp_path / "hf")
    assert not [k for k in model.read_hf_weights(tmp_path / "hf") if "mtp" in k]


# The Triton kernel (in the interpreter without a GPU) computes in float32 at most: its runs are
# compared at float32's tolerance, ATOL32, the others in float64 at 1e-10.
DOC_BACKENDS = ["naive", "sdpa", "triton", "flex"]  # flex: FlexAttention eagerly, forward only on the CPU


def doc_mask_model(backend, rope):
    m = GPT(small_config(doc_mask=True, eot_id=0, rope=rope, attention=backend))
    return (m, ATOL32) if backend == "triton" else (m.double(), 1e-10)


@pytest.mark.parametrize("backend", DOC_BACKENDS)
@pytest.mark.parametrize("rope", [True, False])
@torch.no_grad()  # forward only: flex has no backward on the CPU
def test_doc_mask_gives_the_second_document_the_logits_it_has_alone(backend, rope):
    m, tol = doc_mask_model(backend, rope)
    V = m.config.vocab_size
    first = torch.cat([torch.tensor([0]), torch.randint(1, V, (9,))])  # each document starts with end-of-text
    second = torch.cat([torch.tensor([0]), torch.randint(1, V, (13,))])
    packed, _ = m(torch.cat([first, second])[None])
    alone, _ = m(second[None])
    torch.testing.assert_close(packed[0, 10:], alone[0], rtol=tol, atol=tol)
    torch.testing.assert_close(packed[0, :10], m(first[None])[0][0], rtol=tol, atol=tol)
    plain = GPT(GPTConfig(**{**m.config.__dict__, "doc_mask": False})).to(next(m.parameters()).dtype)
    plain.load_state_dict(m.state_dict())
    assert (plain(torch.cat([first, second])[None])[0][0, 10:] - alone[0]).abs().max() > 1e-3  # without the mask it differs


@pytest.mark.parametrize("style", ["parallel", "sequential"])
@pytest.mark.parametrize("rope", [True, False])
def test_doc_mask_gives_the_mtp_heads_the_second_documents_logits_alone(style, rope):
    """Under --doc_mask the MTP heads' blocks attend by document as the trunk's do: in training, the
    second document's MTP logits in a packed window equal those it has alone (each depth of the
    sequential chain runs on T - k positions, the second document's last ones)."""
    m = GPT(small_config(doc_mask=True, eot_id=0, rope=rope, mtp=2, mtp_style=style)).double().train()
    V = m.config.vocab_size
    first = torch.cat([torch.tensor([0]), torch.randint(1, V, (9,))])
    second = torch.cat([torch.tensor([0]), torch.randint(1, V, (13,))])

    def mtp_logits(idx):  # every head's logits, caught on their way to the losses
        seen, real = [], m.mtp_logits
        m.mtp_logits = lambda h: seen.append(real(h)) or seen[-1]
        try:
            m(idx[None], torch.randint(1, V, idx.shape)[None])  # any targets: the logits are compared
        finally:
            del m.mtp_logits
        return seen

    packed, alone = mtp_logits(torch.cat([first, second])), mtp_logits(second)
    assert len(packed) == len(alone) == 2
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p[0, 10:], a[0], rtol=1e-10, atol=1e-10)  # float64: rounding only


@pytest.mark.parametrize("backend", DOC_BACKENDS)
@torch.no_grad()  # forward only: flex has no backward on the CPU
def test_doc_mask_keeps_the_causal_property(backend):
    m, _ = doc_mask_model(backend, rope=True)
    idx = torch.randint(1, m.config.vocab_size, (2, 32))
    idx[:, [0, 7, 19]] = 0  # three documents per row
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] % (m.config.vocab_size - 1)) + 1  # a later token of the second document
    a, b = m(idx)[0], m(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)  # nothing before it moves
    assert (a[:, 12:19] - b[:, 12:19]).abs().max() > 1e-6  # its own document after it does
    torch.testing.assert_close(a[:, 19:], b[:, 19:], rtol=0, atol=0)  # the next document does not see it


def test_doc_mask_gradients_of_the_triton_kernel_match_sdpa():
    m, _ = doc_mask_model("triton", rope=True)
    ref = GPT(GPTConfig(**{**m.config.__dict__, "attention": "sdpa"})).double()  # the SDPA path, float64
    ref.load_state_dict(m.state_dict())
    idx = torch.randint(1, m.config.vocab_size, (2, 32))
    idx[0, [0, 5, 21]], idx[1, [0, 30]] = 0, 0  # documents of 5, 16, 11 and 30, 2 tokens
    targets = torch.randint(0, m.config.vocab_size, (2, 32))
    m(idx, targets)[1].backward()
    ref(idx, targets)[1].backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        # float32 against float64 through 2 layers: ~1e-6 relative; 1e-4 leaves room
        assert (p.grad.double() - q.grad).norm() <= 1e-4 * q.grad.norm(), name


@pytest.mark.parametrize("rope", [True, False])
@torch.no_grad()  # FlexAttention has no backward on the CPU (model.py's note)
def test_flex_block_mask_gives_the_sdpa_logits_with_and_without_documents(rope):
    """--attention flex against --attention sdpa, both float64, on packed rows of several documents,
    with grouped-query heads (enable_gqa reads them in place); then the plain causal mask alike.
    Float64 rounding: ~1e-15 on these logits."""
    for doc_mask in (True, False):
        flex, sdpa = (m.double() for m in twin(small_config(doc_mask=doc_mask, eot_id=0, rope=rope, n_kv_head=2,
                                                            attention="flex"), attention="sdpa"))
        idx = torch.randint(1, flex.config.vocab_size, (3, 32))
        # documents of 1 to 27 tokens; row 1 opens mid-document
        idx[0, [0, 9, 20]], idx[1, [5]], idx[2, [0, 1, 2, 31]] = 0, 0, 0
        torch.testing.assert_close(flex(idx)[0], sdpa(idx)[0], rtol=1e-10, atol=1e-10)


def test_flex_block_mask_skips_the_tiles_wholly_in_the_future_or_in_another_document():
    """model.py's note on the BlockMask: a key tile is visited (full or partial) exactly where one of its
    128 x 128 scores is visible, and full exactly where all are: counted here from document_mask & causal."""
    T, tile = 512, 128
    doc_ids = torch.zeros(2, T, dtype=torch.long)
    doc_ids[0, 256:] = 1  # two documents of 256
    doc_ids[1] = torch.cumsum(torch.rand(T) < 0.02, 0)  # about ten of random lengths
    block_mask = model.flex_block_mask(doc_ids, T, "cpu")
    visible = (model.document_mask(doc_ids)[:, 0] & model.causal(T, "cpu")).view(2, T // tile, tile, T // tile, tile)
    any_visible, all_visible = visible.any(4).any(2), visible.all(4).all(2)  # (B, query tile, key tile)
    assert torch.equal(block_mask.full_kv_num_blocks[:, 0], all_visible.sum(-1).int())
    assert torch.equal(block_mask.kv_num_blocks[:, 0] + block_mask.full_kv_num_blocks[:, 0], any_visible.sum(-1).int())
    # two documents of two tiles each: 1 + 2 + 1 + 2 of the 16 tiles, where the causal mask alone visits 1 + 2 + 3 + 4
    causal_only = model.flex_block_mask(None, T, "cpu")
    assert any_visible[0].sum() == 6 and (causal_only.kv_num_blocks + causal_only.full_kv_num_blocks).sum() == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward: train.py refuses it there "
                    "(tests/test_train.py -k flex_attention_refuses); this checks the compiled GPU kernel")
def test_flex_loss_and_gradients_on_a_gpu_match_sdpa_with_documents():
    config = small_config(n_embd=64, doc_mask=True, eot_id=0, rope=True, n_kv_head=2, attention="flex")  # hs 16: Triton's tl.dot wants >= 16
    flex, sdpa = (m.cuda() for m in twin(config, attention="sdpa"))
    idx = torch.randint(1, flex.config.vocab_size, (2, 32), device="cuda")
    idx[0, [0, 5, 21]], idx[1, [0, 30]] = 0, 0
    targets = torch.randint(0, flex.config.vocab_size, (2, 32), device="cuda")
    loss_flex, loss_sdpa = flex(idx, targets)[1], sdpa(idx, targets)[1]
    (loss_flex + loss_sdpa).backward()  # one backward: each model's gradients are its own loss's
    # float32 in two orders, and the kernel's dots perhaps in TF32 (10-bit mantissa: 2^-11 = 4.9e-4 per product)
    assert abs(loss_flex.item() - loss_sdpa.item()) <= 2e-3 * loss_sdpa.item()
    for (name, p), q in zip(flex.named_parameters(), sdpa.parameters()):
        assert (p.grad - q.grad).norm() <= 2e-3 * q.grad.norm(), name


def test_flex_attention_refuses_dropout_and_a_torch_without_it_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="^--attention flex has no attention dropout: set --dropout 0"):
        small_config(attention="flex", dropout=0.1)
    monkeypatch.setattr(model, "flex_available", lambda: False)  # as in torch < 2.5
    with pytest.raises(ValueError, match=r"^--attention flex needs FlexAttention \(torch >= 2.5\), not in torch .*: "
                                         r"use --attention sdpa$"):
        small_config(attention="flex")


def test_document_positions_restart_at_each_end_of_text():
    idx = torch.tensor([[5, 0, 4, 4, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    ids = model.document_ids(idx, eot_id=0)
    assert ids.tolist() == [[0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]
    assert model.document_positions(ids).tolist() == [[0, 0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


def test_gpt2_initialisation_scales_residual_projections():
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=8, n_embd=256)
    m = GPT(cfg)
    # with ~65k samples per matrix the sample std is within 1% of the true one
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert torch.all(m.transformer.h[0].attn.c_attn.bias == 0)


# ---------------------------------------------------------------------------------------------
# Loss and generation


def test_loss_is_mean_cross_entropy_and_ignores_minus_one():
    m = GPT(small_config())
    idx = random_tokens(m.config)
    targets = random_tokens(m.config)
    targets[0, :5] = -1
    logits, loss = m(idx, targets)
    logp = torch.log_softmax(logits.double(), -1)
    mask = targets != -1
    ref = -logp[mask].gather(-1, targets[mask][:, None]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_untrained_loss_is_near_log_vocab():
    # at initialisation the logits are ~0, so the predicted distribution is ~uniform: loss ~ ln V
    m = GPT(small_config(vocab_size=1000))
    _, loss = m(random_tokens(m.config), random_tokens(m.config))
    assert abs(loss.item() - math.log(1000)) < 0.1


def test_greedy_generation_picks_the_argmax_each_step():
    # uncached: the same forward passes as the loop below, so the same logits to the bit (the cached
    # path's tokens are checked against this one by the kv_cache tests)
    m = GPT(small_config()).eval()
    start = random_tokens(m.config, B=1, T=3)
    out = m.generate(start, 6, temperature=0, use_cache=False)
    idx = start
    for _ in range(6):
        nxt = m(idx)[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
    assert torch.equal(out, idx)
    assert torch.equal(m.generate(start, 6, temperature=1.0, top_k=1, use_cache=False), idx)  # top-1 sampling is greedy


def test_top_k_sampling_never_leaves_the_top_k():
    m = GPT(small_config()).eval()
    start = random_tokens(m.config, B=1, T=4)
    logits = m(start)[0][0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = {m.generate(start, 1, temperature=5.0, top_k=3, generator=g)[0, -1].item() for _ in range(50)}
    assert draws <= top3


def test_top_k_filter_keeps_exactly_the_k_largest_logits_unchanged():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for k in (1, 4, 50, 60):  # 60 > V: everything is kept
        logits = torch.randn(3, 50, generator=g) * 3  # continuous: no ties
        filtered = model.filter_logits(logits, top_k=k)
        for row in range(3):
            kept = set(torch.nonzero(filtered[row].isfinite()).flatten().tolist())
            assert kept == set(torch.argsort(logits[row], descending=True)[:k].tolist()), k
            assert torch.equal(filtered[row][list(kept)], logits[row][list(kept)])
            assert torch.all(filtered[row][[i for i in range(50) if i not in kept]] == float("-inf"))


def test_generate_crops_context_to_block_size():
    m = GPT(small_config(block_size=8)).eval()
    out = m.generate(random_tokens(m.config, B=1, T=8), 5, temperature=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("name", ["gpt2", "all_modern"])  # learned positions, and RoPE with GQA
def test_kv_cache_greedy_tokens_equal_uncached_over_200_tokens(name):
    # 5 + 200 tokens through a 64-token window: the cache fills, then the window slides and both paths
    # recompute it. float64: in float32 the two paths' sums round differently (~1e-7, see the next
    # test), which could flip the argmax between two near-tied logits of a random model
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    m = GPT(small_config(**OPTIONS[name], block_size=64)).double().eval()
    start = random_tokens(m.config, B=2, T=5)
    uncached = m.generate(start, 200, temperature=0, use_cache=False)
    cached = m.generate(start, 200, temperature=0, use_cache=True)
    assert cached.shape == (2, 205)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["gpt2", "all_modern"])
def test_kv_cache_logits_equal_the_full_forward_for_any_chunking(name):
    # feeding a sequence in chunks through the cache (a prompt, single tokens, a chunk again) gives
    # the logits of one full forward pass: float32, the same sums split differently (measured 2e-7)
    m = GPT(small_config(**OPTIONS[name])).eval()
    idx = random_tokens(m.config, B=2)
    cuts = sorted(torch.randperm(m.config.block_size - 1)[:4].add(1).tolist())
    cache = model.KVCache(m.config)
    with torch.no_grad():
        full = m(idx)[0]
        chunks = [m(idx[:, a:b], kv_cache=cache)[0] for a, b in zip([0, *cuts], [*cuts, m.config.block_size])]
    assert cache.length == m.config.block_size
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL32, rtol=1e-5)


def test_kv_cache_refuses_positions_beyond_the_block():
    m = GPT(small_config(block_size=8)).eval()
    cache = model.KVCache(m.config)
    m(random_tokens(m.config, B=1, T=8), kv_cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        m(random_tokens(m.config, B=1, T=1), kv_cache=cache)


def nucleus_reference(logits: torch.Tensor, top_p: float) -> set:
    """The nucleus by its definition, in float64: most likely first, until the mass reaches top_p."""
    probs = torch.softmax(logits.double(), -1)
    kept, mass = set(), 0.0
    for i in torch.argsort(probs, descending=True).tolist():
        kept.add(i)
        mass += probs[i].item()
        if mass >= top_p:
            return kept
    return kept


def test_top_p_filter_keeps_exactly_the_nucleus():
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        logits = torch.randn(3, 50, generator=g) * 3
        p = float(torch.rand((), generator=g)) * 0.98 + 0.01
        filtered = model.filter_logits(logits, top_p=p)
        for row in range(3):
            kept = set(torch.nonzero(filtered[row].isfinite()).flatten().tolist())
            assert kept == nucleus_reference(logits[row], p), f"seed {seed}, p {p}"
            assert torch.equal(filtered[row][list(kept)], logits[row][list(kept)])  # kept logits unchanged
    assert torch.equal(model.filter_logits(logits, top_p=1.0), logits)  # p = 1 keeps everything
    # top-k first, then the nucleus of what is left
    both = model.filter_logits(logits, top_k=5, top_p=0.5)
    assert torch.equal(both, model.filter_logits(model.filter_logits(logits, top_k=5), top_p=0.5))


def test_top_p_sampling_draws_only_from_the_nucleus():
    m = GPT(small_config()).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(30)  # a peaked distribution, so the nucleus is a real subset
        start = random_tokens(m.config, B=1, T=4)
        logits = m(start)[0][0, -1]
    nucleus = nucleus_reference(logits, 0.6)
    assert len(nucleus) < m.config.vocab_size // 2
    g = torch.Generator().manual_seed(0)
    draws = {m.generate(start, 1, top_p=0.6, generator=g)[0, -1].item() for _ in range(60)}
    assert draws <= nucleus


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_generate_refuses_bad_sampling_settings(kwargs):
    m = GPT(small_config()).eval()
    with pytest.raises(ValueError):
        m.generate(random_tokens(m.config, B=1, T=2), 1, **kwargs)


def test_bench_generate_prints_both_speeds_and_identical_tokens(capsys):
    model.main(["--bench_generate", "--preset", "laptop", "--n_layer", "1", "--prompt_tokens", "4", "--new_tokens", "8",
                "--bench_repeats", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "laptop" and row[-1] == "yes"
    assert float(row[4]) > 0 and float(row[5]) > 0


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 layout


def numpy_gpt2_forward(sd, idx, n_head):
    """An independent GPT-2 in float64 numpy that reads Hugging Face's layout directly
    (Conv1D weights are (in, out), so a layer is x @ W + b)."""
    sd = {k: v.double().numpy() for k, v in sd.items()}
    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]
    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    T = idx.shape[1]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        qkv = ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        B, T, C = q.shape
        heads = lambda t: t.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(k), heads(v)
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // n_head) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


def test_to_hf_state_dict_matches_independent_numpy_gpt2():
    m = GPT(small_config(attention="naive"))
    with torch.no_grad():  # pre-activations of order 1, where GELU's tanh form and its erf form differ by ~1e-4
        for block in m.transformer.h:  # (at the init's 0.02 they are ~0.1 and differ by ~1e-6 only)
            block.mlp.c_fc.weight.mul_(20)
    idx = random_tokens(m.config)
    ref = numpy_gpt2_forward(m.to_hf_state_dict(), idx.numpy(), n_head=4)
    # float32 rounding through two layers: measured worst 2.3e-7 on logits up to ~0.5 over eight fresh
    # runs, so 1e-6 + 1e-6|ref| has a 4x margin; the erf GELU in place of the tanh one is off by ~1e-4
    torch.testing.assert_close(m(idx)[0].double(), torch.from_numpy(ref), atol=1e-6, rtol=1e-6)


def test_hf_state_dict_round_trips():
    m = GPT(small_config())
    sd = m.to_hf_state_dict()
    back = GPT.from_hf_state_dict(sd, small_config())
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert set(sd) >= {"lm_head.weight", "transformer.h.0.attn.c_attn.weight"}
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D layout: (in, out)


def test_from_hf_state_dict_rejects_mismatched_config():
    sd = GPT(small_config()).to_hf_state_dict()
    with pytest.raises(ValueError, match="shape"):
        GPT.from_hf_state_dict(sd, small_config(n_embd=64))
    with pytest.raises(ValueError, match="GPT-2"):
        GPT.from_hf_state_dict(sd, small_config(rope=True))


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_matches_transformers_gpt2_logits(backend):
    transformers = pytest.importorskip("transformers", reason="optional: pip install transformers to compare with Hugging Face")
    hf_config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPT.from_hf_state_dict(hf.state_dict(), small_config(attention=backend)).eval()
    idx = random_tokens(ours.config)
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
        # in float64 both are exact up to float64 rounding (1e-5 when naive attention's softmax went through float32)
        diff64 = (ours.double()(idx)[0] - hf.double()(idx).logits).abs().max().item()
    assert diff < 1e-4  # float32: a few ulps of logits of size ~1
    assert diff64 < 1e-10
    hf.float().load_state_dict(ours.float().to_hf_state_dict())  # strict: every key and shape matches


def test_rope_attention_sees_the_order_of_earlier_tokens():
    # One layer, and no learned positions: the last position's attention is then a softmax-weighted
    # sum over a set of earlier tokens, blind to their order, unless RoPE rotates queries and keys by
    # position. So swapping tokens 0 and 1 must move the last logits with RoPE (by ~0.05 here) and
    # leave them unchanged, up to float32 summation order (0 measured), when the positions are zeroed.
    rope = GPT(small_config(n_layer=1, rope=True)).eval()
    learned = GPT(small_config(n_layer=1)).eval()
    with torch.no_grad():
        learned.transformer.wpe.weight.zero_()  # the control: no position information at all
        for m in (rope, learned):  # scores of O(1), not GPT-2's near-uniform O(0.01) at initialisation
            m.transformer.h[0].attn.c_attn.weight.mul_(10)
    idx = random_tokens(rope.config, B=1, T=8)
    idx[0, 1] = (idx[0, 0] + 1) % rope.config.vocab_size  # two different tokens to swap
    swapped = idx.clone()
    swapped[0, [0, 1]] = idx[0, [1, 0]]
    with torch.no_grad():
        moved = (rope(idx)[0][0, -1] - rope(swapped)[0][0, -1]).abs().max().item()
        control = (learned(idx)[0][0, -1] - learned(swapped)[0][0, -1]).abs().max().item()
    assert control < 1e-5, control
    assert moved > 1e-3, moved


# ---------------------------------------------------------------------------------------------
# Hugging Face directories: `python model.py export`, transformers' from_pretrained, from_pretrained_dir

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import data  # noqa: E402  (tests may use data.py to make a corpus' tokenizer; model.py only reads its files)

ROOT = Path(__file__).resolve().parent.parent
EXPORT_SHAPES = {
    "gpt2": dict(bias=False),  # the laptop preset's GPT-2 shape: no biases (exported as zeros)
    "modern": dict(rope=True, norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
}


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on this repository's own sources (always present), as train.py
    would have prepared it: 512 tokens, the last one <|endoftext|>. The numbers give it merges of
    digits, where tiktoken's pattern splits runs into threes (a test below depends on them)."""
    texts = [(ROOT / name).read_text() for name in ("model.py", "data.py", "README.md")]
    return data.train_bpe(texts + [" ".join(str(37 * n) for n in range(3000))], vocab_size=512)


def random_unicode(n_texts=200, seed=None):
    """Texts mixing ASCII, Latin-1, CJK, emoji, digits, runs of spaces, tabs and newlines."""
    seed = seed if seed is not None else int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    ranges = [(32, 127), (160, 0x250), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F)]
    texts = []
    for _ in range(n_texts):
        chars = []
        for _ in range(int(torch.randint(1, 80, (), generator=g))):
            kind = int(torch.randint(0, len(ranges) + 3, (), generator=g))
            if kind < len(ranges):
                lo, hi = ranges[kind]
                chars.append(chr(int(torch.randint(lo, hi, (), generator=g))))
            else:  # the characters pre-tokenizers treat specially, repeated
                chars.append(" \n\t0123456789'"[int(torch.randint(0, 14, (), generator=g))] * int(torch.randint(1, 5, (), generator=g)))
        texts.append("".join(chars))
    return texts, seed


def write_run(tmp_path, m, enc) -> Path:
    """A checkpoint and a prepared-corpus directory laid out as train.py and data.py write them."""
    corpus = tmp_path / "data_cache" / "corpus-bpe"
    corpus.mkdir(parents=True)
    data.save_tokenizer(enc, corpus / "tokenizer.tiktoken")
    (corpus / "manifest.json").write_text(json.dumps({"tokenizer": "bpe", "vocab_size": enc.n_vocab, "eot_id": enc.eot_token}))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "model_config": asdict(m.config), "data_dir": corpus.name,
                "train_config": {"data_dir": str(corpus.parent)}}, ckpt)
    return ckpt


def perturbed(m):
    """Random weights far from initialisation (norm gains and biases not 1 and 0), so a mapping that
    drops or swaps a tensor shows in the logits."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.mark.parametrize("shape", sorted(EXPORT_SHAPES))
def test_export_command_gives_transformers_our_logits_and_tokenizer_ids(shape, bpe, tmp_path):
    transformers = pytest.importorskip("transformers", reason="optional: pip install transformers to check the export")
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    ours = perturbed(GPT(small_config(vocab_size=bpe.n_vocab, block_size=48, **EXPORT_SHAPES[shape])))
    out = tmp_path / "hf"
    model.main(["export", "--ckpt", str(write_run(tmp_path, ours, bpe)), "--out", str(out)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "modern": "LlamaForCausalLM"}[shape]
    idx = random_tokens(ours.config)
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
        # our own import of the directory runs our code on the same tensors: identical to the bit
        assert torch.equal(GPT.from_pretrained_dir(out).eval()(idx)[0], ours(idx)[0])
    assert diff < 1e-4  # float32, the same maths in another library's order (measured ~1e-6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts, seed = random_unicode()
    for text in texts:
        assert tokenizer(text)["input_ids"] == bpe.encode_ordinary(text), f"seed {seed}: {text!r}"
        assert tokenizer.decode(bpe.encode_ordinary(text)) == text, f"seed {seed}: {text!r}"
    assert tokenizer.eos_token_id == bpe.eot_token


def test_tokenizer_json_with_gpt2_pattern_gives_tiktokens_ids(bpe):
    # GPT-2's own pre-tokenizer regex (the gpt2 tokenizer's; its merge files are not always cached
    # offline, so the trained ranks stand in for them): the conversion follows the Encoding's pattern
    tokenizers = pytest.importorskip("tokenizers", reason="optional: pip install tokenizers")
    import tiktoken
    enc = tiktoken.Encoding(name="gpt2-pattern", pat_str=model.GPT2_PATTERN, mergeable_ranks=bpe._mergeable_ranks,
                            special_tokens=bpe._special_tokens)
    hf = tokenizers.Tokenizer.from_str(json.dumps(model.hf_tokenizer_json(enc)))
    texts, seed = random_unicode()
    for text in texts + ["=" * n + " " * n + "ab" * n for n in range(1, 40)]:
        assert hf.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), f"seed {seed}: {text!r}"


def test_gpt2_tokenizer_exports_to_the_same_ids():
    tokenizers = pytest.importorskip("tokenizers", reason="optional: pip install tokenizers")
    if not data._gpt2_cached():
        pytest.skip("tiktoken's GPT-2 files are not cached on this machine (offline)")
    enc = data.get_tokenizer("gpt2")
    hf = tokenizers.Tokenizer.from_str(json.dumps(model.hf_tokenizer_json(enc)))
    texts, seed = random_unicode(50)
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), f"seed {seed}: {text!r}"


def test_export_without_safetensors_writes_pytorch_model_bin(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers", reason="optional: pip install transformers to check the export")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    ours = perturbed(GPT(small_config(**EXPORT_SHAPES["modern"])))
    assert model.export_hf(ours, tmp_path / "hf") == ["config.json", "pytorch_model.bin"]
    monkeypatch.undo()  # transformers itself may want safetensors
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = random_tokens(ours.config)
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4
        assert torch.equal(GPT.from_pretrained_dir(tmp_path / "hf")(idx)[0], ours(idx)[0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_pretrained_dir_reads_a_directory_transformers_saved(arch, tmp_path):
    # the other direction: a model made and saved by transformers itself, in its own layout
    transformers = pytest.importorskip("transformers", reason="optional: pip install transformers")
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=97, max_position_embeddings=32, hidden_size=64, intermediate_size=model.swiglu_hidden(64),
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
        hf = transformers.LlamaForCausalLM(cfg)
    perturbed(hf).save_pretrained(tmp_path)
    ours = GPT.from_pretrained_dir(tmp_path).eval()
    assert ours.config.n_kv_head == (4 if arch == "gpt2" else 2)
    idx = random_tokens(ours.config)
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"intermediate_size": 100}, "intermediate_size"),
    ({"model_type": "mistral"}, "model_type"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
])
def test_from_pretrained_dir_refuses_a_shape_it_cannot_map_in_one_line(change, message, tmp_path):
    ours = GPT(small_config(**EXPORT_SHAPES["modern"]))
    model.export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message) as e:
        GPT.from_pretrained_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_export_refuses_a_shape_no_hugging_face_class_has(tmp_path):
    # RoPE with LayerNorm and GELU is neither GPT-2 nor Llama: one error line, exit 2, nothing written
    ckpt = tmp_path / "ckpt.pt"
    m = GPT(small_config(rope=True))
    torch.save({"model": m.state_dict(), "model_config": asdict(m.config)}, ckpt)
    run = subprocess.run([sys.executable, "model.py", "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--no_tokenizer"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith("error: no Hugging Face class has this shape") and run.stderr.count("\n") == 1
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == [ckpt]


@pytest.mark.parametrize("change", [dict(qk_norm=True), dict(logit_softcap=30.0), dict(mlp="relu2")])
def test_export_refuses_the_recipe_options_hugging_face_cannot_compute(change, tmp_path):
    # a Llama-shaped model (which would export) with one recipe option on: refused in one line
    config = small_config(**{"rope": True, "norm": "rmsnorm", "mlp": "swiglu", **change})
    with pytest.raises(ValueError) as e:
        model.export_hf(GPT(config), tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    assert ("qk_norm" in str(e.value) or "logit_softcap" in str(e.value)) if "mlp" not in change else "mlp=relu2" in str(e.value)


def test_export_does_not_replace_an_existing_directory_without_overwrite(tmp_path):
    m = GPT(small_config())
    model.export_hf(m, tmp_path / "hf")
    with pytest.raises(ValueError, match="--overwrite"):
        model.export_hf(m, tmp_path / "hf")
    import importlib.util  # the weights' file: safetensors when the optional package is installed (README)
    weights = "model.safetensors" if importlib.util.find_spec("safetensors") else "pytorch_model.bin"
    assert model.export_hf(m, tmp_path / "hf", overwrite=True) == ["config.json", weights]


# ---------------------------------------------------------------------------------------------
# Speed-ups keep the maths: fused cross-entropy, activation checkpointing, vocabulary
# padding and FP8 matmuls, each against the plain path

import kernels  # noqa: E402  (the fused loss and FP8 live there; model.py imports it lazily)
from torch import nn  # noqa: E402


def loss_and_grads(m, idx, targets):
    m.zero_grad(set_to_none=True)
    _, loss = m(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def twin(config, **changes):
    """A model with the same weights as a fresh GPT(config), with some config fields changed."""
    plain = GPT(config)
    other = GPT(GPTConfig(**{**config.__dict__, **changes}))
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("name", ["gpt2", "untied_nobias"])
def test_fused_cross_entropy_gives_the_plain_loss_and_gradients(name):
    plain, fused = twin(small_config(**OPTIONS[name]), fused_ce=True)
    idx = random_tokens(plain.config)
    targets = random_tokens(plain.config)
    targets[0, :7] = -1  # ignored positions stay ignored
    loss, grads = loss_and_grads(plain, idx, targets)
    fused_loss, fused_grads = loss_and_grads(fused, idx, targets)
    assert fused(idx, targets)[0] is None  # no logits were made
    # float32, the same sums in another order (chunks of rows): ~1e-7 relative
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(fused_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_cross_entropy_under_bfloat16_autocast_stays_within_bf16_tolerance():
    plain, fused = twin(small_config(), fused_ce=True)
    idx, targets = random_tokens(plain.config), random_tokens(plain.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = plain(idx, targets)[1]
        fused_loss = fused(idx, targets)[1]
    # both take bf16 logits up to float32; only the matmul's chunking differs: within bf16's 2^-8
    torch.testing.assert_close(fused_loss, loss, rtol=4e-3, atol=0)


def test_fused_cross_entropy_through_the_triton_kernel_matches_the_plain_loss(monkeypatch):
    if kernels.triton is None:
        pytest.skip(kernels.TRITON_ERROR)
    # what a GPU runs: the Triton kernel (here in its interpreter) instead of the chunked torch version
    monkeypatch.setattr(kernels, "chunked_linear_cross_entropy", kernels.fused_linear_cross_entropy)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # with a GPU the kernel compiles for it, not the interpreter
    plain, fused = (m.to(device) for m in twin(small_config(n_layer=1), fused_ce=True))
    idx, targets = (random_tokens(plain.config, B=1, T=16).to(device) for _ in range(2))
    loss, grads = loss_and_grads(plain, idx, targets)
    fused_loss, fused_grads = loss_and_grads(fused, idx, targets)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grads["transformer.wte.weight"], grads["transformer.wte.weight"], rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_gives_identical_loss_and_gradients_even_with_dropout():
    plain, checkpointed = twin(small_config(dropout=0.1), activation_checkpointing=True)
    idx, targets = random_tokens(plain.config), random_tokens(plain.config)
    torch.manual_seed(5)
    loss, grads = loss_and_grads(plain, idx, targets)
    torch.manual_seed(5)  # the same dropout masks: checkpoint restores the RNG state before recomputing
    ck_loss, ck_grads = loss_and_grads(checkpointed, idx, targets)
    # the same operations on the same numbers on the CPU: equal to the last bit
    assert torch.equal(ck_loss, loss)
    for n in grads:
        assert torch.equal(ck_grads[n], grads[n]), n


def test_padded_vocabulary_keeps_the_real_logits_and_adds_only_the_padding_mass():
    # V = 90 padded to 96: the same weights for the 90 real ids, 6 extra rows as initialised. The real
    # logits are identical; the loss differs by exactly the probability mass the padded ids take,
    # log(1 + sum_pad e^z / sum_real e^z) per position, which training drives to 0 (they are never targets)
    real = GPT(small_config(vocab_size=90))
    padded = GPT(small_config(vocab_size=96))
    state = real.state_dict()
    state["transformer.wte.weight"] = torch.cat([state["transformer.wte.weight"], padded.transformer.wte.weight[90:].detach()])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    padded.load_state_dict(state)
    idx, targets = random_tokens(real.config), random_tokens(real.config)
    logits, loss = real(idx, targets)
    padded_logits, padded_loss = padded(idx, targets)
    torch.testing.assert_close(padded_logits[..., :90], logits, rtol=0, atol=1e-6)
    z = padded_logits.double()
    mass = torch.log1p(z[..., 90:].exp().sum(-1) / z[..., :90].exp().sum(-1)).mean()
    torch.testing.assert_close(padded_loss.double() - loss.double(), mass, rtol=1e-4, atol=1e-6)
    assert 0 < mass < 2 * math.log(96 / 90)  # at initialisation every logit is near 0: about log(96/90)


# FP8: per-tensor scaling (Micikevicius et al. 2022, arXiv:2209.05433, Table 1). Rounding to nearest
# leaves a normal number within half a unit in the last place: 2^-4 relative with E4M3's 3 mantissa
# bits, 2^-3 with E5M2's 2; below the smallest normal the spacing is fixed (2^-9 and 2^-16), so the
# error there is absolute: half of it, in the scaled units.
FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 2**-4, 2**-10), "e5m2": (torch.float8_e5m2, 2**-3, 2**-17)}


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
def test_fp8_round_trip_error_is_within_the_format_bound(fmt):
    dtype, rel, sub = FP8_FORMATS[fmt]
    x = torch.randn(8192) * 10 ** torch.empty(8192).uniform_(-6, 1)  # seven decades: some land among the subnormals
    x8, inv_scale = kernels.quantize_fp8(x, dtype)
    assert x8.dtype == dtype and x8.float().abs().max() == torch.finfo(dtype).max  # amax maps onto the largest value
    err = (kernels.dequantize_fp8(x8, inv_scale) - x).abs()
    bound = rel * x.abs() + sub * inv_scale
    assert (err <= bound * (1 + 1e-6)).all(), (err - bound).max()  # 1e-6: float32's own roundings of x * scale
    assert (err / bound).max() > 0.5  # and the bound is reached, not vacuous


def fp8_product_bound(a, b, fmt_a, fmt_b, inv_a, inv_b):
    """Elementwise bound on |A8 B8 - A B| when |A8 - A| <= rel |A| + sub inv_scale (and for B):
    |dA B + A dB + dA dB| <= |dA| |B| + |A| |dB| + |dA| |dB|, summed over k by a matmul."""
    (_, rel_a, sub_a), (_, rel_b, sub_b) = FP8_FORMATS[fmt_a], FP8_FORMATS[fmt_b]
    A, B = a.abs().double(), b.abs().double()
    dA, dB = rel_a * A + sub_a * float(inv_a), rel_b * B + sub_b * float(inv_b)
    return dA @ B + A @ dB + dA @ dB + 1e-5 * (A @ B)  # 1e-5: float32 accumulation over k in both results


def scaled_mm_runs_here() -> bool:
    one = torch.tensor(1.0)
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


@pytest.mark.parametrize("emulate", [True, False], ids=["emulated", "scaled_mm"])
def test_float8_linear_matches_f_linear_within_the_fp8_bound(emulate):
    if not emulate and not scaled_mm_runs_here():
        pytest.skip("this torch has no torch._scaled_mm on the CPU")
    N, K, M = 64, 48, 32
    linear = nn.Linear(K, M)
    x = torch.randn(N, K, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(N, M)
    fp8 = kernels.Float8Linear.from_linear(linear, emulate=emulate)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    y = fp8(x)
    y.backward(g)
    grad_w, grad_b = linear.weight.grad.clone(), linear.bias.grad.clone()
    linear.zero_grad()
    y_ref = F.linear(x_ref, linear.weight, linear.bias)
    y_ref.backward(g)
    w = linear.weight.detach()
    inv = {name: t.abs().max() / torch.finfo(FP8_FORMATS[f][0]).max for name, t, f in
           (("x", x.detach(), "e4m3"), ("w", w, "e4m3"), ("g", g, "e5m2"))}  # amax / fp8_max, as quantize_fp8 computes
    checks = {  # result: (ours, reference, bound)
        "Y = X W^T": (y, y_ref, fp8_product_bound(x.detach(), w.t(), "e4m3", "e4m3", inv["x"], inv["w"])),
        "dX = dY W": (x.grad, x_ref.grad, fp8_product_bound(g, w, "e5m2", "e4m3", inv["g"], inv["w"])),
        "dW = dY^T X": (grad_w, linear.weight.grad, fp8_product_bound(g.t(), x.detach(), "e5m2", "e4m3", inv["g"], inv["x"])),
    }
    for name, (ours, ref, bound) in checks.items():
        err = (ours.detach().double() - ref.detach().double()).abs()
        assert (err <= bound).all(), f"{name}: {(err - bound).max()}"
        assert (err / ref.detach().double().norm()).max() > 1e-4, f"{name}: suspiciously exact; was it quantized?"
    torch.testing.assert_close(grad_b, linear.bias.grad)  # the bias stays in full precision


def test_scaled_mm_and_its_emulation_compute_the_same_product():
    if not scaled_mm_runs_here():
        pytest.skip("this torch has no torch._scaled_mm on the CPU")
    a8, inv_a = kernels.quantize_fp8(torch.randn(32, 64), torch.float8_e4m3fn)
    b8, inv_b = kernels.quantize_fp8(torch.randn(48, 64), torch.float8_e4m3fn)
    real = kernels.fp8_matmul(a8, inv_a, b8.t(), inv_b, torch.float32, fast_accum=False, emulate=False)
    emulated = kernels.fp8_matmul(a8, inv_a, b8.t(), inv_b, torch.float32, fast_accum=False, emulate=True)
    torch.testing.assert_close(real, emulated, rtol=1e-5, atol=1e-5)  # the same fp8 inputs, float32 sums


def test_convert_to_float8_swaps_only_the_block_linears_and_keeps_every_parameter():
    m = GPT(small_config(n_layer=2))
    params, keys = dict(m.named_parameters()), list(m.state_dict())
    assert kernels.convert_to_float8(m.transformer.h, emulate=True) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert type(m.lm_head) is nn.Linear  # the output layer stays in 16 bits
    assert all(type(mod) is kernels.Float8Linear for mod in m.transformer.h.modules() if isinstance(mod, nn.Linear))
    assert list(m.state_dict()) == keys  # checkpoints do not see the swap
    assert all(p is params[n] for n, p in m.named_parameters())  # nor does the optimizer


def test_fp8_emulated_training_tracks_the_plain_loss():
    plain = GPT(small_config())
    fp8 = GPT(small_config())
    fp8.load_state_dict(plain.state_dict())
    kernels.convert_to_float8(fp8.transformer.h, emulate=True)
    idx = random_tokens(plain.config, B=4, T=33)
    x, y = idx[:, :-1], idx[:, 1:]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (plain, fp8)]
    losses = {0: [], 1: []}
    for _ in range(8):  # memorise one batch: the loss falls by ~15%
        for i, (m, opt) in enumerate(zip((plain, fp8), optimizers)):
            loss = m(x, y)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    assert losses[0][-1] < 0.9 * losses[0][0]
    # measured: at most 0.036% apart over these steps, six fresh batches; 1% leaves room for BLAS libraries
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Mixture of experts


MOE_NAMES = {"mlp.c_fc.weight": "mlp.experts.w_fc", "mlp.c_proj.weight": "mlp.experts.w_proj",
             "mlp.c_fc.bias": "mlp.experts.b_fc", "mlp.c_proj.bias": "mlp.experts.b_proj"}


def as_expert_0(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A dense model's tensor under its one-expert MoE name: an MLP's weights become expert 0's
    (Experts store (in, out), nn.Linear (out, in)); every other tensor keeps its name."""
    for dense, moe in MOE_NAMES.items():
        if name.endswith(dense):
            return name.replace(dense, moe), (tensor.t() if dense.endswith("weight") else tensor).unsqueeze(0)
    return name, tensor


@pytest.mark.parametrize("shape", [{}, {"mlp": "swiglu", "bias": False, "norm": "rmsnorm"}])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_moe_with_one_expert_equals_the_dense_mlp_in_logits_and_gradients(shape, router):
    # float64 on both sides: the same multiply-adds in the same order, so agreement to 1e-12
    dense = small_config(**shape)
    a, b = GPT(dense).double(), GPT(small_config(**shape, moe_experts=1, moe_topk=1, moe_router=router)).double()
    b.load_state_dict({**b.state_dict(), **dict(as_expert_0(k, v) for k, v in a.state_dict().items())})
    idx = random_tokens(dense)
    la, lossa = a(idx, idx)
    lb, lossb = b(idx, idx)
    (lossa * 3).backward()  # a non-unit gradient, so that the weights' scale reaches the comparison
    (lossb * 3).backward()
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-12)
    grads_b = {n: p.grad for n, p in b.named_parameters()}
    for name, p in a.named_parameters():
        moe_name, grad = as_expert_0(name, p.grad)
        torch.testing.assert_close(grads_b[moe_name], grad, rtol=0, atol=1e-12, msg=name)
    for m in b.moe_layers():  # one expert: its weight is 1 whatever the router says (s/s for sigmoid: 0 up to rounding)
        assert m.router.weight.grad.abs().max() < 1e-15


def run_moe(layer: model.MoE, x: torch.Tensor, impl: str):
    """Output and every gradient (input and parameters) of one MoE layer under impl, for a fixed random output gradient."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    layer.impl = impl
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("trial", range(4))
def test_moe_sorted_grouped_path_equals_the_loop_over_experts_in_float32(trial, monkeypatch):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pick = lambda options: options[int(torch.randint(len(options), (), generator=g))]
    E = pick([2, 3, 4, 6, 8])
    cfg = small_config(moe_experts=E, moe_topk=pick(list(range(1, E + 1))), moe_shared=pick([0, 1, 2]),
                       moe_capacity=pick([0.0, 0.5, 1.0, 1.25]), moe_router=pick(["softmax", "sigmoid"]),
                       mlp=pick(["gelu", "swiglu"]), bias=pick([True, False]), moe_expert_frac=pick([1.0, 0.25]))
    layer = model.MoE(cfg)
    layer.apply(GPT(small_config())._init_weights)  # the GPT's initialiser, as training uses it
    with torch.no_grad():
        layer.expert_bias.normal_(0, 0.05, generator=g)  # the balancer's bias changes which experts are chosen
        layer.router.weight.mul_(20)  # confident, uneven routing, so capacities really drop slots
    x = torch.randn(2, 16, cfg.n_embd, generator=g)
    loop = run_moe(layer, x, "loop")
    fast = run_moe(layer, x, "fast")
    monkeypatch.setattr(model, "grouped_mm_usable", lambda x, w: False)  # the padded batched matmul
    padded = run_moe(layer, x, "fast")
    # float32, the same products summed in another order: ~1e-7 relative observed; 1e-5 is the project's bar
    for other in (fast, padded):
        torch.testing.assert_close(other[0], loop[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[1], loop[1], rtol=1e-5, atol=1e-6)
        assert other[2].keys() == loop[2].keys()
        for name in loop[2]:
            torch.testing.assert_close(other[2][name], loop[2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_moe_capacity_drops_exactly_the_hand_counted_slots():
    # 8 tokens, 2 experts, top-1, capacity factor 1: each expert takes ceil(1 x 1 x 8 / 2) = 4 tokens.
    # The router reads channel 0 (expert 0) and channel 1 (expert 1); tokens 0,1,3,4,6,7 lean to
    # expert 0, tokens 2 and 5 to expert 1. Expert 0 gets 6 and keeps its first 4 in token order
    # (0, 1, 3, 4): tokens 6 and 7 are dropped, 2 slots, and their output is 0.
    cfg = small_config(n_embd=4, n_head=1, moe_experts=2, moe_topk=1, moe_capacity=1.0, bias=False)
    layer = model.MoE(cfg).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        layer.experts.w_fc.normal_()
        layer.experts.w_proj.normal_()
    to_expert = [0, 0, 1, 0, 0, 1, 0, 0]
    x = torch.randn(1, 8, 4)
    x[0, :, :2] = torch.tensor([[2.0, 0.0] if e == 0 else [0.0, 2.0] for e in to_expert])
    for impl in ("loop", "fast"):
        layer.impl = impl
        layer.reset_stats()
        y = layer(x)[0]
        assert layer.dropped.item() == 2 and layer.load.tolist() == [6, 2]
        assert torch.all(y[[6, 7]] == 0) and torch.all(y[[0, 1, 2, 3, 4, 5]].abs().sum(-1) > 0)
        p = torch.softmax(x[0, 0, :2], -1)[0]  # token 0's probability of expert 0, its weight
        torch.testing.assert_close(y[0], p * layer.experts.expert(0, x[0, :1])[0])
    # top-2 with capacity 0.5: ceil(0.5 x 2 x 8 / 2) = 4 slots each, 8 slots wanted each (every token
    # picks both experts): 4 dropped per expert. First choices go first: expert 0 keeps the 4 first
    # choices of tokens 0, 1, 3, 4; expert 1 keeps tokens 2 and 5 (first choices), then 0 and 1 (second)
    layer.topk, layer.capacity_factor = 2, 0.5
    for impl in ("loop", "fast"):
        layer.impl = impl
        layer.reset_stats()
        y = layer(x)[0]
        assert layer.dropped.item() == 8
        assert torch.all(y[[6, 7]] == 0)
        both = torch.softmax(x[0, 0, :2], -1)
        torch.testing.assert_close(y[0], both[0] * layer.experts.expert(0, x[0, :1])[0] + both[1] * layer.experts.expert(1, x[0, :1])[0])
        torch.testing.assert_close(y[3], torch.softmax(x[0, 3, :2], -1)[0] * layer.experts.expert(0, x[0, 3:4])[0])


def test_moe_balancing_losses_and_the_bias_update_follow_their_formulas():
    cfg = small_config(moe_experts=4, moe_topk=2, moe_aux=0.01, moe_zloss=0.001, moe_bias_update=0.5)
    layer = model.MoE(cfg).train()
    x = torch.randn(1, 10, cfg.n_embd)
    layer(x)
    logits = layer.router(x[0]).double()
    p = torch.softmax(logits, -1)
    chosen = torch.topk(p, 2, -1).indices
    f = torch.bincount(chosen.reshape(-1), minlength=4).double() / 20  # fraction of the 2 x 10 slots
    aux = 4 * (f * p.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(layer.loss.double(), 0.01 * aux + 0.001 * z, rtol=1e-5, atol=0)
    load = torch.tensor([9.0, 5.0, 5.0, 1.0])  # mean 5: the first expert is overloaded, the last underused
    layer.update_bias(load)
    assert layer.expert_bias.tolist() == [-0.5, 0.0, 0.0, 0.5]
    assert "expert_bias" in layer.state_dict() and "load" not in layer.state_dict()


def moe_by_hand(layer: model.MoE, x: torch.Tensor):
    """The routed MoE of model.MoE's docstring, token by token in float64: scores s = sigmoid(z) or
    p = softmax(z) of z = W_r x; the k largest s_i + b_i choose (the bias b only chooses); the weights
    are s_i / sum of the k chosen s_j (sigmoid, DeepSeek-V3 sec. 2.1.2) or p_i as they are (softmax);
    y = sum over the chosen of w_i Expert_i(x), Expert_i(x) = GELU_tanh(x W_fc,i + b_fc,i) W_proj,i + b_proj,i.
    Also L_aux = E sum_i f_i P_i, f_i = slots sent to i / (k N), P_i = mean over tokens of p_i, or of
    s_i / sum over all E of s_j for the sigmoid router. x (N, C) -> (y (N, C), L_aux)."""
    E, k, ex = layer.n_experts, layer.topk, layer.experts
    gelu = lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    ys, counts, P = [], [0] * E, torch.zeros(E, dtype=torch.float64)
    for xt in x.double():
        z = layer.router.weight.double() @ xt
        s = torch.sigmoid(z) if layer.router_kind == "sigmoid" else torch.exp(z) / torch.exp(z).sum()
        picked = sorted(range(E), key=lambda i: -(s[i] + layer.expert_bias[i]).item())[:k]
        total = sum(s[j] for j in picked)
        y = 0
        for i in picked:
            w = s[i] / total if layer.router_kind == "sigmoid" else s[i]
            y = y + w * (gelu(xt @ ex.w_fc[i] + ex.b_fc[i]) @ ex.w_proj[i] + ex.b_proj[i])
            counts[i] += 1
        ys.append(y)
        P += s / s.sum() if layer.router_kind == "sigmoid" else s
    f = torch.tensor(counts, dtype=torch.float64) / (k * len(x))
    return torch.stack(ys), E * (f * P / len(x)).sum()


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_moe_routes_weighs_and_balances_as_the_hand_written_float64_reference(router):
    E, k = 4, 2
    cfg = small_config(n_embd=8, n_head=1, moe_experts=E, moe_topk=k, moe_router=router, moe_aux=1.0)
    layer = model.MoE(cfg).double().train()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))  # experts far apart: a wrong weight shows
        layer.expert_bias.normal_(0, 0.05, generator=g)
        layer.expert_bias[int(torch.randint(E, (), generator=g))] += 1.0  # always chosen, whatever its score
    x = torch.randn(32, cfg.n_embd, generator=g, dtype=torch.float64)
    want, aux = moe_by_hand(layer, x)
    probs = layer.route(x)[1]
    assert not torch.equal(layer.route(x)[2].sort(-1).values, probs.topk(k, -1).indices.sort(-1).values)  # the bias chose
    for impl in ("loop", "fast"):
        layer.impl = impl
        y = layer(x[None])[0]
        # float64 on both sides, the same terms summed in another order: ~1e-16 relative; 1e-12 is margin
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.loss, aux, rtol=1e-12, atol=1e-12)


def test_export_refuses_an_moe_model_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="MoE model has no Hugging Face class") as e:
        model.export_hf(GPT(small_config(moe_experts=2)), tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_export_refuses_a_doc_mask_model_in_one_line_and_writes_nothing(tmp_path):
    # GPT-2 and Llama attend across end-of-text tokens and count positions from the window's start;
    # a --doc_mask model does neither, so the same weights give other logits once an EOT is in the input
    cfg = small_config(**OPTIONS["doc_mask"])
    m = GPT(cfg).eval()
    idx = random_tokens(cfg, B=1)
    idx[0, cfg.block_size // 2] = cfg.eot_id
    plain = GPT(small_config(**{**OPTIONS["doc_mask"], "doc_mask": False})).eval()
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (m(idx)[0] - plain(idx)[0]).abs().max() > 1e-3  # what an export would silently change
    with pytest.raises(ValueError, match="--doc_mask model has no Hugging Face class") as e:
        model.export_hf(m, tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    assert model.hf_architecture(cfg) == "gpt2"  # --init_from a GPT-2 directory with --doc_mask stays possible


def moe_with_capacity(**overrides) -> GPT:
    """A float64 MoE GPT whose capacity factor would drop slots, with confident, uneven routing and
    experts strong enough (weights x 10) that a dropped slot moves the argmax of the logits."""
    cfg = small_config(moe_experts=4, moe_topk=1, moe_capacity=0.5, **overrides)
    m = GPT(cfg).double().eval()
    with torch.no_grad():
        for layer in m.moe_layers():
            layer.router.weight.mul_(20)
            layer.experts.w_fc.mul_(10)
            layer.experts.w_proj.mul_(10)
    return m


def test_moe_capacity_is_training_only_so_eval_rows_equal_each_row_alone():
    # ceil(0.5 x 1 x N / 4) slots per expert: 8 for a 2 x 32 batch, 4 for one row. If the capacity
    # bound in eval mode, a row's logits would depend on its batch-mate; dropless, they cannot
    m = moe_with_capacity()
    idx = random_tokens(m.config, B=3)
    with torch.no_grad():
        batch = m(idx)[0]
        alone = torch.cat([m(idx[b:b + 1])[0] for b in range(3)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)  # float64, the same sums: rounding only
    m.train()  # in training it still drops slots (counted), as the hand count above checks in detail
    for layer in m.moe_layers():
        layer.reset_stats()
    m(idx)
    assert sum(layer.dropped.item() for layer in m.moe_layers()) > 0


def test_moe_capacity_leaves_greedy_generation_the_same_with_and_without_the_kv_cache():
    # the cache feeds one token at a time (capacity ceil(0.5 x 2 / 4) = 1 per expert for two rows),
    # the uncached path the whole window: equal only because eval mode is dropless (float64, as above)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    m = moe_with_capacity(block_size=48)
    start = random_tokens(m.config, B=2, T=4)
    assert torch.equal(m.generate(start, 40, temperature=0, use_cache=True), m.generate(start, 40, temperature=0, use_cache=False))


def test_a_directly_built_moe_has_its_experts_drawn_as_gpt_draws_them():
    cfg = small_config(n_embd=64, moe_experts=8, moe_topk=2)
    layer = model.MoE(cfg)
    # 8 x 64 x 256 and 8 x 256 x 64 draws: the sample std is within 1% of sigma (relative error
    # ~1/sqrt(2n) = 0.3%); torch.empty's memory would be zeros or garbage
    assert layer.experts.w_fc.std().item() == pytest.approx(0.02, rel=0.01)
    assert layer.experts.w_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.01)
    assert torch.isfinite(layer(torch.randn(2, 8, cfg.n_embd))).all()


def test_the_moe_constructors_draw_leaves_the_seeds_stream_as_it_was(monkeypatch):
    # a GPT draws every weight again in _init_weights, from the stream left after building its
    # modules; the MoE's own draw must not move that stream, or a seed would give other weights
    cfg = small_config(moe_experts=4, moe_topk=2, moe_shared=1)
    torch.manual_seed(0)
    model.MoE(cfg)
    after = torch.get_rng_state()
    monkeypatch.setattr(model, "init_experts", lambda experts, n_layer: None)
    torch.manual_seed(0)
    model.MoE(cfg)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("device, needle", [("foo", "unknown --device 'foo': use auto, cpu, cuda, cuda:N or mps"),
                                            ("cuda", "--device cuda asked for, but torch sees no CUDA GPU")])
def test_bench_generate_with_a_bad_device_is_one_line(device, needle, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(SystemExit) as e:
        model.main(["--bench_generate", "--preset", "laptop", "--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err


def test_load_model_checkpoint_refuses_an_edited_checkpoint_in_one_line(tmp_path):
    # evaluate.py, export and data.py's scorers load through it: a model_config edited to a huge size
    # is refused before any allocation, as train.py --sample refuses it; wrong weights are one line too
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    good = {"model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config)}
    path = tmp_path / "ckpt.pt"
    torch.save(good, path)
    assert model.load_model_checkpoint(path)[0].config == config
    for edit, words in (({"block_size": 10**9}, "block_size=1000000000, outside [1, 1,048,576]"),
                        ({"n_embd": 24}, "its weights do not fit its model_config"),
                        ({"n_head": 5}, "cannot build")):
        torch.save({**good, "model_config": {**good["model_config"], **edit}}, path)
        with pytest.raises(ValueError, match=re.escape(words)) as e:
            model.load_model_checkpoint(path)
        assert "\n" not in str(e.value)
    torch.save({**good, "model_config": [1, 2]}, path)
    with pytest.raises(ValueError, match="no model_config dict"):
        model.load_model_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Claims of the essays and comments, checked (claims audit)


def test_swiglu_parameter_count_is_exact_at_768_and_an_eighth_more_at_128():
    # hidden = 64 * ceil(8C/3 / 64): 2048 at C = 768 (8C/3 exactly), 384 at C = 128 (8C/3 = 341.3)
    def mlp_weights(C, mlp):
        return sum(p.numel() for p in model.MLP(small_config(n_embd=C, n_head=4, mlp=mlp, bias=False)).parameters())
    assert mlp_weights(768, "swiglu") == mlp_weights(768, "gelu") == 8 * 768 * 768
    assert mlp_weights(128, "swiglu") == 3 * 128 * 384
    assert mlp_weights(128, "swiglu") / mlp_weights(128, "gelu") == 1.125


def test_laptop_preset_has_the_parameter_count_its_comment_gives():
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        m = GPT(GPTConfig(**model.MODEL_PRESETS["laptop"], vocab_size=2048))
    blocks = sum(p.numel() for p in m.transformer.h.parameters())
    assert round(blocks / 1e6, 2) == 0.59
    assert m.num_params() == blocks + 2048 * 128 + 256 * 128 + 128 == 885_632  # + ln_f's gain


def test_written_out_attention_keeps_4_plus_e_bytes_per_score_for_the_backward():
    # (named without "naive": the attention exercise's judge, -k naive, holds answers to correctness, and a
    # correct answer may save other tensors for its backward)
    # kernels.py's essay: the float32 softmax output (4 bytes) and its bf16 copy P (e = 2), plus a T x T mask
    B, H, T, D = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.naive_attention(q, k, v)
    per_score = sum(n for (_, _, shape), n in saved.items() if shape[-2:] == (T, T) and len(shape) > 2) / (B * H * T * T)
    assert per_score == 4 + 2
    assert sum(n for (_, dtype, shape), n in saved.items() if shape == (T, T)) == T * T  # the bool mask


def test_qk_norm_bounds_every_score_even_for_huge_inputs(monkeypatch):
    cfg = small_config(qk_norm=True, rope=True, attention="naive", n_kv_head=2)
    attn = model.CausalSelfAttention(cfg).double()
    with torch.no_grad():
        attn.q_norm.weight.normal_()
        attn.k_norm.weight.normal_()
    seen = []
    monkeypatch.setattr(model, "attend", lambda backend, q, k, v, *a: seen.append((q, k)) or model.naive_attention(q, k, v))
    attn(100 * torch.randn(2, 16, cfg.n_embd, dtype=torch.float64))  # inputs 100x their usual scale
    q, k = seen[0]
    k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_size)
    bound = attn.q_norm.weight.abs().max() * attn.k_norm.weight.abs().max() * math.sqrt(cfg.head_size)
    assert scores.abs().max() <= bound
    attn.q_norm = attn.k_norm = None  # without QK-norm the same inputs break the bound many times over
    seen.clear()
    attn(100 * torch.randn(2, 16, cfg.n_embd, dtype=torch.float64))
    q, k = seen[0]
    assert (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / math.sqrt(cfg.head_size)).abs().max() > 10 * bound


def test_moe_aux_loss_is_one_when_balanced_and_e_when_one_expert_takes_all():
    E = 4
    layer = model.MoE(small_config(moe_experts=E, moe_topk=1)).train()
    N = 2 * E
    logits = torch.zeros(N, E)
    balanced = torch.arange(N).remainder(E).unsqueeze(1)  # (N, 1): each expert gets N/E tokens
    layer.record(logits, torch.softmax(logits, -1), balanced, None)  # uniform probabilities
    assert layer.aux_sum.item() == pytest.approx(1.0, rel=1e-6)
    layer.reset_stats()
    one_hot = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()  # every token sure of expert 0
    layer.record(logits, one_hot, torch.zeros(N, 1, dtype=torch.long), None)
    assert layer.aux_sum.item() == pytest.approx(E, rel=1e-6)


def test_moe_capacity_leaves_a_rows_eval_logits_the_same_when_padding_follows_it():
    # 20 tokens alone: ceil(0.5 x 20 / 4) = 3 slots per expert; padded to 32: 4. If the capacity
    # bound in eval mode the padding would let more of the row's tokens through (float64, as above)
    m = moe_with_capacity()
    idx = random_tokens(m.config, B=1)
    padded = idx.clone()
    padded[:, 20:] = 0  # pad tokens after the row
    with torch.no_grad():
        alone = m(idx[:, :20])[0]
        with_padding = m(padded)[0][:, :20]
    torch.testing.assert_close(with_padding, alone, rtol=0, atol=1e-12)
