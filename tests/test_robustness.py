"""Robustness across modules: what a long run and a careless user do to nanopretrain.

Each test checks one promise against something independent of the code under test:

- faults: a training run killed with SIGKILL at 11 moments (at chosen steps, at random times, and
  once between a checkpoint's temporary file and its rename) and resumed each time ends with the
  same metrics.jsonl and the same weights as a run never interrupted, bit for bit (CPU, float32);
  every checkpoint left behind loads;
- NaN/inf: a learning rate that explodes stops the run with one line naming the step and the last
  good checkpoint, which is left untouched; --skip_nonfinite steps over a bad batch without
  updating the weights (the checkpoints before and after it are equal);
- hangs: a rank that skips a collective makes its peer fail after the timeout, not wait forever;
- gradient accumulation: micro-batch x accumulation steps x data-parallel ranks with the same global
  batch give one process's full-batch gradient, send nothing on non-final micro-steps, and have
  the same pre-clip norm (so --grad_clip means the same in every split);
- bad input: a table of wrong invocations of train.py, data.py, scaling.py and kernels.py, each one
  line on stderr, exit code 2, and every file that existed before byte-identical after;
- --compare_seeds: the mean and standard deviation it reports are those of the seeds' own runs.

Map: shared fixtures -> faults -> NaN/inf -> hangs and gradient accumulation (one 2-process spawn)
-> bad-input catalogue -> seed comparison.
"""

import contextlib
import gzip
import hashlib
import http.server
import importlib.util
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import prefetch, prepared_tiny_corpus, run_in_one_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import parallel  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# one thread per child process: the runs are small, and the machine's two cores are shared
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# the only fields of metrics.jsonl allowed to differ between runs (--async_checkpoint logs the time each
# checkpoint blocked the step loop)
TIMING_KEYS = ("ms_per_step", "tokens_per_s", "mfu", "checkpoint_blocked_ms")


@prefetch("data_dir")
def tiny_corpus(session, tmp_path_factory):
    """The tiny preset's corpus, prepared once for every run in this file by a process of its own,
    started early with this file's other jobs (tests/conftest.py, 3 and 4)."""
    return prepared_tiny_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def data_dir(prefetched):
    return prefetched("tiny_corpus")


def tiny_flags(data_dir, out_dir, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--data_dir", str(data_dir),
            "--out_dir", str(out_dir), *map(str, extra)]


def run_train(*args, timeout=300, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env or CHILD_ENV)


def start_train(*args, stderr_path) -> subprocess.Popen:
    """run_train, in the background: an independent run (an uninterrupted reference) trains on the
    machine's other core while the test drives its own processes; its stderr goes to a file (nobody
    reads a pipe while it runs). finish_train waits for it."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT, env=CHILD_ENV,
                            stdout=subprocess.DEVNULL, stderr=open(stderr_path, "w"))


def finish_train(proc: subprocess.Popen, stderr_path):
    assert proc.wait(timeout=300) == 0, Path(stderr_path).read_text()[-3000:]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


# ---------------------------------------------------------------------------------------------
# Faults: SIGKILL at any moment, then --resume


# The child is train.py itself, started through `python -c` so that one kill point can be placed
# inside atomic_torch_save: with SLOW_CHECKPOINT_RENAME set, the child writes that marker file and
# waits just before renaming a finished temporary checkpoint over ckpt.pt. train.py has no test hook.
# The wait lasts until the process has received a second stop signal (the one a test sends once it
# sees the marker: train's handler runs, counted, and the rename or the stop line goes on at once),
# or 120 s; a SIGKILL, which no handler sees, ends it. (SLOW_STOP_LINE waits the same way in the
# stop line, after training.)
CHILD = r"""
import os, sys, time
signals = []  # the stop signals received, in order
def wait_for_a_second_signal(seconds):
    deadline = time.time() + seconds
    while len(signals) < 2 and time.time() < deadline:
        time.sleep(0.01)
marker = os.environ.get("SLOW_CHECKPOINT_RENAME")
if marker:
    real_replace = os.replace
    def slow_replace(src, dst):
        if str(dst).endswith("ckpt.pt"):
            open(marker, "w").close()
            wait_for_a_second_signal(120)
        real_replace(src, dst)
    os.replace = slow_replace
import train
real_on_stop_signal = train.on_stop_signal  # installed by name when training starts: counted from here on
def counted_on_stop_signal(signum, frame):
    signals.append(signum)
    real_on_stop_signal(signum, frame)
train.on_stop_signal = counted_on_stop_signal
slow_stop = os.environ.get("SLOW_STOP_LINE")
if slow_stop:  # the stop line waits: the process is between training and its exit
    real_report_stop = train.report_stop
    def slow_report_stop(result):
        open(slow_stop, "w").close()
        wait_for_a_second_signal(120)
        real_report_stop(result)
    train.report_stop = slow_report_stop
