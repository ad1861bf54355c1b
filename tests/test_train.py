"""Tests for train.py: flags, schedule, exact resume, gradient accumulation, metrics and bad input."""

import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

import train
from model import GPT

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
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s")} for r in rows]
    assert strip(a) == strip(b)  # same losses, learning rates and validation losses, exactly
    sa, sb = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["sampler"] == sb["sampler"]


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
    out = run_cli("--sample", "--out_dir", str(tmp_path), "--sample_tokens", "20", "--prompt", "def ")
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
