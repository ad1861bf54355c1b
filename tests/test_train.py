"""Tests for train.py: flags, schedule, exact resume, gradient accumulation, metrics and bad input."""

import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import data
import parallel
import scaling
import train
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One small prepared corpus shared by the tests of this file (prepared on first use)."""
    return str(tmp_path_factory.mktemp("data"))


def tiny(data_dir, out_dir, **overrides) -> tuple[train.TrainConfig, dict]:
    """The tiny preset, with output in out_dir, as train.main would resolve it."""
    args = train.build_parser().parse_args(["--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(out_dir)])
    cfg, model_overrides = train.resolve_configs(args)
    for k, v in overrides.items():
        if k in train.MODEL_FLAGS:
            model_overrides[k] = v
        else:
            setattr(cfg, k, v)
    return cfg, model_overrides


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


# ---------------------------------------------------------------------------------------------
# Flags and schedule


def test_every_config_field_is_a_flag_with_its_comment():
    help_text = run_cli("--help").stdout
    run_comments, model_comments = train.field_comments(train.TrainConfig), train.field_comments(train.GPTConfig)
    pairs = [(f.name, run_comments) for f in train.fields(train.TrainConfig)] + [(n, model_comments) for n in train.MODEL_FLAGS]
    for name, comments in pairs:
        assert f"--{name}" in help_text, name
        first_words = " ".join(comments[name].split()[:3])
        assert first_words in " ".join(help_text.split()), f"--{name} help lacks its field comment"


def test_flags_override_preset_and_model_fields():
    args = train.build_parser().parse_args(["--preset", "tiny", "--n_layer", "3", "--compile", "--batch_size", "5"])
    cfg, model_overrides = train.resolve_configs(args)
    assert cfg.batch_size == 5 and cfg.compile is True and cfg.max_iters == train.PRESETS["tiny"]["max_iters"]
    assert model_overrides["n_layer"] == 3 and model_overrides["n_embd"] == train.PRESETS["tiny"]["n_embd"]


def schedule_cfg(**kw):
    return train.TrainConfig(**{"learning_rate": 1.0, "min_lr_ratio": 0.1, "warmup_iters": 10, "max_iters": 110, **kw})


def test_warmup_is_linear_to_the_peak():
    cfg = schedule_cfg()
    assert [train.learning_rate_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_schedule_matches_its_formula():
    cfg = schedule_cfg(schedule="cosine")
    for step in (10, 35, 60, 85, 110):
        progress = (step - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert train.learning_rate_at(step, cfg) == pytest.approx(expected)
    assert train.learning_rate_at(60, cfg) == pytest.approx(0.55)  # half-way: mean of peak and floor


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = schedule_cfg(schedule="wsd", decay_frac=0.2)  # decay over the last 22 of 110 steps, from step 88
    assert train.learning_rate_at(50, cfg) == 1.0 and train.learning_rate_at(87, cfg) == 1.0
    assert train.learning_rate_at(99, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert train.learning_rate_at(110, cfg) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Resume, accumulation, metrics


def final_state(out_dir):
    return train.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    # dropout on, so the resumed run must also restore the RNG state exactly
    straight, mo = tiny(data_dir, tmp_path / "straight", max_iters=8, eval_interval=4, dropout=0.1, dtype="float32")
    train.train(straight, mo)
    first, mo = tiny(data_dir, tmp_path / "resumed", max_iters=8, eval_interval=4, dropout=0.1, stop_at=4, dtype="float32")
    train.train(first, mo)
    second, mo = tiny(data_dir, tmp_path / "resumed", max_iters=8, eval_interval=4, dropout=0.1, resume=True, dtype="float32")
    train.train(second, mo)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s", "mfu")} for r in rows]
    assert strip(a) == strip(b)  # same losses, learning rates and validation losses, exactly
    sa, sb = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["sampler"] == sb["sampler"]


def test_rng_states_saved_then_set_replay_the_same_draws_and_dropout_masks():
    # what a resume needs of the RNG: after set_rng_states(saved), every draw is the one that
    # followed the save (a dropout mask included), however much was drawn in between
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    torch.rand(int(torch.randint(1, 100, ())))
    saved = train.rng_states()
    saved_copy = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}
    first = (torch.rand(5), torch.nn.functional.dropout(torch.ones(64), 0.5))
    torch.rand(1000)
    train.set_rng_states(saved)
    again = (torch.rand(5), torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert all(torch.equal(saved[k], saved_copy[k]) for k in saved if torch.is_tensor(saved[k]))  # a copy, not a view


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    # 8 sequences in one micro-batch, or 4 x 2 micro-batches: the same windows, the same mean gradient
    big, mo = tiny(data_dir, tmp_path / "big", max_iters=4, batch_size=8, grad_accum=1, dtype="float32")
    train.train(big, mo)
    acc, mo = tiny(data_dir, tmp_path / "acc", max_iters=4, batch_size=4, grad_accum=2, dtype="float32")
    train.train(acc, mo)
    la = [r["loss"] for r in read_metrics(tmp_path / "big") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "acc") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)  # float32: only the summation order differs
    sa, sb = final_state(tmp_path / "big"), final_state(tmp_path / "acc")
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-4, atol=1e-5)


class ListSampler:
    """Hands train_step the micro-batches of a list, in order, as data.TokenSampler would."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def tiny_par(seed: int, **cfg_overrides):
    config = GPTConfig(vocab_size=61, block_size=12, n_layer=2, n_head=2, n_embd=16, bias=True, dropout=0.0)
    cfg = train.TrainConfig(**{"learning_rate": 3e-3, "warmup_iters": 0, "max_iters": 10, "grad_clip": 0.05,
                               "dtype": "float32", **cfg_overrides})
    torch.manual_seed(seed)
    model = GPT(config)
    par, _ = train.make_parallelized(model, cfg, parallel.init_distributed(1, 1, 1, 1, torch.device("cpu")), torch.float32)
    return par, cfg, config


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_train_step_takes_the_full_batch_step_whatever_the_accumulation(grad_accum):
    # the reference is written out here with plain torch: the mean loss over all 8 sequences, its
    # gradient, its norm (returned before clipping), clipping at 0.05 (active: the norm is ~1), and
    # AdamW's step. A judge of the step itself: a missing 1/grad_accum multiplies the gradient and
    # its norm by grad_accum (AdamW alone would hide it; the returned norm and the clipping do not),
    # a loss summed instead of averaged is grad_accum times too large, and a sync on every
    # micro-step is caught below by counting
    seed = int(torch.randint(0, 2**31, ()))
    par, cfg, config = tiny_par(seed, grad_accum=grad_accum, batch_size=8 // grad_accum)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 61, (8, 12), generator=g), torch.randint(0, 61, (8, 12), generator=g)
    syncs = []
    forward_backward = par.forward_backward
    par.forward_backward = lambda *a, **k: syncs.append(k.get("sync", True)) or forward_backward(*a, **k)
    out = train.train_step(par, ListSampler(zip(x.chunk(grad_accum), y.chunk(grad_accum))), cfg, step=3)
    torch.manual_seed(seed)
    ref = GPT(config)
    opt = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=train.learning_rate_at(3, cfg), betas=(cfg.beta1, cfg.beta2))
    _, loss = ref(x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
    opt.step()
    assert syncs == [False] * (grad_accum - 1) + [True]  # gradients cross ranks on the last micro-step only
    assert out["lr"] == train.learning_rate_at(3, cfg) and not out["skipped"]
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)  # float32 sums in another order: ~1e-7
    assert out["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    for (name, a), b in zip(par.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert a.grad is None  # zero_grad: the next step starts from nothing


def test_bench_times_exactly_the_training_step(tmp_path, monkeypatch):
    # --bench runs train_step itself (one micro-batch, its fixed random batch): every timed step is
    # a call of the function training uses, and its reported loss is that function's loss
    calls = []
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg, mo = bench_cfg(tmp_path, bench=True, vocab_size=500, bench_steps=3, bench_warmup=2, grad_accum=4)
    row = train.bench_one(cfg, mo, parallel.init_distributed(1, 1, 1, 1, torch.device("cpu")))
    assert len(calls) == 5 and all(c[2].grad_accum == 1 for c in calls) and [c[3] for c in calls] == [0, 1, 2, 3, 4]
    batch = calls[0][1]
    torch.manual_seed(cfg.seed)
    par, _ = train.make_parallelized(GPT(GPTConfig(**row["model_config"])), replace(cfg, grad_accum=1),
                                     parallel.init_distributed(1, 1, 1, 1, torch.device("cpu")), torch.float32)
    losses = [real(par, batch, replace(cfg, grad_accum=1), step)["loss"] for step in range(5)]
    assert row["loss"] == losses[-1]  # the same function on the same batch from the same weights: bit for bit


def test_metrics_file_has_steps_losses_and_evaluations(data_dir, tmp_path):
    cfg, mo = tiny(data_dir, tmp_path, max_iters=6, eval_interval=3)
    result = train.train(cfg, mo)
    rows = read_metrics(tmp_path)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"lr", "ms_per_step", "tokens_per_s"} <= set(r) for r in steps)
    assert [r["step"] for r in evals] == [3, 6]
    # bits per byte is the loss rescaled by tokens per byte of the validation text
    m = result["manifest"]
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] * m["val_tokens"] / m["val_bytes"] / math.log(2))
    info = json.load(open(tmp_path / "run.json"))
    assert info["train_config"]["max_iters"] == 6 and "torch" in info


