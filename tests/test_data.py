"""Tests for data.py, each against an independent reference: a naive BPE trainer,
tiktoken's own file reader, a re-encoding of the documents, a set of all windows,
an uninterrupted run of the sampler, and a hand computation of bits per byte."""

import ast
import json
import math
import os
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


@pytest.fixture
def rng():
    """A freshly seeded generator; the seed is printed so a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed={seed}")
    return random.Random(seed)


def random_unicode(rng, n: int) -> str:
    """A string mixing ASCII, Latin accents, combining marks, CJK, emoji and whitespace."""
    ranges = [(0x20, 0x7E), (0xC0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF),
              (0x1F300, 0x1FAFF), (0x0A, 0x0A), (0x09, 0x09), (0x80, 0xD7FF)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))  # every range stays below the surrogates or above them
    return "".join(chars)


# --- corpus -----------------------------------------------------------------

def test_stdlib_corpus_is_deterministic_with_both_domains():
    """Two reads agree, both domains appear, the per-domain cap holds, code parses as Python."""
    first = data.stdlib_corpus(max_bytes=200_000)
    assert first == data.stdlib_corpus(max_bytes=200_000)
    domains = Counter(d for _, d, _ in first)
    assert set(domains) == {"code", "prose"}
    for domain in ("code", "prose"):  # the cap is per domain
        assert sum(len(t.encode()) for t, d, _ in first if d == domain) <= 200_000
    code = [t for t, d, _ in first if d == "code"]
    for text in code[:5]:
        ast.parse(text)  # the code documents are real Python
    assert all(t.strip() for t, d, _ in first if d == "prose")


def test_missing_path_raises_a_helpful_error(tmp_path):
    """A typo in --data gets one line that names the accepted forms."""
    with pytest.raises(ValueError, match="does not exist: pass --data stdlib"):
        data.read_documents(str(tmp_path / "nope.txt"))


def test_empty_directory_raises_an_error_naming_it(tmp_path):
    """A directory without .txt content is an error that says which directory."""
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.read_documents(str(tmp_path))


def test_single_block_text_file_is_cut_into_many_documents(tmp_path):
    """A file with no document breaks is chunked at lines, losing no text."""
    path = tmp_path / "one.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    docs = data.read_documents(str(path))
    assert 50 <= len(docs) <= 101
    assert "".join(t for t, _, _ in docs) == path.read_text()  # nothing lost at the cuts


# --- tokenizers ---------------------------------------------------------------

def test_bytes_tokenizer_round_trips_with_one_token_per_byte(rng):
    """Reference: Python's own UTF-8 encoder gives the expected token count."""
    # 256 byte ids plus EOT; with no merges the pre-tokenizer cannot change the count.
    enc = data.get_tokenizer("bytes")
    assert enc.n_vocab == 257 and enc.eot_token == 256
    for _ in range(20):
        s = random_unicode(rng, rng.randint(0, 300))
        ids = enc.encode_ordinary(s)
        assert len(ids) == len(s.encode("utf-8"))
        assert enc.decode(ids) == s


def test_bpe_round_trips_random_unicode_with_requested_vocab(rng):
    """Byte-level BPE must decode any string back exactly, including unseen scripts."""
    texts = [random_unicode(rng, 2000) for _ in range(10)]
    # 600 - 257 = 343 merges, few enough that this random text cannot run out of pairs.
    enc = data.train_bpe(texts, 600)
    assert enc.n_vocab == 600 and enc.eot_token == 599
    assert len(enc._mergeable_ranks) == 599
    for _ in range(20):
        s = random_unicode(rng, rng.randint(0, 500))
        assert enc.decode(enc.encode_ordinary(s)) == s


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tinyshakespeare.txt is absent")
def test_bpe_compresses_held_out_shakespeare_beyond_two_bytes_per_token():
    """BPE must actually compress text it was not trained on."""
    text = SHAKESPEARE.read_text()
    # Held-out text is the play's end, never seen in training. GPT-2's 50k vocabulary
    # reaches ~4 bytes/token on English; 1024 tokens should clear 2 comfortably.
    train, held_out = text[:800_000], text[-100_000:]
    enc = data.train_bpe([train], 1024)
    ratio = len(held_out.encode()) / len(enc.encode_ordinary(held_out))
    assert ratio > 2.0, ratio


def naive_bpe_ranks(texts, n_merges: int) -> dict:
    """Reference trainer: recount every pair after every merge, same tie-break."""
    # Words are tuples of byte strings, so a merge is visible as concatenation.
    words = Counter()
    for t in texts:
        words.update(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(data.PATTERN, t))
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < 256 + n_merges:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # highest count, then smallest bytes
        merged = best[0] + best[1]
        # Two different pairs can spell the same bytes: the token keeps its first rank,
        # and the vocabulary grows only when the bytes are new (as in data.train_bpe).
        ranks.setdefault(merged, len(ranks))
        new_words = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = new_words
    return ranks


