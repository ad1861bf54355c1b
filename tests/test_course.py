"""Tests for tests/exercises.py (course mode): every marked exercise's judge fails without it.

The essential check: for each exercise, a temporary copy of the repository (the .py files, tests/
and pytest.ini) has that exercise, and only it, stripped, and its judge command must then fail,
every test it selects: a judge that still passes without the code judges nothing. That the same
judges pass on the unstripped code is the main suite's part (they are ordinary tests in it);
`python -m tests.exercises check` shows both sides at once. The judges run as subprocesses, two
at a time; the working tree is never touched.

The rest checks the tool on small files: where markers may sit, what a strip keeps (signature,
decorators, docstring) and what it writes (a file that parses, a function that raises), and that
the README's course table says what the markers say.
"""

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import exercises

ROOT = exercises.ROOT
EXERCISES = exercises.find_exercises(ROOT)
NAMES = [e.name for e in EXERCISES]


# ---------------------------------------------------------------------------------------------
# Every judge fails when its exercise is stripped


def runs_of_selected(request, test_name: str, param: str, run) -> dict:
    """run(value) for the `param` of each item of test_name this session selected, two at a time
    (two cores; each run works in a copy of its own), as {value: result}."""
    selected = [item.callspec.params[param] for item in request.session.items
                if getattr(item, "originalname", None) == test_name]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(selected, pool.map(run, selected)))


@pytest.fixture(scope="module")
def stripped_runs(request):
    """The stripped-copy judge run of each selected exercise."""
    return runs_of_selected(request, "test_judge_fails_when_its_exercise_is_stripped", "name",
                            lambda n: exercises.check_one(n, ROOT, original=False))


def test_the_course_covers_the_core_sequence():
    # tokenizer, attention, training loop, data parallel, ZeRO, tensor parallel, flash attention, scaling law
    targets = {t for e in EXERCISES for t in e.targets}
    assert {"data.train_bpe", "model.naive_attention", "train.learning_rate_at",
            "parallel.BucketedDataParallel.finish_gradient_sync", "parallel.ShardedAdamW.step",
            "parallel.ReduceFromTensorParallelRegion.forward", "kernels._attn_fwd_inner",
            "scaling.parametric_optimal"} <= targets


# The suite strips a fixed five of the exercises, one from each of model.py, data.py, train.py,
# scaling.py and parallel.py (kernels.py's are left to the command below): nine of them took 54 s of
# the suite's 10-minute budget on a slower 2-core CPU (AMD EPYC, AVX2), so every exercise's strip is
# the command `python -m tests.exercises check`, run before a release.
IN_SUITE = ["layernorm", "pii", "grad-accum", "chinchilla", "zero"]


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_SUITE)
def test_judge_fails_when_its_exercise_is_stripped(stripped_runs, name):
    run = stripped_runs[name]["stripped"]
    assert exercises.judged_fail(run), f"{stripped_runs[name]['exercise'].command}: {run.summary()}\n{run.output[-3000:]}"
    assert "NotImplementedError" in run.output and f"exercise {name}:" in run.output  # failed because of the strip


# ---------------------------------------------------------------------------------------------
# The tool on small files

TOY = '''\
import functools


# EXERCISE: double (tests/test_toy.py -k double)
@functools.lru_cache(maxsize=None)
def double(
    x: int,  # a signature over several lines, with a colon inside the parentheses
) -> int:
    """Twice x."""
    return 2 * x


class Counter:
    def __init__(self):
        self.n = 0

    def bump(self, k=1):
        # EXERCISE: bump (tests/test_toy.py -k bump)
        """Add k; a marker may also be the first line of the body."""
        # a hint that goes with the body
        self.n += k
        return self.n


def half_and_square(x):
    """Half of x, squared: only the squaring is the exercise."""
    h = x / 2
    # EXERCISE BEGIN square (tests/test_toy.py -k square)
    if True:
        h = h * h
    # EXERCISE END square
    return h


# EXERCISE: pair (tests/test_toy.py -k pair)
def first(p):
    return p[0]


# EXERCISE: pair
def second(p):
    return p[1]
'''


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    return tmp_path


