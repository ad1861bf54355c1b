"""Two things every test run needs from the course mode (tests/exercises.py).

1. The `course` marker is opt-in. A test marked `course` (the whole mutant table of tests/mutants.py,
   tens of minutes on two cores) is deselected unless the -m expression names it:
   `python -m pytest -q -m course tests/test_course.py`. CI's `python -m pytest -q` (10 minutes) and
   the quick `-m "not slow"` leave it out; `slow` alone is not enough, CI runs slow tests.

2. An exercise's judge is reproducible. A judge's verdict is a grade, so a test that an exercise's
   judge selects (its file and -k expression, read from the markers) starts from a fixed seed of its
   own (crc32 of its node id) for torch, numpy and random: the same answer gets the same verdict on
   every run. Every other test keeps the suite's fresh random inputs.
"""

import contextlib
import random
import shlex
import zlib
from pathlib import Path

import pytest


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