def test_compile_falls_back_to_eager_with_one_line_where_it_cannot_work(data_dir, tmp_path, monkeypatch, capsys):
    # no C++ compiler on PATH: Inductor cannot build CPU code, so --compile must say so and train eagerly
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    assert "C++ compiler" in train.compile_unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(train.torch, "compile", lambda *a, **k: pytest.fail("torch.compile called without a compiler"))
    cfg, mo = tiny(data_dir, tmp_path / "compiled", max_iters=2, eval_interval=2, compile=True)
    compiled = train.train(cfg, mo)
    assert "--compile: no C++ compiler on PATH" in capsys.readouterr().err
    cfg, mo = tiny(data_dir, tmp_path / "eager", max_iters=2, eval_interval=2)
    eager = train.train(cfg, mo)
    assert compiled["loss"] == eager["loss"] and compiled["val_loss"] == eager["val_loss"]


def test_checkpoint_loads_weights_only_without_compile_prefixes(data_dir, tmp_path, monkeypatch):
    # torch.compile wraps the model in an OptimizedModule whose state_dict keys start with
    # "_orig_mod." (nanoGPT #325); the eager backend builds the same wrapper in seconds
    compile_fn = torch.compile
    monkeypatch.setattr(train.torch, "compile", lambda m: compile_fn(m, backend="eager"))
    cfg, mo = tiny(data_dir, tmp_path, max_iters=2, eval_interval=2, compile=True)
    train.train(cfg, mo)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert not list(tmp_path.glob("*.tmp*")), "no temporary files left behind"