def test_markers_above_inside_and_around_bodies_are_found(toy):
    found = {e.name: e for e in exercises.find_exercises(toy)}
    assert list(found) == ["double", "bump", "square", "pair"]  # file order
    assert found["double"].targets == ["toy.double"]
    assert found["bump"].targets == ["toy.Counter.bump"]
    assert found["square"].targets == ["toy.half_and_square"]
    assert found["pair"].targets == ["toy.first", "toy.second"] and found["pair"].judge == ["tests/test_toy.py", "-k", "pair"]
    assert found["double"].command == "python -m pytest -q tests/test_toy.py -k double"


def test_strip_keeps_signature_decorators_and_docstrings_and_raises(toy):
    before = (toy / "toy.py").read_text()
    exercises.strip(exercises.select(exercises.find_exercises(toy), ["double", "bump", "square", "pair"]))
    text = (toy / "toy.py").read_text()
    tree = ast.parse(text)  # it still parses
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert ast.get_docstring(functions["double"]) == "Twice x." and "@functools.lru_cache(maxsize=None)" in text
    assert ast.get_docstring(functions["bump"]).startswith("Add k")
    assert "a hint that goes with the body" not in text and "self.n += k" not in text
    assert "h = h * h" not in text and "h = x / 2" in text and "return h" in text  # only the block went
    assert (toy / "toy.py.orig").read_text() == before
    toy_module = load(toy / "toy.py", "stripped_toy")
    for call in (lambda: toy_module.double(3), lambda: toy_module.Counter().bump(), lambda: toy_module.half_and_square(4),
                 lambda: toy_module.first((1, 2)), lambda: toy_module.second((1, 2))):
        with pytest.raises(NotImplementedError, match="then run: python -m pytest -q tests/test_toy.py"):
            call()
    # stripping again changes nothing; the markers still list every exercise, now marked stripped
    again = exercises.find_exercises(toy)
    assert all(r.stripped for e in again for r in e.regions)
    exercises.strip(exercises.select(again, ["double"]))
    assert (toy / "toy.py").read_text() == text
    assert exercises.restore(toy) == ["toy.py"] and (toy / "toy.py").read_text() == before
    assert not (toy / "toy.py.orig").exists() and (toy / "toy.py.mine").read_text() == text  # nothing lost


def test_one_target_of_a_shared_exercise_can_be_stripped_alone(toy):
    exercises.strip(exercises.select(exercises.find_exercises(toy), ["toy.second"]))
    toy_module = load(toy / "toy.py", "half_stripped_toy")
    assert toy_module.first((1, 2)) == 1
    with pytest.raises(NotImplementedError):
        toy_module.second((1, 2))


def test_finding_again_gives_fresh_exercises_for_each_copy(toy, tmp_path_factory):
    # what a file marks is found once per name and text (exercises._exercises_in): each call must
    # still get exercises of its own, with its own paths, that no earlier caller's edits reach
    first = {e.name: e for e in exercises.find_exercises(toy)}
    first["pair"].judge.append("-x")
    first["bump"].regions[0].keep.append("    # a caller's edit\n")
    other = tmp_path_factory.mktemp("other")
    (other / "toy.py").write_text(TOY)
    again = {e.name: e for e in exercises.find_exercises(other)}
    assert again["pair"].judge == ["tests/test_toy.py", "-k", "pair"]
    assert again["bump"].regions[0].keep == []  # its marker sits above the docstring: nothing to re-emit
    assert all(r.path == other / "toy.py" for e in again.values() for r in e.regions)
    assert first["double"].regions[0].path == toy / "toy.py"


