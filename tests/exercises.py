"""
Course mode: turn a function into an exercise, and prove that its tests judge it.

The problem
-----------
A teacher wants to hand out nanopretrain with one piece missing (the attention, ZeRO's optimizer
step, the online softmax of the flash kernel) and let the tests say when a student's version is
right. That needs three things: a way to say which piece and which tests, a tool that blanks the
piece without breaking the file around it, and proof that the tests really fail without it (a test
that passes on an empty body judges nothing).

The markers (comments, so they change nothing when the code runs)
------------------------------------------------------------------
    # EXERCISE: attention (tests/test_model.py -k naive)
    def naive_attention(q, k, v, dropout_p: float = 0.0):
        \"\"\"softmax(Q K^T / sqrt(hs) + M) V ...\"\"\"      <- kept: the docstring is the assignment
        ...                                                <- replaced by raise NotImplementedError

  `# EXERCISE: <name> (<judge>)` on the line above a def (or above its decorators), or as the first
  line of its body: the exercise is the function's body. The signature and the docstring stay.
  `# EXERCISE BEGIN <name> (<judge>)` ... `# EXERCISE END <name>` inside a body: only the lines
  between the two are blanked (the raise takes the BEGIN line's indentation).
  <judge> is what follows `python -m pytest -q`: a test file and a -k selection. Every test it
  selects must check behaviour against an independent reference, never the shape of the code, so
  any correct solution passes; and every one must fail when the exercise is stripped (`check`).
  Several markers may share a name: one exercise over several functions (tensor parallelism's f
  and g are four small methods). The judge is written on one of them (or repeated identically).

The commands
------------
    python -m tests.exercises list                  every exercise: target, file:line, judge
    python -m tests.exercises strip NAME|TARGET...  blank them in place; FILE.py.orig keeps the original
    python -m tests.exercises strip ... --out DIR   write a stripped copy of the repository to DIR instead
    python -m tests.exercises restore               put every FILE.py.orig back (FILE.py.mine keeps yours)
    python -m tests.exercises check [NAME...]       in a temporary copy: the judge passes on the
                                                    original and every judging test fails stripped
    python -m tests.exercises mutants [NAME...]     each judge against plausible wrong answers (all must
                                                    fail it) and correct alternatives (all must pass),
                                                    from tests/mutants.py, each in a temporary copy
    python -m tests.exercises handout --out DIR --set NAME
                                                    a stripped copy for one assignment set, with
                                                    ASSIGNMENT.md (the task of each exercise, from its
                                                    docstring) and the command that grades it
    python -m tests.exercises grade [--json]        each exercise's score: tests of its judge passed /
                                                    tests selected (in a handout: its set only, with the
                                                    judges handout.json kept at hand-out time)
    python -m tests.exercises --root SUBMISSION grade --tests DIR
                                                    a teacher's grade: DIR (their own, untouched tests)
                                                    against the submission's sources

In place is the default because a student working alone strips one exercise, writes it and runs
its judge in the same tree; the .orig backup is written once (a second strip in the same file
keeps the first, true original) and `restore` (or `git checkout FILE.py`) undoes it, keeping the
edited file as FILE.py.mine. A teacher preparing a hand-out uses --out, which never touches the
working tree. (`python tests/exercises.py ...` works as well as `python -m tests.exercises ...`.)

Judging the judges: a judge that fails on `raise NotImplementedError` may still pass a wrong
answer. tests/mutants.py lists, per exercise, plausible wrong answers (mutants, each one mistake,
named for it) and correct answers written another way (alternatives); `mutants` applies each to a
temporary copy and runs the judge, which must fail on every mutant (at least one test, -x stops
there) and pass on every alternative (all tests). Its table's last line gives the totals.

Hand-outs: the exercises fall into the assignment sets of SETS (the README lists them with
SET_HOURS). `handout` copies the repository to a new directory, strips one set, leaves out
tests/mutants.py (its alternatives are solutions) and tests/test_course.py (which tests this tool
on the repository, with them), and writes ASSIGNMENT.md (each exercise's functions with their
docstrings, which are the task, and its judge) and handout.json (the set, its exercises and their
judges). `grade` run inside it scores each exercise of the set as the tests of its judge that pass
over those selected: 0 on a fresh hand-out (every judge fails stripped, as `check` proves), 1 when
the originals are put back; `--json` gives an autograder one object. The exercises and judges come
from handout.json, not from the markers, so a student who edits a marker's judge or deletes a
marker gains nothing; and since a student can edit tests/ too, a teacher grades with their own
copy: from the repository, `python -m tests.exercises --root SUBMISSION grade --tests tests` runs
the repository's tests (and its judges, for the set the submission's handout.json names) against
the submission's sources.

How: the markers are found with `tokenize` (a comment, never text inside a string), the function
they belong to with `ast` (exact first and last lines, decorators and multi-line signatures
included), and the result is parsed again before it is written, atomically (the top-level statements
that changed: `parse_changed`). What a file marks is found once per name and text and kept, since
`check`, `mutants` and the tests find it again in copy after identical copy.
"""

