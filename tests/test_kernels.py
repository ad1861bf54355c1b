"""Tests for kernels.py: FlashAttention and the fused linear + cross-entropy against float64 references.

Without a GPU everything runs in Triton's interpreter (kernels.py turns it on), the same kernel
source that compiles for a GPU, one program at a time; shapes are kept small so this file stays
well inside the suite's time budget, but every T below is ragged against the interpreter's tiles
(32 query rows x 16 keys forward and for dQ, 16 x 32 for dK/dV) except where it is smaller.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import prefetch
from model import naive_attention, sdpa_attention  # a reference, and the fallback model.attend hands the Triton backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the kernels compile for a GPU where there is one (kernels.py leaves the interpreter off): the
# inputs must live there; on a machine without one they run on the CPU, in the interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's CPU path; a GPU compiles the kernels")

# Tolerances on ||ours - ref|| / ||ref||, the reference in float64 on the same (rounded) inputs.
# float32: the kernels' float32 sums in another order; the worst over this file's float32 checks in
# three fresh runs under the CPU interpreter was 5.6e-7 (the attention cases), so 1e-5 leaves a margin
# of ~20, and a matmul in TF32 (10 mantissa bits, ~4e-4 here) fails it. bf16/fp16: the output is
# rounded to 8 (bf16) or 11 (fp16) mantissa bits, 2^-8 = 4e-3 relative at worst per element; 1e-2 is the bound.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref||; NaN or inf anywhere in ours fails outright."""
    assert torch.isfinite(ours).all(), "non-finite values in the kernel's output"
    diff = (ours.double() - ref).norm()
    return (diff / ref.norm()).item() if ref.norm() > 0 else diff.item()  # an exactly-zero ref: absolute error


def random_qkv(B, H, H_kv, T, D, dtype, seed=None):
    """Fresh inputs each run (seeded from torch's global RNG unless given), rounded to dtype."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    shapes = [(B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D), (B, H, T, D)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype) for s in shapes]  # q, k, v, dO


def check_against_reference(B, H, H_kv, T, D, causal, dtype):
    q, k, v, do = random_qkv(B, H, H_kv, T, D, dtype)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attention(*ours, causal=causal)
    out.backward(do)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]  # the same rounded values, in float64
    ref = kernels.reference_attention(*ref_in, causal=causal)
    ref.backward(do.double())
    assert out.dtype == dtype and out.shape == (B, H, T, D)
    for name, a, b in [("O", out, ref), ("dQ", ours[0].grad, ref_in[0].grad), ("dK", ours[1].grad, ref_in[1].grad),
                       ("dV", ours[2].grad, ref_in[2].grad)]:
        err = rel_err(a, b.detach())
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} for {dtype}, T={T}, D={D}, causal={causal}"


# (B, H, H_kv, T, D, causal, dtype). All four T for the smallest head, fewer for the larger ones
# (the interpreter's cost grows with T^2 * D); every dtype sees causal and non-causal.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = (
    [(1, 2, 2, T, 16, causal, F32) for T in (1, 7, 77, 130) for causal in (True, False)]
    + [(1, 2, 2, T, 32, causal, F32) for T in (7, 130) for causal in (True, False)]
    + [(1, 1, 1, 77, 64, True, F32), (1, 1, 1, 77, 64, False, F32), (2, 1, 1, 130, 64, True, F32)]
    + [(1, 1, 1, 77, 48, True, F32), (1, 1, 1, 33, 80, False, F32)]  # D not a power of two: padded, masked
    + [(1, 1, 1, 33, 1, True, F32), (1, 1, 1, 33, 4, False, F32), (1, 1, 1, 33, 128, True, F32)]  # the documented range's ends, 1..128
    + [(1, 2, 2, 77, 32, True, BF16), (1, 2, 2, 130, 16, False, BF16), (1, 2, 2, 1, 16, True, BF16)]
    + [(1, 1, 1, 77, 64, False, F16), (1, 2, 2, 7, 16, True, F16)]
)


@pytest.mark.parametrize("B,H,H_kv,T,D,causal,dtype", CASES)
def test_flash_attention_and_its_gradients_match_float64_reference(B, H, H_kv, T, D, causal, dtype):
    check_against_reference(B, H, H_kv, T, D, causal, dtype)


@pytest.mark.parametrize("B,H,H_kv,T,D,causal,dtype", [
    (1, 4, 2, 77, 32, True, F32),  # grouped-query: 2 query heads per K/V head
    (1, 4, 1, 130, 16, False, F32),  # multi-query: one K/V head for all
    (1, 4, 2, 77, 16, True, BF16),
])
def test_grouped_query_attention_forward_and_backward_match_reference(B, H, H_kv, T, D, causal, dtype):
    # the reference repeats K/V heads, so autograd sums dK, dV over each group, as the kernel must
    check_against_reference(B, H, H_kv, T, D, causal, dtype)


def test_forward_saves_the_log_sum_exp_of_each_row():
    q, k, v, _ = random_qkv(1, 2, 2, 77, 16, torch.float32)
    _, lse = kernels._flash_forward(q, k, v, causal=True, sm_scale=0.25)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.25  # (1, 2, 77, 77)
    s = s.masked_fill(torch.ones(77, 77, dtype=torch.bool).triu(1), float("-inf"))
    assert rel_err(lse, torch.logsumexp(s, dim=-1)) < 1e-6  # float32 sums of 77 terms: ~1e-7


def test_strided_inputs_and_custom_scale_match_reference():
    # model.py hands over (B, T, H, D) -> (B, H, T, D) transposes of a fused qkv projection
    B, T, H, D = 2, 50, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, dtype=torch.float64, device=DEVICE)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.float().split(H * D, dim=2))
    assert not q.is_contiguous()
    out = kernels.flash_attention(q, k, v, causal=True, sm_scale=0.3)
    ref_q, ref_k, ref_v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert rel_err(out, kernels.reference_attention(ref_q, ref_k, ref_v, causal=True, sm_scale=0.3)) < TOL[F32]


def test_causal_output_ignores_future_keys():
    # an independent property, not a comparison: changing keys and values after position t
    # must leave outputs 0..t bit-for-bit unchanged
    q, k, v, _ = random_qkv(1, 1, 1, 40, 16, torch.float32)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 21:] += 1.0
    v2[:, :, 21:] -= 1.0
    a = kernels.flash_attention(q, k, v, causal=True)
    b = kernels.flash_attention(q, k2, v2, causal=True)
    assert torch.equal(a[:, :, :21], b[:, :, :21]) and not torch.equal(a[:, :, 21:], b[:, :, 21:])


# ---------------------------------------------------------------------------------------------
# Document masking (--doc_mask): per-row document ids, tiles of other documents skipped


def random_documents(B, T, p=0.08, seed=None):
    """(B, T) non-decreasing document ids, as model.document_ids makes them: a new document starts
    at each position with probability p (so rows hold documents of random, ragged lengths)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    return torch.cumsum(torch.rand(B, T, generator=g) < p, dim=1).to(DEVICE)


