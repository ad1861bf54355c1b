"""
Data: from raw text to batches of token ids.

A language model is pretrained on a *corpus*: a large collection of documents
(web pages, books, source code) that the model learns to continue, one token
at a time. This chapter turns such a corpus into the (x, y) batches that the
training loop consumes, where y is x shifted left by one token:

    loss = -(1 / (B*T)) * sum_{b,t} log p(y[b, t] | x[b, :t+1])

The path a document takes, and the seam where each later stage plugs in:

    read_documents -> (later: clean, dedup, filter, mix) -> tokenize
                   -> token files (train.bin, val.bin) -> TokenSampler -> (x, y)

The corpus. With no download allowed, the default corpus is the one every
Python installation carries: the standard library's source code (domain
"code") and its docstrings plus the pydoc topic pages (domain "prose"), a few
tens of MB in all. Two domains let a later chapter study data mixing; `--data`
also accepts a .txt file or a directory of them.

Tokenize once. Tokenizing is slow compared with a training step, so, as in
nanoGPT's prepare.py, we tokenize the corpus once and write the ids as a flat
binary array (train.bin, val.bin) that training opens with np.memmap: the OS
pages in only the windows a batch touches, so a corpus larger than RAM works.
The ids are stored as uint16 when the vocabulary fits (V <= 65536) and uint32
otherwise; the choice is written in manifest.json and checked on load, since
ids silently wrapping around in uint16 is a known failure (datatrove #118).
Documents are separated by an end-of-text token (EOT) so the model learns
where one document ends and the next, unrelated one begins (GPT-2 does this).

Byte-level BPE (Sennrich, Haddow, Birch 2016, "Neural Machine Translation of
Rare Words with Subword Units", arXiv:1508.07909; made byte-level by GPT-2,
Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").
Start from the 256 single bytes, so every string is encodable and nothing is
ever "unknown". Then repeat: find the most frequent adjacent pair of tokens in
the training text and merge it into a new token, until the vocabulary has V
entries. Text is first split into pre-tokens by a regular expression (words,
numbers, punctuation runs, whitespace), and merges never cross a pre-token
boundary, so " the" can become one token but "e t" never does. Encoding
replays the merges, lowest rank first; we hand the result to tiktoken, whose
Rust encoder does that fast.

Bits per byte. A loss in nats per token depends on the tokenizer: a larger
vocabulary packs more bytes into each token and so has a larger per-token
loss for the same model quality. Dividing the total loss by the number of raw
UTF-8 bytes gives a tokenizer-independent number (nanochat reports
validation this way):

    bpb = (loss_nats_per_token * n_tokens) / (n_bytes * ln 2)

An epoch-aware sampler. nanoGPT draws random windows with replacement, which
repeats some data and skips other data within an "epoch" (nanoGPT #294). Our
TokenSampler cuts the token stream into non-overlapping windows, visits them
in a fresh random permutation each epoch, splits that permutation between
data-parallel ranks, and keeps its position in a state dict that the
checkpoint stores, so a resumed run sees exactly the batches it would have.

Not in this chapter: exact and near deduplication, quality filters, domain
mixing weights and a sharded streaming loader for corpora of terabytes; a
later chapter inserts them at the seams above without changing the files'
format.

Map of the file, in reading order:
    EOT, PATTERN                 the end-of-text token and the pre-tokenizer
    stdlib_corpus, read_documents    documents from the stdlib or from files
    train_bpe                    byte-level BPE with incremental pair counts
    save_tokenizer, load_tokenizer_file, get_tokenizer
    prepare, load_prepared       tokenize once into train.bin / val.bin
    TokenSampler                 epoch-aware, rank-aware, resumable batches
    bits_per_byte                tokenizer-independent loss
    main                         `python data.py prepare ...`
"""

import argparse
import ast
import base64
import hashlib
import heapq
import json
import math
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import Counter
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
# cache key, so old caches are ignored instead of misread.
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------

# Directories of the stdlib that are not the library itself: installed
# packages, test suites (huge and repetitive), the IDLE app, the deprecated
# 2to3 tool, turtle demos, and pydoc_data (the topics, already in "prose").
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib",
              "lib2to3", "turtledemo", "pydoc_data", "__pycache__"}


