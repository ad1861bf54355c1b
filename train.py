"""
Training: the loop that turns a corpus and a randomly initialised GPT into a language model.

The objective
-------------
Pretraining minimises the average next-token cross-entropy over the corpus,

    loss = -1/N sum_t log p_theta(x_t | x_<t)        (nats per token)

with stochastic gradient steps on small random batches. The same number in bits per byte,

    bpb = loss * (tokens / bytes) / ln 2,

no longer depends on the tokenizer, so a byte-level run and a BPE run compare, and so does a
general-purpose compressor: gzip -9 on the validation text is the baseline every run here prints
(a language model is a compressor; Shannon 1948, Deletang et al. 2023, arXiv:2309.10668).

One optimizer step, as this file does it
----------------------------------------
1. lr = schedule(step): linear warm-up, then cosine decay (Loshchilov & Hutter 2016,
   arXiv:1608.03983) or warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv:2404.06395). The
   schedule is a pure function of the step, so a resumed run picks up the same learning rate.
2. grad_accum micro-batches, each loss divided by grad_accum so the summed gradient is the mean
   over the whole batch: then the clipping threshold means the same whatever the split.
3. Clip the global gradient norm to grad_clip (Pascanu et al. 2013), then AdamW (Loshchilov &
   Hutter 2017, arXiv:1711.05101) with weight decay on matrices only: decaying biases and norm gains
   only pulls them towards zero for no benefit (the GPT-2/nanoGPT recipe).
4. Log loss, learning rate, ms/step, tokens/s and (on a GPU) MFU, and append the same to
   <out_dir>/metrics.jsonl.
5. Every checkpoint_interval steps, write a checkpoint, then evaluate (in that order: a crash
   during evaluation must not cost the steps before it).

Checkpoints and exact resume
----------------------------
A checkpoint holds everything the next step depends on: model and optimizer state, the gradient
scaler, the step (hence the learning rate), every RNG state and the data sampler's position. It is
written to a temporary file, fsynced and renamed over the old one, so a crash at any moment leaves
either the old checkpoint or the new one, never half of one; it loads with weights_only=True, so a
checkpoint cannot run code. On the CPU in float32, N steps + resume + N steps reproduces 2N straight
steps bit for bit (a test checks it).

Mixed precision
---------------
bfloat16 autocast keeps float32's exponent range, so it needs no loss scaling; float16 does (its
gradients underflow), so a GradScaler multiplies the loss up and the gradients back down
(Micikevicius et al. 2017, arXiv:1710.03740). Parameters and optimizer state stay in float32.

MFU (model FLOPs utilisation)
-----------------------------
MFU = achieved model FLOP/s / the device's peak (Chowdhery et al. 2022, PaLM, appendix B), with
6N + 12 L C T FLOPs per token: 2 per parameter for the forward multiply-add, 4 for the backward,
plus attention's score and value matmuls. The peak comes from a table keyed by device name and dtype;
an unknown device gets no MFU rather than a guess.

Map of this file
----------------
TrainConfig, PRESETS -> flags from dataclass fields -> device and dtype -> learning-rate schedule ->
optimizer -> checkpoint save/load -> evaluation -> the training loop -> sampling -> main().
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

import data
from model import GPT, MODEL_PRESETS, GPTConfig


@dataclass
class TrainConfig:
    """Everything about a run that is not the model's shape. One flag per field (see --help)."""

    preset: str = "laptop"  # named set of defaults (see PRESETS); any flag overrides it
    # --- data
    data: str = "stdlib"  # stdlib, stdlib:code, stdlib:prose, a .txt file or a directory of .txt files
    tokenizer: str = "bpe"  # bytes (256 symbols), bpe (trained on the corpus, offline), gpt2 (tiktoken, needs its cached files)
    vocab_size: int = 4096  # size of the BPE vocabulary to train (ignored for bytes and gpt2)
    data_dir: str = "data_cache"  # where tokenized corpora are kept and reused between runs
    max_data_bytes: int = 0  # cap on the corpus bytes read per domain (0: no cap)
    # --- run
    out_dir: str = "out"  # checkpoint, metrics.jsonl, run.json and samples go here
    overwrite: bool = False  # allow a fresh run to replace a checkpoint already in out_dir
    resume: bool = False  # continue the run whose checkpoint is in out_dir
    stop_at: int = 0  # stop this invocation after this step (0: at max_iters); the schedule still spans max_iters
    seed: int = 1337  # seeds initialisation, data order and sampling
    device: str = "auto"  # auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # float32, bfloat16, float16 (CUDA, with a gradient scaler); auto: bfloat16 where supported, else float32
    compile: bool = False  # torch.compile the model (faster on GPUs; slow to start)
    # --- optimisation
    max_iters: int = 1000  # optimizer steps in the whole run
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (tokens/step = batch_size * grad_accum * block_size)
    learning_rate: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak (Chinchilla decays to 10%)
    schedule: str = "cosine"  # cosine or wsd (warmup-stable-decay)
    warmup_iters: int = 50  # steps of linear warm-up from 0
    decay_frac: float = 0.2  # wsd: fraction of max_iters spent decaying at the end
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (GPT-3's 0.1)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.95 as GPT-3, steadier than 0.999 at large batch)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    # --- evaluation, logging, checkpoints
    eval_interval: int = 250  # evaluate on the validation split every this many steps (and at the end)
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 1  # print a training line every this many steps
    checkpoint_interval: int = 0  # write a checkpoint every this many steps (0: at each evaluation) and at the end
    # --- sampling
    sample: bool = False  # do not train: load the checkpoint in out_dir and print generated text
    sample_tokens: int = 300  # tokens to generate for the sample
    temperature: float = 0.8  # sampling temperature (0: greedy)
    top_k: int = 50  # sample only among the k most likely tokens (0: all)
    prompt: str = ""  # text the sample continues (empty: start of a document)


# Presets are plain overrides. "model" names a model size from model.MODEL_PRESETS.
PRESETS = {
    # the default (TrainConfig's own defaults are this preset's): trains on a 2-core laptop CPU in
    # about 6 minutes and beats gzip -9 on held-out standard-library text
    "laptop": dict(model="laptop"),
    # a quick smoke test: seconds, for checking that everything runs
    "tiny": dict(model="laptop", n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=512, max_data_bytes=300_000,
                 batch_size=8, max_iters=20, eval_interval=10, eval_iters=4, warmup_iters=5, sample_tokens=50),
    # GPT-2 small on one GPU, nanoGPT's recipe: 0.5M tokens/step (16 x 1024 x 32), 6e-4 peak,
    # 2000 warm-up steps; needs a real corpus and --tokenizer gpt2
    "gpt2-124m": dict(model="gpt2-124m", tokenizer="gpt2", batch_size=16, grad_accum=32, learning_rate=6e-4,
                      max_iters=600_000, warmup_iters=2000, eval_interval=1000, eval_iters=200, weight_decay=0.1,
                      compile=True, vocab_size=50304),
}

# Model fields that appear as flags; None means "the preset's value".
MODEL_FLAGS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "n_kv_head", "rope", "rope_theta",
               "norm", "mlp", "tie_embeddings", "attention")