train.main(sys.argv[1:])
"""

FAULT_STEPS = 40  # steps of the faulted run; a checkpoint after every one
KILLS = 11  # at least 10 kill points, one of them mid-write


def fault_flags(data_dir, out_dir, *extra):
    # dropout on, so a resume must restore the RNG state as well as the weights and the data position
    return tiny_flags(data_dir, out_dir, "--max_iters", FAULT_STEPS, "--checkpoint_interval", 1, "--eval_interval", 10,
                      "--dropout", 0.1, *extra)


def last_logged_step(metrics_path) -> int:
    try:
        lines = open(metrics_path).read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written right now
    return max(steps)


def kill_once(data_dir, out, kind, rng, planned_step, extra=()):
    """Start a resume (or the first run), kill it as `kind` says; returns a description, or None if
    the run finished before it could be killed. extra: more flags for every invocation."""
    metrics, env = out / "metrics.jsonl", dict(CHILD_ENV)
    first = not (out / "ckpt.pt").exists()
    if kind == "rename":
        env["SLOW_CHECKPOINT_RENAME"] = str(out / "renaming")
    logged = last_logged_step(metrics)  # lines past the checkpoint are rewritten on resume: wait beyond them
    args = fault_flags(data_dir, out, *extra) if first else fault_flags(data_dir, out, *extra, "--resume")
    stderr = open(out.parent / "stderr.txt", "w+")  # a file, not a pipe: nobody reads while the child runs
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 120
    if kind == "step":
        target = max(planned_step, logged + 1)
        while proc.poll() is None and time.time() < deadline and last_logged_step(metrics) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # somewhere in the step, its checkpoint or its evaluation
        what = f"after step {target} was logged"
    elif kind == "time":
        # mostly inside start-up (imports, corpus, loading the checkpoint, rewriting metrics.jsonl),
        # which takes longer than this on any machine: so a kill here never carries the run far
        delay = rng.uniform(0.05, 1.5)
        while proc.poll() is None and time.time() < deadline and delay > 0:
            time.sleep(0.01)
            delay -= 0.01
        what = "at a random time"
    else:
        while proc.poll() is None and time.time() < deadline and not (out / "renaming").exists():
            time.sleep(0.005)
        temp = out / f"ckpt.pt.tmp.{proc.pid}"  # atomic_torch_save names it after the writing process
        # the temporary file is a whole checkpoint, one step ahead of the one it was about to replace
        assert torch.load(temp, weights_only=True)["step"] == train.load_checkpoint(str(out / "ckpt.pt"))["step"] + 1
        what = "between writing a checkpoint's temporary file and renaming it"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (out / "renaming").unlink(missing_ok=True)
    if proc.returncode == 0:
        stderr.close()
        return None
    stderr.seek(0)
    assert proc.returncode == -signal.SIGKILL, stderr.read()[-3000:]
    stderr.close()
    return what


@prefetch("test_sigkill_at_eleven_points_then_resume_equals_an_uninterrupted_run")
def sigkill_at_eleven_points(session, tmp_path_factory):
    """The test below, started early (tests/conftest.py, 3): it only waits on its processes."""
    data_dir, tmp_path = prepared_tiny_corpus(tmp_path_factory), tmp_path_factory.mktemp("sigkill")
    straight = start_train(*fault_flags(data_dir, tmp_path / "straight"), stderr_path=tmp_path / "straight.txt")

    out = tmp_path / "faulted"
    out.mkdir()
    rng = random.Random(20240605)  # a fixed seed: the same plan every time; the timings still vary
    kinds = ["step"] + rng.sample(["step"] * 6 + ["time"] * 3 + ["rename"], KILLS - 1)
    planned = sorted(rng.sample(range(2, FAULT_STEPS - 8), kinds.count("step")))
    kills, ckpt_steps = [], []
    for kind in kinds:
        what = kill_once(data_dir, out, kind, rng, planned.pop(0) if kind == "step" else 0)
        if what is None:
            break  # the run finished first: no more kill points to make
        ckpt = train.load_checkpoint(str(out / "ckpt.pt"))  # never corrupt: raises if it were
        ckpt_steps.append(ckpt["step"])
        kills.append(f"{what}: checkpoint at step {ckpt['step']}")
    print("\n".join(kills))
    assert len(kills) >= 10 and any("renaming" in k for k in kills), kills
    assert ckpt_steps == sorted(ckpt_steps), ckpt_steps  # a resume never went back

    final = run_train(*fault_flags(data_dir, out, "--resume"))
    assert final.returncode == 0, final.stderr[-3000:]
    finish_train(straight, tmp_path / "straight.txt")
    assert without_timings(read_metrics(out)) == without_timings(read_metrics(tmp_path / "straight"))
    a, b = train.load_checkpoint(str(out / "ckpt.pt")), train.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    assert a["step"] == b["step"] == FAULT_STEPS
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not list(out.glob("*.tmp*")), "the resume removes a temporary file a kill left behind"


@pytest.mark.slow
def test_sigkill_at_eleven_points_then_resume_equals_an_uninterrupted_run(prefetched):
    prefetched("sigkill_at_eleven_points")  # its assertions: one failed raises here


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_last_k_and_resume_takes_the_newest_whole_one(data_dir, tmp_path):
    flags = ("--max_iters", 6, "--checkpoint_interval", 1, "--eval_interval", 5, "--dropout", 0.1, "--sample_tokens", 1)
    straight = start_train(*tiny_flags(data_dir, tmp_path / "straight", *flags), stderr_path=tmp_path / "straight.txt")
    out = tmp_path / "kept"
    first = run_train(*tiny_flags(data_dir, out, *flags, "--stop_at", 5, "--keep_checkpoints", 3))
    assert first.returncode == 0, first.stderr[-3000:]
    finish_train(straight, tmp_path / "straight.txt")
    kept = sorted(p.name for p in out.glob("ckpt*"))
    assert kept == ["ckpt.pt", "ckpt_step00000003.pt", "ckpt_step00000004.pt", "ckpt_step00000005.pt"], kept
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt_step00000005.pt")  # the newest, as a hard link
    for step in (3, 4, 5):
        assert train.load_checkpoint(str(out / f"ckpt_step{step:08d}.pt"))["step"] == step
    # a disk that lost the end of the newest checkpoint (ckpt.pt and its step file are one file):
    # the resume says so and continues from step 4, and the run ends as the uninterrupted one
    with open(out / "ckpt.pt", "r+b") as f:
        f.truncate(3000)
    resumed = run_train(*tiny_flags(data_dir, out, *flags, "--resume", "--keep_checkpoints", 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: checkpoint" in resumed.stdout and "ckpt_step00000004.pt (step 4)" in resumed.stdout, resumed.stdout
    assert without_timings(read_metrics(out)) == without_timings(read_metrics(tmp_path / "straight"))
    assert sorted(p.name for p in out.glob("ckpt_step*")) == [f"ckpt_step{s:08d}.pt" for s in (4, 5, 6)]
    a, b = train.load_checkpoint(str(out / "ckpt.pt")), train.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@prefetch("test_sigkill_during_background_checkpoint_writes_then_resume_equals_an_uninterrupted_run")
def sigkill_during_background_writes(session, tmp_path_factory):
    """The test below, started early (tests/conftest.py, 3): it only waits on its processes."""
    data_dir, tmp_path = prepared_tiny_corpus(tmp_path_factory), tmp_path_factory.mktemp("sigkill_async")
    # --async_checkpoint: the write of step N's checkpoint runs in a thread while steps N+1... train.
    # "rename" kills (twice) while that thread holds a whole temporary file it has not yet renamed (the step
    # loop, meanwhile, waits at the next checkpoint for it): the newest whole checkpoint, step N-1's,
    # must be the one resumed, and the run must end as an uninterrupted --async_checkpoint run.
    extra = ("--async_checkpoint", "--keep_checkpoints", 2)
    straight = start_train(*fault_flags(data_dir, tmp_path / "straight", *extra), stderr_path=tmp_path / "straight.txt")
    out = tmp_path / "faulted"
    out.mkdir()
    rng = random.Random(20261202)  # a fixed plan; where in a step (or its background write) a kill lands varies
    at = rng.randrange(12, 30)
    plan = (("step", 5), ("rename", 0), ("time", 0), ("step", at), ("rename", 0))
    kills = []
    for kind, step in plan:
        before = set(out.glob("ckpt.pt.tmp.*"))  # an earlier kill's, which the next resume removes
        what = kill_once(data_dir, out, kind, rng, step, extra)
        if what is None:
            break
        # a temporary file of its own left behind: the kill came while a checkpoint was being written
        mid_write = " (a write in flight)" if set(out.glob("ckpt.pt.tmp.*")) - before else ""
        ckpt = train.load_checkpoint(str(out / "ckpt.pt"))  # whole: the kill never reaches a renamed file
        kills.append(f"{what}{mid_write}: checkpoint at step {ckpt['step']}")
    print("\n".join(kills))
    assert len(kills) == len(plan), kills
    assert sum("renaming" in k for k in kills) == 2, kills
    final = run_train(*fault_flags(data_dir, out, *extra, "--resume"))
    assert final.returncode == 0, final.stderr[-3000:]
    finish_train(straight, tmp_path / "straight.txt")
    rows = read_metrics(out)
    assert without_timings(rows) == without_timings(read_metrics(tmp_path / "straight"))
    assert all(r["checkpoint_blocked_ms"] >= 0 for r in rows if "checkpoint_blocked_ms" in r)
    a, b = train.load_checkpoint(str(out / "ckpt.pt")), train.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    assert a["step"] == b["step"] == FAULT_STEPS and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert not list(out.glob("*.tmp*"))


@pytest.mark.slow
def test_sigkill_during_background_checkpoint_writes_then_resume_equals_an_uninterrupted_run(prefetched):
    prefetched("sigkill_during_background_writes")  # its assertions: one failed raises here


# ---------------------------------------------------------------------------------------------
# One run per directory, preemption by signals, and writes that fail


def wait_until(predicate, proc, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def start_child(args, env=None, stderr_path=None) -> subprocess.Popen:
    """train.py through CHILD (see above), stderr to a file (nobody reads a pipe while it runs)."""
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=ROOT, env={**CHILD_ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=open(stderr_path, "w"))


def one_line(path) -> str:
    lines = Path(path).read_text().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_two_runs_at_once_in_one_out_dir_one_refuses_naming_the_other_whose_files_are_whole(data_dir, tmp_path):
    out = tmp_path / "out"
    flags = tiny_flags(data_dir, out, "--max_iters", 12, "--eval_interval", 6, "--checkpoint_interval", 4, "--overwrite")
    runs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT, env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in runs]
    assert sorted(r.returncode for r in runs) == [0, 2], [o[1][-2000:] for o in outputs]
    winner, loser = (0, 1) if runs[0].returncode == 0 else (1, 0)
    refusal = outputs[loser][1].strip().splitlines()
    assert len(refusal) == 1 and f"another run (PID {runs[winner].pid} on" in refusal[0], refusal
    rows = read_metrics(out)  # the winner's, whole: every step once, both evaluations, the last checkpoint
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert train.load_checkpoint(str(out / "ckpt.pt"))["step"] == 12
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "run.json"]  # no temporary file, no lock left
    # a lock file a killed run left behind (no process holds its lock) is taken over
    (out / "train.lock").write_text("PID 4194303 on a-host-long-gone\n")
    resumed = run_train(*tiny_flags(data_dir, out, "--max_iters", 14, "--eval_interval", 6, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking over from PID 4194303 on a-host-long-gone, which is no longer running" in resumed.stdout
    assert not (out / "train.lock").exists()


def test_a_resume_while_a_run_trains_before_its_first_checkpoint_names_that_run(tmp_path):
    """--resume where a run holds the lock but has no checkpoint yet: the refusal names the run, not
    "train first". The holder here is a small process that locks train.lock as OutDirLock does."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / 'train.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.lockf(fd, fcntl.LOCK_EX)\nos.write(fd, b'PID 4242 on the-other-host\\n')\n"
                               "print('locked', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(run_train("--preset", "tiny", "--resume", "--out_dir", out),
                              "no checkpoint at", "yet: another run (PID 4242 on the-other-host) is training")
    finally:
        holder.kill()
        holder.wait()
    # once it is gone, the usual line
    assert_one_line_error(run_train("--preset", "tiny", "--resume", "--out_dir", out), "train first")


def test_signals_stop_after_the_step_with_its_checkpoint_and_a_second_one_corrupts_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    flags = tiny_flags(data_dir, out, "--max_iters", 1000, "--eval_interval", 1000, "--dropout", 0.1)
    err = tmp_path / "stderr.txt"

    def checkpoint_step():
        return train.load_checkpoint(str(out / "ckpt.pt"))["step"]

    # Ctrl-C: the step in progress ends, its checkpoint is written, one line, exit 130
    run = start_child(flags, stderr_path=err)
    wait_until(lambda: last_logged_step(out / "metrics.jsonl") >= 3, run, "step 3")
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    stopped = last_logged_step(out / "metrics.jsonl")
    assert one_line(err) == f"stopped by SIGINT after step {stopped}: {out / 'ckpt.pt'} holds step {stopped}; continue with --resume"
    assert checkpoint_step() == stopped

    def second_sigterm(env: dict, more_steps: int, where: str) -> int:
        """A resume stopped by SIGTERM after more_steps, a second SIGTERM once the marker says the run
        is at `where`: the checkpoint of the stopping step written whole, one line, exit 0."""
        run = start_child([*flags, "--resume"], env, err)
        wait_until(lambda: last_logged_step(out / "metrics.jsonl") >= stopped + more_steps, run, f"{more_steps} more steps")
        run.send_signal(signal.SIGTERM)
        wait_until(marker.exists, run, where)
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 0
        step = last_logged_step(out / "metrics.jsonl")
        assert one_line(err).startswith(f"stopped by SIGTERM after step {step}: ")
        assert checkpoint_step() == step
        marker.unlink()
        return step

    # SIGTERM, and a second SIGTERM while the checkpoint is being written: it is written whole, exit 0
    marker = tmp_path / "renaming"
    stopped = second_sigterm({"SLOW_CHECKPOINT_RENAME": str(marker)}, 2, "the checkpoint's rename")
    # a second SIGTERM after training has ended, on the way out (torchrun and Slurm repeat theirs):
    # still exit 0, not the default action's 143
    stopped = second_sigterm({"SLOW_STOP_LINE": str(marker)}, 1, "the stop line")

    # a second Ctrl-C while the checkpoint is being written: abandoned, its temporary file removed,
    # the previous checkpoint whole; one line, exit 130
    run = start_child([*flags, "--resume"], {"SLOW_CHECKPOINT_RENAME": str(marker)}, err)
    wait_until(lambda: last_logged_step(out / "metrics.jsonl") >= stopped + 1, run, "one more step")
    run.send_signal(signal.SIGINT)
    wait_until(marker.exists, run, "the checkpoint's rename")
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    assert one_line(err).startswith("error: stopped by a second Ctrl-C: a checkpoint being written was abandoned")
    assert checkpoint_step() == stopped
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "run.json"]


def preparing_flags(data, data_dir, out_dir):
    """The tiny preset on a corpus train.py prepares itself (bytes: no tokenizer to train)."""
    return ["--preset", "tiny", "--device", "cpu", "--data", data, "--tokenizer", "bytes", "--quality_filter", "false",
            "--dedup", "none", "--max_data_bytes", 0, "--data_dir", data_dir, "--out_dir", out_dir]


def hidden_entries(folder: Path) -> list:
    """data.py's temporary files and directories (".<name>.<pid>@<host>.tmp"), anywhere under folder."""
    return [p.name for p in folder.rglob(".*")] if folder.exists() else []


PREPARING_LINE = ("stopped by {} while preparing the corpus: its temporary files were removed, nothing was saved; "
                  "run the same command again")


def test_sigterm_while_train_prepares_a_large_corpus_stops_it_at_once_leaving_no_temporary_files(tmp_path):
    """A stop signal during train.py's data preparation waited for the whole corpus (the handler only
    noted it for the first step). 40 MB of text: 16 s of `data.py prepare` on two busy cores (load 9),
    against the 0.01 s wait_until polls at between the temporary directory's appearance and the signal."""
    corpus = tmp_path / "big.txt"
    with open(corpus, "w") as f:
        for i in range(40_000):  # 40 MB, 1 kB a document
            f.write(f"Document {i}. " + "Some words of plain text, again and again. " * 23 + "\n\n")
    data_dir, out, err = tmp_path / "data", tmp_path / "out", tmp_path / "stderr.txt"
    run = start_child(preparing_flags(corpus, data_dir, out), stderr_path=err)
    wait_until(lambda: hidden_entries(data_dir), run, "preparation's temporary directory")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 0  # a preempted job is not a failed one (report_stop)
    assert one_line(err) == PREPARING_LINE.format("SIGTERM")
    assert hidden_entries(data_dir) == [] and not (out / "ckpt.pt").exists()