def _stdlib_sources():
    """Yield (relative path, source, parsed module) for each stdlib .py file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    for rel in paths:
        if _SKIP_DIRS.intersection(rel.split("/")[:-1]):
            continue
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
    from pydoc_data.topics import topics  # the text behind help("with") etc.
    for name in sorted(topics):
        if topics[name].strip():
            yield topics[name], "prose", f"pydoc_data.topics:{name}"


def stdlib_corpus(domains=("code", "prose"), max_bytes: int | None = None) -> list[tuple[str, str, str]]:
    """The embedded default corpus: (text, domain, source) documents from the installed stdlib.

    "code" is each .py file's source; "prose" is each module's docstrings (one
    document per module) plus each pydoc topic. max_bytes caps the UTF-8
    bytes per domain. Deterministic, and never downloads anything.
    """
    generators = {"code": lambda: ((src, "code", rel) for rel, src, _ in _stdlib_sources()),
                  "prose": _stdlib_prose}
    unknown = set(domains) - set(generators)
    if unknown:
        raise ValueError(f"unknown stdlib domain(s) {sorted(unknown)}: use 'code' and/or 'prose'")
    # The generators are lazy, so a small max_bytes stops parsing early.
    return [doc for d in domains for doc in _capped(generators[d](), max_bytes)]


def _split_text_file(text: str) -> list[str]:
    """Documents of one text file: blocks separated by two empty lines, else ~100 chunks."""
    blocks = [b for b in regex.split(r"\n[ \t]*\n[ \t]*\n\s*", text) if b.strip()]
    if len(blocks) > 1:
        return blocks
    # One block: cut it at line boundaries into ~100 pieces, so that a
    # document-level train/val split still has something to hold out.
    lines = text.splitlines(keepends=True)
    target = max(1, len(text) // 100)
    chunks, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= target:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return [c for c in chunks if c.strip()]


def read_documents(data: str, max_bytes: int | None = None) -> list[tuple[str, str, str]]:
    """(text, domain, source) documents from "stdlib[:code|:prose]", a .txt file or a directory of them."""
    if data == "stdlib" or data.startswith("stdlib:"):
        domains = ("code", "prose") if data == "stdlib" else (data.split(":", 1)[1],)
        return stdlib_corpus(domains, max_bytes)
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data path '{data}' does not exist: pass --data stdlib or a path "
                         "to a .txt file or a directory of .txt files")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        docs = [(f.read_text(encoding="utf-8", errors="replace"), "text",
                 f.relative_to(path).as_posix()) for f in files]
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [(t, "text", f"{path.name}#{i}") for i, t in enumerate(_split_text_file(text))]
    docs = list(_capped((d for d in docs if d[0].strip()), max_bytes))
    if not docs:
        raise ValueError(f"no text found in '{data}': it needs non-empty .txt content")
    return docs


# ---------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------

def _word_counts(texts, max_train_bytes: int) -> Counter:
    """Count unique pre-tokens (as bytes) over the texts, up to max_train_bytes of text."""
    counts, seen = Counter(), 0
    for text in texts:
        if seen >= max_train_bytes:
            break
        text = text.encode("utf-8")[: max_train_bytes - seen].decode("utf-8", "ignore")
        seen += len(text.encode("utf-8"))
        counts.update(regex.findall(PATTERN, text))
    return Counter({w.encode("utf-8"): c for w, c in counts.items()})


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


def train_bpe(texts, vocab_size: int, max_train_bytes: int = 2_000_000) -> tiktoken.Encoding:
    """Byte-level BPE (Sennrich et al. 2016) trained on texts; ids 0..V-2 are tokens, V-1 is EOT.

    The naive trainer recounts every pair after each merge: O(merges * corpus).
    Here only the words that contain the merged pair are recounted, and a
    max-heap with lazy deletion finds the next pair. Ties go to the smallest
    pair of byte strings, so the result does not depend on dict order.
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
    """Write text to path through a temporary file, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """tiktoken's GPT-2 encoding, failing within seconds (not a long hang) when offline."""
    if not _gpt2_cached():
        try:  # tiktoken's download has no timeout, so probe the host first
            socket.create_connection(("openaipublic.blob.core.windows.net", 443), timeout=5).close()
        except OSError:
            raise ValueError(_GPT2_MISSING) from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ValueError(_GPT2_MISSING) from e


def get_tokenizer(name: str, texts=None, vocab_size: int = 4096) -> tiktoken.Encoding:
    """"bytes" (V=257), "bpe" (trained on texts, V=vocab_size) or "gpt2" (V=50257)."""
    if name == "bytes":
        # 256 single-byte ranks and no merges: one token per UTF-8 byte.
        return tiktoken.Encoding(name="bytes", pat_str=PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: 256})
    if name == "bpe":
        if texts is None:
            raise ValueError("the bpe tokenizer needs texts to train on: pass texts=[...]")
        return train_bpe(texts, vocab_size)
    if name == "gpt2":
        return _gpt2_encoding()
    raise ValueError(f"unknown tokenizer '{name}': use bytes, bpe or gpt2")


# ---------------------------------------------------------------------------
# Tokenize once: train.bin, val.bin, manifest.json
# ---------------------------------------------------------------------------