def test_bfloat16_autocast_on_cpu_stays_close_to_float32(data_dir, tmp_path):
    f32, mo = tiny(data_dir, tmp_path / "f32", max_iters=3, dtype="float32")
    bf16, mo = tiny(data_dir, tmp_path / "bf16", max_iters=3, dtype="bfloat16")
    train.train(f32, mo)
    train.train(bf16, mo)
    la = [r["loss"] for r in read_metrics(tmp_path / "f32") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r]
    assert la == pytest.approx(lb, rel=2e-2)  # bf16 keeps 8 mantissa bits: ~0.4% per rounding


def test_nan_loss_stops_the_run_naming_step_and_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg, mo = tiny(data_dir, tmp_path, max_iters=6, eval_interval=2)
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        calls["n"] += 1
        if self.training and calls["n"] > 3 and loss is not None:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"step \d+.*ckpt\.pt"):
        train.train(cfg, mo)
    assert os.path.exists(tmp_path / "ckpt.pt")  # the last good checkpoint is still there


def test_sample_mode_generates_text_from_a_checkpoint(data_dir, tmp_path):
    cfg, mo = tiny(data_dir, tmp_path, max_iters=2, eval_interval=2)
    train.train(cfg, mo)
    # the corpus is found in this invocation's --data_dir (never a path from the checkpoint)
    out = run_cli("--sample", "--out_dir", str(tmp_path), "--data_dir", str(data_dir), "--sample_tokens", "20", "--prompt", "def ")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ")


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit 2, nothing overwritten


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg, mo = tiny(data_dir, out, max_iters=2, eval_interval=2)
    train.train(cfg, mo)
    return out