class TrickleServer(http.server.BaseHTTPRequestHandler):
    """A server that sends 2 bytes every 0.05 s of a body it says is 1 MB: a download of 7 hours."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**6))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client hung up
            while True:
                self.wfile.write(b"zz")
                self.wfile.flush()
                time.sleep(0.05)


def test_ctrl_c_while_train_downloads_its_corpus_stops_at_once_leaving_no_temporary_files(tmp_path):
    """Ctrl-C during the download waited for its deadline (an hour: data.DOWNLOAD_DEADLINE)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrickleServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data_dir, out, err = tmp_path / "data", tmp_path / "out", tmp_path / "stderr.txt"
    url, run = f"http://127.0.0.1:{server.server_address[1]}/corpus.txt", None
    try:
        no_proxy = {"http_proxy": "", "HTTP_PROXY": "", "all_proxy": "", "ALL_PROXY": ""}  # (empty: unset for urllib)
        run = start_child(preparing_flags(url, data_dir, out), no_proxy, err)
        wait_until(lambda: hidden_entries(data_dir / "downloads"), run, "the download's temporary file")
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        server.shutdown()
        server.server_close()
    assert one_line(err) == PREPARING_LINE.format("SIGINT")
    assert hidden_entries(data_dir) == [] and not (out / "ckpt.pt").exists()


def test_a_second_ctrl_c_before_any_checkpoint_does_not_claim_one_was_abandoned(data_dir, tmp_path, monkeypatch, capsys):
    """Two Ctrl-C during start-up, after the corpus (in the banner): the message said a checkpoint
    being written was abandoned, where none existed."""
    def two_ctrl_c(*args):  # (os.kill to its own process runs the handler before it returns)
        os.kill(os.getpid(), signal.SIGINT)  # noted: the run would stop before its first step
        os.kill(os.getpid(), signal.SIGINT)  # the second stops at once
    monkeypatch.setattr(train, "print_banner", two_ctrl_c)
    handlers = {n: signal.getsignal(getattr(signal, n)) for n in train.STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main(tiny_flags(data_dir, tmp_path / "out"))
    finally:
        for name, handler in handlers.items():  # train leaves its handler after a stop (its process exits)
            signal.signal(getattr(signal, name), handler)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: stopped by a second Ctrl-C: no checkpoint was being written, so none was abandoned; --out_dir holds "
        "what it held before (continue with --resume if it holds a checkpoint)"]
    assert not (tmp_path / "out" / "ckpt.pt").exists()


