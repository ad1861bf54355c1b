"""Two things every test run needs from the course mode (tests/exercises.py).

1. The `course` marker is opt-in. A test marked `course` (the whole mutant table of tests/mutants.py,
   tens of minutes on two cores) is deselected unless the -m expression names it:
   `python -m pytest -q -m course tests/test_course.py`. CI's `python -m pytest -q` (10 minutes) and
   the quick `-m "not slow"` leave it out; `slow` alone is not enough, CI runs slow tests.

2. An exercise's judge is reproducible. A judge's verdict is a grade, so a test that an exercise's
   judge selects (its file and -k expression, read from the markers) starts from a fixed seed of its
   own (crc32 of its node id) for torch, numpy and random: the same answer gets the same verdict on
   every run. Every other test keeps the suite's fresh random inputs.

3. Work that only waits on other processes starts early. Most tests run in this process and keep one
   core busy; the multi-process runs of tests/test_parallel.py (torchrun, mp.spawn) need nothing of
   this process but a directory. A function registered with @prefetch(a fixture or test) starts, in
   one background thread, as soon as the first test runs, if a selected test is or uses the one it
   names; that one calls prefetched(name) for its result and waits for it there (or runs it then, if
   it was not started). On two cores this fills the core the in-process tests leave idle.

4. Commands that stop before any work run many to a process: run_in_one_process (below). Jobs of
   3. that train share one prepared corpus of the tiny preset: prepared_tiny_corpus (below).

5. The suite's own processes keep their bytecode. With PYTHONDONTWRITEBYTECODE set (as on this
   project's CI machines) a fresh clone never writes __pycache__, so each of the suite's few hundred
   Python processes compiled the project's 16,000 lines again (0.3 to 0.5 s each on a 2-core AMD
   EPYC); the suite drops it for itself and its children. A judge's run (tests/exercises.py) keeps it.
"""

import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if not os.environ.get("NANOPRETRAIN_JUDGE"):  # 5. above
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False


def pytest_collection_modifyitems(config, items):
    if "course" not in (config.option.markexpr or ""):
        chosen = [item for item in items if item.get_closest_marker("course") is None]
        if len(chosen) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("course")])
            items[:] = chosen
    for item in _judged(config, items):
        item.judged = True


def _judged(config, items) -> list:
    """The items that some exercise's judge selects: its test file, and its -k expression, matched
    the way pytest's own -k matches. The judges are read from the marker lines with the markers'
    own patterns, line by line (exercises.find_exercises parses every file: seconds, every run)."""
    try:
        import exercises
        from _pytest.mark import KeywordMatcher
        from _pytest.mark.expression import Expression

        judges = {}  # test file -> the compiled -k expressions of its judges (None: the whole file)
        for path in exercises.source_files(Path(config.rootpath)):
            for line in path.read_text().splitlines():
                m = "# EXERCISE" in line and (exercises.FUNCTION_MARKER.search(line) or exercises.BEGIN_MARKER.search(line))
                if m and m["judge"]:
                    judge = shlex.split(m["judge"])
                    k = judge[judge.index("-k") + 1] if "-k" in judge else None
                    judges.setdefault(judge[0], []).append(Expression.compile(k) if k else None)
    except (ImportError, ValueError):  # no exercises module, or a judge that does not parse: seed every test
        return list(items)
    out = []
    for item in items:
        where = item.path.relative_to(config.rootpath).as_posix() if item.path.is_relative_to(config.rootpath) else None
        if where in judges:
            matcher = KeywordMatcher.from_item(item)
            if any(k is None or k.evaluate(matcher) for k in judges[where]):
                out.append(item)
    return out


@pytest.fixture(autouse=True)
def _judges_are_seeded(request):
    if not getattr(request.node, "judged", False):
        yield
        return
    with seeded(zlib.crc32(request.node.nodeid.encode())):
        yield


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch, numpy and random for the body, then put back the states they had before, so the
    tests after a judged one keep drawing from the run's own fresh stream (not one fixed by the seed)."""
    import numpy
    import torch

    saved = torch.get_rng_state(), numpy.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    numpy.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        numpy.random.set_state(saved[1])
        random.setstate(saved[2])


PREFETCH = {}  # name -> (the fixture or test that needs its result, f(session, tmp_path_factory))


def prefetch(user: str):
    """Register f(session, tmp_path_factory) -> result, which the fixture or test function named `user`
    asks for with prefetched(f's name), to start early when a selected test is or uses `user` (3.
    above). A test module imports this as `from conftest import prefetch`."""
    def register(f):
        PREFETCH[f.__name__] = (user, f)
        return f
    return register


@pytest.fixture(scope="session", autouse=True)
def prefetched(request, tmp_path_factory):
    """prefetched(name): the result of the registered function `name` (an exception it raised is raised
    here), started early in one background thread, one job at a time, in the order registered."""
    used = {name for item in request.session.items
            for name in (getattr(item, "originalname", item.name), *getattr(item, "fixturenames", ()))}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    futures = {name: pool.submit(f, request.session, tmp_path_factory)
               for name, (user, f) in PREFETCH.items() if user in used}

    def result(name):
        if name not in futures:  # not started early: run it now
            futures[name] = pool.submit(PREFETCH[name][1], request.session, tmp_path_factory)
        return futures[name].result()

    yield result
    pool.shutdown(wait=True, cancel_futures=True)


# Most refusals (a command that stops with one error line) only need the command's main() on a fresh
# argv, so they run in batches: one process per batch imports the modules once (torch alone takes
# about 2 s) and calls main(argv) for each case, with stdout and stderr captured and SystemExit's
# code as the exit status. A case with an environment of its own (read at import, like
# CUDA_VISIBLE_DEVICES or TRITON_INTERPRET) needs a process of its own.
ONE_PROCESS_DRIVER = r"""
import contextlib, io, json, sys, traceback
cases, results = json.load(open(sys.argv[1])), []
for argv in cases:
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            __import__(argv[0][:-3]).main(argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


def run_in_one_process(argvs: list, work: Path, cwd, env: dict) -> list:
    """Each argv ([script.py, arg, ...], a script of the repository root) run as script.main(args),
    one after another in one Python process in cwd: a subprocess.CompletedProcess each. work: a
    folder for the cases' and results' files (its name must be new)."""
    root = str(Path(__file__).resolve().parents[1])
    work.mkdir(parents=True)
    cases_file, results_file = work / "cases.json", work / "results.json"
    cases_file.write_text(json.dumps(argvs))
    done = subprocess.run([sys.executable, "-c", ONE_PROCESS_DRIVER, str(cases_file), str(results_file)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env={**env, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, **r) for argv, r in zip(argvs, json.loads(results_file.read_text()))]


_TINY_CORPUS = []  # its path, once prepared (prefetched jobs run one at a time, in one thread)
PREPARE_TINY = """import sys, train
cfg, _ = train.resolve_configs(train.build_parser().parse_args(["--preset", "tiny", "--data_dir", sys.argv[1]]))
train.prepare_data(cfg, verbose=False)"""


def prepared_tiny_corpus(tmp_path_factory) -> str:
    """The --data_dir of `train.py --preset tiny`, prepared once per session by a process of its own.
    For prefetched jobs (3.), which run one at a time, so one of them prepares it and the rest find it."""
    if not _TINY_CORPUS:
        path = str(tmp_path_factory.mktemp("tiny_corpus"))
        done = subprocess.run([sys.executable, "-c", PREPARE_TINY, path], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        _TINY_CORPUS.append(path)
    return _TINY_CORPUS[0]