def test_incremental_bpe_matches_naive_reference(rng):
    """The fast trainer and the obviously correct slow one produce identical ranks."""
    # Few distinct letters make ties and repeated pairs ("aaaa") frequent.
    alphabet = "ab c\nd'é中"
    texts = ["".join(rng.choice(alphabet) for _ in range(3000)) for _ in range(3)]
    if SHAKESPEARE.exists():
        texts.append(SHAKESPEARE.read_text()[:20_000])
    # 60 merges on top of the 256 bytes, plus one id for EOT.
    enc = data.train_bpe(texts, 256 + 60 + 1)
    assert enc._mergeable_ranks == naive_bpe_ranks(texts, 60)


def test_saved_tokenizer_loads_with_identical_encodings(tmp_path, rng):
    """Reference: tiktoken's own .tiktoken reader (inside load_tokenizer_file)."""
    texts = [random_unicode(rng, 3000)]
    enc = data.train_bpe(texts, 400)
    path = tmp_path / "tok.tiktoken"
    data.save_tokenizer(enc, path)
    loaded = data.load_tokenizer_file(path)
    assert loaded._mergeable_ranks == enc._mergeable_ranks
    assert loaded.eot_token == enc.eot_token and loaded.n_vocab == enc.n_vocab
    for _ in range(10):
        s = random_unicode(rng, 400)
        assert loaded.encode(s + data.EOT, allowed_special="all") == enc.encode(s + data.EOT, allowed_special="all")


# --- prepare ------------------------------------------------------------------