# Stand-ins for Slurm's commands, for running the README's batch script on a machine without Slurm:
# srun notes its arguments and the signals it gets (it takes a second to "checkpoint" after SIGTERM),
# scontrol names one host and notes every other call.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$SLURM_LOG"
trap 'echo "srun got TERM" >> "$SLURM_LOG"; sleep 1; echo "srun done" >> "$SLURM_LOG"; exit 0' TERM
while true; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> "$SLURM_LOG"; fi
"""


def test_readme_slurm_script_passes_sigterm_on_waits_for_the_checkpoint_then_requeues_with_resume(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    script = next(block for block in readme.split("```bash\n")[1:] if "#SBATCH --signal" in block).split("```")[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # what the out_dir holds when each job starts, and whether the job resumes: the first job, a sharded
    # write that was cut off (no checkpoint yet), then requeued jobs after a full and after a sharded
    # checkpoint (a sharded run writes no ckpt.pt, and a fresh start into its directory would refuse).
    # The four jobs run at once, each in a directory of its own: most of each is srun's second of waiting.
    cases = (((), False), (("ckpt_step00000040.dcp.tmp/.metadata",), False), (("ckpt.pt",), True),
             (("ckpt_step00000040.dcp/.metadata",), True))
    jobs = []
    for i, (files, resumes) in enumerate(cases):
        job_dir = tmp_path / f"job{i}"
        out = job_dir / "out" / "gpt2-124m"  # (made only where it holds files, as a first job finds it)
        job_dir.mkdir()
        (job_dir / "train.sbatch").write_text(script)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"a checkpoint")
        log = job_dir / "slurm.log"
        log.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_LOG": str(log), "SLURM_JOB_ID": "42",
               "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
        jobs.append((subprocess.Popen(["bash", "train.sbatch"], cwd=job_dir, env=env), log))
    for job, log in jobs:
        wait_until(lambda: "srun " in log.read_text(), job, "srun")
        job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends
    for (job, log), (files, resumes) in zip(jobs, cases):
        assert job.wait(timeout=30) is not None
        lines = log.read_text().splitlines()
        assert lines[1:] == ["srun got TERM", "srun done", "scontrol requeue 42"], lines
        assert lines[0].startswith("srun torchrun ") and "--out_dir out/gpt2-124m" in lines[0]
        assert lines[0].endswith("--out_dir out/gpt2-124m --resume" if resumes else "--out_dir out/gpt2-124m"), (files, lines[0])


def test_a_resume_redoes_the_evaluations_it_cuts_instead_of_deleting_them(data_dir, tmp_path):
    def run(*flags):
        cfg, mo = train.resolve_configs(train.build_parser().parse_args(tiny_flags(data_dir, tmp_path, *flags)))
        train.train(cfg, mo)

    run("--max_iters", 8, "--stop_at", 4, "--eval_interval", 2)  # evaluates at 2 and 4, checkpoint at 4
    first = read_metrics(tmp_path)
    step4 = (tmp_path / "ckpt.pt").read_bytes()
    # every 3 steps from here: step 4's evaluation is not on this schedule, and stays (issue 13 lost it)
    run("--max_iters", 8, "--resume", "--eval_interval", 3)
    whole = without_timings(read_metrics(tmp_path))
    assert whole[:len(first)] == without_timings(first)
    assert [r["step"] for r in whole if "val_loss" in r] == [2, 4, 6, 8]
    # the checkpoints after step 4 lost (a crash between checkpoints), and a resume that evaluates only at
    # its end: the evaluation at step 6 it cuts from the file is done again, so nothing recorded is lost
    (tmp_path / "ckpt.pt").write_bytes(step4)
    run("--max_iters", 8, "--resume", "--eval_interval", 100)
    assert without_timings(read_metrics(tmp_path)) == whole
    # and if that resume stops before step 6, the evaluations it still owes go into its checkpoint
    (tmp_path / "ckpt.pt").write_bytes(step4)
    run("--max_iters", 8, "--resume", "--eval_interval", 100, "--stop_at", 5)  # (which evaluates at its stop, 5)
    assert train.load_checkpoint(str(tmp_path / "ckpt.pt"))["redo_evals"] == [6, 8]
    run("--max_iters", 8, "--resume", "--eval_interval", 100)
    assert [r for r in without_timings(read_metrics(tmp_path)) if not (r["step"] == 5 and "val_loss" in r)] == whole


def test_a_checkpoint_write_that_runs_out_of_space_leaves_no_temporary_file(data_dir, tmp_path):
    import resource

    cfg, mo = train.resolve_configs(train.build_parser().parse_args(tiny_flags(data_dir, tmp_path, "--stop_at", 2)))
    train.train(cfg, mo)
    before = (tmp_path / "ckpt.pt").read_bytes()

    def small_disk():  # in the child: no file may grow past half a checkpoint (EFBIG, as a full disk stops a write)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    full = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *tiny_flags(data_dir, tmp_path, "--resume",
                                                                                        "--stop_at", 3)],
                          capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV, timeout=300, preexec_fn=small_disk)
    assert_one_line_error(full, f"cannot write {tmp_path / 'ckpt.pt'}: the write came up short", "free space")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "metrics.jsonl", "run.json"]
    # where the operating system says the disk is full, the line says so by name
    enospc = OSError(28, "No space left on device")
    assert "the disk that holds it is full" in train.write_failure(str(tmp_path / "ckpt.pt"), enospc, free=10**9)


def test_an_interrupted_checkpoint_write_removes_its_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "ckpt.pt").write_bytes(b"the previous checkpoint")

    def half_a_save(obj, f):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of torch.save

    monkeypatch.setattr(torch, "save", half_a_save)
    with pytest.raises(KeyboardInterrupt):
        train.atomic_torch_save({"step": 1}, str(tmp_path / "ckpt.pt"))
    assert os.listdir(tmp_path) == ["ckpt.pt"] and (tmp_path / "ckpt.pt").read_bytes() == b"the previous checkpoint"


# ---------------------------------------------------------------------------------------------
# NaN and inf


def test_exploding_learning_rate_stops_with_one_line_and_keeps_the_checkpoint(data_dir, tmp_path):
    cfg, mo = train.resolve_configs(train.build_parser().parse_args(
        tiny_flags(data_dir, tmp_path, "--stop_at", 2, "--checkpoint_interval", 1)))
    train.train(cfg, mo)
    before = (tmp_path / "ckpt.pt").read_bytes()
    # lr 1e30: step 3's update leaves weights near 1e29, whose squares overflow float32 in step 4's
    # LayerNorm; no checkpoint is due before step 100, so ckpt.pt stays the step-2 one
    blown = run_train(*tiny_flags(data_dir, tmp_path, "--resume", "--learning_rate", "1e30", "--checkpoint_interval", 100,
                                  "--eval_interval", 100, "--skip_nonfinite", 2))
    assert_one_line_error(blown, "loss is nan at step 6 after 2 skipped", "ckpt.pt (step 2), its weights all finite",
                          "--learning_rate")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "skipped" in r] == [4, 5]  # skipped and logged, up to --skip_nonfinite


def test_the_nan_message_does_not_call_a_checkpoint_with_nan_weights_good(data_dir, tmp_path):
    cfg, mo = train.resolve_configs(train.build_parser().parse_args(tiny_flags(data_dir, tmp_path, "--stop_at", 1)))
    train.train(cfg, mo)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.wte.weight"][0, 0] = float("nan")  # as an update gone wrong would leave it
    torch.save(ckpt, tmp_path / "ckpt.pt")
    cfg, mo = train.resolve_configs(train.build_parser().parse_args(tiny_flags(data_dir, tmp_path, "--resume")))
    with pytest.raises(FloatingPointError, match=r"ckpt\.pt \(step 1\), but its weights are not all finite: do not resume"):
        train.train(cfg, mo)


def test_skip_nonfinite_steps_over_one_bad_batch_without_an_update(data_dir, tmp_path, monkeypatch):
    cfg, mo = train.resolve_configs(train.build_parser().parse_args(
        tiny_flags(data_dir, tmp_path, "--max_iters", 5, "--checkpoint_interval", 1, "--skip_nonfinite", 1)))
    forward, calls = GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None):  # the third training forward, step 3's, returns inf
        logits, loss = forward(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                loss = loss * float("inf")
        return logits, loss

    saved, save = {}, train.atomic_torch_save

    def keep_a_copy(obj, path):  # what each checkpoint holds, read back from disk
        save(obj, path)
        saved[obj["step"]] = torch.load(path, weights_only=True)

    monkeypatch.setattr(GPT, "forward", poisoned)
    monkeypatch.setattr(train, "atomic_torch_save", keep_a_copy)
    train.train(cfg, mo)
    rows = [r for r in read_metrics(tmp_path) if "val_loss" not in r]
    assert [r.get("skipped") for r in rows] == [None, None, "loss is inf", None, None]
    for k in saved[2]["model"]:  # step 3 left the weights and AdamW's state as step 2 had them
        assert torch.equal(saved[2]["model"][k], saved[3]["model"][k]), k
    for i, state in saved[2]["optimizer"]["state"].items():  # AdamW's moments and step count too
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(saved[3]["optimizer"]["state"][i][k])), (i, k)
    assert not all(torch.equal(saved[3]["model"][k], saved[4]["model"][k]) for k in saved[3]["model"])  # step 4 trains
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)  # the logged losses are finite


# ---------------------------------------------------------------------------------------------
# Two processes (gloo): gradient accumulation in every split, and a collective one rank skips

GLOBAL_BATCH, T = 8, 16
CLIP = 0.5  # below the gradient norm (1.05), so clipping acts and its coefficient is compared too
SPLITS_ONE_RANK = [(8, 1), (4, 2), (2, 4)]  # (micro-batch, accumulation steps) on 1 rank
SPLITS_TWO_RANKS = [(4, 1), (2, 2), (1, 4)]  # the same global batch of 8 on 2 ranks
HANG_TIMEOUT_S = 4


def tiny_gpt_config() -> GPTConfig:
    return GPTConfig(vocab_size=64, block_size=T, n_layer=2, n_head=4, n_embd=32, bias=True, attention="naive")


def global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (GLOBAL_BATCH, T), generator=g), torch.randint(0, 64, (GLOBAL_BATCH, T), generator=g)


def accumulated_gradients(layout, micro, accum, divisor=None) -> dict:
    """One step's gradients through parallel.Parallelized, as train.py's loop computes them: micro-step
    k takes sequences [k R B, (k+1) R B) of the global batch, rank r its B of them. Returns the synced
    gradients before and after clipping, the pre-clip global norm, and the bytes sent."""
    torch.manual_seed(0)
    par = parallel.Parallelized(GPT(tiny_gpt_config()), layout, bucket_mb=0.01)  # 10 kB buckets: several of them
    x, y = global_batch()
    ranks, rank = layout.dp, layout.rank("dp")
    parallel.BYTES_SENT.clear()
    sent_before_last = {}
    for k in range(accum):
        rows = slice(k * ranks * micro + rank * micro, k * ranks * micro + (rank + 1) * micro)
        par.forward_backward(x[rows], y[rows], divisor=divisor or accum, sync=k == accum - 1)
        if k == accum - 2:
            sent_before_last = dict(parallel.BYTES_SENT)  # every non-final micro-step is behind us
    par.finish_gradient_sync()
    sent = dict(parallel.BYTES_SENT)
    grads = {n: p.grad.clone() for n, p in par.module.named_parameters()}
    norm = par.clip_grad_norm_(CLIP)
    clipped = {n: p.grad.clone() for n, p in par.module.named_parameters()}
    return dict(grads=grads, clipped=clipped, norm=norm, sent=sent, sent_before_last=sent_before_last)


def check_hang(results):
    """Rank 1 all-reduces a loss over the data group (what evaluate does); rank 0 never does. The
    group comes from parallel.build_layout with a short timeout, so rank 1 must fail after it."""
    layout = parallel.build_layout(dp=2, tp=1, pp=1, cp=1, device=torch.device("cpu"), timeout_s=HANG_TIMEOUT_S)
    par = parallel.Parallelized(GPT(tiny_gpt_config()), layout)
    if dist.get_rank() == 0:  # alive but elsewhere, until the peer has its answer: its error must come from its timeout
        deadline = time.time() + HANG_TIMEOUT_S + 30
        while "hang_done" not in results and time.time() < deadline:
            time.sleep(0.1)
        return {}
    start = time.perf_counter()
    try:
        par.reduce_loss(torch.tensor(1.0))
        out = {"error": "the collective returned without its peer"}
    except Exception as e:  # gloo raises a RuntimeError (DistBackendError) naming the timeout
        out = {"seconds": time.perf_counter() - start, "message": str(e).splitlines()[0]}
    results["hang_done"] = True
    return out


def worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    layout = parallel.init_distributed(dp=2, timeout_s=120)
    out = {}
    try:
        out["accumulation"] = {f"{m}x{a}x2": accumulated_gradients(layout, m, a) for m, a in SPLITS_TWO_RANKS}
    except Exception:
        out["accumulation"] = {"error": traceback.format_exc()}
    try:
        out["hang"] = check_hang(results)
    except Exception:
        out["hang"] = {"error": traceback.format_exc()}
    results[rank] = out
    os._exit(0)  # skip destroy_process_group: the hang check left a collective half-done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=2, join=True)
        return dict(results)


def full_batch_gradients() -> dict:
    """The reference: one process, plain torch, the mean loss over all 8 sequences."""
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config())
    x, y = global_batch()
    _, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    return dict(grads=grads, norm=norm, clipped={n: p.grad.clone() for n, p in model.named_parameters()})


def test_gradient_accumulation_and_data_parallel_splits_give_the_full_batch_gradient(two_ranks):
    ref = full_batch_gradients()
    runs = {f"{m}x{a}x1": accumulated_gradients(parallel.Layout(), m, a) for m, a in SPLITS_ONE_RANK}
    for rank in (0, 1):
        assert "error" not in two_ranks[rank]["accumulation"], two_ranks[rank]["accumulation"]["error"]
        runs.update({f"{k} rank {rank}": v for k, v in two_ranks[rank]["accumulation"].items()})
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    worst = {}
    for name, run in runs.items():
        worst[name] = max((run["grads"][k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
        # float32: the splits only reorder sums of 8 x 16 per-token gradients. Measured: 2e-8, or 1.6e-7
        # of the largest element (0.13); 1e-5 of it leaves room for other BLAS libraries and still
        # sees a wrong scaling, e.g. a missing 1/accum (a factor of 2-4, so differences of order 1)
        assert worst[name] <= 1e-5 * scale, (name, worst[name], scale)
        assert run["norm"] == pytest.approx(ref["norm"], rel=1e-5), name  # the clip threshold means the same
        for k in ref["clipped"]:
            torch.testing.assert_close(run["clipped"][k], ref["clipped"][k], rtol=0, atol=1e-5 * scale)
    print(f"max |grad - full-batch grad| over splits: {max(worst.values()):.2e} (largest gradient element {scale:.2e})")


def test_no_bytes_on_non_final_micro_steps_and_one_all_reduce_on_the_last(two_ranks):
    n_params = GPT(tiny_gpt_config()).num_params()
    for rank in (0, 1):
        for name, run in two_ranks[rank]["accumulation"].items():
            assert run["sent_before_last"] == {}, (name, run["sent_before_last"])  # nothing at all
            assert run["sent"] == {"grads": 2 * (2 - 1) / 2 * 4 * n_params}, (name, run["sent"])  # one ring all-reduce, float32


def test_unscaled_accumulation_would_change_the_clipping_threshold():
    # the control: without dividing by the accumulation steps (nanoGPT #168) the norm is 4x
    ok = accumulated_gradients(parallel.Layout(), 2, 4)
    wrong = accumulated_gradients(parallel.Layout(), 2, 4, divisor=1)
    assert wrong["norm"] == pytest.approx(4 * ok["norm"], rel=1e-5)


def test_a_skipped_collective_fails_after_the_timeout_instead_of_hanging(two_ranks):
    hang = two_ranks[1]["hang"]
    assert "error" not in hang, hang["error"]
    assert HANG_TIMEOUT_S * 0.9 <= hang["seconds"] <= HANG_TIMEOUT_S + 6, hang
    assert "timed out" in hang["message"].lower(), hang["message"]


# DiLoCo's workers train apart, so one worker's NaN is not the others': the verdict must be made
# common (train_step asks every rank), or the healthy workers would wait at the next outer step for
# a peer that stopped, until --dist_timeout. Rank 1's loss turns NaN at its 3rd step.
NAN_ON_RANK_1 = r"""
import os, sys
import model, train
if os.environ["RANK"] == "1":
    forward, calls = model.GPT.forward, [0]
    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        calls[0] += self.training and targets is not None
        return logits, (loss * float("nan") if calls[0] >= 3 and self.training and loss is not None else loss)
    model.GPT.forward = poisoned
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_nan_on_one_diloco_worker_stops_every_worker_promptly_with_one_line(data_dir, tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    logs = tmp_path / "logs"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--log-dir", str(logs), "--redirects", "3", str(script),
                          *tiny_flags(data_dir, tmp_path / "out", "--dp", 2, "--batch_size", 4, "--diloco_steps", 4,
                                      "--max_iters", 8, "--eval_interval", 8, "--dist_timeout", 120)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env={**CHILD_ENV, "PYTHONPATH": ROOT})
    seconds = time.perf_counter() - start
    assert run.returncode != 0
    assert seconds < 60, seconds  # both stopped at once: far from the 120 s a waiting peer would need
    for rank in (0, 1):
        (stderr,) = logs.rglob(f"attempt_0/{rank}/stderr.log")
        lines = stderr.read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "at step 3" in lines[0], (rank, lines)
    assert "another worker" in (next(logs.rglob("attempt_0/0/stderr.log"))).read_text()  # rank 0 was healthy