import argparse
import ast
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ("python", "-m", "pytest", "-q")  # a judge is this plus the marker's arguments
HANDOUT_FILE = "handout.json"  # written by `handout`: the set and its exercises, read by `grade`
# the README's reading order ("The files, in reading order"), which is also the suggested order of
# the exercises; other files follow alphabetically
COURSE_ORDER = ("model.py", "data.py", "train.py", "kernels.py", "scaling.py", "parallel.py")

# The assignment sets: each exercise in exactly one, in the order of `list` (a test checks both).
# Hours: a rough estimate of a student's time for the whole set, for a reader who knows PyTorch.
SETS = {
    "model": ("layernorm", "rmsnorm", "rope", "repeat-kv", "attention", "self-attention", "swiglu", "moe-router", "moe-loop",
              "sampling"),
    "data": ("minhash", "lsh", "gopher", "pii", "bpe-merge", "tokenizer"),
    "training": ("batch-sampler", "lr-schedule", "grad-accum", "checkpoint", "newton-schulz", "muon", "adamw",
                 "grad-clip"),
    "systems": ("flash-attention", "flash-backward", "cross-entropy", "fused-ce-chunk", "data-parallel", "zero",
                "zero3-gather", "tensor-parallel", "vocab-parallel-ce", "pipeline-1f1b", "ring-merge"),
    "scaling": ("chinchilla", "isoflop-fit", "chinchilla-fit"),
}
SET_HOURS = {"model": 7, "data": 6, "training": 6, "systems": 14, "scaling": 3}

FUNCTION_MARKER = re.compile(r"#\s*EXERCISE:\s*(?P<name>[\w-]+)\s*(?:\((?P<judge>.*)\))?\s*$")
BEGIN_MARKER = re.compile(r"#\s*EXERCISE BEGIN\s+(?P<name>[\w-]+)\s*(?:\((?P<judge>.*)\))?\s*$")
END_MARKER = re.compile(r"#\s*EXERCISE END\s+(?P<name>[\w-]+)\s*$")


@dataclass
class Region:
    """Lines first..last (1-based, inclusive) of one file, replaced by `raise NotImplementedError`."""
    path: Path
    target: str  # module.Class.method that holds the region
    marker: int  # the marker's line
    first: int
    last: int
    indent: str  # the raise's indentation
    keep: list = field(default_factory=list)  # lines re-emitted before the raise (a marker inside the range)
    stripped: bool = False  # already `raise NotImplementedError("exercise ...")`


@dataclass
class Exercise:
    name: str
    judge: list  # pytest arguments: a test file and -k EXPR
    regions: list

    @property
    def command(self) -> str:
        return shlex.join([*PYTEST, *self.judge])

    @property
    def targets(self) -> list:
        return list(dict.fromkeys(r.target for r in self.regions))  # in marker order, each once


# ----------------------------------------------------------------------------------------------
# Finding the exercises


def _markers(path: Path, source: str) -> list:
    """(line, kind, name, judge) of every marker comment in the source; kind is def, begin or end."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or not re.match(r"#\s*EXERCISE\b", tok.string):
            continue
        line = tok.start[0]
        for kind, pattern in (("def", FUNCTION_MARKER), ("begin", BEGIN_MARKER), ("end", END_MARKER)):
            m = pattern.match(tok.string)
            if m:
                judge = m.groupdict().get("judge")
                found.append((line, kind, m["name"], shlex.split(judge) if judge else None))
                break
        else:
            raise ValueError(f"{path.name}:{line}: cannot read the marker {tok.string!r}: write "
                             "'# EXERCISE: name (tests/test_x.py -k expr)', '# EXERCISE BEGIN name (...)' or '# EXERCISE END name'")
    return found


def _functions(tree: ast.Module, module: str) -> list:
    """(node, qualified name) of every function and method, nested ones included."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child, name))
                visit(child, name)
            else:
                visit(child, prefix)  # defs inside `if`/`try` blocks keep their parent's prefix

    visit(tree, module)
    return out


def _start(node) -> int:
    """A def's first line: its first decorator's, if it has any."""
    return min([d.lineno for d in node.decorator_list] + [node.lineno])


def _docstring(node):
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def _signature_end(lines: list, node) -> int:
    """The line of the colon that ends a def's signature (signatures may span lines)."""
    text = "".join(lines[node.lineno - 1:])
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            return node.lineno + tok.start[0] - 1
    raise ValueError(f"no end of signature found for the def on line {node.lineno}")


def _is_stripped(stmts: list) -> bool:
    """Is this body exactly the raise that strip() writes?"""
    if len(stmts) != 1 or not isinstance(stmts[0], ast.Raise) or not isinstance(stmts[0].exc, ast.Call):
        return False
    call = stmts[0].exc
    return (getattr(call.func, "id", None) == "NotImplementedError" and len(call.args) == 1
            and isinstance(call.args[0], ast.Constant) and str(call.args[0].value).startswith("exercise "))


def _innermost(functions: list, line: int):
    around = [(node, name) for node, name in functions if node.lineno < line <= node.end_lineno]
    return max(around, key=lambda f: f[0].lineno) if around else (None, None)