@pytest.mark.parametrize("B,H,H_kv,T,D,dtype", [(2, 2, 1, 77, 16, F32), (1, 2, 2, 130, 16, F32), (1, 2, 2, 77, 32, BF16)])
def test_flash_attention_with_documents_and_its_gradients_match_float64_reference(B, H, H_kv, T, D, dtype):
    q, k, v, do = random_qkv(B, H, H_kv, T, D, dtype)
    docs = random_documents(B, T)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attention(*ours, causal=True, doc_ids=docs)
    out.backward(do)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, doc_ids=docs)  # model.py's block-diagonal causal mask, written out
    ref.backward(do.double())
    for name, a, b in [("O", out, ref), ("dQ", ours[0].grad, ref_in[0].grad), ("dK", ours[1].grad, ref_in[1].grad),
                       ("dV", ours[2].grad, ref_in[2].grad)]:
        err = rel_err(a, b.detach())
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} for {dtype}, T={T}, documents {docs.tolist()}"


@CPU_ONLY  # the tile sizes below are the interpreter's (32 x 16 forward and dQ, 16 x 32 dK/dV)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's warnings about the NaN rows, which are expected
def test_document_mask_skips_the_tiles_of_other_documents():
    # NaN in a tile that is visited, even where masked, spreads (0 * NaN = NaN in P V); a finite
    # result proves the tile was never loaded. Documents [0, 48) and [48, 80).
    T, boundary = 80, 48
    q, k, v, do = random_qkv(1, 1, 1, T, 16, torch.float32)
    docs = (torch.arange(T) >= boundary).long()[None].to(DEVICE)
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    want = kernels.flash_attention(*clean, doc_ids=docs)
    want.backward(do)
    # forward and dQ: the query block [64, 96) starts in the second document, so key tiles
    # [0, 48) are skipped: NaN keys and values there leave rows 64.. finite and unchanged
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, :boundary], v_nan[:, :, :boundary] = float("nan"), float("nan")
    ours = [t.clone().requires_grad_() for t in (q, k_nan, v_nan)]
    out = kernels.flash_attention(*ours, doc_ids=docs)
    dq = torch.autograd.grad(out, ours[0], do)[0]
    assert torch.equal(out[:, :, 64:], want[:, :, 64:])
    assert torch.equal(dq[:, :, 64:], clean[0].grad[:, :, 64:])
    # dK, dV: the key tile [0, 32) ends in the first document, so query tiles [48, 80) are
    # skipped: NaN queries and output gradients there leave its dK, dV finite and unchanged
    q_nan, do_nan = q.clone(), do.clone()
    q_nan[:, :, boundary:], do_nan[:, :, boundary:] = float("nan"), float("nan")
    ours = [t.clone().requires_grad_() for t in (q_nan, k, v)]
    kernels.flash_attention(*ours, doc_ids=docs).backward(do_nan)
    assert torch.equal(ours[1].grad[:, :, :32], clean[1].grad[:, :, :32])
    assert torch.equal(ours[2].grad[:, :, :32], clean[2].grad[:, :, :32])