def torchrun(args, logs, script=None) -> subprocess.Popen:
    """Two processes under torchrun (gloo), each rank's stdout and stderr in logs/.../attempt_0/<rank>/."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--log-dir", str(logs), "--redirects", "3", str(script or os.path.join(ROOT, "train.py")),
                             *map(str, args)], cwd=ROOT, env={**CHILD_ENV, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_stderr(logs, rank) -> list[str]:
    (path,) = Path(logs).rglob(f"attempt_0/{rank}/stderr.log")
    return path.read_text().strip().splitlines()


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The processes torchrun started (Linux: /proc lists each thread's children)."""
    pids = []
    for children in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
        pids += [int(p) for p in children.read_text().split()]
    return pids


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_with_its_checkpoint_and_resume_is_exact(data_dir, tmp_path):
    def flags(out, *extra):
        return tiny_flags(data_dir, out, "--dp", 2, "--batch_size", 4, "--max_iters", 16, "--eval_interval", 8,
                          "--dropout", 0.1, *extra)

    straight = torchrun(flags(tmp_path / "straight"), tmp_path / "logs_straight")
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    at, rank = rng.randint(2, 11), rng.randint(0, 1)
    print(f"seed {seed}: SIGTERM to one worker (of pids in spawn order, number {rank}) after step {at} is logged")
    out, logs = tmp_path / "out", tmp_path / "logs"
    run = torchrun(flags(out), logs)
    wait_until(lambda: last_logged_step(out / "metrics.jsonl") >= at, run, f"step {at}")
    os.kill(sorted(worker_pids(run))[rank], signal.SIGTERM)  # the other rank hears of it at the step's end
    t0 = time.perf_counter()
    assert run.wait(timeout=120) == 0, run.communicate()[1][-3000:]  # torchrun: 0 when every worker exits 0
    seconds = time.perf_counter() - t0
    stopped = last_logged_step(out / "metrics.jsonl")
    print(f"both ranks stopped {seconds:.1f} s after the signal, after step {stopped}")
    assert seconds < 30 and at <= stopped <= at + 3
    assert train.load_checkpoint(str(out / "ckpt.pt"))["step"] == stopped
    assert rank_stderr(logs, 0) == [f"stopped by SIGTERM after step {stopped}: {out / 'ckpt.pt'} holds step {stopped}; "
                                    "continue with --resume"]
    assert rank_stderr(logs, 1) == []
    resumed = torchrun(flags(out, "--resume"), tmp_path / "logs_resumed")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    assert without_timings(read_metrics(out)) == without_timings(read_metrics(tmp_path / "straight"))
    a, b = (train.load_checkpoint(str(d / "ckpt.pt")) for d in (out, tmp_path / "straight"))
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_sigterm_under_torchrun_while_rank_0_prepares_the_corpus_stops_every_rank_at_once_with_one_line(tmp_path):
    """Rank 0 prepares (here: waits on a named pipe, a corpus that never ends) while rank 1 waits in a
    barrier; torchrun passes a SIGTERM on to both. Rank 0 stops preparing, says so and exits 0; rank
    1's barrier fails as rank 0 leaves, and it exits 0 without a communication-failure line."""
    corpus, data_dir, out, logs = tmp_path / "corpus.txt", tmp_path / "data", tmp_path / "out", tmp_path / "logs"
    os.mkfifo(corpus)
    run = torchrun([*preparing_flags(corpus, data_dir, out), "--dp", 2, "--batch_size", 4], logs)
    try:
        wait_until(lambda: hidden_entries(data_dir), run, "rank 0's temporary directory")
        for pid in worker_pids(run):  # what torchrun does with the SIGTERM it gets
            os.kill(pid, signal.SIGTERM)
        assert run.wait(timeout=60) == 0, run.communicate()[1][-3000:]  # torchrun: 0 when every worker exits 0
    finally:  # a rank still reading the pipe would wait for ever
        if run.poll() is None:
            for pid in worker_pids(run):
                os.kill(pid, signal.SIGKILL)
            run.kill()
    assert rank_stderr(logs, 0) == [PREPARING_LINE.format("SIGTERM")]
    assert rank_stderr(logs, 1) == []
    assert hidden_entries(data_dir) == [] and not (out / "ckpt.pt").exists()


# Rank 1 stops answering in its third training step (until a signal comes: torchrun sends SIGTERM
# to the workers left when one fails), so rank 0's next collective times out.
HANG_ON_RANK_1 = r"""
import os, sys, time
import model, train
if os.environ["RANK"] == "1":
    forward, calls = model.GPT.forward, [0]
    def stuck(self, idx, targets=None):
        calls[0] += self.training and targets is not None
        while calls[0] == 3 and self.training and not train._stop["signum"]:
            time.sleep(0.05)
        return forward(self, idx, targets)
    model.GPT.forward = stuck
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_distributed_failures_are_one_line_naming_the_rank_to_check(data_dir, tmp_path):
    script = tmp_path / "hang_on_rank_1.py"
    script.write_text(HANG_ON_RANK_1)
    flags = tiny_flags(data_dir, tmp_path / "out", "--dp", 2, "--batch_size", 4, "--max_iters", 8, "--dist_timeout", 3)
    hang = torchrun(flags, tmp_path / "logs_hang", script)
    # once step 2 is logged, rank 1 is stuck in step 3 and what is left of this run is waiting: rank 0's
    # collective for --dist_timeout, then for rank 1's note (parallel.FAILURE_GRACE_S, here 3 s). The
    # next two cases run meanwhile, and this one is judged after them.
    wait_until(lambda: last_logged_step(tmp_path / "out" / "metrics.jsonl") >= 2, hang, "step 2")
    # a refusal on rank 0 alone (another process holds the directory) reaches rank 1 as rank 0's own words
    with hold_lock(tmp_path / "busy"):
        busy = torchrun(tiny_flags(data_dir, tmp_path / "busy", "--dp", 2, "--batch_size", 4), tmp_path / "logs_busy")
        assert busy.wait(timeout=180) != 0
    (line0,), (line1,) = rank_stderr(tmp_path / "logs_busy", 0), rank_stderr(tmp_path / "logs_busy", 1)
    assert line0.startswith("error: another run (PID"), line0
    assert line1 == f"error: rank 1: stopped because rank 0 stopped with an error: {line0[len('error: '):]}", line1
    # a worker killed with SIGKILL (as the OOM killer does): the other one names it, although torchrun's
    # SIGTERM comes while it waits for its peers' notes (parallel.FAILURE_GRACE_S)
    out, logs = tmp_path / "killed", tmp_path / "logs_killed"
    killed = torchrun(tiny_flags(data_dir, out, "--dp", 2, "--batch_size", 4, "--max_iters", 3000, "--dist_timeout", 20),
                      logs)
    wait_until(lambda: last_logged_step(out / "metrics.jsonl") >= 2, killed, "step 2")
    os.kill(sorted(worker_pids(killed))[1], signal.SIGKILL)
    assert killed.wait(timeout=120) != 0
    lines = {rank: rank_stderr(logs, rank) for rank in (0, 1)}
    (survivor,) = [rank for rank in lines if lines[rank]]  # the killed one wrote nothing
    (line,) = lines[survivor]
    assert line.startswith(f"error: rank {survivor}: lost the connection to another rank") and line.endswith(
        f"check rank {1 - survivor} (it did not answer: killed or crashed)"), line
    # the hang of the first case: rank 0 names rank 1, which left no note, and rank 1 stops without a traceback
    assert hang.wait(timeout=180) != 0
    (line,) = rank_stderr(tmp_path / "logs_hang", 0)
    assert line.startswith("error: rank 0: a collective waited --dist_timeout 3 s") and "check rank 1" in line, line
    assert "Traceback" not in "\n".join(rank_stderr(tmp_path / "logs_hang", 1))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing touched


class RunsCode:
    """A pickle that runs a shell command when loaded: what a checkpoint from a stranger may be."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def workspace(data_dir, tmp_path_factory):
    """Files for the catalogue: a trained run, broken copies of the corpus and of a checkpoint."""
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(data_dir, ws / "data")
    cfg, mo = train.resolve_configs(train.build_parser().parse_args(tiny_flags(ws / "data", ws / "run", "--max_iters", 2)))
    train.train(cfg, mo)
    (ws / "truncated").mkdir()
    (ws / "truncated" / "ckpt.pt").write_bytes((ws / "run" / "ckpt.pt").read_bytes()[:4000])
    (ws / "evil").mkdir()
    with open(ws / "evil" / "ckpt.pt", "wb") as f:
        pickle.dump({"model": RunsCode(), "model_config": {}}, f)
    prepared = next(p.parent.name for p in (ws / "data").glob("*/manifest.json"))
    for name in ("corrupt", "empty_shard", "wide_vocab", "flipped"):
        shutil.copytree(ws / "data", ws / name)
    manifest = json.loads((ws / "data" / prepared / "manifest.json").read_text())
    train_shard, val_shard = manifest["shards"]["train"][0]["file"], manifest["shards"]["val"][0]["file"]
    os.truncate(ws / "corrupt" / prepared / train_shard, os.path.getsize(ws / "corrupt" / prepared / train_shard) - 7)
    os.truncate(ws / "empty_shard" / prepared / val_shard, 0)
    (ws / "wide_vocab" / prepared / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 70_000}))
    raw = bytearray((ws / "flipped" / prepared / train_shard).read_bytes())
    raw[100] ^= 1
    (ws / "flipped" / prepared / train_shard).write_bytes(raw)
    (ws / "texts").mkdir()
    for i in range(3):
        (ws / "texts" / f"{i}.txt").write_text(f"Document {i}. " + "Some plain words in a sentence. " * 40)
    (ws / "empty_corpus").mkdir()
    add_data_inputs(ws, prepared)  # what data.py's rows need (their own block, after CATALOGUE)
    add_train_inputs(ws)  # what train.py's rows for issue 13 need (their own block, after data.py's)
    return ws, prepared


def train_case(*args):
    return ["train.py", "--preset", "tiny", "--device", "cpu", "--data_dir", "{ws}/data", *args]