def make_text_dir(tmp_path, rng, n_docs=30) -> tuple[Path, list[str]]:
    """A directory of small random .txt documents, all distinct."""
    folder = tmp_path / "docs"
    folder.mkdir()
    # The "doc i" prefix makes every text unique, so sets of decoded texts identify documents.
    texts = [f"doc {i}: " + random_unicode(rng, rng.randint(50, 800)) for i in range(n_docs)]
    for i, t in enumerate(texts):
        (folder / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    return folder, texts


def split_documents(path, dtype, eot) -> list[list[int]]:
    """Cut a token file at EOT ids; every document must end with one."""
    # np.fromfile reads the raw array exactly as np.memmap would, independently of the sampler.
    ids = np.fromfile(path, dtype=dtype).tolist()
    assert ids and ids[-1] == eot
    docs, current = [], []
    for t in ids:
        if t == eot:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prepare_manifest_matches_independent_encoding(tmp_path, rng, tokenizer):
    """Decode the token files, re-encode the documents, and compare every count."""
    folder, texts = make_text_dir(tmp_path, rng)
    # vocab 512 is ignored by "bytes" (always 257); both fit uint16.
    m = data.prepare(str(folder), tokenizer, 512, str(tmp_path / "cache"), 0.2, verbose=False)
    manifest, enc = data.load_prepared(m["dir"])
    assert manifest["dtype"] == "uint16" and manifest["eot_id"] == enc.eot_token
    assert manifest["vocab_size"] == enc.n_vocab == (257 if tokenizer == "bytes" else 512)
    assert "dir" not in json.loads((Path(m["dir"]) / "manifest.json").read_text())
    assert manifest["documents"] == {"train": 24, "val": 6}  # ceil(0.2 * 30) = 6
    # Decoding the files and re-encoding each document with the loaded tokenizer
    # checks the counts without trusting the code that wrote them.
    seen = {}
    for split in ("train", "val"):
        docs = split_documents(Path(m["dir"]) / f"{split}.bin", manifest["dtype"], enc.eot_token)
        assert len(docs) == manifest["documents"][split]  # one EOT per document
        seen[split] = {enc.decode(d) for d in docs}
        assert manifest[f"{split}_tokens"] == sum(len(enc.encode_ordinary(t)) + 1 for t in seen[split])
        assert manifest[f"{split}_bytes"] == sum(len(t.encode()) for t in seen[split])
    assert not seen["train"] & seen["val"]  # split by document, disjointly
    assert seen["train"] | seen["val"] == set(texts)
    assert manifest["domains"] == {"text": sum(len(t.encode()) for t in texts)}


def test_prepare_reuses_an_existing_directory_untouched(tmp_path, rng, capsys):
    """A second prepare with the same settings writes nothing."""
    folder, _ = make_text_dir(tmp_path, rng)
    m = data.prepare(str(folder), "bytes", out_dir=str(tmp_path / "cache"), verbose=False)
    files = sorted(Path(m["dir"]).iterdir())
    before = {f: f.stat().st_mtime_ns for f in files}
    again = data.prepare(str(folder), "bytes", out_dir=str(tmp_path / "cache"))
    assert "reusing" in capsys.readouterr().out
    assert again == m
    assert {f: f.stat().st_mtime_ns for f in sorted(Path(m["dir"]).iterdir())} == before
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary directory left behind


def test_truncated_token_file_is_reported_as_corrupt(tmp_path, rng):
    """A token file cut short (a crash, a full disk) is caught on load."""
    folder, _ = make_text_dir(tmp_path, rng)
    m = data.prepare(str(folder), "bytes", out_dir=str(tmp_path / "cache"), verbose=False)
    train = Path(m["dir"]) / "train.bin"
    os.truncate(train, train.stat().st_size - 2)  # one uint16 token short
    with pytest.raises(ValueError, match="corrupt"):
        data.load_prepared(m["dir"])


def test_prepare_needs_two_documents(tmp_path):
    """A train/val split by document needs at least one document on each side."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.txt").write_text("just one document")
    with pytest.raises(ValueError, match="at least 2"):
        data.prepare(str(folder), "bytes", out_dir=str(tmp_path / "cache"), verbose=False)


# --- sampler ------------------------------------------------------------------

def write_arange(tmp_path, n_tokens) -> Path:
    """Token i has id i, so a window is identified by its first id."""
    path = tmp_path / "tokens.bin"
    # n_tokens < 65536 in every test, so the ids stay exact in uint16.
    np.arange(n_tokens, dtype=np.uint16).tofile(path)
    return path


def collect_windows(sampler, n_windows) -> list[int]:
    """The start ids of the next n_windows rows, checking x and y against the token stream."""
    starts = []
    while len(starts) < n_windows:
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (sampler.batch_size, sampler.block_size) and x.dtype == torch.int64
        T = sampler.block_size
        assert torch.equal(x, x[:, :1] + torch.arange(T))  # a contiguous slice of the stream
        assert torch.equal(y, x + 1)  # targets are the inputs shifted by one token
        starts.extend(x[:, 0].tolist())
    return starts[:n_windows]


def test_one_epoch_covers_every_window_exactly_once(tmp_path, rng):
    """Reference: the set of all windows (nanoGPT #294 samples with replacement)."""
    T, n_tokens = rng.randint(3, 17), rng.randint(200, 2000)
    sampler = data.TokenSampler(write_arange(tmp_path, n_tokens), "uint16", T, 7, seed=rng.randrange(100))
    n_windows = (n_tokens - 1) // T  # each window needs T + 1 tokens, sharing one with the next
    # batch_size 7 rarely divides n_windows, so the last batch also crosses into epoch 1.
    starts = collect_windows(sampler, n_windows)
    assert sorted(starts) == [i * T for i in range(n_windows)]


def test_two_ranks_cover_disjoint_windows_once(tmp_path, rng):
    """Data-parallel ranks never see the same window in one epoch."""
    T, n_tokens = rng.randint(3, 17), rng.randint(200, 2000)
    path = write_arange(tmp_path, n_tokens)
    n_windows = (n_tokens - 1) // T
    per_rank = n_windows // 2  # an odd window count leaves one window out, so ranks stay in step
    starts = [collect_windows(data.TokenSampler(path, "uint16", T, 5, seed=3, rank=r, world_size=2), per_rank)
              for r in range(2)]
    assert not set(starts[0]) & set(starts[1])
    assert len(set(starts[0] + starts[1])) == 2 * per_rank  # only the odd tail window is dropped
    assert set(starts[0] + starts[1]) <= {i * T for i in range(n_windows)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_the_same_batches_as_an_uninterrupted_run(tmp_path, rng, world_size):
    """Reference: the same sampler run straight through (nanoGPT #467)."""
    path = write_arange(tmp_path, rng.randint(300, 1000))
    for rank in range(world_size):
        make = lambda: data.TokenSampler(path, "uint16", 8, 6, seed=11, rank=rank, world_size=world_size)
        straight, interrupted = make(), make()
        k = rng.randint(1, 40)  # often lands in a later epoch or mid-batch across epochs
        for _ in range(k):
            straight.next_batch()
            interrupted.next_batch()
        state = json.loads(json.dumps(interrupted.state_dict()))  # must survive a checkpoint file
        resumed = make()
        resumed.load_state_dict(state)
        for _ in range(15):
            a, b = straight.next_batch(), resumed.next_batch()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resume_with_a_different_world_size_is_refused(tmp_path):
    """A changed data-parallel size is refused, not silently dropped (torchtitan #811)."""
    path = write_arange(tmp_path, 500)
    # Resharding a permutation split across ranks is possible, but refusing is simpler and safe.
    state = data.TokenSampler(path, "uint16", 8, 4, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this run has 1"):
        data.TokenSampler(path, "uint16", 8, 4).load_state_dict(state)


def test_split_shorter_than_a_window_is_refused(tmp_path):
    """Too little data for one (x, y) window is one clear error."""
    with pytest.raises(ValueError, match="fewer than block_size"):
        data.TokenSampler(write_arange(tmp_path, 10), "uint16", 16, 2)


# --- bits per byte ------------------------------------------------------------

def test_bits_per_byte_matches_hand_computation():
    """bpb = loss * tokens / (bytes * ln 2), checked on two hand-worked cases."""
    # 1000 tokens at 2.0 nats each = 2000 nats = 2000 / ln 2 = 2885.39 bits, over 4000 bytes.
    assert data.bits_per_byte(2.0, 1000, 4000) == pytest.approx(2000 / math.log(2) / 4000, rel=1e-12)
    # A byte-level model (one token per byte) with loss ln 2 spends exactly one bit per byte.
    assert data.bits_per_byte(math.log(2), 123, 123) == pytest.approx(1.0, rel=1e-12)