def test_parse_changed_refuses_what_the_whole_file_would_refuse():
    # exercises.parse_changed parses only the top-level statements a change touches; the reference is
    # ast.parse of the whole changed file. Every one-line deletion and every stray bracket, colon,
    # quote or backslash on every line of the toy: whenever the whole file does not parse, neither does
    # the change, and the error names a line of the changed statement, no later than the whole file's
    # (which may be later: a string left open runs on to the next docstring's quotes there)
    lines = TOY.splitlines(keepends=True)
    changes = [(i, lines[:i] + lines[i + 1:]) for i in range(len(lines))]
    changes += [(i, lines[:i] + [lines[i].rstrip("\n") + junk + "\n"] + lines[i + 1:]) for i in range(len(lines))
                for junk in ("(", ":", '"""', " \\")]
    refused = 0
    for i, changed in changes:
        after = "".join(changed)
        statement = max([1, *(s for s in exercises._statement_starts(TOY) if s <= i + 1)])  # holds line i + 1
        try:
            ast.parse(after)
        except SyntaxError as whole:
            with pytest.raises(SyntaxError) as part:
                exercises.parse_changed(Path("toy.py"), TOY, after)
            assert statement <= part.value.lineno <= whole.lineno, (after, part.value, whole)
            refused += 1
        else:
            try:
                exercises.parse_changed(Path("toy.py"), TOY, after)
            except SyntaxError:  # stricter than the whole file: only for a change that joins the next statement
                assert any(l.startswith("@") or l.rstrip("\n").endswith("\\") for l in changed), after
    assert refused > len(changes) // 2  # the junk does break most lines
    # a decorator left above a class parses with it, not alone: refused (its docstring says so)
    with pytest.raises(SyntaxError):
        exercises.parse_changed(Path("toy.py"), TOY, TOY.replace("\n\nclass Counter:", "\n@functools.cache\nclass Counter:"))
    exercises.parse_changed(Path("toy.py"), TOY, TOY.replace("h = h * h", "h = h ** 2"))  # and a good change passes