# (name, argv (with {ws} and {prepared} filled in, and {out}: an output directory of the case's own, so
# that no two cases run in one directory at once), extra environment, words the one line must hold:
# what is wrong, and how to fix it)
CATALOGUE = [
    ("train: data file missing", train_case("--data", "{ws}/nope.txt", "--out_dir", "{out}"), {},
     ["{ws}/nope.txt", "does not exist"]),
    ("train: unknown flag", train_case("--lr", "0.1"), {}, ["unrecognized arguments: --lr", "--help"]),
    ("train: flag value of the wrong type", train_case("--batch_size", "many"), {}, ["--batch_size", "invalid int value"]),
    ("train: unknown mix domain", train_case("--data", "{ws}/texts", "--tokenizer", "bytes", "--mix", "poetry=1",
                                             "--quality_filter", "false", "--dedup", "none", "--out_dir", "{out}",
                                             "--data_dir", "{ws}/cache"), {},
     ["poetry", "not found"]),
    ("train: --tp does not divide the heads", train_case("--tp", "3", "--out_dir", "{out}"), {},
     ["--tp 3 must divide n_head=2"]),
    ("train: unknown checkpoint format", train_case("--checkpoint_format", "zip", "--out_dir", "{out}"), {},
     ["--checkpoint_format 'zip'", "full or sharded"]),
    ("train: sharded checkpoints of DiLoCo workers", train_case("--checkpoint_format", "sharded", "--diloco_steps", "2",
                                                               "--out_dir", "{out}"), {},
     ["--diloco_steps", "--checkpoint_format full"]),
    ("train: --keep_checkpoints 0", train_case("--keep_checkpoints", "0", "--out_dir", "{out}"), {}, ["--keep_checkpoints"]),
    ("train: convert without a destination", train_case("--convert_checkpoint", "{ws}/run_model/ckpt.pt"), {},
     ["--convert_to"]),
    ("train: convert over an existing file", train_case("--convert_checkpoint", "{ws}/run_model/ckpt.pt", "--convert_to",
                                                        "{ws}/run_model/ckpt.pt"), {}, ["already exists", "new path"]),
    ("train: world size does not match the layout", train_case("--dp", "2", "--out_dir", "{out}"), {"WORLD_SIZE": "1"},
     ["= 2 processes, but 1 were started", "torchrun"]),
    ("train: checkpoint from another model", train_case("--resume", "--out_dir", "{ws}/run_model", "--n_layer", "3"), {},
     ["n_layer 2 -> 3", "same model flags"]),
    ("train: checkpoint that is a pickle with code", train_case("--resume", "--out_dir", "{ws}/evil"), {},
     ["unsafe", "another --out_dir"]),
    ("train: truncated checkpoint", train_case("--resume", "--out_dir", "{ws}/truncated"), {}, ["corrupt", "delete it"]),
    ("train: sample without a checkpoint", train_case("--sample", "--out_dir", "{ws}/nothing"), {},
     ["no checkpoint", "--out_dir"]),
    ("train: one seed to compare", train_case("--compare_seeds", "1", "--out_dir", "{out}"), {},
     ["--compare_seeds needs 2 or more"]),
    # the modern recipe (README, "Modern recipe")
    ("train: unknown optimizer", train_case("--optimizer", "sgd", "--out_dir", "{out}"), {}, ["unknown --optimizer 'sgd'", "adamw or muon"]),
    ("train: muon with tensor parallelism", train_case("--optimizer", "muon", "--tp", "2", "--out_dir", "{out}"), {},
     ["--optimizer muon needs whole matrices", "drop --tp"]),
    ("train: soft-capping inside the fused loss", train_case("--logit_softcap", "30", "--fused_ce", "--out_dir", "{out}"), {},
     ["--logit_softcap with --fused_ce", "drop one"]),
    ("train: negative spike threshold", train_case("--spike_sigma", "-1", "--out_dir", "{out}"), {}, ["--spike_sigma must be 0 or more"]),
    ("data: verify a directory that is not prepared", ["data.py", "verify", "{ws}/nothing"], {},
     ["no prepared corpus", "run prepare"]),
    # (train.py treats a prepared directory as a cache: one that fails these checks is prepared again)
    ("data: verify a truncated token shard", ["data.py", "verify", "{ws}/corrupt/{prepared}"], {},
     ["corrupt token file", "re-prepare"]),
    ("data: verify an empty token shard", ["data.py", "verify", "{ws}/empty_shard/{prepared}"], {},
     ["corrupt token file", "found 0", "re-prepare"]),
    ("data: verify a shard with a flipped bit", ["data.py", "verify", "{ws}/flipped/{prepared}"], {},
     ["checksum differs", "re-prepare"]),
    ("data: vocabulary larger than the token dtype", ["data.py", "verify", "{ws}/wide_vocab/{prepared}"], {},
     ["vocab_size 70000 does not fit its token dtype uint16", "prepare again"]),
    ("data: prepare an empty directory", ["data.py", "prepare", "--data", "{ws}/empty_corpus", "--out_dir", "{ws}/cache"], {},
     ["{ws}/empty_corpus"]),
    ("data: unknown flag", ["data.py", "prepare", "--tokeniser", "bytes"], {}, ["unrecognized arguments: --tokeniser"]),
    ("scaling: MFU for an unknown GPU", ["scaling.py", "flops", "--preset", "laptop", "--tokens_per_s", "1e5", "--gpu", "Z80"],
     {}, ["unknown GPU 'Z80'", "H100 SXM"]),
    ("kernels: benchmark without a GPU", ["kernels.py", "--bench"], {}, ["needs a CUDA GPU", "--cpu-smoke"]),
    ("kernels: CPU smoke test with the interpreter off", ["kernels.py", "--bench", "--cpu-smoke"], {"TRITON_INTERPRET": "0"},
     ["TRITON_INTERPRET=1"]),
]


# ---- data.py's rows: a block of their own (the rows above are train.py's and the other commands') ----