def test_document_mask_keeps_outputs_causal_and_within_their_document():
    # change keys and values at positions 21..25 (inside the second of three documents [0, 10),
    # [10, 30), [30, 40)): only outputs 21..29 may move, and the others not by a single bit
    q, k, v, _ = random_qkv(1, 2, 2, 40, 16, torch.float32)
    docs = torch.tensor([[0] * 10 + [1] * 20 + [2] * 10], device=DEVICE)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 21:26] += 1.0
    v2[:, :, 21:26] -= 1.0
    a = kernels.flash_attention(q, k, v, doc_ids=docs)
    b = kernels.flash_attention(q, k2, v2, doc_ids=docs)
    assert torch.equal(a[:, :, :21], b[:, :, :21]) and torch.equal(a[:, :, 30:], b[:, :, 30:])
    assert (a[:, :, 21:30] - b[:, :, 21:30]).abs().amin(dim=-1).gt(0).all()


def test_document_spans_bound_each_run_of_equal_ids():
    start, end = kernels.document_spans(torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5]]))
    assert start.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6, [0, 1, 2, 3, 4, 5]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6, [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("shapes,words", [
    (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), "like q"),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "groups"),
    (((1, 2, 8, 160), (1, 2, 8, 160), (1, 2, 8, 160)), "head size"),
    (((2, 8, 16), (2, 8, 16), (2, 8, 16)), "(B, H, T, D)"),
])
def test_bad_attention_inputs_are_one_line_value_errors(shapes, words):
    with pytest.raises(ValueError) as e:
        kernels.flash_attention(*(torch.zeros(s, device=DEVICE) for s in shapes))
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# model.py's seam and its fallback


def test_backend_with_dropout_falls_back_to_sdpa_and_says_so_once(capsys):
    kernels._warned.clear()
    q, k, v, _ = random_qkv(1, 4, 2, 20, 16, torch.float32)
    torch.manual_seed(7)
    got = kernels.triton_attention_backend(q, k, v, dropout_p=0.5, fallback=sdpa_attention)
    torch.manual_seed(7)  # the same dropout mask from SDPA itself, called directly
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), dropout_p=0.5,
                                          is_causal=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    kernels.triton_attention_backend(q, k, v, dropout_p=0.5, fallback=sdpa_attention)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "falls back to torch SDPA" in err[0] and "dropout" in err[0]


def test_backend_without_dropout_uses_the_kernel_and_matches_reference(monkeypatch):
    calls = []
    q, k, v, _ = random_qkv(2, 4, 2, 20, 16, torch.float32)
    got = kernels.triton_attention_backend(q, k, v, 0.0, fallback=lambda *a: calls.append(a))  # must not be reached
    assert not calls and rel_err(got, kernels.reference_attention(q.double(), k.double(), v.double())) < TOL[F32]


LATE_IMPORT = """
import torch
torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())  # imports Triton before kernels.py can set it up
import kernels
from model import sdpa_attention
q, k, v = torch.randn(3, 1, 2, 9, 16).unbind(0)
for _ in range(2):
    out = kernels.triton_attention_backend(q, k, v, 0.0, fallback=sdpa_attention)
print((out - kernels.reference_attention(q, k, v)).abs().max().item())
"""