def _function_region(path, lines, functions, line) -> Region:
    """The region of a `# EXERCISE:` marker: the body of the def right below it, else of the def it is in."""
    nxt = line + 1  # the first line after the marker that is code, not a comment or blank
    while nxt <= len(lines) and (not lines[nxt - 1].strip() or lines[nxt - 1].lstrip().startswith("#")):
        nxt += 1
    below = [(node, name) for node, name in functions if _start(node) == nxt]
    node, name = below[0] if below else _innermost(functions, line)
    if node is None:
        raise ValueError(f"{path.name}:{line}: an '# EXERCISE:' marker must sit above a def or inside its body")
    doc = _docstring(node)
    header_end = doc.end_lineno if doc else _signature_end(lines, node)
    body = node.body[1:] if doc else node.body
    if not body:
        raise ValueError(f"{path.name}:{line}: {name} has nothing but a docstring to strip")
    if body[0].lineno <= header_end:
        raise ValueError(f"{path.name}:{line}: {name}'s body starts on its def line: move it to lines of its own")
    first, last = header_end + 1, node.end_lineno
    keep = [lines[line - 1]] if first <= line <= last else []
    return Region(path, name, line, first, last, " " * body[0].col_offset, keep, _is_stripped(body))


def _block_region(path, lines, functions, begin, end, name) -> Region:
    """The region between `# EXERCISE BEGIN` and `# EXERCISE END`."""
    node, target = _innermost(functions, begin)
    if node is None:
        raise ValueError(f"{path.name}:{begin}: an '# EXERCISE BEGIN' marker must be inside a function")
    indent = lines[begin - 1][: len(lines[begin - 1]) - len(lines[begin - 1].lstrip())]
    if end == begin + 1:
        raise ValueError(f"{path.name}:{begin}: nothing between EXERCISE BEGIN {name} and its END")
    try:
        stripped = _is_stripped(ast.parse("".join(l.strip() + "\n" for l in lines[begin:end - 1])).body)
    except SyntaxError:  # a part of a statement: not our raise
        stripped = False
    return Region(path, target, begin, begin + 1, end - 1, indent, [], stripped)


def file_exercises(path: Path) -> list:
    """(name, judge or None, Region) for every marker in one file, in line order."""
    return [(name, list(judge) if judge else judge, replace(region, path=path, keep=list(region.keep)))
            for name, judge, region in _exercises_in(path.name, path.read_text())]


# What a file's markers mark depends only on its name and its text, and finding it means tokenizing
# and parsing the whole file, the slowest thing this tool does outside the judges. `check`, `mutants`
# and the suite find the exercises of identical copies of the same files over and over (each judge
# in a copy of its own, each restore test in another), so it is found once per name and text;
# file_exercises hands out fresh copies (the copy's path, lists of their own), so no caller sees
# another's edits. A file whose markers are wrong raises each time: exceptions are not cached.
@functools.lru_cache(maxsize=64)
def _exercises_in(filename: str, source: str) -> tuple:
    path = Path(filename)  # messages name the file; the caller puts in the real path
    found = _markers(path, source)
    if not found:
        return ()
    lines = source.splitlines(keepends=True)
    functions = _functions(ast.parse(source, str(path)), path.stem)
    out, open_blocks = [], {}
    for line, kind, name, judge in found:
        if kind == "def":
            out.append((name, judge, _function_region(path, lines, functions, line)))
        elif kind == "begin":
            if name in open_blocks:
                raise ValueError(f"{path.name}:{line}: EXERCISE BEGIN {name} again before its END")
            open_blocks[name] = (line, judge)
        else:
            if name not in open_blocks:
                raise ValueError(f"{path.name}:{line}: EXERCISE END {name} without a BEGIN above it")
            begin, judge = open_blocks.pop(name)
            out.append((name, judge, _block_region(path, lines, functions, begin, line, name)))
    if open_blocks:
        name, (line, _) = next(iter(open_blocks.items()))
        raise ValueError(f"{path.name}:{line}: EXERCISE BEGIN {name} has no EXERCISE END")
    return tuple(out)


def source_files(root: Path) -> list:
    """The repository's top-level .py files, in the course's order."""
    rank = {name: i for i, name in enumerate(COURSE_ORDER)}
    return sorted(root.glob("*.py"), key=lambda p: (rank.get(p.name, len(rank)), p.name))


def find_exercises(root: Path = ROOT) -> list:
    """Every exercise marked in root's .py files, in the course's order (file, then line)."""
    regions, judges = {}, {}
    for path in source_files(root):
        for name, judge, region in file_exercises(path):
            regions.setdefault(name, []).append(region)
            if judge is not None:
                if judges.setdefault(name, judge) != judge:
                    raise ValueError(f"{path.name}:{region.marker}: exercise {name} has two different judges: "
                                     f"{shlex.join(judges[name])!r} and {shlex.join(judge)!r}")
    for name in regions:
        if name not in judges:
            r = regions[name][0]
            raise ValueError(f"{r.path.name}:{r.marker}: exercise {name} has no judge: write its tests in "
                             "parentheses after the name, e.g. '# EXERCISE: attention (tests/test_model.py -k naive)'")
    return [Exercise(name, judges[name], regions[name]) for name in regions]