def test_unknown_preset_is_one_line():
    assert_one_line_error(run_cli("--preset", "gpt5"), "unknown preset", "laptop")


def test_missing_data_path_is_one_line(tmp_path):
    assert_one_line_error(run_cli("--preset", "tiny", "--data", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "o")),
                          "does not exist")


def test_empty_corpus_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("--preset", "tiny", "--data", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")))


def test_resume_without_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_cli("--preset", "tiny", "--resume", "--out_dir", str(tmp_path)), "no checkpoint")


def test_fresh_run_refuses_to_overwrite_a_checkpoint(data_dir, trained_run):
    before = (trained_run / "ckpt.pt").read_bytes()
    result = run_cli("--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(trained_run))
    assert_one_line_error(result, "--resume", "--overwrite")
    assert (trained_run / "ckpt.pt").read_bytes() == before


def test_resume_with_another_model_shape_is_refused(data_dir, trained_run):
    before = (trained_run / "ckpt.pt").read_bytes()
    result = run_cli("--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(trained_run), "--resume", "--n_embd", "96")
    assert_one_line_error(result, "n_embd 64 -> 96")
    assert (trained_run / "ckpt.pt").read_bytes() == before


def test_corrupt_checkpoint_is_one_line_and_left_alone(data_dir, trained_run, tmp_path):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((trained_run / "ckpt.pt").read_bytes()[:5000])  # a truncated write
    result = run_cli("--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(out), "--resume")
    assert_one_line_error(result, "corrupt")
    assert len((out / "ckpt.pt").read_bytes()) == 5000


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_code_in_it_is_refused_and_not_run(data_dir, tmp_path):
    out = tmp_path / "evil"
    out.mkdir()
    with open(out / "ckpt.pt", "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    result = run_cli("--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(out), "--resume", cwd=str(tmp_path))
    assert_one_line_error(result, "unsafe")
    assert not (tmp_path / "PWNED").exists()


def test_float16_on_cpu_is_one_line(tmp_path):
    assert_one_line_error(run_cli("--preset", "tiny", "--device", "cpu", "--dtype", "float16", "--out_dir", str(tmp_path)),
                          "float16")


def test_readme_documents_every_flag_and_preset():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for action in train.build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in readme, f"README does not document {flag}"
    for preset in train.PRESETS:
        assert f"`{preset}`" in readme, f"README does not describe preset {preset}"


# ---------------------------------------------------------------------------------------------
# Throughput: --bench, the ablation, and the speed-up flags keep the maths

def bench_cfg(tmp_path, **overrides):
    # data_dir points at a directory that must stay absent: --bench prepares no corpus
    return tiny(str(tmp_path / "no_corpus"), tmp_path, **{"device": "cpu", "bench_steps": 2, "bench_warmup": 1, **overrides})


def test_bench_runs_on_the_cpu_without_a_corpus_and_writes_the_documented_json(tmp_path, capsys):
    cfg, mo = bench_cfg(tmp_path, bench=True, vocab_size=500)  # a BPE of 500 ids, padded to 512
    train.bench(cfg, mo)
    report = json.load(open(tmp_path / "bench.json"))
    for key in ("device", "device_name", "dtype", "torch", "git_revision", "peak_flops", "rows"):
        assert key in report, key
    (row,) = report["rows"]
    assert set(train.BENCH_ROW_KEYS) <= set(row)
    assert row["tokens_per_step"] == 8 * 64 and row["model_config"]["vocab_size"] == 512
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / (row["ms_per_step"] / 1000))
    # float32 on a CPU: MFU against scaling.cpu_peak_flops (Linux); the CPU allocator keeps no peak count
    peak = scaling.cpu_peak_flops()
    expected = None if peak is None else row["tokens_per_s"] * scaling.flops_per_token_6n(GPTConfig(**row["model_config"]), 64) / peak
    assert row["mfu"] == (None if expected is None else pytest.approx(expected)) and row["peak_memory_mib"] is None
    assert abs(row["loss"] - math.log(500)) < 1.0  # random tokens: about a uniform guess after 3 steps
    assert "| run | what changes | tokens/s | ms/step (median) | MFU | peak memory (MiB) |" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "no_corpus")


def test_bench_ablation_turns_each_speedup_off_in_turn(tmp_path):
    cfg, mo = bench_cfg(tmp_path, bench_ablation=True)
    rows = {name: (flags, skipped) for name, _, flags, skipped in train.ablation_rows(cfg, mo, torch.device("cpu"))}
    best = rows["all"][0]
    assert best["compile"] and best["fused_ce"] and best["fused_adamw"] == "on" and best["pad_vocab"] == 64
    for name, (flags, _) in rows.items():
        changed = {k for k in set(flags) | set(best) if flags.get(k) != best.get(k)}
        assert len(changed) == (0 if name == "all" else 1), (name, changed)  # one thing at a time
    assert rows["fp8"][1] and rows["cuda_graphs"][1]  # skipped on a CPU, with the reason
    cfg.bench_rows = "no_compile,fp8"  # the one row that runs quickly on a CPU, and one that cannot run here
    train.bench(cfg, mo)
    report = json.load(open(tmp_path / "bench.json"))
    assert [r["name"] for r in report["rows"]] == ["no_compile", "fp8"]
    assert report["rows"][0]["tokens_per_s"] > 0 and "compute capability" in report["rows"][1]["skipped"]
    cfg.bench_rows = "no_such_row"
    with pytest.raises(ValueError, match="no_such_row"):
        train.bench(cfg, mo)


def test_fused_cross_entropy_and_checkpointing_train_like_the_plain_path(data_dir, tmp_path):
    losses = {}
    for name, flags in {"plain": {}, "fused": {"fused_ce": True, "activation_checkpointing": True}}.items():
        cfg, mo = tiny(data_dir, tmp_path / name, max_iters=3, eval_interval=3, **flags)
        train.train(cfg, mo)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-5)  # float32: the same sums in another order