@pytest.mark.parametrize("source, message", [
    ("# EXERCISE attention\ndef f():\n    return 1\n", "cannot read the marker"),
    ("def f():\n    x = 1\n    # EXERCISE END a\n    return x\n", "without a BEGIN"),
    ("def f():\n    # EXERCISE BEGIN a (t.py)\n    return 1\n", "has no EXERCISE END"),
    ("# EXERCISE: a\ndef f():\n    return 1\n", "has no judge"),
    ("# EXERCISE: a (t.py)\ndef f():\n    return 1\n\n\n# EXERCISE: a (u.py)\ndef g():\n    return 2\n", "two different judges"),
    ("# EXERCISE: a (t.py)\nX = 1\n", "must sit above a def"),
    ("# EXERCISE: a (t.py)\ndef f():\n    \"\"\"Only a docstring.\"\"\"\n", "nothing but a docstring"),
])
def test_bad_markers_are_one_line_errors_naming_file_and_line(tmp_path, capsys, source, message):
    (tmp_path / "bad.py").write_text(source)
    assert exercises.main(["--root", str(tmp_path), "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad.py:") and message in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# The commands on a copy of this repository


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    copy = tmp_path_factory.mktemp("repo")
    exercises.copy_sources(ROOT, copy)
    return copy


@pytest.mark.parametrize("name", NAMES)
def test_restore_puts_back_exactly_the_code_whose_judges_pass(tmp_path, name):
    # the suite itself runs every judge on the unstripped code; here strip + restore must give back
    # those very bytes, so a restored exercise passes its judge again
    exercises.copy_sources(ROOT, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.py")}
    (exercise,) = [e for e in exercises.find_exercises(tmp_path) if e.name == name]
    exercises.strip([(exercise, exercise.regions)])
    assert {p.name for p in tmp_path.glob("*.py") if p.read_bytes() != before[p.name]}  # something was blanked
    exercises.restore(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.py")} == before


def test_list_names_every_exercise_its_targets_and_judge(repo_copy):
    out = subprocess.run([sys.executable, "-m", "tests.exercises", "list"], cwd=repo_copy, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for e in EXERCISES:
        assert f". {e.name}\n" in out.stdout and f"judge: {e.command}\n" in out.stdout
        for target in e.targets:
            assert target in out.stdout


def test_strip_out_writes_a_stripped_copy_and_leaves_the_tree_alone(repo_copy, tmp_path, capsys):
    before = (repo_copy / "model.py").read_text()
    out = tmp_path / "handout"
    assert exercises.main(["--root", str(repo_copy), "strip", "model.naive_attention", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    judge = next(e for e in EXERCISES if "model.naive_attention" in e.targets).command
    assert f"judge of attention: {judge}" in printed
    assert (repo_copy / "model.py").read_text() == before and not list(repo_copy.glob("*.orig"))
    assert not list(out.glob("*.orig"))  # a hand-out needs no backup
    original = next(n for n in ast.walk(ast.parse(before)) if getattr(n, "name", None) == "naive_attention")
    stripped = next(n for n in ast.walk(ast.parse((out / "model.py").read_text())) if getattr(n, "name", None) == "naive_attention")
    assert ast.get_docstring(stripped) == ast.get_docstring(original)
    assert [a.arg for a in stripped.args.args] == [a.arg for a in original.args.args]
    import torch

    model = load(out / "model.py", "handout_model")
    with pytest.raises(NotImplementedError, match="exercise attention"):
        model.naive_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------
# Sets, mutants, hand-outs

import mutants  # noqa: E402


def test_every_exercise_is_in_exactly_one_set():
    listed = [name for names in exercises.SETS.values() for name in names]
    assert sorted(listed) == sorted(NAMES) and len(listed) == len(set(listed))
    for names in exercises.SETS.values():  # in the order of `list`, which is the order of a hand-out
        assert list(names) == [n for n in NAMES if n in names]
    assert set(exercises.SET_HOURS) == set(exercises.SETS)


def test_every_exercise_has_three_mutants_and_an_alternative_that_apply_to_its_lines(tmp_path):
    # no judge runs here: each variant's edits must still find their text, once, on the lines of
    # their exercise (the sources move on; a stale mutant is one error line, not a silent skip),
    # and the result must parse (the statements it changes: exercises.parse_changed)
    counts = {name: [0, 0] for name in NAMES}
    exercises.copy_sources(ROOT, tmp_path)
    found = exercises.find_exercises(tmp_path)
    originals = {p.name: p.read_text() for p in tmp_path.glob("*.py")}
    for v in mutants.VARIANTS:
        counts[v.exercise][v.correct] += 1
        exercises.apply_variant(v, tmp_path, found)
        for name in {f for f, _, _ in v.edits} | {t.split(".")[0] + ".py" for t, _ in v.bodies}:
            (tmp_path / name).write_text(originals[name])  # back to the original for the next one
    assert all(m >= 3 and a >= 1 for m, a in counts.values()), counts
    assert len({(v.exercise, v.name) for v in mutants.VARIANTS}) == len(mutants.VARIANTS)  # names are unique


FAST_VARIANTS = [v for v in mutants.VARIANTS if (v.exercise, v.name) in mutants.FAST]


@pytest.fixture(scope="module")
def fast_runs(request):
    """The judge run of each selected variant of mutants.FAST."""
    return runs_of_selected(request, "test_fast_subset_of_mutants_is_caught_and_alternatives_pass", "variant",
                            exercises.run_variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", FAST_VARIANTS, ids=lambda v: f"{v.exercise}:{v.name}")
def test_fast_subset_of_mutants_is_caught_and_alternatives_pass(fast_runs, variant):
    # the whole table (`python -m tests.exercises mutants`, every exercise) takes far longer than
    # the suite's budget on two cores; this fixed subset (mutants.FAST) keeps the named mistakes
    # of the issue and a few alternatives in every CI run
    result = fast_runs[variant]
    assert result["ok"], f"{variant.exercise}: {variant.name}: {result['run'].summary()}\n{result['run'].output[-2000:]}"


@pytest.mark.slow
def test_handout_grades_zero_stripped_and_full_marks_restored(tmp_path):
    # the smallest set, in a directory outside the repository: the stripped hand-out scores 0 on
    # every exercise, even with a marker's judge edited to select passing tests and another marker
    # deleted (grade runs the judges handout.json kept); a copy of it with the original sources put
    # back, graded by the repository's own tests (--tests) while the hand-out's are gutted, 100%
    out = tmp_path / "handout"
    assert exercises.main(["handout", "--out", str(out), "--set", "scaling"]) == 0
    assert not (out / "tests" / "mutants.py").exists()  # its alternatives are solutions
    assert not (out / "tests" / "test_course.py").exists()  # it imports mutants
    text = (out / "ASSIGNMENT.md").read_text()
    for name in exercises.SETS["scaling"]:
        assert f"`{name}`" in text
    assert "argmin L(N, D) subject to 6 N D = C" in text  # the docstrings are the tasks
    put_back = tmp_path / "put-back"
    shutil.copytree(out, put_back)
    for name in ("scaling.py", "model.py"):
        shutil.copy2(ROOT / name, put_back / name)
    (put_back / "tests" / "test_scaling.py").write_text("def test_nothing():\n    pass\n")  # a student's tests

    # The three runs below are independent, so they overlap: a grade runs its judges two at a time and
    # the last one alone, which would leave one of two cores idle. Each works in a directory of its own.
    def start(*args, cwd):
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc):
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            proc.kill()  # nothing once it has exited; after a timeout, it does not outlive the test
        return proc.returncode, stdout, stderr

    # (leaving the with block, even by a failed assertion, waits for the restored copy's grade)
    with start("tests.exercises", "--root", str(put_back), "grade", "--json", "--tests", str(ROOT / "tests"),
               cwd=ROOT) as grading_restored:
        code, stdout, _ = finish(start("pytest", "-q", "--collect-only", "tests/test_scaling.py", cwd=out))
        assert code == 0, stdout[-2000:]  # the hand-out's tests still collect

        scaling = (out / "scaling.py").read_text()
        judge = {e.name: e for e in EXERCISES}["chinchilla"].judge
        edited = scaling.replace(f"# EXERCISE: chinchilla ({' '.join(judge)})", "# EXERCISE: chinchilla (tests/test_scaling.py -k count)")
        edited = re.sub(r"\n# EXERCISE: isoflop-fit \(.*\)\n", "\n", edited)
        assert edited.count("# EXERCISE:") == scaling.count("# EXERCISE:") - 1 and "-k count)" in edited
        (out / "scaling.py").write_text(edited)

        code, stdout, stderr = finish(start("tests.exercises", "grade", "--json", cwd=out))
        assert code == 0, stderr
        stripped = json.loads(stdout)
        assert stripped["set"] == "scaling" and list(stripped["exercises"]) == list(exercises.SETS["scaling"])
        assert all(e["passed"] == 0 and e["total"] > 0 for e in stripped["exercises"].values()) and stripped["score"] == 0, stripped
        assert not stripped["exercises"]["isoflop-fit"]["marked"]
        code, stdout, stderr = finish(grading_restored)
    assert code == 0, stderr
    restored = json.loads(stdout)
    assert all(e["passed"] == e["total"] > 1 for e in restored["exercises"].values()) and restored["score"] == 1, restored


def test_grade_takes_the_judges_handout_json_kept_not_the_markers(toy):
    (toy / "handout.json").write_text(json.dumps({"set": "toy", "exercises": ["double", "gone"], "judges": {
        "double": ["tests/test_toy.py", "-k", "double"], "gone": ["tests/test_toy.py", "-k", "gone"]}}))
    (toy / "toy.py").write_text(TOY.replace("(tests/test_toy.py -k double)", "(tests/test_toy.py -k other)"))
    assert exercises.graded_exercises(toy) == ("toy", [("double", ["tests/test_toy.py", "-k", "double"]),
                                                       ("gone", ["tests/test_toy.py", "-k", "gone"])])
    # an exercise of the set taken out of handout.json is still graded, with no judge: 0
    scaling = exercises.SETS["scaling"]
    (toy / "handout.json").write_text(json.dumps({"set": "scaling", "exercises": list(scaling[1:]),
                                                  "judges": {n: ["tests/test_scaling.py", "-k", n] for n in scaling[1:]}}))
    assert exercises.graded_exercises(toy)[1][0] == (scaling[0], None)


@pytest.mark.parametrize("markexpr, kept", [("", 1), ("not slow", 1), ("slow", 1), ("course", 2), ("course or slow", 2)])
def test_course_marked_tests_run_only_when_the_m_expression_names_them(request, markexpr, kept):
    # the whole mutant table is opt-in: tests/conftest.py's hook deselects `course` tests unless -m
    # names the marker (-m itself then filters as usual); here on this test and the table's first
    table = [i for i in request.session.items if getattr(i, "originalname", None) == "test_every_mutant_is_caught_and_every_alternative_passes"]
    if not table:  # deselected in this run, as it should be: make the item again, the way collection does
        table = [pytest.Function.from_parent(request.node.parent, name="test_every_mutant_is_caught_and_every_alternative_passes[x]",
                                             callobj=test_every_mutant_is_caught_and_every_alternative_passes,
                                             originalname="test_every_mutant_is_caught_and_every_alternative_passes")]
    items, deselected = [request.node, table[0]], []
    config = type("Config", (), {"option": type("Option", (), {"markexpr": markexpr})(), "rootpath": ROOT,
                                 "hook": type("Hook", (), {"pytest_deselected": staticmethod(lambda items: deselected.extend(items))})()})()
    conftest = next(p for p in request.config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(ROOT / "tests" / "conftest.py"))
    conftest.pytest_collection_modifyitems(config, items)
    assert len(items) == kept and (kept == 2 or deselected == [table[0]])


def test_a_judged_tests_seed_does_not_fix_the_stream_of_the_tests_after_it(request):
    # tests/conftest.py seeds a judged test (a grade must be reproducible) inside `seeded`, which puts
    # the states back after it: the draws after it continue the run's own stream, as if no judge had run
    import random

    import numpy
    import torch

    conftest = next(p for p in request.config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(ROOT / "tests" / "conftest.py"))
    draw = lambda: (torch.rand(4).tolist(), numpy.random.rand(4).tolist(), [random.random() for _ in range(4)])
    before = torch.get_rng_state(), numpy.random.get_state(), random.getstate()
    undisturbed = draw()
    torch.set_rng_state(before[0]), numpy.random.set_state(before[1]), random.setstate(before[2])
    with conftest.seeded(1234):
        judged = draw()
    with conftest.seeded(1234):
        assert draw() == judged  # inside: the fixed seed, the same verdict on every run
    assert draw() == undisturbed  # after: the stream the test would have drawn without the judge


@pytest.fixture(scope="module")
def variant_runs(request):
    """Every selected variant's judge run."""
    return runs_of_selected(request, "test_every_mutant_is_caught_and_every_alternative_passes", "variant",
                            exercises.run_variant)


@pytest.mark.course
@pytest.mark.parametrize("variant", mutants.VARIANTS, ids=lambda v: f"{v.exercise}:{v.name}")
def test_every_mutant_is_caught_and_every_alternative_passes(variant_runs, variant):
    # the whole table of tests/mutants.py, one judge run per variant: tens of minutes on two cores,
    # far past CI's 10 minutes, so opt-in (`-m course`, README); FAST above keeps a subset in every run
    result = variant_runs[variant]
    assert result["ok"], f"{variant.exercise}: {variant.name}: {result['run'].summary()}\n{result['run'].output[-2000:]}"


# ---------------------------------------------------------------------------------------------
# The README says what the markers say


def test_readme_course_table_lists_each_exercise_target_and_judge():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using nanopretrain in a course", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if re.match(r"\|\s*\d+\s*\|", r)]
    assert len(rows) == len(EXERCISES)
    for row, e in zip(rows, EXERCISES):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert f"`{e.name}`" in cells[1], (row, e.name)
        assert all(f"`{t}`" in row for t in e.targets), (row, e.targets)
        assert f"`{e.command}`" in row, (row, e.command)


def test_readme_lists_the_sets_with_their_exercises_and_hours():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using nanopretrain in a course", 1)[1].split("\n## ", 1)[0]
    rows = {c[0].strip("` "): c for c in ([x.strip() for x in r.strip("|").split("|")] for r in section.splitlines()
                                          if r.startswith("| `") and "set" not in r[:8])}
    for name, members in exercises.SETS.items():
        assert name in rows, name
        assert all(f"`{m}`" in rows[name][1] for m in members), name
        assert rows[name][2] == str(exercises.SET_HOURS[name]), name