def select(exercises: list, selectors: list) -> list:
    """(exercise, regions) for each selector: an exercise's name (all its regions) or a target (that one)."""
    chosen = []
    for s in selectors:
        by_name = [e for e in exercises if e.name == s]
        by_target = [(e, [r for r in e.regions if r.target == s]) for e in exercises if s in e.targets]
        if by_name:
            chosen.append((by_name[0], by_name[0].regions))
        elif by_target:
            chosen.extend(by_target)
        else:
            names = ", ".join(e.name for e in exercises) or "none"
            raise ValueError(f"no exercise is called or marks {s!r}: choose one of {names} (or a target that "
                             "`list` shows); to make a new one, put '# EXERCISE: name (judge)' above the def")
    return chosen


# ----------------------------------------------------------------------------------------------
# Stripping


def raise_line(exercise: Exercise, region: Region) -> str:
    message = f"exercise {exercise.name}: write {region.target}, then run: {exercise.command}"
    return f"{region.indent}raise NotImplementedError({message!r})\n"


@functools.lru_cache(maxsize=64)
def _statement_starts(source: str) -> tuple:
    """The first line of each top-level statement of source (a def's or class's first decorator's)."""
    return tuple(min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
                 for node in ast.parse(source).body)


def parse_changed(path: Path, before: str, after: str) -> None:
    """Raise SyntaxError (at after's line) unless after parses, where after is before (a file that
    parses) with some lines changed: a stripped exercise, a mutant.

    Only the top-level statements that hold changed lines are parsed, not the whole file again (a
    strip or a mutant changes a few lines of a file of thousands, and the suite applies hundreds of
    them). That is enough: the lines above and below them are unchanged top-level statements, and a
    top-level statement starts at column 0 with nothing open (no bracket, no string, no indented
    block), so whatever parses there alone parses between them. It is, if anything, stricter than
    parsing the whole file: a change that parses only together with the statement after it (a stray
    decorator or backslash, a string left open until the next docstring) is refused."""
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    if len(old) != before.count("\n") + (not before.endswith("\n")):  # a form feed or a lone \r: splitlines' lines
        ast.parse(after, str(path))  # are not the parser's, so the statements' lines cannot be trusted here
        return
    same = min(len(old), len(new))
    head = next((i for i in range(same) if old[i] != new[i]), same)  # lines unchanged at the top
    tail = next((i for i in range(same - head) if old[-1 - i] != new[-1 - i]), same - head)  # and at the bottom
    starts = _statement_starts(before)
    first = max([1, *(s for s in starts if s <= head + 1)])  # the statement the first changed line is in
    end = min([len(old) + 1, *(s for s in starts if s > len(old) - tail)])  # the statement after the last one
    try:
        ast.parse("".join(new[first - 1:end - 1 + len(new) - len(old)]), str(path))
    except SyntaxError as e:
        e.lineno = e.lineno + first - 1 if e.lineno else e.lineno
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write next to the file and rename over it: a reader sees the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    shutil.copymode(path, tmp)
    os.replace(tmp, path)


def strip(chosen: list, backup: bool = True) -> list:
    """Replace each chosen region by a raise; returns (exercise, region, what happened) lines."""
    report, by_file = [], {}
    for exercise, regions in chosen:
        for region in regions:
            if region.stripped:
                report.append((exercise, region, "already stripped"))
            elif all(region is not r for _, r in by_file.get(region.path, [])):
                by_file.setdefault(region.path, []).append((exercise, region))
    for path, items in by_file.items():
        before = path.read_text()
        lines = before.splitlines(keepends=True)
        for exercise, region in sorted(items, key=lambda item: -item[1].first):  # bottom up: earlier lines stay put
            lines[region.first - 1:region.last] = region.keep + [raise_line(exercise, region)]
        text = "".join(lines)
        try:
            parse_changed(path, before, text)
        except SyntaxError as e:  # a marker in an odd place; the file on disk is untouched
            raise ValueError(f"{path.name}: stripping would not parse (line {e.lineno}: {e.msg}); move the marker") from None
        orig = path.with_name(path.name + ".orig")
        if backup and not orig.exists():
            shutil.copy2(path, orig)
        write_atomic(path, text)
        report += [(e, r, f"stripped {path.name}:{r.first}-{r.last}") for e, r in items]
    return report


def restore(root: Path = ROOT) -> list:
    """Move every FILE.py.orig back over FILE.py, keeping FILE.py as FILE.py.mine (a student's
    solution is not lost); returns the files restored."""
    restored = []
    for orig in sorted(root.glob("*.py.orig")):
        path = orig.with_name(orig.name[: -len(".orig")])
        if path.exists():
            shutil.copy2(path, path.with_name(path.name + ".mine"))
        os.replace(orig, path)
        restored.append(path.name)
    return restored


def copy_sources(src: Path, dst: Path) -> None:
    """What a student (or a judge) needs: the top-level sources and settings, and tests/*.py."""
    (dst / "tests").mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix in (".py", ".ini", ".md", ".txt", ".toml", ".cfg"):
            shutil.copy2(path, dst / path.name)
    for path in (src / "tests").glob("*.py"):
        shutil.copy2(path, dst / "tests" / path.name)


# ----------------------------------------------------------------------------------------------
# Judging


@dataclass
class JudgeRun:
    returncode: int
    counts: dict  # passed, failed, error, skipped, ... from pytest's summary line
    seconds: float
    output: str

    def summary(self) -> str:
        shown = ", ".join(f"{n} {k}" for k, n in self.counts.items() if k != "deselected") or f"exit {self.returncode}"
        return f"{shown} ({self.seconds:.1f} s)"