def test_fused_and_unfused_adamw_take_the_same_steps():
    torch.manual_seed(0)
    # bias=False: the key bias's gradient is 0 in exact arithmetic (softmax ignores a shift shared by
    # all keys), so Adam would divide rounding noise by noise there, differently in each implementation
    config = train.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, bias=False)
    models = [GPT(config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = train.TrainConfig(learning_rate=1e-2)
    optimizers = []
    for m, fused in zip(models, ("on", "off")):
        cfg.fused_adamw = fused
        optimizers.append(train.make_optimizer(m, cfg, torch.device("cpu")))
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        for m, opt in zip(models, optimizers):
            opt.zero_grad()
            m(idx, idx)[1].backward()
            opt.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)  # float32 AdamW, ops in another order


class Uncompiled(torch.nn.Module):
    """What torch.compile returns (the module under _orig_mod), without the compiling."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args):
        return self._orig_mod(*args)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    calls = []

    def record(module, **kwargs):
        calls.append((module, kwargs))
        return Uncompiled(module)

    monkeypatch.setattr(train.torch, "compile", record)
    cfg = train.TrainConfig(compile=True, compile_mode="reduce-overhead")
    model = GPT(train.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    layout = parallel.init_distributed(1, 1, 1, 1, torch.device("cpu"))
    par, _ = train.make_parallelized(model, cfg, layout, torch.float32)
    assert calls == [(model, {}), (model, {"mode": "reduce-overhead"})]  # Parallelized's, then the mode's, of the GPT
    assert par.forward_module._orig_mod is model


def test_padded_vocabulary_rows_start_on_16_byte_boundaries():
    # padded_vocab_size's docstring: bf16 rows of 50257 logits are 100,514 bytes, so only every 8th
    # row starts 16-byte aligned; padded to 50304 (nanoGPT's number) every row does
    assert train.padded_vocab_size(50257, 64) == 50304 and train.padded_vocab_size(512, 64) == 512
    assert 50257 * 2 == 100_514 and [i for i in range(16) if i * 100_514 % 16 == 0] == [0, 8]
    assert all(i * 50304 * 2 % 16 == 0 for i in range(16))
    assert (50304 - 50257) / 50257 == pytest.approx(0.0009, abs=0.00005)  # "+0.09% output-layer FLOPs"


def test_old_checkpoints_resume_with_the_speed_flags_changed():
    cfg = train.TrainConfig()
    saved = {k: v for k, v in train.asdict(train.GPTConfig()).items() if k not in ("fused_ce", "activation_checkpointing")}
    ckpt = {"model_config": saved, "train_config": train.asdict(cfg)}  # written before these fields existed
    train.check_resume_compatible(ckpt, train.GPTConfig(fused_ce=True, activation_checkpointing=True, attention="naive"), cfg)


@pytest.mark.parametrize("flags, words", [
    ({"compile_mode": "reduce-overhead"}, ("--compile",)),
    ({"compile": True, "compile_mode": "fast"}, ("compile_mode",)),
    ({"fused_adamw": "maybe"}, ("fused_adamw",)),
    ({"pad_vocab": 0}, ("pad_vocab",)),
    ({"bench_steps": 0}, ("bench_steps",)),
])
def test_speed_flag_mistakes_are_refused_with_the_reason(flags, words):
    cfg = train.TrainConfig(**flags)
    with pytest.raises(ValueError) as e:
        train.check_config(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_fp8_on_a_cpu_is_one_line(tmp_path):
    assert_one_line_error(run_cli("--preset", "tiny", "--device", "cpu", "--bench", "--fp8", "--out_dir", str(tmp_path)),
                          "--fp8", "compute capability")


# ---------------------------------------------------------------------------------------------
# Mixtures that adapt during training (--mix_online, --mix_anneal; data.MixingSampler)


@pytest.mark.parametrize("flags", [dict(mix_online="odm"), dict(mix_anneal="code=0.2,prose=0.8", schedule="wsd", decay_frac=0.25)])
def test_adaptive_mixing_resumes_bit_for_bit_and_logs_its_weights(data_dir, tmp_path, flags):
    """ODM's bandit, or the annealed mixture, through train.py: 8 straight steps equal 4 + resume + 4
    (losses, domains, weights, model, loader state), and every step's domain and weights reach metrics.jsonl."""
    common = dict(max_iters=8, eval_interval=4, dtype="float32", **flags)
    straight, mo = tiny(data_dir, tmp_path / "straight", **common)
    train.train(straight, mo)
    first, mo = tiny(data_dir, tmp_path / "resumed", stop_at=4, **common)
    train.train(first, mo)
    second, mo = tiny(data_dir, tmp_path / "resumed", resume=True, **common)
    train.train(second, mo)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s", "mfu")} for r in rows]
    assert strip(a) == strip(b)
    mixes = [r for r in a if "mix_domain" in r]
    assert [r["step"] for r in mixes] == list(range(1, 9))
    assert all(abs(sum(r["mix_weights"].values()) - 1) < 1e-5 for r in mixes)
    if "mix_anneal" in flags:  # wsd decays over the last 25% of 8 steps: steps 7 and 8 (1-based) use the anneal weights
        assert [r["mix_weights"] for r in mixes[-2:]] == [{"code": 0.2, "prose": 0.8}] * 2
        assert mixes[0]["mix_weights"] != {"code": 0.2, "prose": 0.8}
    sa, sb = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["sampler"] == sb["sampler"] and sa["sampler"]["kind"] == "mixing"


def test_mix_flags_are_checked_before_any_work():
    cfg = train.TrainConfig(mix_online="bandit")
    with pytest.raises(ValueError, match="unknown --mix_online"):
        train.check_config(cfg)
    with pytest.raises(ValueError, match="--mix_reference"):
        train.check_config(train.TrainConfig(mix_online="doremi"))
    with pytest.raises(ValueError, match="DiLoCo"):
        train.check_config(train.TrainConfig(mix_online="odm", diloco_steps=5))


RECORD_DOMAINS = """
import json, os, sys
import data, train
update = data.MixingSampler.update
def recording(self, loss):
    record = update(self, loss)
    with open(os.path.join(os.environ["DOMAIN_LOG"], f"rank{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps([record["mix_domain"], loss]) + "\\n")
    return record
data.MixingSampler.update = recording
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_two_data_parallel_ranks_draw_the_same_domain_sequence(data_dir, tmp_path):
    """torchrun, 2 processes with gloo, --dp 2 --mix_online odm: each rank records the domain it drew and the
    loss it was given at every step; both sequences are the same, and so are rank 0's metrics.jsonl records."""
    script = tmp_path / "record.py"
    script.write_text(RECORD_DOMAINS)
    logs = tmp_path / "domains"
    logs.mkdir()
    args = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--data_dir", data_dir, "--out_dir",
            str(tmp_path / "out"), "--dp", "2", "--batch_size", "4", "--max_iters", "12", "--eval_interval", "12",
            "--mix_online", "odm"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "DOMAIN_LOG": str(logs)})
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [[json.loads(line) for line in open(logs / f"rank{r}.jsonl")] for r in (0, 1)]
    assert len(ranks[0]) == 12 and ranks[0] == ranks[1]
    logged = [r["mix_domain"] for r in read_metrics(tmp_path / "out") if "mix_domain" in r]
    assert logged == [domain for domain, _ in ranks[0]]


