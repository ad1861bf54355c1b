"""Tests for model.py: every piece of the GPT against an independent reference or a property."""

import math

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


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_backend_matches_float64_reference(backend, n_kv):
    q = torch.randn(2, 4, 13, 8)
    k, v = torch.randn(2, n_kv, 13, 8), torch.randn(2, n_kv, 13, 8)
    got = model.ATTENTION_BACKENDS[backend](q, k, v)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v), atol=ATOL32, rtol=1e-5)


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
    for (n, pa), pb in zip(naive.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=n)


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


def test_rmsnorm_matches_float64_formula():
    x = torch.randn(3, 5, 16)
    rn = model.RMSNorm(16)
    with torch.no_grad():
        rn.weight.normal_()
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * rn.weight.double()
    torch.testing.assert_close(rn(x).double(), ref, atol=1e-6, rtol=1e-5)


def test_rope_matches_complex_rotation():
    # reference: pair (x_i, x_{i+D/2}) as the complex number x_i + i x_{i+D/2}, times e^{i m theta_i}
    T, D, theta = 11, 8, 10000.0
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    cos, sin = model.rope_cache(T, D, theta)
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
    m = GPT(small_config()).eval()
    start = random_tokens(m.config, B=1, T=3)
    out = m.generate(start, 6, temperature=0)
    idx = start
    for _ in range(6):
        nxt = m(idx)[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
    assert torch.equal(out, idx)
    assert torch.equal(m.generate(start, 6, temperature=1.0, top_k=1), idx)  # top-1 sampling is greedy


def test_top_k_sampling_never_leaves_the_top_k():
    m = GPT(small_config()).eval()
    start = random_tokens(m.config, B=1, T=4)
    logits = m(start)[0][0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = {m.generate(start, 1, temperature=5.0, top_k=3, generator=g)[0, -1].item() for _ in range(50)}
    assert draws <= top3


def test_generate_crops_context_to_block_size():
    m = GPT(small_config(block_size=8)).eval()
    out = m.generate(random_tokens(m.config, B=1, T=8), 5, temperature=0)
    assert out.shape == (1, 13)


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
    idx = random_tokens(m.config)
    ref = numpy_gpt2_forward(m.to_hf_state_dict(), idx.numpy(), n_head=4)
    torch.testing.assert_close(m(idx)[0].double(), torch.from_numpy(ref), atol=1e-4, rtol=1e-4)


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


def test_matches_transformers_gpt2_logits():
    transformers = pytest.importorskip("transformers", reason="optional: pip install transformers to compare with Hugging Face")
    hf_config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPT.from_hf_state_dict(hf.state_dict(), small_config()).eval()
    idx = random_tokens(ours.config)
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    hf.load_state_dict(ours.to_hf_state_dict())  # strict: every key and shape matches