def summary_counts(stdout: str) -> dict:
    """pytest -q's last line, '3 failed, 1 passed, 19 deselected in 1.75s', as a dict."""
    for line in reversed(stdout.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", line)
        if found and re.search(r"\bin [\d.]+s", line):
            return {("error" if kind.startswith("error") else kind): int(n) for n, kind in found}
    return {}


def run_judge(exercise: Exercise, cwd: Path, timeout: float = 600, extra=("--tb=line",)) -> JudgeRun:
    """The judge's command, run in cwd with this interpreter. --tb=line: one line per failure
    (the NotImplementedError and its message) halves the time of a judge whose tests all fail."""
    cmd = [sys.executable, *PYTEST[1:], *exercise.judge, *extra]
    start = time.perf_counter()
    # no bytecode written (a variant edited within the second, at the same size, would load the old one's),
    # and no third-party pytest plugins (hypothesis and others, when installed, cost ~2 s a start)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "NANOPRETRAIN_JUDGE": "1",
                               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    return JudgeRun(proc.returncode, summary_counts(proc.stdout), time.perf_counter() - start, proc.stdout + proc.stderr)


def judged_pass(run: JudgeRun) -> bool:
    """Every selected test passed (and at least one ran: a judge that skips everything judges nothing)."""
    return run.returncode == 0 and run.counts.get("passed", 0) > 0 and not run.counts.get("failed")


def judged_fail(run: JudgeRun) -> bool:
    """Every selected test failed: none passed, none errored in collection (the stripped file still imports)."""
    return (run.returncode == 1 and run.counts.get("failed", 0) > 0 and not run.counts.get("passed")
            and not run.counts.get("error"))


def check_one(name: str, root: Path = ROOT, original: bool = True) -> dict:
    """In a temporary copy of root: the judge on the original (if asked), then on the stripped copy."""
    with tempfile.TemporaryDirectory(prefix=f"exercise-{name}-") as tmp:
        copy = Path(tmp)
        copy_sources(root, copy)
        exercises = find_exercises(copy)
        exercise = next(e for e in exercises if e.name == name)
        result = {"name": name, "exercise": exercise}
        if original:
            result["original"] = run_judge(exercise, copy)
        strip(select(exercises, [name]), backup=False)
        result["stripped"] = run_judge(exercise, copy)
    result["ok"] = judged_fail(result["stripped"]) and (not original or judged_pass(result["original"]))
    return result


# ----------------------------------------------------------------------------------------------
# Mutants: plausible wrong answers every judge must reject, correct alternatives it must accept


def apply_variant(variant, root: Path, exercises_found: list) -> None:
    """Write one variant of tests/mutants.py into the copy at root: its text edits (each `old` must
    occur exactly once in the file, on lines of the exercise's regions: a mutant is a mistake in the
    exercise, not elsewhere) and its bodies (a target's whole region replaced). Parsed before written:
    a variant that does not parse leaves the files as they were."""
    exercise = next((e for e in exercises_found if e.name == variant.exercise), None)
    if exercise is None:
        raise ValueError(f"mutant {variant.name}: no exercise {variant.exercise!r}")
    originals = {}  # path -> its text before the variant
    for file, old, new in variant.edits:  # checked against the original lines, before anything moves them
        text = originals.setdefault(root / file, (root / file).read_text())
        if text.count(old) != 1:
            raise ValueError(f"mutant {variant.name}: {old!r} occurs {text.count(old)} times in {file}, not once")
        line = text[:text.index(old)].count("\n") + 1
        if not any(r.path.name == file and r.first <= line <= r.last for r in exercise.regions):
            raise ValueError(f"mutant {variant.name}: {file}:{line} is outside exercise {exercise.name}")
    by_file = {}
    for target, code in variant.bodies:
        region = next((r for r in exercise.regions if r.target == target), None)
        if region is None:
            raise ValueError(f"mutant {variant.name}: {target} is not a target of exercise {exercise.name}")
        by_file.setdefault(region.path, []).append((region, code))
    texts = {}  # path -> its text with the variant
    for path, items in by_file.items():
        lines = originals.setdefault(path, path.read_text()).splitlines(keepends=True)
        for region, code in sorted(items, key=lambda item: -item[0].first):
            body = [(region.indent + l if l.strip() else "\n") for l in textwrap.dedent(code).strip("\n").splitlines(True)]
            body[-1] = body[-1].rstrip("\n") + "\n"
            lines[region.first - 1:region.last] = region.keep + body
        texts[path] = "".join(lines)
    for file, old, new in variant.edits:
        text = texts.get(root / file, originals[root / file])
        if text.count(old) != 1:  # an earlier edit of the same variant made it ambiguous
            raise ValueError(f"mutant {variant.name}: {old!r} occurs {text.count(old)} times in {file} after the edits before it")
        texts[root / file] = text.replace(old, new)
    for path, text in texts.items():
        try:
            parse_changed(path, originals[path], text)
        except SyntaxError as e:
            raise ValueError(f"mutant {variant.name}: {path.name} does not parse (line {e.lineno}: {e.msg})") from None
    for path, text in texts.items():
        path.write_text(text)


def run_variant(variant, root: Path = ROOT) -> dict:
    """One variant in a temporary copy: a mutant is caught when a test of the judge fails (-x: the
    first failure is enough); an alternative passes when every test of the judge passes."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{variant.exercise}-") as tmp:
        copy = Path(tmp)
        copy_sources(root, copy)
        found = find_exercises(copy)
        apply_variant(variant, copy, found)
        exercise = next(e for e in found if e.name == variant.exercise)
        extra = ("--tb=line",) if variant.correct else ("--tb=line", "-x")
        run = run_judge(exercise, copy, extra=extra)
    ok = judged_pass(run) if variant.correct else (run.counts.get("failed", 0) > 0 and not judged_pass(run))
    return {"variant": variant, "run": run, "ok": ok}


def load_variants(names=(), fast: bool = False, only=()) -> list:
    """The variants of tests/mutants.py (imported here only: a handout has no mutants file)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mutants

    chosen = [v for v in mutants.VARIANTS if (not names or v.exercise in names)]
    if fast:
        chosen = [v for v in chosen if (v.exercise, v.name) in mutants.FAST]
    if only:
        chosen = [v for v in chosen if v.name in only]
    return chosen


WIDTHS = (18, 40)  # the table's exercise and variant columns


def variant_header() -> str:
    return f"{'exercise':{WIDTHS[0]}}  {'variant':{WIDTHS[1]}}  {'kind':11}  {'result':8}  judge"


def variant_row(r: dict) -> str:
    v = r["variant"]
    kind = "alternative" if v.correct else "mutant"
    result = ("passes" if r["ok"] else "FAILS") if v.correct else ("caught" if r["ok"] else "MISSED")
    return f"{v.exercise:{WIDTHS[0]}}  {v.name:{WIDTHS[1]}}  {kind:11}  {result:8}  {r['run'].summary()}"


def variant_totals(results: list) -> str:
    mutants_ = [r for r in results if not r["variant"].correct]
    alternatives = [r for r in results if r["variant"].correct]
    return (f"mutants caught: {sum(r['ok'] for r in mutants_)}/{len(mutants_)}; alternatives passing: "
            f"{sum(r['ok'] for r in alternatives)}/{len(alternatives)}; exercises: "
            f"{len({r['variant'].exercise for r in results})}")


# ----------------------------------------------------------------------------------------------
# Hand-outs and grading


def set_of(name: str) -> str | None:
    return next((s for s, names in SETS.items() if name in names), None)


def assignment_text(set_name: str, chosen: list, originals: dict) -> str:
    """ASSIGNMENT.md: per exercise its functions (with their docstrings, the task) and its judge."""
    out = [f"# Assignment set `{set_name}` (about {SET_HOURS[set_name]} hours)\n",
           "Each exercise below is a function (or a few) whose body was replaced by `raise NotImplementedError`.",
           "Write it so that its judge passes; the docstring above the raise is the specification, the",
           "module's opening essay the background. Work in the order given: a few judges use an earlier exercise.\n",
           "Grade everything: `python -m tests.exercises grade` (add `--json` for a machine-readable score).\n"]
    for i, e in enumerate(chosen, 1):
        out.append(f"## {i}. `{e.name}`\n")
        for target in e.targets:
            region = next(r for r in e.regions if r.target == target)
            doc = originals.get(target) or "(no docstring: read the comments around it and the module's essay)"
            out.append(f"- write `{target}` ({region.path.name}, line {region.marker})")
            out.append("\n".join("  > " + l if l.strip() else "  >" for l in doc.splitlines()) + "\n")
        out.append(f"Judge: `{e.command}`\n")
    return "\n".join(out)


def docstrings(exercises_found: list) -> dict:
    """target -> its function's docstring, read from the files before stripping."""
    out = {}
    for e in exercises_found:
        for r in e.regions:
            tree = ast.parse(r.path.read_text())
            for node, name in _functions(tree, r.path.stem):
                if name == r.target:
                    out[name] = ast.get_docstring(node)
            if not out.get(r.target) and r.target.count(".") == 2:  # none: the enclosing class's or function's
                parent = r.target.split(".")[1]
                node = next((n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == parent), None)
                out[r.target] = ast.get_docstring(node) if node is not None else None
    return out


def make_handout(root: Path, out: Path, set_name: str) -> list:
    if set_name not in SETS:
        raise ValueError(f"no set {set_name!r}: choose one of {', '.join(SETS)}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: name a new directory")
    copy_sources(root, out)
    (out / "tests" / "mutants.py").unlink(missing_ok=True)  # its alternatives are solutions
    (out / "tests" / "test_course.py").unlink(missing_ok=True)  # tests the course tool on the repository; imports mutants
    found = find_exercises(out)
    chosen = [e for e in found if e.name in SETS[set_name]]
    originals = docstrings(chosen)
    strip([(e, e.regions) for e in chosen], backup=False)
    (out / "ASSIGNMENT.md").write_text(assignment_text(set_name, chosen, originals))
    # the judges are written down now: `grade` runs these, not whatever the markers say by then
    handout = {"set": set_name, "exercises": [e.name for e in chosen], "judges": {e.name: e.judge for e in chosen}}
    (out / HANDOUT_FILE).write_text(json.dumps(handout, indent=1) + "\n")
    return chosen


def score(run: JudgeRun) -> tuple:
    """(tests passed, tests selected) of one judge run; a run that collected nothing scores 0/1."""
    passed = run.counts.get("passed", 0)
    total = passed + run.counts.get("failed", 0) + run.counts.get("error", 0)
    return passed, max(total, 1)


def graded_exercises(root: Path, tests: Path | None = None) -> tuple:
    """(set name or None, [(name, judge or None)]) that `grade` scores. A hand-out's handout.json fixes them at
    hand-out time, so an edited or deleted marker changes nothing; with --tests DIR (a teacher's own
    tests), the judges come from DIR's side: the handout.json beside DIR, else the markers of the
    repository DIR belongs to, for the set the submission's handout.json names."""
    handout = json.loads((root / HANDOUT_FILE).read_text()) if (root / HANDOUT_FILE).exists() else None
    set_name = handout["set"] if handout else None
    if tests is not None:
        teacher = tests.resolve().parent
        if (teacher / HANDOUT_FILE).exists():
            handout = json.loads((teacher / HANDOUT_FILE).read_text())
            set_name = handout["set"]
        else:
            if set_name is not None and set_name not in SETS:
                raise ValueError(f"the submission's {HANDOUT_FILE} names no known set ({set_name!r})")
            names = SETS[set_name] if set_name else None
            judged = [(e.name, e.judge) for e in find_exercises(teacher) if names is None or e.name in names]
            if not judged:
                raise ValueError(f"--tests {tests}: no {HANDOUT_FILE} beside it and no exercise marked in {teacher}: "
                                 "name the tests folder of the repository or of a pristine hand-out")
            return set_name, judged
    if handout and "judges" in handout:  # every exercise of the set: one gone from the file scores 0 (judge None)
        names = list(dict.fromkeys([*SETS.get(set_name, ()), *handout["exercises"]]))
        return set_name, [(name, handout["judges"].get(name)) for name in names]
    found = find_exercises(root)  # no hand-out (or one written before the judges were kept): the markers
    names = handout["exercises"] if handout else [e.name for e in found]
    return set_name, [(e.name, e.judge) for e in found if e.name in names]


def grade(root: Path, jobs: int = 2, tests: Path | None = None) -> dict:
    """Each exercise's judge run in root (with --tests: in a copy of root's sources with DIR as
    tests/): its tests passed over those selected. An exercise whose markers are gone from the
    submission is still judged (its code is what the judge tests); `marked` says it is gone."""
    if tests is not None and not tests.is_dir():
        raise ValueError(f"--tests {tests} is not a directory")
    set_name, judged = graded_exercises(root, tests)
    try:
        marked = {e.name for e in find_exercises(root)}
    except ValueError:  # markers the tool cannot read: the judges still run
        marked = set()
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        where = root
        if tests is not None:
            where = Path(tmp)
            copy_sources(root, where)
            shutil.rmtree(where / "tests")
            shutil.copytree(tests, where / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            runs = list(pool.map(lambda nj: nj[1] and run_judge(Exercise(nj[0], nj[1], []), where, extra=("--tb=no",)), judged))
    scores = {}
    for (name, judge), run in zip(judged, runs):
        passed, total = score(run) if run else (0, 1)  # no judge kept for it: 0
        scores[name] = {"passed": passed, "total": total, "score": passed / total,
                        "judge": shlex.join([*PYTEST, *judge]) if judge else None, "marked": name in marked}
    mean = sum(s["score"] for s in scores.values()) / max(1, len(scores))
    return {"set": set_name, "exercises": scores, "score": mean, "tests": str(tests) if tests else None}


# ----------------------------------------------------------------------------------------------
# The command line


def where(region: Region) -> str:
    return f"{region.path.name}:{region.marker}"


def cmd_list(args) -> int:
    exercises = find_exercises(args.root)
    if not exercises:
        print("no exercises marked: put '# EXERCISE: name (tests/test_x.py -k expr)' above a def")
    for i, e in enumerate(exercises, 1):
        print(f"{i:2d}. {e.name}")
        for target in e.targets:
            region = next(r for r in e.regions if r.target == target)
            print(f"      {target}  ({where(region)}){'  [stripped]' if region.stripped else ''}")
        print(f"      judge: {e.command}")
    return 0


def cmd_strip(args) -> int:
    root = args.root
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} exists and is not empty: name a new directory")
        copy_sources(root, out)
        root = out
    exercises = find_exercises(root)
    report = strip(select(exercises, args.selectors), backup=args.out is None)
    for exercise, region, what in report:
        print(f"{exercise.name}: {region.target}: {what}")
    for exercise in dict.fromkeys(e.name for e, _, _ in report):  # each exercise's judge, once
        print(f"judge of {exercise}: {next(e for e in exercises if e.name == exercise).command}")
    if args.out is not None:
        print(f"stripped copy in {root}; the working tree is untouched")
    else:
        print("originals kept as FILE.py.orig; undo with: python -m tests.exercises restore")
    return 0


def cmd_restore(args) -> int:
    restored = restore(args.root)
    if restored:
        print(f"restored {', '.join(restored)}; the stripped or edited versions are kept as FILE.py.mine")
    else:
        print("nothing to restore: no FILE.py.orig here")
    return 0


def cmd_check(args) -> int:
    exercises = find_exercises(args.root)
    names = args.names or [e.name for e in exercises]
    select(exercises, names)  # unknown names: one line, before any work
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda n: check_one(n, args.root, original=not args.stripped_only), names))
    width = max(len(n) for n in names)
    for r in results:
        original = r["original"].summary() if "original" in r else "-"
        print(f"{r['name']:{width}}  original: {original:28}  stripped: {r['stripped'].summary():28}  "
              f"{'ok' if r['ok'] else 'WRONG'}")
    bad = [r for r in results if not r["ok"]]
    for r in bad:
        print(f"\n--- {r['name']}: {r['exercise'].command}")
        for key in ("original", "stripped"):
            if key in r:
                print(f"[{key}]\n" + "\n".join(r[key].output.strip().splitlines()[-15:]))
    return 1 if bad else 0