@CPU_ONLY
def test_backend_says_why_when_triton_cannot_run_and_still_computes_attention():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a fresh CPU user has it
    r = subprocess.run([sys.executable, "-c", LATE_IMPORT], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "falls back" in line]
    assert len(lines) == 1 and "TRITON_INTERPRET=1" in lines[0]  # once, with the fix in it
    assert float(r.stdout) < 1e-5  # SDPA's float32 result, ~1e-7 from the reference


def train_losses(data_dir, out_dir, attention) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels.py must switch it on itself
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--max_iters", "3",
                        "--batch_size", "4", "--eval_iters", "1", "--sample_tokens", "0", "--dtype", "float32", "--device", "cpu",
                        "--attention", attention, "--data_dir", str(data_dir), "--out_dir", str(out_dir)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [row["loss"] for row in rows if "loss" in row] + [row["val_loss"] for row in rows if "val_loss" in row]


@prefetch("test_training_with_triton_attention_matches_sdpa")
def sdpa_and_triton_losses(session, tmp_path_factory):
    """The two runs of the test below, started early (tests/conftest.py, 3)."""
    tmp = tmp_path_factory.mktemp("triton_training")
    return train_losses(tmp / "data", tmp / "sdpa", "sdpa"), train_losses(tmp / "data", tmp / "triton", "triton")


@pytest.mark.slow  # 11-13 s idle: out of the quick command's 3 minutes
def test_training_with_triton_attention_matches_sdpa(prefetched):
    # the whole chain: train.py's CLI -> model.attend -> kernels, forward and backward, 3 AdamW steps
    sdpa, triton = prefetched("sdpa_and_triton_losses")
    assert len(sdpa) == len(triton) == 4  # 3 training losses and the final validation loss
    assert max(abs(a - b) for a, b in zip(sdpa, triton)) < 1e-4  # float32 reorderings give ~1e-6; 1e-4 leaves a margin of 100


# ---------------------------------------------------------------------------------------------
# Fused linear + cross-entropy


def random_ce(N, C, V, dtype, ignore_every=5):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(N, C, generator=g).to(DEVICE, dtype)
    w = (0.5 * torch.randn(V, C, generator=g)).to(DEVICE, dtype)  # logits of order 1, as in a trained model
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignore_every] = -1  # some positions have no target
    return x, w, t.to(DEVICE)


@pytest.mark.parametrize("N,C,V,chunk,dtype", [
    (37, 16, 300, 8, F32),  # 5 chunks, the last ragged; V ragged against the interpreter's 256-wide tiles
    (64, 32, 513, None, F32),  # the default chunk size
    (37, 16, 300, 16, BF16),
    (20, 16, 100, 7, F16),  # V smaller than one tile
])
def test_fused_linear_cross_entropy_and_gradients_match_float64_reference(N, C, V, chunk, dtype):
    x, w, t = random_ce(N, C, V, dtype)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    scale = float(torch.rand(())) + 0.5  # an upstream gradient != 1: the stored grads must be scaled by it
    loss = kernels.fused_linear_cross_entropy(xs, ws, t, ignore_index=-1, chunk_size=chunk)
    (loss * scale).backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(x64 @ w64.t(), t, ignore_index=-1)
    (ref * scale).backward()
    assert rel_err(loss, ref.detach()) < TOL[dtype] / 10  # the loss is summed in float32: tighter
    assert rel_err(xs.grad, x64.grad) < TOL[dtype] and rel_err(ws.grad, w64.grad) < TOL[dtype]
    assert xs.grad.dtype == dtype and ws.grad.dtype == dtype


@pytest.mark.parametrize("impl", ["fused", "chunked"])  # the Triton kernel (interpreter here) and the torch version
def test_z_loss_inside_the_fused_loss_equals_the_plain_loss_plus_z_loss(impl):
    # z-loss 0.05 (500x PaLM's): its share of the loss and of the gradients is then far above the
    # tolerances, so a missing 2 z LSE softmax term in the gradient fails them
    x, w, t = random_ce(21, 16, 70, F32)
    t[3] = -1  # an ignored row: neither term counts it
    x, w = x * 4, w * 4  # logits of a few units, so log Z is far from 0
    coef, scale = 0.05, float(torch.rand(())) + 0.5
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn = kernels.fused_linear_cross_entropy if impl == "fused" else kernels.chunked_linear_cross_entropy
    loss = fn(xs, ws, t, ignore_index=-1, chunk_size=8, z_loss=coef)
    (loss * scale).backward()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    logits = x64 @ w64.t()
    keep = t != -1
    log_z = logits.exp().sum(-1).log()  # written out, not logsumexp: the formula itself
    ref = F.cross_entropy(logits, t, ignore_index=-1) + coef * (log_z[keep] ** 2).mean()
    (ref * scale).backward()
    z_share = (coef * (log_z[keep] ** 2).mean() / ref).item()
    assert z_share > 0.05  # the z-loss is a real part of what is compared
    # float32 sums: measured worst 6e-8 on the loss and 1.9e-6 on the gradients (logits 16x the plain
    # test's, so larger) over three fresh runs of each impl; the bounds leave a margin of ~10 or more
    assert rel_err(loss, ref.detach()) < 1e-6
    assert rel_err(xs.grad, x64.grad) < 2e-5 and rel_err(ws.grad, w64.grad) < 2e-5