def test_the_doremi_recipe_runs_from_a_reference_run_to_a_mixture_for_the_main_run(data_dir, tmp_path):
    """Reference (--mix_online static) -> proxy (--mix_online doremi --mix_reference its metrics.jsonl) ->
    the proxy's average weights as a --mix value; each proxy step's weights follow DoReMi's update from the
    logged losses: alpha_i *= exp(max(L - L_ref(i), 0)) for the step's domain, pi = 0.999 alpha / sum + 0.0005."""
    ref, mo = tiny(data_dir, tmp_path / "ref", max_iters=10, eval_interval=10, dtype="float32", mix_online="static")
    train.train(ref, mo)
    proxy, mo = tiny(data_dir, tmp_path / "proxy", max_iters=6, eval_interval=6, dtype="float32", mix_online="doremi",
                     mix_reference=str(tmp_path / "ref" / "metrics.jsonl"), seed=7)
    train.train(proxy, mo)
    ref_rows = [r for r in read_metrics(tmp_path / "ref") if "mix_domain" in r]
    rows = [r for r in read_metrics(tmp_path / "proxy") if "mix_domain" in r]
    names = list(rows[0]["mix_weights"])
    alpha = {n: 1 / len(names) for n in names}
    for r in rows:  # the weights each step was drawn with, recomputed from the losses logged before it
        total = sum(alpha.values())
        assert r["mix_weights"] == pytest.approx({n: 0.999 * a / total + 0.001 / len(names) for n, a in alpha.items()},
                                                 abs=2e-6)
        seen = [x["mix_loss"] for x in ref_rows if x["mix_domain"] == r["mix_domain"] and x["step"] <= r["step"]]
        reference = seen[-1] if seen else next(x["mix_loss"] for x in ref_rows if x["mix_domain"] == r["mix_domain"])
        alpha[r["mix_domain"]] *= math.exp(max(r["mix_loss"] - reference, 0.0))
        alpha = {n: a / sum(alpha.values()) for n, a in alpha.items()}
    mixture = data.parse_mix(data.doremi_weights(str(tmp_path / "proxy" / "metrics.jsonl")))
    assert set(mixture) == set(names) and sum(mixture.values()) == pytest.approx(1, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# One range per flag (issue 13): where the flags are parsed, naming the flag


def test_every_numeric_flag_has_a_range_and_a_value_outside_it_is_refused_naming_the_flag():
    numeric = [f.name for f in train.fields(train.TrainConfig) if f.type in ("int", "float")]
    numeric += [f.name for f in train.fields(train.GPTConfig) if f.name in train.MODEL_FLAGS and f.type in ("int", "float")]
    assert sorted(set(numeric) - set(train.FLAG_RANGES)) == []  # a new numeric flag needs its row
    for name, interval in train.FLAG_RANGES.items():
        low, high = (float(x) for x in interval[1:-1].split(","))
        outside = low - 1 if math.isinf(high) else high + 1
        inside = low if interval[0] == "[" else low + 0.5
        with pytest.raises(ValueError, match=f"--{name} must be"):
            train.check_ranges({name: outside})
        with pytest.raises(ValueError, match=f"--{name} must be"):
            train.check_ranges({name: float("nan")})
        train.check_ranges({name: inside})  # its end, where it is included
    # and the defaults of every preset sit inside their ranges
    for preset in train.PRESETS:
        cfg, model_overrides = train.resolve_configs(train.build_parser().parse_args(["--preset", preset]))
        train.check_ranges({**train.asdict(cfg), **model_overrides})


def test_max_download_mb_defaults_to_data_pys_cap():
    assert train.TrainConfig.max_download_mb == train.data.MAX_DOWNLOAD_MB


def test_max_download_mb_reaches_data_prepare_and_its_errors_name_data_dir(monkeypatch):
    seen = {}

    def prepare(**settings):  # data.prepare names its own flag, --out_dir: here it is --data_dir
        seen.update(settings)
        raise ValueError(f"cannot write to --out_dir {settings['out_dir']} (Not a directory): pass a writable directory")

    monkeypatch.setattr(train.data, "prepare", prepare)
    with pytest.raises(ValueError, match="cannot write to --data_dir elsewhere "):
        train.prepare_data(train.TrainConfig(max_download_mb=12.5, data_dir="elsewhere"))
    assert seen["max_download_mb"] == 12.5 and seen["out_dir"] == "elsewhere"


def test_a_full_disk_is_named_in_the_one_line():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "out/metrics.jsonl")
    assert train.os_error_line(full).startswith("the disk is full (No space left on device: out/metrics.jsonl)")
    assert "the disk that holds it is full" in train.write_failure("out/ckpt.pt", full, free=10**9)
    # torch's zip writer reports a short write as "unexpected pos": with space left, it may be a quota or ulimit -f
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 979072 vs 978964")
    assert "the write came up short" in train.write_failure("out/ckpt.pt", short, free=10**9)
    assert "the disk that holds it is full" in train.write_failure("out/ckpt.pt", short, free=1000)