# ----------------------------------------------------------------------------------------------
# Flags generated from the dataclasses, so a flag and its field never disagree


def field_comments(cls) -> dict[str, str]:
    """The trailing comment of each `name: type = default  # comment` line in a dataclass's source."""
    src = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^=]+= [^#\n]*#\s*(.*)$", src, flags=re.M))


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def add_field_flags(parser, cls, names=None, default_none=False):
    comments = field_comments(cls)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = {"int": int, "float": float, "str": str, "bool": parse_bool}[f.type]
        extra = dict(nargs="?", const=True) if f.type == "bool" else {}  # `--compile` alone means true
        default = None if default_none else f.default
        shown = "preset's" if default_none else repr(f.default)
        help_text = f"{comments.get(f.name, '')} (default: {shown})".replace("%", "%%")  # argparse formats help with %
        parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a GPT. Every flag overrides the preset's value; `python train.py` alone trains the laptop preset.",
    )
    add_field_flags(parser.add_argument_group("run"), TrainConfig, default_none=True)
    add_field_flags(parser.add_argument_group("model (model.GPTConfig)"), GPTConfig, names=MODEL_FLAGS, default_none=True)
    return parser


def resolve_configs(args: argparse.Namespace) -> tuple[TrainConfig, GPTConfig]:
    """Defaults <- preset <- flags, for both the run and the model."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset_name = given.get("preset", TrainConfig.preset)
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset '{preset_name}': choose one of {', '.join(PRESETS)}")
    preset = dict(PRESETS[preset_name])
    model_overrides = dict(MODEL_PRESETS[preset.pop("model")])
    for k in MODEL_FLAGS:  # a preset may also override model fields (the tiny preset does)
        if k in preset:
            model_overrides[k] = preset.pop(k)
    train_fields = {f.name for f in fields(TrainConfig)}
    train = TrainConfig(**{**preset, **{k: v for k, v in given.items() if k in train_fields}, "preset": preset_name})
    model_overrides.update({k: v for k, v in given.items() if k in MODEL_FLAGS})
    return train, model_overrides


def check_config(cfg: TrainConfig):
    if cfg.schedule not in ("cosine", "wsd"):
        raise ValueError(f"unknown schedule '{cfg.schedule}': use cosine or wsd")
    if cfg.tokenizer not in ("bytes", "bpe", "gpt2"):
        raise ValueError(f"unknown tokenizer '{cfg.tokenizer}': use bytes, bpe or gpt2")
    for name in ("max_iters", "batch_size", "grad_accum", "eval_iters", "eval_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")


# ----------------------------------------------------------------------------------------------
# Device and precision, decided in one place


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA GPU: use --device cpu (or auto)")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype '{name}': use float32, bfloat16 or float16")
    if name == "float16" and device.type != "cuda":
        raise ValueError("--dtype float16 needs a CUDA GPU (its gradient scaler is CUDA-only): use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support (pre-Ampere): use --dtype float16")
    return dtypes[name]


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Matmuls in dtype, reductions and parameters in float32. float32 needs no autocast at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return peak * (step + 1) / cfg.warmup_iters  # linear warm-up: Adam's early moment estimates are noisy
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: hold the peak, then decay linearly over the last decay_frac of the run;
    # a run can be extended from any stable-phase checkpoint (Hu et al. 2024)
    decay_start = cfg.max_iters - int(cfg.decay_frac * cfg.max_iters)
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, cfg.max_iters - decay_start)
    return peak + (floor - peak) * min(1.0, progress)


# ----------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (embeddings, linear weights) decay, vectors (biases, norm gains) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True runs the whole update as a few CUDA kernels instead of a loop over tensors
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU


# Peak dense FLOP/s per accelerator and dtype, from the vendors' data sheets (dense, no sparsity).
PEAK_FLOPS = {
    "H100 SXM": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},  # NVIDIA H100 data sheet (tf32)
    "H100 PCIe": {torch.bfloat16: 756.0e12, torch.float16: 756.0e12, torch.float32: 378.0e12},
    "H100": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},  # HBM3 H100 boards report "H100 80GB HBM3"
    "H200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 494.7e12},  # H200 data sheet: same compute as H100 SXM
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},  # A100 data sheet (tf32)
    "A10G": {torch.bfloat16: 70e12, torch.float16: 70e12, torch.float32: 35e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12},
}


def flops_per_token(config: GPTConfig, n_params_no_embedding: int) -> float:
    """6N + 12 L C T (Chowdhery et al. 2022, appendix B): 6 FLOPs per parameter per token for
    forward and backward matmuls, plus 12 L C T for attention's QK^T and AV (forward and backward).
    The output layer is a real matmul, so with tied embeddings its V*C is added back to N."""
    N = n_params_no_embedding + config.vocab_size * config.n_embd * config.tie_embeddings
    return 6 * N + 12 * config.n_layer * config.n_embd * config.block_size


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak for this device and dtype, or None if the device is not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific name first
        if key.lower() in name.lower() or key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return PEAK_FLOPS[key].get(dtype)
    return None


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, safe loads


def atomic_torch_save(obj, path: str):
    """Write to a temporary file in the same directory, fsync, then rename over the target.
    os.replace is atomic on POSIX and Windows: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on Windows)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}: train first, or point --out_dir at a run's directory")
    try:
        # weights_only=True: only tensors and plain containers unpickle, so a checkpoint cannot run code
        with warnings.catch_warnings():  # the refusal is reported below, in one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a zip, a pickle with code in it, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} is corrupt or unsafe ({first_line[:120]}): delete it or use another --out_dir") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a nanopretrain checkpoint")
    return ckpt


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Append one JSON object per line to <out_dir>/metrics.jsonl."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            # drop lines written after the checkpoint we resume from: they will be written again
            kept = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)

    def log(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def gzip_bits_per_byte(tokens: np.ndarray, enc, eot_id: int) -> float:
    """The baseline: gzip -9 on the same validation text, in bits per byte of raw text."""
    text = enc.decode([int(t) for t in tokens if t != eot_id]).encode("utf-8")
    return 8 * len(gzip.compress(text, compresslevel=9)) / max(1, len(text))


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, manifest: dict, cfg: TrainConfig, block_size: int, device, amp) -> float:
    """Mean validation loss over the same eval_iters batches every time (a fresh sampler with a
    fixed seed), so evaluations are comparable and do not disturb the training RNG or data order."""
    sampler = data.TokenSampler(os.path.join(manifest["dir"], "val.bin"), manifest["dtype"], block_size,
                                cfg.batch_size, seed=0)
    model.eval()
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = sampler.next_batch()
        with amp:
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train()
    return float(np.mean(losses))