def test_fused_cross_entropy_only_ever_holds_chunk_rows_of_logits(monkeypatch):
    seen = []
    real = kernels._ce_rows_kernel

    class Spy:  # records the logits each kernel launch receives, then launches the real kernel
        def __getitem__(self, grid):
            def launch(logits, *args, **kwargs):
                seen.append(tuple(logits.shape))
                return real[grid](logits, *args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_ce_rows_kernel", Spy())
    x, w, t = random_ce(30, 16, 200, F32)
    loss = kernels.fused_linear_cross_entropy(x, w, t, chunk_size=8)
    assert seen == [(8, 200), (8, 200), (8, 200), (6, 200)]  # never (30, 200)
    assert rel_err(loss, F.cross_entropy(x.double() @ w.double().t(), t, ignore_index=-1)) < 1e-5


def test_fused_cross_entropy_is_exact_for_logits_in_the_thousands():
    # exp(1000) overflows float32 (and float64): the log-sum-exp must subtract the row's maximum first.
    # Logits ~1e3 in float32 keep ~1e-4 absolute: the loss, O(1e3), agrees to ~1e-6 relative
    x, w, t = random_ce(12, 16, 300, F32)
    x = x * 400
    xs = x.clone().requires_grad_()
    loss = kernels.fused_linear_cross_entropy(xs, w, t, chunk_size=5)
    loss.backward()
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64 @ w.double().t(), t, ignore_index=-1)
    ref.backward()
    assert torch.isfinite(loss) and rel_err(loss, ref.detach()) < 1e-5
    assert rel_err(xs.grad, x64.grad) < 1e-4


def test_fused_cross_entropy_with_every_target_ignored_is_nan_like_torch():
    x, w, t = random_ce(6, 16, 50, F32)
    t[:] = -1
    assert torch.isnan(kernels.fused_linear_cross_entropy(x, w, t))
    assert torch.isnan(F.cross_entropy(x @ w.t(), t, ignore_index=-1))


# ---------------------------------------------------------------------------------------------
# Command line and benchmark


@CPU_ONLY
def test_bench_code_runs_in_the_interpreter_on_tiny_shapes(capsys):
    assert kernels.main(["--bench", "--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    for name in ("ours", "sdpa-flash", "naive", "fused:", "torch:"):
        assert name in out
    assert "ours/sdpa-flash" in out and "n/a" in out  # cuDNN has no CPU kernel: reported, not crashed


@CPU_ONLY
def test_bench_without_gpu_is_one_line_and_exit_2(capsys):
    assert kernels.main(["--bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "CUDA" in err and "\n" not in err


def test_flops_follow_the_documented_formula():
    # counted, not restated: torch's FLOP counter on the reference's matmuls. Non-causal, the
    # reference computes every score; causal halves that (the docstring), and FlashAttention's
    # backward is the reference's four matmuls plus S recomputed (one of the forward's two)
    from torch.utils.flop_counter import FlopCounterMode

    B, H, T, D = (int(n) for n in torch.randint(1, 9, (4,)))
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counted_forward:
        out = kernels.reference_attention(q, k, v, causal=False)
    with FlopCounterMode(display=False) as counted_backward:
        out.backward(torch.randn_like(out))
    forward, backward = counted_forward.get_total_flops(), counted_backward.get_total_flops()
    assert forward == 4 * B * H * T * T * D and backward == 2 * forward  # QK^T and PV; dQ, dK, dP, dV
    assert kernels.attention_flops(B, H, T, D, backward=False) == forward / 2
    assert kernels.attention_flops(B, H, T, D, backward=True) == (forward + backward + forward / 2) / 2


def test_help_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--bench" in r.stdout and "--cpu-smoke" in r.stdout