def add_data_inputs(ws: Path, prepared: str) -> None:
    """The files data.py's rows need: a truncated .gz, a .gz that is plain text, a file where a directory
    is expected, and a prepared copy whose first token is outside its vocabulary under a matching checksum."""
    packed = gzip.compress("".join(f"line {i} of a corpus that was gzipped\n" for i in range(4000)).encode())
    (ws / "truncated.txt.gz").write_bytes(packed[: len(packed) // 2])
    (ws / "not_gzip.jsonl.gz").write_text('{"text": "plain JSON under a .gz name"}\n')
    (ws / "a_file").write_text("a file where a directory is expected")
    (ws / "not_parquet.parquet").write_text("a text file under a .parquet name")
    shutil.copytree(ws / "data", ws / "out_of_range")
    manifest_path = ws / "out_of_range" / prepared / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = manifest_path.parent / manifest["shards"]["train"][0]["file"]
    itemsize = {"uint16": 2, "uint32": 4}[manifest["dtype"]]
    raw = bytearray(shard.read_bytes())
    raw[:itemsize] = manifest["vocab_size"].to_bytes(itemsize, "little")  # one past the largest id
    shard.write_bytes(raw)
    manifest["shards"]["train"][0]["sha256"] = hashlib.sha256(raw).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


NO_PROXY = {"http_proxy": "", "HTTP_PROXY": "", "all_proxy": "", "ALL_PROXY": ""}  # (empty: unset for urllib)
CATALOGUE += [
    ("data: prepare a truncated .gz", ["data.py", "prepare", "--data", "{ws}/truncated.txt.gz", "--tokenizer", "bytes",
                                       "--out_dir", "{ws}/cache"], {}, ["{ws}/truncated.txt.gz", "not a whole gzip file"]),
    ("data: prepare a .gz that is not gzip", ["data.py", "prepare", "--data", "{ws}/not_gzip.jsonl.gz", "--tokenizer",
                                              "bytes", "--out_dir", "{ws}/cache"], {},
     ["{ws}/not_gzip.jsonl.gz", "not a whole gzip file", "remove the .gz"]),
    ("data: prepare into an out_dir that is a file", ["data.py", "prepare", "--data", "{ws}/texts", "--tokenizer", "bytes",
                                                      "--out_dir", "{ws}/a_file"], {},
     ["--out_dir {ws}/a_file", "pass a writable directory"]),
    ("data: a download cap of 0 MB", ["data.py", "prepare", "--max_download_mb", "0", "--out_dir", "{ws}/cache"], {},
     ["--max_download_mb 0", "must be positive"]),
    ("data: a URL nothing answers", ["data.py", "prepare", "--data", "http://127.0.0.1:9/corpus.txt", "--out_dir",
                                     "{ws}/cache"], NO_PROXY, ["cannot download http://127.0.0.1:9/corpus.txt", "--data"]),
    ("data: verify a shard with an id outside the vocabulary", ["data.py", "verify", "{ws}/out_of_range/{prepared}"], {},
     ["outside the vocabulary", "re-prepare"]),
    ("data: a negative number of workers", ["data.py", "prepare", "--workers", "-1", "--out_dir", "{ws}/cache"], {},
     ["--workers -1", "0 for one per CPU"]),
    ("data: a memory budget of 0 GB", ["data.py", "prepare", "--memory_gb", "0", "--out_dir", "{ws}/cache"], {},
     ["--memory_gb 0", "must be positive"]),
    ("data: prepare a .parquet that is not Parquet", ["data.py", "prepare", "--data", "{ws}/not_parquet.parquet",
                                                      "--tokenizer", "bytes", "--out_dir", "{ws}/cache"], {},
     ["{ws}/not_parquet.parquet", "as Parquet"] if importlib.util.find_spec("pyarrow") else ["pip install pyarrow"]),
]



# ---- train.py's, scaling.py's and parallel.py's rows for issue 13 ("Nothing lost, nothing silent"),
# each named after the item it covers; most fail while the flags are checked, before any work ----

# copies of the trained run, one per case that resumes it (a resume holds its directory's lock)
RUN_COPIES = ("run_model", "run_stop_at", "run_max_iters", "run_grad_accum", "run_batch")


def edited_checkpoint(ws: Path, name: str, edit) -> None:
    """ws/name/ckpt.pt: the trained run's checkpoint after edit(ckpt) (what a hand or another program does)."""
    ckpt = torch.load(ws / "run" / "ckpt.pt", weights_only=True)
    edit(ckpt)
    (ws / name).mkdir()
    torch.save(ckpt, ws / name / "ckpt.pt")


def add_train_inputs(ws: Path) -> None:
    """Copies of the trained run, checkpoints edited in the ways issue 13 found (item 21), and a
    directory whose lock a live process holds (the test process itself, while the catalogue runs)."""
    for name in RUN_COPIES + ("busy",):
        shutil.copytree(ws / "run", ws / name)
    edited_checkpoint(ws, "ck_no_optimizer", lambda c: c.pop("optimizer"))
    edited_checkpoint(ws, "ck_string_step", lambda c: c.update(step="2"))
    edited_checkpoint(ws, "ck_negative_step", lambda c: c.update(step=-3))
    edited_checkpoint(ws, "ck_wrong_shape", lambda c: c["model"].update({"transformer.wte.weight": torch.zeros(3, 5)}))
    edited_checkpoint(ws, "ck_unknown_key", lambda c: c["model_config"].update(not_a_field=4))
    edited_checkpoint(ws, "ck_other_corpus", lambda c: c.update(corpus_id="0" * 16))
    edited_checkpoint(ws, "ck_small_vocab", lambda c: c["model_config"].update(vocab_size=300))
    edited_checkpoint(ws, "ck_path_name", lambda c: c.update(data_dir=".."))
    # a stranger's checkpoint naming a URL to fetch and a corpus directory of its own
    edited_checkpoint(ws, "ck_url", lambda c: (c["train_config"].update(data="http://127.0.0.1:9/evil.txt",
                                                                         data_dir="/tmp/evil"),
                                               c.update(data_dir="evil-bpe512-0000000000")))
    edited_checkpoint(ws, "ck_not_tensors", lambda c: c["model"].update({"transformer.wte.weight": [1.0, 2.0]}))
    edited_checkpoint(ws, "ck_huge_block", lambda c: c["model_config"].update(block_size=10**9))


def sample_case(out, *args):
    return ["train.py", "--sample", "--device", "cpu", "--data_dir", "{ws}/data", "--out_dir", out, *args]


CATALOGUE += [
    # (1) one run per out_dir: the fixture holds {ws}/busy's lock as a live run would
    ("train (1): a fresh run into a directory another run is training in",
     train_case("--out_dir", "{ws}/busy", "--overwrite"), {}, ["another run (PID", "is training in --out_dir {ws}/busy"]),
    ("train (1): a second --resume of a run in progress", train_case("--out_dir", "{ws}/busy", "--resume"), {},
     ["another run (PID", "wait for it to finish"]),
    # (2) a resume cannot stop before its checkpoint
    ("train (2): --stop_at below the checkpoint's step", train_case("--resume", "--out_dir", "{ws}/run_stop_at",
                                                                    "--stop_at", "1"), {},
     ["--stop_at 1 is below the checkpoint's step 2", "--stop_at 2 or more"]),
    ("train (2): --max_iters below the checkpoint's step", train_case("--resume", "--out_dir", "{ws}/run_max_iters",
                                                                      "--max_iters", "1"), {},
     ["--max_iters 1 is below the checkpoint's step 2"]),
    # (3) a negative --stop_at is not "stop at once"
    ("train (3): --overwrite --stop_at -1", train_case("--overwrite", "--stop_at", "-1", "--out_dir", "{ws}/run"), {},
     ["--stop_at must be 0 or more, got -1"]),
    # (8) the global batch cannot change on resume
    ("train (8): resume with another --grad_accum", train_case("--resume", "--out_dir", "{ws}/run_grad_accum",
                                                               "--grad_accum", "2"), {},
     ["--grad_accum was 1 in the checkpoint, now 2", "tokens per step"]),
    ("train (8): resume with another --batch_size", train_case("--resume", "--out_dir", "{ws}/run_batch",
                                                               "--batch_size", "4"), {},
     ["global batch", "keep batch_size x dp the same"]),
    # (9) learning rates and steps that cannot be
    ("train (9): a negative --min_lr_ratio", train_case("--min_lr_ratio", "-1"), {}, ["--min_lr_ratio must be in [0, 1]"]),
    ("train (9): a negative --learning_rate", train_case("--learning_rate", "-0.001"), {}, ["--learning_rate must be positive"]),
    ("train (9): --learning_rate nan", train_case("--learning_rate", "nan"), {}, ["--learning_rate must be positive, got nan"]),
    ("train (9): --learning_rate inf", train_case("--learning_rate", "inf"), {}, ["--learning_rate must be positive and finite"]),
    ("train (9): a checkpoint edited to step -3", train_case("--resume", "--out_dir", "{ws}/ck_negative_step"), {},
     ["its step is -3", "another --out_dir"]),
    ("train (9): a checkpoint whose step is a string", train_case("--resume", "--out_dir", "{ws}/ck_string_step"), {},
     ["'step' should be of type int, found str"]),
    # (10) --sample takes its paths from the flags only, never fetches
    ("train (10): --sample of a checkpoint naming a URL and a corpus of its own", sample_case("{ws}/ck_url"), {},
     ["corpus evil-bpe512-0000000000 is not in --data_dir {ws}/data", "never prepares or downloads"]),
    ("train (10): --sample of a checkpoint naming a path as its corpus", sample_case("{ws}/ck_path_name"), {},
     ["names no prepared corpus", "'..'"]),
    ("train (10): --sample with another --data_dir", sample_case("{ws}/run", "--data_dir", "{ws}/empty_corpus"), {},
     ["is not in --data_dir {ws}/empty_corpus", "the --data_dir the run trained with"]),
    # (issue 17) mixture of experts and expert parallelism
    ("train (issue 17): --moe_topk above --moe_experts", train_case("--moe_experts", "4", "--moe_topk", "5", "--out_dir", "{out}"), {},
     ["--moe_topk 5 must be between 1 and --moe_experts 4"]),
    ("train (issue 17): --ep without experts", train_case("--ep", "2", "--dp", "2", "--out_dir", "{out}"), {},
     ["--ep 2 splits the experts", "add --moe_experts"]),
    ("train (issue 17): --moe_router unknown", train_case("--moe_experts", "4", "--moe_router", "cosine", "--out_dir", "{out}"), {},
     ["unknown moe_router 'cosine'", "softmax or sigmoid"]),
    ("train (issue 17): --moe_capacity -1", train_case("--moe_experts", "4", "--moe_capacity", "-1", "--out_dir", "{out}"), {},
     ["--moe_capacity must be 0 or more"]),
    ("scaling (issue 17): memory --ep for a dense model", ["scaling.py", "memory", "--preset", "laptop", "--ep", "2"], {},
     ["--ep 2 splits the experts of an MoE", "--moe_experts"]),
    # (14) scaling.py sweep
    ("scaling (14): sweep --jobs 0", ["scaling.py", "sweep", "--jobs", "0", "--out_dir", "{out}"], {},
     ["--jobs must be in [1, inf), got 0"]),
    ("scaling (14): sweep --threads 0", ["scaling.py", "sweep", "--threads", "0", "--out_dir", "{out}"], {},
     ["--threads must be in [1, inf), got 0"]),
    ("scaling (14): sweep --sizes 0x16", ["scaling.py", "sweep", "--sizes", "0x16", "--budgets", "1e9", "--out_dir", "{out}"], {},
     ["size '0x16'", "LAYERS at least 1"]),
    ("scaling (14): sweep --sizes 2x0", ["scaling.py", "sweep", "--sizes", "2x0", "--budgets", "1e9", "--out_dir", "{out}"], {},
     ["size '2x0'", "WIDTH a positive multiple of 16"]),
    ("scaling (issue 17): memory --ep that does not divide --dp", ["scaling.py", "memory", "--preset", "laptop", "--moe_experts", "8",
                                                            "--ep", "4", "--dp", "2"], {}, ["--ep 4", "--dp, multiples of 4"]),
    # (16) a context longer than the validation split fails before training
    ("train (16): --block_size longer than the splits", train_case("--block_size", "100000", "--out_dir", "{out}"), {},
     ["too short for --block_size 100000", "smaller --block_size"]),
    # (18) the output directory cannot be written
    ("train (18): --out_dir is a file", train_case("--out_dir", "{ws}/a_file"), {}, ["--out_dir {ws}/a_file is a file"]),
    ("train (18): --out_dir under /proc", train_case("--out_dir", "/proc/nanopretrain/out"), {},
     ["cannot write to --out_dir /proc/nanopretrain/out", "pass a writable directory"]),
    ("train (18): --out_dir whose name is too long", train_case("--out_dir", "{ws}/" + "x" * 300), {},
     ["File name too long", "pass a writable directory"]),
    ("train (18): --out_dir inside a file", train_case("--out_dir", "{ws}/a_file/out"), {},
     ["cannot write to --out_dir {ws}/a_file/out", "Not a directory"]),
    ("train (18): --data_dir is a file", train_case("--data_dir", "{ws}/a_file", "--out_dir", "{out}"), {},
     ["--data_dir {ws}/a_file is a file, not a directory"]),
    ("train (18): --data_dir inside a file", train_case("--data_dir", "{ws}/a_file/data", "--out_dir", "{out}"), {},
     ["cannot write to --data_dir {ws}/a_file/data", "pass a writable directory"]),
    # (20) flags that cannot make a model or a device
    ("train (20): --n_head 0", train_case("--n_head", "0"), {}, ["--n_head must be at least 1, got 0"]),
    ("train (20): --block_size 0", train_case("--block_size", "0"), {}, ["--block_size must be at least 1, got 0"]),
    ("train (20): --n_layer 0", train_case("--n_layer", "0"), {}, ["--n_layer must be at least 1"]),
    ("train (20): --n_embd 0", train_case("--n_embd", "0"), {}, ["--n_embd must be at least 1"]),
    ("train (20): --dropout 1", train_case("--dropout", "1"), {}, ["--dropout must be in [0, 1), got 1.0"]),
    ("train (20): --n_embd not a multiple of --n_head", train_case("--n_embd", "65"), {},
     ["n_embd=65 is not divisible by n_head=2"]),
    ("train (20): --device foo", train_case("--device", "foo"), {}, ["unknown --device 'foo'", "cuda:N or mps"]),
    ("train (20): --device mps where torch has none", train_case("--device", "mps"), {}, ["--device mps", "--device cpu"]),
    ("train (20): --device cuda without a GPU", train_case("--device", "cuda:0"), {"CUDA_VISIBLE_DEVICES": ""},
     ["--device cuda:0", "no CUDA GPU"]),
    ("train (20): --top_k -5 fails before the run", train_case("--top_k", "-5", "--out_dir", "{out}"), {},
     ["--top_k must be 0 or more, got -5"]),
    ("train (20): --sample --top_k -5 fails before loading", sample_case("{ws}/run", "--top_k", "-5"), {},
     ["--top_k must be 0 or more"]),
    ("train (20): --top_p 1.5 fails before the run", train_case("--top_p", "1.5", "--out_dir", "{out}"), {},
     ["--top_p must be in (0, 1], got 1.5"]),
    ("train (20): --sample --top_p 0 fails before loading", sample_case("{ws}/run", "--top_p", "0"), {},
     ["--top_p must be in (0, 1], got 0.0"]),
    ("train (20): --impl native --zero 1 in one process", train_case("--impl", "native", "--zero", "1", "--out_dir", "{out}"),
     {}, ["--impl native --zero 1", "ZeroRedundancyOptimizer", "torchrun --nproc_per_node N", "--impl scratch"]),
    ("train (20): --impl native --zero 3 in one process", train_case("--impl", "native", "--zero", "3", "--out_dir", "{out}"),
     {}, ["--impl native --zero 3", "FSDP2", "torchrun --nproc_per_node N", "--impl scratch"]),
    ("train (20): --mix_anneal with --decay_frac 0", train_case("--mix_anneal", "code=0.3,prose=0.7", "--decay_frac", "0",
                                                                 "--out_dir", "{out}"), {},
     ["--mix_anneal switches the mixture for the decay phase", "--decay_frac 0 of --max_iters 20 is no step"]),
    # (21) edited or foreign checkpoints
    ("train (21): a checkpoint without its optimizer state", train_case("--resume", "--out_dir", "{ws}/ck_no_optimizer"),
     {}, ["'optimizer' should be of type dict, found nothing", "another --out_dir"]),
    ("train (21): a checkpoint tensor of the wrong shape (resume)", train_case("--resume", "--out_dir", "{ws}/ck_wrong_shape"),
     {}, ["does not fit this model", "another --out_dir"]),
    ("train (21): a checkpoint tensor of the wrong shape (sample)", sample_case("{ws}/ck_wrong_shape"), {},
     ["tensors do not fit its model_config (size mismatch for transformer.wte.weight", "edited or is damaged"]),
    ("train (21): a checkpoint whose weights are not tensors", sample_case("{ws}/ck_not_tensors"), {},
     ["some of its weights are not tensors"]),
    ("train (21): an unknown model_config key in --sample", sample_case("{ws}/ck_unknown_key"), {},
     ["model_config this model.py cannot build", "not_a_field"]),
    ("train (21): a model_config with a block_size of 10^9 in --sample", sample_case("{ws}/ck_huge_block"), {},
     ["model_config with block_size=1000000000, outside [1, 1,048,576]", "not one train.py wrote"]),
    ("train (21): a tokenizer with more ids than the model", sample_case("{ws}/ck_small_vocab"), {},
     ["has 512 ids, more than the model's 300", "not the tokenizer"]),
    ("train (21): --sample after the corpus was prepared again", sample_case("{ws}/ck_other_corpus"), {},
     ["prepared again since the checkpoint", "--data_dir the run trained with"]),
    ("train (21): --resume after the corpus was prepared again", train_case("--resume", "--out_dir", "{ws}/ck_other_corpus"),
     {}, ["cannot resume: the corpus in", "prepared again since the checkpoint"]),
    # (22) distributed settings
    ("train (22): --dist_timeout 0", train_case("--dist_timeout", "0"), {}, ["--dist_timeout must be at least 1, got 0"]),
    ("parallel (22): preflight --timeout 0", ["parallel.py", "preflight", "--timeout", "0"], {},
     ["--timeout and --megabytes must be positive"]),
    # (23) what argparse, AdamW or a late failure used to say
    ("parallel (23): no subcommand", ["parallel.py"], {}, ["name a command", "preflight", "plan"]),
    ("parallel (23): preflight without torchrun", ["parallel.py", "preflight"], {},
     ["launch it with torchrun", "--nproc_per_node 2 parallel.py preflight"]),
    ("parallel (23): an unknown subcommand", ["parallel.py", "check"], {}, ["invalid choice: 'check'"]),
    ("parallel (23): plan --batch_tokens -5", ["parallel.py", "plan", "--batch_tokens", "-5"], {},
     ["--batch_tokens must be at least 1"]),
    ("train (23): --beta1 1.5 (AdamW's own error named no flag)", train_case("--beta1", "1.5"), {},
     ["--beta1 must be in [0, 1), got 1.5"]),
    ("train (23): --beta2 -0.1", train_case("--beta2", "-0.1"), {}, ["--beta2 must be in [0, 1)"]),
    ("train (23): --weight_decay -0.1", train_case("--weight_decay", "-0.1"), {}, ["--weight_decay must be 0 or more"]),
    ("train (23): --temperature -1", train_case("--temperature", "-1"), {}, ["--temperature must be 0 or more, got -1.0"]),
    ("train (23): --sample_tokens -1", train_case("--sample_tokens", "-1"), {}, ["--sample_tokens must be 0 or more"]),
    ("train (23): --checkpoint_interval -1", train_case("--checkpoint_interval", "-1"), {},
     ["--checkpoint_interval must be 0 or more"]),
    ("scaling (23): flops --seq_len -5", ["scaling.py", "flops", "--seq_len", "-5"], {}, ["--seq_len must be in [1, inf), got -5"]),
    ("scaling (23): count --n_head 0", ["scaling.py", "count", "--n_head", "0"], {}, ["--n_head must be in [1, inf)"]),
    # and the rest of the range table, a row each for the kinds of interval
    ("train: --warmup_iters -1", train_case("--warmup_iters", "-1"), {}, ["--warmup_iters must be 0 or more"]),
    ("train: --decay_frac 2", train_case("--schedule", "wsd", "--decay_frac", "2"), {}, ["--decay_frac must be in [0, 1]"]),
    ("train: --zero 4", train_case("--zero", "4"), {}, ["--zero must be in [0, 3], got 4"]),
    ("train: --bucket_mb 0", train_case("--bucket_mb", "0"), {}, ["--bucket_mb must be positive"]),
    ("train: --diloco_outer_momentum 1", train_case("--diloco_outer_momentum", "1"), {},
     ["--diloco_outer_momentum must be in [0, 1)"]),
    ("train: --seed -1", train_case("--seed", "-1"), {}, ["--seed must be 0 or more"]),
    ("train: --vocab_size 100 for BPE", train_case("--vocab_size", "100"), {}, ["--vocab_size must be at least 257"]),
    ("train: --max_download_mb 0", train_case("--max_download_mb", "0"), {}, ["--max_download_mb must be positive"]),
    ("train: --eval_iters 0", train_case("--eval_iters", "0"), {}, ["--eval_iters must be at least 1"]),
]

# issues 14 and 18: starting from a Hugging Face directory, downstream tasks, live logging, pictures, perplexity
CATALOGUE += [
    ("train (issue 14): --init_from a directory without config.json",
     train_case("--init_from", "{ws}/empty_corpus", "--out_dir", "{out}"), {},
     ["{ws}/empty_corpus is not a Hugging Face model directory", "config.json"]),
    ("train (issue 14): --eval_tasks a task the folder does not have",
     train_case("--eval_tasks", "nosuch", "--eval_tasks_dir", "{ws}/empty_corpus", "--out_dir", "{out}"), {},
     ["no task 'nosuch' in {ws}/empty_corpus"]),
    ("train (issue 14): --eval_tasks_every -1", train_case("--eval_tasks_every", "-1"), {},
     ["--eval_tasks_every must be 0 or more"]),
    ("train (issue 14): --log_to csv", train_case("--log_to", "csv", "--out_dir", "{out}"), {},
     ["unknown --log_to 'csv'", "tensorboard"]),
    ("train (issue 14): --plot a directory without metrics", ["train.py", "--plot", "{ws}/empty_corpus"], {},
     ["--plot"]),  # without matplotlib the line names it instead of the missing metrics.jsonl
    ("data (issue 18): --perplexity_keep of two thirds that do not touch",
     ["data.py", "prepare", "--data", "{ws}/texts", "--tokenizer", "bytes", "--perplexity_model", "{ws}/a_file",
      "--perplexity_keep", "head,tail", "--out_dir", "{ws}/cache"], {}, ["--perplexity_keep 'head,tail'", "adjacent"]),
    ("data (issue 18): --perplexity_model that does not exist",
     ["data.py", "prepare", "--data", "{ws}/texts", "--tokenizer", "bytes", "--perplexity_model", "{ws}/nope.pt",
      "--out_dir", "{ws}/cache"], {}, ["--perplexity_model '{ws}/nope.pt' does not exist"]),
]

# the catalogue: every case across all five commands (issue 13 asked for at least 70; the README says more than 90)
assert len(CATALOGUE) > 90 and {argv[0] for _, argv, _, _ in CATALOGUE} == {"train.py", "data.py", "scaling.py", "kernels.py",
                                                                             "parallel.py"}
assert len({name for name, *_ in CATALOGUE}) == len(CATALOGUE)  # names are the test ids


def file_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# Most cases only need the command's main() on a fresh argv, so they run in batches of one process
# each (conftest.run_in_one_process); a case with an environment of its own and kernels.py's run as
# processes of their own.
BATCHES = 3  # processes at a time: each mostly computes, on a machine of two cores


def batchable(case) -> bool:
    _, argv, env, _ = case
    return not env and argv[0] in ("train.py", "data.py", "scaling.py", "parallel.py")


@pytest.fixture(scope="module")
def catalogue(workspace, tmp_path_factory):
    """Every case of CATALOGUE, in BATCHES processes at a time (and the others one process each),
    between two snapshots of every file in the workspace."""
    ws, prepared = workspace
    work = tmp_path_factory.mktemp("batches")

    def fill(s, name=""):
        return s.format(ws=ws, prepared=prepared, out=ws / "out" / hashlib.sha1(name.encode()).hexdigest()[:8])

    def argv_of(case):
        name, argv, _, _ = case
        return [argv[0], *(fill(a, name) for a in argv[1:])]

    def run_alone(case):
        argv = argv_of(case)
        return subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True, text=True,
                              cwd=ws, timeout=300, env={**CHILD_ENV, **case[2]})

    def run_batch(i, cases):
        return {c[0]: r for c, r in zip(cases, run_in_one_process([argv_of(c) for c in cases], work / f"batch{i}", ws, CHILD_ENV))}

    together = [c for c in CATALOGUE if batchable(c)]
    batches = [together[i::BATCHES] for i in range(BATCHES)]
    before = file_hashes(ws)
    alone = [c for c in CATALOGUE if not batchable(c)]
    with hold_lock(ws / "busy"), ThreadPoolExecutor(max_workers=BATCHES) as pool:
        # both maps are queued before either is read: a process of its own starts as soon as a batch ends
        batch_results, alone_results = pool.map(run_batch, range(BATCHES), batches), pool.map(run_alone, alone)
        results = {}
        for batch in batch_results:
            results.update(batch)
        results.update(zip([c[0] for c in alone], alone_results))
    return results, before, file_hashes(ws), fill


@contextlib.contextmanager
def hold_lock(out_dir: Path):
    """Hold out_dir's lock as a training run does (train.OutDirLock), for as long as the block runs."""
    lock = train.OutDirLock(str(out_dir))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("name, words", [(c[0], c[3]) for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_one_line_and_exit_2(catalogue, name, words):
    results, _, _, fill = catalogue
    assert "Traceback" not in results[name].stderr, results[name].stderr[-3000:]
    assert_one_line_error(results[name], *map(fill, words))


@pytest.mark.slow
def test_bad_input_leaves_every_existing_file_untouched(catalogue, workspace):
    _, before, after, _ = catalogue
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or removed by the catalogue: {changed}"
    assert not (workspace[0] / "PWNED").exists()  # the pickle's code never ran


# ---------------------------------------------------------------------------------------------
# Comparing seeds


def test_compare_seeds_reports_mean_and_spread_of_the_seeds_own_runs(data_dir, tmp_path):
    flags = tiny_flags(data_dir, tmp_path, "--max_iters", 4, "--eval_interval", 4, "--eval_iters", 2, "--seed", 7)
    # the run `--seed 8` makes on its own (compared with the second seed's below), beside the comparison
    alone = start_train(*tiny_flags(data_dir, tmp_path / "alone", "--max_iters", 4, "--eval_interval", 4, "--eval_iters", 2,
                                    "--seed", 8), stderr_path=tmp_path / "alone.txt")
    result = run_train(*flags, "--compare_seeds", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["seeds"] == [7, 8]
    finals = [read_metrics(tmp_path / f"seed{s}")[-1] for s in (7, 8)]  # the last line: the final evaluation
    for key in ("val_loss", "val_bpb"):
        a, b = (f[key] for f in finals)
        assert summary[key]["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
        assert summary[key]["std"] == pytest.approx(abs(a - b) / 2 ** 0.5, rel=1e-9)  # sample std of two numbers
        assert a != b  # the seeds differ, so does the loss
    assert f"val loss {summary['val_loss']['mean']:.4f} +- {summary['val_loss']['std']:.4f}" in result.stdout
    # each seed's run is the run `--seed s` makes on its own
    finish_train(alone, tmp_path / "alone.txt")
    assert without_timings(read_metrics(tmp_path / "alone")) == without_timings(read_metrics(tmp_path / "seed8"))