# ----------------------------------------------------------------------------------------------
# Run bookkeeping


def run_info(cfg: TrainConfig, model_config: GPTConfig, manifest: dict) -> dict:
    """What a later reader needs to reproduce this run: configs, source revision, versions."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"train_config": asdict(cfg), "model_config": asdict(model_config), "data": {k: v for k, v in manifest.items() if k != "dir"},
            "git_revision": rev or None, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "argv": sys.argv}


def write_json_atomic(obj, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Training


def prepare_data(cfg: TrainConfig, verbose: bool = True) -> tuple[dict, object]:
    manifest = data.prepare(data=cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, out_dir=cfg.data_dir,
                            max_bytes=cfg.max_data_bytes or None, seed=0, verbose=verbose)
    _, enc = data.load_prepared(manifest["dir"])
    return manifest, enc


def train(cfg: TrainConfig, model_overrides: dict) -> dict:
    """Run (or resume) training; returns the last training and validation losses."""
    check_config(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
    elif os.path.exists(ckpt_path) and not cfg.overwrite:
        raise ValueError(f"{ckpt_path} already exists: pass --resume to continue that run, --overwrite to replace it, or another --out_dir")

    manifest, enc = prepare_data(cfg)
    # the model's vocabulary is the tokenizer's, rounded up to a multiple of 64 for aligned matmuls
    # (nanoGPT pads GPT-2's 50257 to 50304); the extra logits are never targets and learn to be unlikely
    vocab = 64 * math.ceil(manifest["vocab_size"] / 64)
    model_config = GPTConfig(**{**model_overrides, "vocab_size": vocab})
    if ckpt is not None:
        check_resume_compatible(ckpt, model_config, cfg)

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    train_sampler = data.TokenSampler(os.path.join(manifest["dir"], "train.bin"), manifest["dtype"],
                                      model_config.block_size, cfg.batch_size, seed=cfg.seed)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        train_sampler.load_state_dict(ckpt["sampler"])
        set_rng_states(ckpt["rng"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json_atomic(run_info(cfg, model_config, manifest), os.path.join(cfg.out_dir, "run.json"))
    metrics = Metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), step if ckpt is not None else None)

    # compile after loading, and keep `model` the plain module: its state_dict has no _orig_mod. prefix
    fast_model = torch.compile(model) if cfg.compile else model
    amp = autocast_context(device, dtype)
    n_params = model.num_params()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.block_size
    flops_per_step = flops_per_token(model_config, model.num_params(exclude_embeddings=True)) * tokens_per_step
    peak = device_peak_flops(device, dtype)
    val_tokens = np.memmap(os.path.join(manifest["dir"], "val.bin"), dtype=manifest["dtype"], mode="r")
    tokens_per_byte = manifest["val_tokens"] / manifest["val_bytes"]
    gzip_bpb = gzip_bits_per_byte(val_tokens, enc, manifest["eot_id"])
    print(f"model: {n_params:,} parameters ({model.num_params(exclude_embeddings=True):,} without embeddings) | "
          f"device {device} | dtype {str(dtype).replace('torch.', '')} | {tokens_per_step:,} tokens/step")
    print(f"baseline: gzip -9 compresses the validation text to {gzip_bpb:.3f} bits per byte")
    if device.type == "cuda" and peak is None:
        print(f"MFU: unknown GPU '{torch.cuda.get_device_name(device)}' (add its peak to PEAK_FLOPS)")

    stop = min(cfg.stop_at or cfg.max_iters, cfg.max_iters)
    ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
    result = {"loss": None, "val_loss": None, "val_bpb": None, "gzip_bpb": gzip_bpb}
    model.train()
    while step < stop:
        t0 = time.perf_counter()
        lr = learning_rate_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = train_sampler.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with amp:
                _, loss = fast_model(x, y)
            # divide by grad_accum: the accumulated gradient is then the mean over all micro-batches,
            # the same as one big batch, and grad_clip keeps its meaning (nanoGPT #168)
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = (loss_sum / cfg.grad_accum).item()  # .item() waits for the GPU: ms/step is honest
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"loss is {train_loss} at step {step}; the last good checkpoint is {ckpt_path}"
                                     " (lower --learning_rate, or use --dtype bfloat16 instead of float16)")
        dt = time.perf_counter() - t0
        tokens_per_s = tokens_per_step / dt
        mfu = flops_per_step / dt / peak if peak else None
        metrics.log(step=step, loss=train_loss, lr=lr, ms_per_step=1000 * dt, tokens_per_s=tokens_per_s, mfu=mfu)
        result["loss"] = train_loss
        if step % cfg.log_interval == 0 or step == stop:
            mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
            print(f"step {step:5d}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {1000 * dt:7.1f} ms"
                  f" | {tokens_per_s:9,.0f} tok/s{mfu_text}", flush=True)
        if step % ckpt_every == 0 or step == stop:
            # checkpoint first, then evaluate: a crash in evaluation costs nothing (nanochat #446)
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                               "sampler": train_sampler.state_dict(), "rng": rng_states(), "step": step,
                               "model_config": asdict(model_config), "train_config": asdict(cfg),
                               "data_dir": os.path.basename(manifest["dir"])}, ckpt_path)
        if step % cfg.eval_interval == 0 or step == stop:
            val_loss = evaluate(fast_model, manifest, cfg, model_config.block_size, device, amp)
            val_bpb = data.bits_per_byte(val_loss, manifest["val_tokens"], manifest["val_bytes"])
            metrics.log(step=step, val_loss=val_loss, val_bpb=val_bpb)
            result.update(val_loss=val_loss, val_bpb=val_bpb)
            print(f"step {step:5d} | val loss {val_loss:.4f} | val {val_bpb:.3f} bits/byte (gzip -9: {gzip_bpb:.3f})"
                  f" | {tokens_per_byte:.3f} tokens/byte", flush=True)
    result["model"], result["enc"], result["manifest"], result["device"] = model, enc, manifest, device
    return result


def check_resume_compatible(ckpt: dict, model_config: GPTConfig, cfg: TrainConfig):
    """Refuse a resume that would silently change the model or the data (pitfall: torchtitan #809, #811)."""
    saved = ckpt["model_config"]
    diff = {k: (saved.get(k), v) for k, v in asdict(model_config).items() if k != "attention" and saved.get(k) != v}
    if diff:
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume: the checkpoint's model differs ({shown}); use the same model flags or another --out_dir")
    old = ckpt["train_config"]
    for k in ("data", "tokenizer", "vocab_size", "batch_size", "max_data_bytes"):
        if old.get(k) != getattr(cfg, k):
            raise ValueError(f"cannot resume: --{k} was {old.get(k)!r} in the checkpoint, now {getattr(cfg, k)!r}; keep it the same to continue exactly")


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_text(model: GPT, enc, manifest: dict, cfg: TrainConfig, device) -> str:
    """Continue cfg.prompt (or a document start) for sample_tokens tokens."""
    start = enc.encode_ordinary(cfg.prompt) if cfg.prompt else [manifest["eot_id"]]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    out = model.generate(idx, cfg.sample_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, generator=gen)
    ids = [t for t in out[0].tolist() if t < manifest["vocab_size"]]
    return enc.decode(ids).replace(data.EOT, "\n")


def sample_from_checkpoint(cfg: TrainConfig) -> str:
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    saved = TrainConfig(**{**ckpt["train_config"], "out_dir": cfg.out_dir})
    manifest, enc = prepare_data(saved, verbose=False)  # stdout carries only the sample
    device = pick_device(cfg.device)
    model = GPT(GPTConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return sample_text(model, enc, manifest, cfg, device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg, model_overrides = resolve_configs(args)
        if cfg.sample:
            print(sample_from_checkpoint(cfg))
            return
        result = train(cfg, model_overrides)
        if result["val_bpb"] is not None:
            print(f"final: val loss {result['val_loss']:.4f}, {result['val_bpb']:.3f} bits/byte vs gzip -9 {result['gzip_bpb']:.3f}")
        print("sample:\n" + sample_text(result["model"], result["enc"], result["manifest"], cfg, result["device"]))
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