def _cache_key(config: dict) -> str:
    """A readable prefix plus a short hash of everything that changes the output."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    stem = regex.sub(r"[^A-Za-z0-9]+", "_", Path(config["data"]).name or "data").strip("_")
    return f"{stem}-{config['tokenizer']}{config['vocab_size']}-{digest}"


def _split_documents(n_docs: int, val_fraction: float, seed: int):
    """Document indices for (train, val): a seeded shuffle, the first ceil(f*n) go to val."""
    if n_docs < 2:
        raise ValueError(f"found {n_docs} document(s), need at least 2 for a train/val split: add more data")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, math.ceil(val_fraction * n_docs)), n_docs - 1)
    return order[n_val:], order[:n_val]


def _write_tokens(path: Path, enc, texts: list[str], dtype: str) -> int:
    """Encode texts in batches, EOT after each, append to a raw binary file; return the token count."""
    n_tokens, batch = 0, 512  # batches keep memory flat on large corpora
    with open(path, "wb") as f:
        for start in range(0, len(texts), batch):
            encoded = enc.encode_ordinary_batch(texts[start:start + batch])  # multithreaded in Rust
            ids = [t for doc in encoded for t in (*doc, enc.eot_token)]
            np.asarray(ids, dtype=dtype).tofile(f)
            n_tokens += len(ids)
    return n_tokens


def prepare(data: str = "stdlib", tokenizer: str = "bpe", vocab_size: int = 4096,
            out_dir: str = "data_cache", val_fraction: float = 0.05,
            max_bytes: int | None = None, seed: int = 0, verbose: bool = True) -> dict:
    """Tokenize a corpus once into <out_dir>/<key>/ and return its manifest (plus "dir")."""
    log = print if verbose else (lambda *a, **k: None)
    is_path = not (data == "stdlib" or data.startswith("stdlib:"))
    config = {"data": os.path.abspath(data) if is_path else data, "tokenizer": tokenizer,
              "vocab_size": vocab_size, "val_fraction": val_fraction,
              "max_bytes": max_bytes, "seed": seed, "format": FORMAT_VERSION}
    final = Path(out_dir).resolve() / _cache_key(config)
    if (final / "manifest.json").exists():
        try:
            manifest, _ = load_prepared(final)
            if manifest.get("config") == config:
                log(f"reusing {final}")
                return manifest
        except ValueError:
            pass  # corrupt or stale: prepare again below
    t0 = time.time()
    docs = read_documents(data, max_bytes)
    log(f"read {len(docs)} documents from {data} in {time.time() - t0:.1f} s")
    train_idx, val_idx = _split_documents(len(docs), val_fraction, seed)
    splits = {"train": [docs[i] for i in train_idx], "val": [docs[i] for i in val_idx]}

    t0 = time.time()
    # BPE sees only the training documents, so val measures unseen text.
    enc = get_tokenizer(tokenizer, [d[0] for d in splits["train"]], vocab_size)
    log(f"tokenizer {enc.name} ready in {time.time() - t0:.1f} s (vocab {enc.n_vocab})")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); the cache is meant to be shared
    try:
        manifest = _write_prepared(tmp, enc, splits, config)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the directory appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {manifest['train_tokens']:,} train and {manifest['val_tokens']:,} val tokens to {final}")
    return {**manifest, "dir": str(final)}


def _write_prepared(tmp: Path, enc, splits: dict, config: dict) -> dict:
    """Write token files, tokenizer and manifest into tmp; return the manifest."""
    dtype = "uint16" if enc.n_vocab <= 2**16 else "uint32"  # ids up to V-1 must fit
    manifest = {"format": FORMAT_VERSION, "data": config["data"], "tokenizer": config["tokenizer"],
                "vocab_size": enc.n_vocab, "eot_id": enc.eot_token, "dtype": dtype}
    domains = Counter()
    for split, docs in splits.items():
        texts = [d[0] for d in docs]
        manifest[f"{split}_tokens"] = _write_tokens(tmp / f"{split}.bin", enc, texts, dtype)
        manifest[f"{split}_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
        for text, domain, _ in docs:
            domains[domain] += len(text.encode("utf-8"))
    manifest["documents"] = {s: len(d) for s, d in splits.items()}
    manifest["domains"] = dict(sorted(domains.items()))
    manifest["config"] = config  # what produced this directory, checked before reuse
    if config["tokenizer"] == "bpe":
        save_tokenizer(enc, tmp / "tokenizer.tiktoken")
    _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def load_prepared(dir) -> tuple[dict, tiktoken.Encoding]:
    """Read and check a prepared directory; return (manifest with "dir", tokenizer)."""
    dir = Path(dir)
    try:
        manifest = json.loads((dir / "manifest.json").read_text())
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in ("train", "val"):
            _check_size(dir / f"{split}.bin", manifest[f"{split}_tokens"] * itemsize)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {dir}/manifest.json ({e}): delete {dir} and run prepare again") from None
    if manifest["tokenizer"] == "bpe":
        enc = load_tokenizer_file(dir / "tokenizer.tiktoken")
    else:
        enc = get_tokenizer(manifest["tokenizer"])
    if enc.n_vocab != manifest["vocab_size"] or enc.eot_token != manifest["eot_id"]:
        raise ValueError(f"the tokenizer in {dir} does not match its manifest: delete the directory to re-prepare")
    return {**manifest, "dir": str(dir.resolve())}, enc


def _check_size(path: Path, expected: int) -> None:
    """Raise if a token file is not exactly tokens * itemsize bytes (a truncated write)."""
    found = path.stat().st_size if path.exists() else 0
    if found != expected:
        raise ValueError(f"corrupt token file {path}: expected {expected} bytes, found {found}; "
                         "delete the directory to re-prepare")


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

class TokenSampler:
    """Epoch-aware batches of non-overlapping windows from one split's token file.

    Window i covers tokens [i*T, i*T + T + 1): T inputs plus one more token for
    the last target. Each epoch visits all windows in a permutation drawn from
    default_rng((seed, epoch)); rank r takes positions r, r+W, r+2W, ... (W =
    world_size), cut so every rank has the same count, hence the ranks see
    disjoint windows and stay in step. The position lives in state_dict().
    """

    def __init__(self, path: str, dtype: str, block_size: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.path, self.dtype = str(path), dtype
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        n_tokens = os.path.getsize(path) // np.dtype(dtype).itemsize
        if n_tokens < block_size + 1:
            raise ValueError(f"split has {n_tokens} tokens, fewer than block_size+1={block_size + 1}: "
                             "use a smaller --block_size or more data")
        self.n_windows = (n_tokens - 1) // block_size
        self.windows_per_rank = self.n_windows // world_size  # the tail is dropped
        if self.windows_per_rank == 0:
            raise ValueError(f"split has {self.n_windows} windows for {world_size} ranks: "
                             "use a smaller --block_size or more data")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> np.ndarray:
        """This rank's window indices for the current epoch (cached per epoch)."""
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)
            self._order = perm[self.rank::self.world_size][: self.windows_per_rank]
            self._order_epoch = self.epoch
        return self._order

    def _next_window(self) -> int:
        """The next window index; an exhausted epoch rolls into the next one."""
        window = int(self._epoch_order()[self.position])
        self.position += 1
        if self.position == self.windows_per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        return window

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (B, T), with y[:, t] = x[:, t+1] in the token stream."""
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")  # pages in only what is read
        T = self.block_size
        starts = [self._next_window() * T for _ in range(self.batch_size)]
        buf = np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        buf = torch.from_numpy(buf)
        return buf[:, :-1], buf[:, 1:]  # (B, T) inputs, (B, T) targets

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this sampler is."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "block_size": self.block_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuse a different block size or world size."""
        for key in ("block_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's loader was saved with {key}={state[key]} but this run "
                                 f"has {getattr(self, key)}: resume with the same {key}")
        if not 0 <= state["position"] < self.windows_per_rank:
            raise ValueError(f"the checkpoint's loader position {state['position']} is outside this "
                             f"split's {self.windows_per_rank} windows per rank: resume with the same data")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order_epoch = None  # the seed may differ: redraw the permutation