def cmd_mutants(args) -> int:
    variants = load_variants(args.names, args.fast, args.variant or ())
    known = {e.name for e in find_exercises(args.root)}
    unknown = sorted(set(args.names) - known)
    if unknown:
        raise ValueError(f"no exercise called {', '.join(unknown)}: `list` shows them")
    if not variants:
        raise ValueError("no mutants for these exercises in tests/mutants.py")
    results = []
    print(variant_header(), flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(lambda v: run_variant(v, args.root), variants):  # rows in order, as they finish
            results.append(r)
            print(variant_row(r), flush=True)
    print(variant_totals(results))
    bad = [r for r in results if not r["ok"]]
    for r in bad:
        v = r["variant"]
        print(f"\n--- {v.exercise}: {v.name} ({'alternative' if v.correct else 'mutant'})")
        print("\n".join(r["run"].output.strip().splitlines()[-8:]))
    return 1 if bad else 0


def cmd_handout(args) -> int:
    out = Path(args.out).resolve()
    chosen = make_handout(args.root, out, args.set)
    print(f"set {args.set}: {len(chosen)} exercises stripped in {out}: {', '.join(e.name for e in chosen)}")
    print(f"the tasks: {out / 'ASSIGNMENT.md'}; grade with: cd {shlex.quote(str(out))} && python -m tests.exercises grade")
    return 0


def cmd_grade(args) -> int:
    result = grade(args.root, args.jobs, Path(args.tests) if args.tests else None)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    width = max([len(n) for n in result["exercises"]] + [8])
    for name, s in result["exercises"].items():
        gone = "" if s["marked"] else "  (its marker is gone from the sources; judged all the same)"
        print(f"{name:{width}}  {s['passed']:3d}/{s['total']:<3d}  {100 * s['score']:5.1f}%{gone}")
    print(f"{'score':{width}}  {100 * result['score']:.1f}% (mean over {len(result['exercises'])} exercises)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.exercises", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: the one this file is in)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every exercise: its target, file:line and judge command")
    s = sub.add_parser("strip", help="replace exercises' bodies by raise NotImplementedError")
    s.add_argument("selectors", nargs="+", metavar="NAME|TARGET", help="an exercise's name, or one target (model.CausalSelfAttention.forward)")
    s.add_argument("--out", help="write a stripped copy of the repository here (a new directory); the working tree is untouched")
    sub.add_parser("restore", help="put every FILE.py.orig written by strip back (FILE.py.mine keeps the edited file)")
    c = sub.add_parser("check", help="prove each judge: it passes on the original and every judging test fails stripped")
    c.add_argument("names", nargs="*", help="exercises to check (default: all)")
    c.add_argument("--jobs", type=int, default=2, help="judges run at once (default 2)")
    c.add_argument("--stripped-only", action="store_true", help="skip the run on the original (the main suite covers it)")
    m = sub.add_parser("mutants", help="each judge against the wrong answers and correct alternatives of tests/mutants.py")
    m.add_argument("names", nargs="*", help="exercises (default: all)")
    m.add_argument("--jobs", type=int, default=2, help="judges run at once (default 2)")
    m.add_argument("--fast", action="store_true", help="only the fixed fast subset the test suite runs (mutants.FAST)")
    m.add_argument("--variant", action="append", help="only the variant of this name (repeatable)")
    h = sub.add_parser("handout", help="a stripped copy for one assignment set, with ASSIGNMENT.md and the grading command")
    h.add_argument("--out", required=True, help="a new directory")
    h.add_argument("--set", required=True, choices=list(SETS), help="the assignment set")
    g = sub.add_parser("grade", help="score per exercise: its judge's tests passed / selected")
    g.add_argument("--json", action="store_true", help="one JSON object, for an autograder")
    g.add_argument("--jobs", type=int, default=2, help="judges run at once (default 2)")
    g.add_argument("--tests", help="a teacher's own tests directory, run against the submission's sources "
                   "(judges from the handout.json beside it, else from its repository's markers)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"list": cmd_list, "strip": cmd_strip, "restore": cmd_restore, "check": cmd_check,
                "mutants": cmd_mutants, "handout": cmd_handout, "grade": cmd_grade}
    try:
        return commands[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