def bits_per_byte(loss_nats: float, tokens: int, nbytes: int) -> float:
    """bpb = loss * tokens / (bytes * ln 2): mean nats per token -> total bits -> bits per UTF-8 byte."""
    if nbytes <= 0:
        raise ValueError(f"nbytes={nbytes}: bits per byte needs the positive byte count of the evaluated text")
    return loss_nats * tokens / (nbytes * math.log(2))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None) -> None:
    """`python data.py prepare ...`: tokenize a corpus and print its manifest."""
    parser = argparse.ArgumentParser(description="Tokenize a corpus once into train.bin/val.bin.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize a corpus into <out_dir>/<key>/")
    p.add_argument("--data", default="stdlib", help="stdlib, stdlib:code, stdlib:prose, a .txt file or a directory")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained here), bytes or gpt2")
    p.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size, EOT included")
    p.add_argument("--out_dir", default="data_cache", help="where prepared directories go")
    p.add_argument("--val_fraction", type=float, default=0.05, help="fraction of documents held out")
    p.add_argument("--max_bytes", type=int, default=None, help="cap on UTF-8 bytes per domain")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.data, args.tokenizer, args.vocab_size, args.out_dir,
                           args.val_fraction, args.max_bytes, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    manifest["bytes_per_token"] = round(manifest["train_bytes"] / manifest["train_tokens"], 3)
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
