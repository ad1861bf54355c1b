"""
Parallelism: one training step spread over many devices, built from four collectives.

The problem
-----------
One optimizer step of a GPT with N parameters on a batch of B sequences of T tokens costs about
6 N B T FLOPs and, in float32 with AdamW, 16 N bytes of state (4 for the weights, 4 for their
gradients, 8 for Adam's two moments), plus the activations kept for backward. Past a point neither
fits one device, in time or in memory. Every scheme below splits some of that work or state across
P processes (ranks) and pays for it in communication; each is shown to give the same losses and the
same updated weights as one process on the same global batch (tests/test_parallel.py).

The four collectives (on a group of n ranks, a tensor of S bytes; a ring moves (n-1)/n of it per phase)
---------------------------------------------------------------------------------------------------
    all-reduce      every rank ends with the sum            sends 2 (n-1)/n S per rank (reduce-scatter + all-gather)
    reduce-scatter  rank r ends with the sum of slice r     sends   (n-1)/n S per rank
    all-gather      every rank ends with every slice        sends   (n-1)/n S per rank (S = the full size)
    send / recv     point to point                          sends S
These are the byte counts the wrappers below add to BYTES_SENT, so a test can hold every formula in
this docstring against what the code really did.

The strategies (N parameters, d data-parallel ranks, bytes per rank in float32)
------------------------------------------------------------------------------
Data parallel (DDP; Li et al. 2020, arXiv:2006.15704). Every rank holds the whole model and takes
1/d of the batch; after backward the gradients are averaged with an all-reduce, so every replica
takes the same step. Memory 4N params + 4N grads + 4N buckets + 8N Adam = 20N. Communication per
step 2 (d-1)/d 4N. The all-reduce is cut into buckets launched from backward hooks, so the
gradients of the last layers travel while the first layers are still in backward; gradient
accumulation micro-steps communicate nothing (no_sync).

ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054), parameters flattened into one vector of N' = N
rounded up to a multiple of d, rank r owning slice r:
    stage 1  optimizer state sharded:  4N' + 4N' + 8N'/d;  all-reduce grads, update own slice,
             all-gather params: 3 (d-1)/d 4N' sent (DeepSpeed reduce-scatters here too, 2 (d-1)/d 4N';
             we all-reduce so that each stage adds exactly one idea)
    stage 2  + gradients reduce-scattered: 4N' + 4N'/d + 8N'/d;  2 (d-1)/d 4N' sent, as DDP
    stage 3  + parameters sharded: 4N'/d + 4N'/d + 8N'/d, plus one block (and the root: embeddings,
             final norm) gathered at a time; each block's flat shard is all-gathered before its
             forward, freed after, all-gathered again in backward (the block is recomputed, as
             activation checkpointing does) and its gradient reduce-scattered:
             (d-1)/d 4 (3 N_blocks + 2 N_root) sent per micro-step: the paper's 3 Psi, 1.5x DDP's
             2 Psi (Psi = N numbers; Rajbhandari et al., sec. 7).
    Real FSDP keeps the block's activations instead of recomputing, and frees parameter storage
    by resizing it; we recompute because it makes "gather, use, free" three visible lines.

Muon (Jordan et al. 2024; Kimi's Distributed Muon, Liu et al. 2025, arXiv:2502.16982) needs whole
matrices: its Newton-Schulz iteration multiplies a matrix by itself. Under data parallelism and
ZeRO-1/2 the hidden matrices are dealt out in chunks of d same-shaped ones, each rank
orthogonalises the ones it owns (about 1/d of the work and of the momentum memory: of the k matrices
of a shape the busiest rank owns ceil(k/d)) and one all-gather per chunk returns every updated
matrix; ZeRO-2 reduce-scatters each chunk's gradients to the owners. The rest (embeddings, output
layer, norms, biases) stays on AdamW, sharded as above.

Tensor parallel (Megatron-LM; Shoeybi et al. 2019, arXiv:1909.08053), t ranks. The MLP's first
matrix is split by columns (each rank computes C -> 4C/t), the second by rows (4C/t -> C, partial
sums added by one all-reduce). Attention is split by heads the same way (c_attn by heads: columns;
c_proj: rows). Two conjugate functions carry the communication:
    f: identity forward, all-reduce backward   (before a column-parallel layer)
    g: all-reduce forward, identity backward   (after a row-parallel layer)
so each block costs 2 all-reduces of B T C forward and 2 backward: 4 x 2 (t-1)/t 4 B T C bytes.
The embedding is split by vocabulary rows (each rank looks up its ids, zeros elsewhere, one
all-reduce) and so is the output layer; the cross-entropy is then computed without ever gathering
the V logits: a max, a sum of exponentials and the target's logit, each all-reduced over B T
numbers. Memory 16N/t for the split matrices (norm gains and row-parallel biases are replicated).

Sequence parallel (Korthikanti et al. 2022, arXiv:2205.05198), an option of tensor parallelism.
Between the tensor-parallel regions (attention, MLP, output layer) plain tensor parallelism keeps
the whole (B, T, C) activation on every rank: the norms, dropouts and residual adds are computed t
times over and stored t times over. Sequence parallelism splits them along T instead: rank r holds
positions [r T/t, (r+1) T/t). Entering a region the sequence is all-gathered; leaving it, the
row-parallel layer's partial sums are reduce-scattered, so each rank sums only its own positions.
f and g become
    all-gather forward, reduce-scatter backward   (entering a region, in place of f)
    reduce-scatter forward, all-gather backward   (leaving a region, in place of g)
and since a ring all-reduce *is* a reduce-scatter followed by an all-gather,
    2 (t-1)/t S  =  (t-1)/t S  +  (t-1)/t S,
the bytes are unchanged: per block 4 x 2 (t-1)/t 4 B T C, as above (the embedding reduce-scatters,
the output layer gathers: again the same). New: the replicated parameters (norms, row-parallel
biases, learned positions; N_rep of them) now see T/t positions each, so their gradients are
partial sums, all-reduced once after backward: 2 (t-1)/t 4 N_rep bytes per step. Weights,
gradients and Adam state per rank: as tensor parallelism's. Activations kept for backward, per
layer, in the paper's count (16-bit, s = T, b = B, h = C, a = heads; their sec. 4):
    one device                s b h (34 + 5 a s / h)
    tensor parallel           s b h (10 + 24/t + 5 a s / (h t))   (norm inputs 4, dropout masks 2,
                                                                  column-parallel inputs 4: not split)
    tensor + sequence par.    s b h (34 + 5 a s / h) / t
Here autograd keeps each column-parallel layer's gathered input for its weight gradient, so those
4 s b h stay whole: s b h (4 + 30/t + 5 a s / (h t)). Megatron keeps only the T/t shard and
gathers it again in backward (one more all-gather, overlapped with the gradient matmul).

Pipeline parallel (GPipe, Huang et al. 2018, arXiv:1811.06965; 1F1B from PipeDream, Harlap, Narayanan
et al. 2018, arXiv:1806.03377, with the flush of PipeDream-Flush, Narayanan et al. 2021, arXiv:2006.09503,
as Megatron-LM schedules it, Narayanan et al. 2021, arXiv:2104.04473, sec. 2.2.1), p stages of L/p
blocks; the batch is cut into m micro-batches that flow through the stages with point-to-point sends.
Time runs left to right in slots of one forward or one backward (taken as equally long); F3 is
micro-batch 3's forward, B3 its backward; p = 4, m = 4; each stage runs its work in the order
gpipe / one_f_one_b issue it, as soon as its input has arrived:

    GPipe (all forwards, then all backwards)          1F1B (one forward, one backward, in steady state)
    s0: F0 F1 F2 F3 .  .  .  .  .  .  B0 B1 B2 B3      s0: F0 F1 F2 F3 .  .  .  B0 .  B1 .  B2 .  B3
    s1: .  F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3 .       s1: .  F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3 .
    s2: .  .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .  .       s2: .  .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .  .
    s3: .  .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .  .       s3: .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .  .

Both take 2 (m+p-1) slots, and each stage is busy in 2m of them: bubble = (p-1)/(m+p-1) of the step
(a test rebuilds both diagrams from the schedules' code). 1F1B's gain is memory: a stage holds
the activations of at most p - s micro-batches in flight, not all m.
Communication per stage boundary: m activations forward and m gradients backward, each B/m T C x 4.
A tied embedding lives on the first stage (lookup) and the last (output layer); its two gradients
are summed by an all-reduce between those two stages, as Megatron does: V C x 4 more bytes sent by each
(a two-rank all-reduce sends 2 (n-1)/n = 1 times the tensor).
With --doc_mask each stage computes the document numbers and positions from the micro-batch's tokens,
which every stage holds (the batch is split by data rank only): nothing but activations is sent.
Memory per stage: 16 bytes (weights, gradient, Adam) per parameter it holds, L/p blocks' worth,
plus the embeddings on the first stage and ln_f and the output layer (with tied embeddings, a copy
of V C) on the last: about 16 N/p.

Context parallel (ring attention; Liu et al. 2023, arXiv:2310.01889), c ranks each holding T/c
positions of every sequence. Everything but attention is per position; attention needs every
earlier key, so the key/value blocks travel round a ring: at each of c steps a rank attends its
queries to the block it holds while sending it on. The partial results merge exactly with the
online-softmax rule (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022):
    m' = max(m, m_b),  l' = l e^(m - m') + l_b e^(m_b - m'),  o' = o e^(m - m') + o_b e^(m_b - m')
Causality per block: a block entirely in the future is skipped, the diagonal block is masked.
Load balancing (option) gives rank r the chunks r and 2c-1-r of 2c, so every rank has as much
unmasked work. Sent per rank and layer, in blocks of B nh (T/c) hs x 4 bytes: forward 2 (c-1) (K, V),
backward 4 (c-1) (K, V and their dK, dV) and 2 more (dK, dV home): (6c - 4) blocks; plus data
parallel's gradient all-reduce over the dp x cp ranks. With --doc_mask each block's document numbers
travel beside it, B (T/c) x 8 bytes (int64) per hop, 2 (c-1) hops forward and backward, and every
block is masked by document too (the numbers come from the whole window, cut like the tokens).
Memory: weights, gradients and Adam state as data parallel's (every cp rank holds the model);
activations 1/c of one device's, and each score block is (T/c)^2 instead of T^2.

Expert parallelism (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch, Fedus et al. 2021),
for a mixture-of-experts model (model.MoE), ep ranks per group inside the data group: rank i of a
group keeps experts [i E/ep, (i+1) E/ep) of every MoE layer and everything else whole. Each rank
routes its own tokens; an all-to-all of the counts (E int64 per layer) tells every rank how many
rows it will receive; an all-to-all sends each (token, expert) slot's C values to its expert's rank
(dispatch), the experts run there, and a second all-to-all brings the outputs back (combine);
backward runs both the other way. Per MoE layer and micro-step rank r sends
    2 (sum_{j != r} n_{r->j} + sum_{j != r} n_{j->r}) C 4 bytes,   = 4 (ep-1)/ep N k C 4 when balanced,
with n_{r->j} the slots of r's tokens routed to j's experts (N tokens, k slots each). Expert weights'
gradients are summed over the d/ep ranks holding the same experts and divided by d (2 (d/ep - 1)/(d/ep)
4 N_e/ep bytes); the rest is plain data parallelism or ZeRO-1/2. Memory: 16 N_e / ep for the experts' weights,
gradients and AdamW, the dense part as DDP. Tests hold the bytes and the 1/ep to these formulas.

DiLoCo (Douillard et al. 2023, arXiv:2311.08105): d workers each take H local AdamW steps without
talking; then the pseudo-gradient theta_global - theta_local is averaged (one all-reduce of 4N) and
an outer Nesterov SGD (lr 0.7, momentum 0.9, the paper's) moves theta_global. Communication is
2 (d-1)/d 4N every H steps instead of every step. Memory 24N: the worker's 16N (weights, gradients,
AdamW) plus theta_global and the outer momentum, 4N each. Once its momentum m has built up, the
outer step moves theta_global lr / (1 - m) times the averaged change: 7x with the paper's values,
chosen for H = 500 from a pretrained model; a short run from scratch wants less (README: measured).

The mesh
--------
With P = pp x dp x cp x tp ranks, rank coordinates on a DeviceMesh with dims (pp, dp, cp, tp): tp
innermost, so that tensor parallelism's per-layer all-reduces stay on the fastest links (inside a
node), pp outermost because it sends least. Gradients are averaged over dp x cp (the "data" group:
context-parallel ranks hold copies of the weights too).

Map of this file
----------------
process groups (Layout, init_distributed) -> when a collective fails (one line naming the rank
to check) -> counted collectives -> one replica (the decay rule,
torch's AdamW, and Replicated: the calls every strategy answers, with no data parallelism) -> Muon
(Newton-Schulz, Kimi's scale, each rank orthogonalising the matrices it owns) -> data
parallel (BucketedDataParallel) -> ZeRO 1/2 and 3 (FlatShard, ShardedAdamW, ZeRO, GatherParams,
ZeRO3) -> tensor parallel (f, g, column/row layers, vocabulary-parallel embedding and
cross-entropy, its checkpoint pieces) -> sequence parallel (all-gather / reduce-scatter along T,
per-rank dropout) -> pipeline (cut_to_stage, GPipe, 1F1B, the tied embedding's sum) -> context
parallel (ring attention) -> DiLoCo -> expert parallelism (all-to-all dispatch and combine) -> torch's native versions (DTensor tensor parallelism, DDP
and ZeroRedundancyOptimizer, FSDP2), TensorParallel (either one's part of each call) and
make_data_parallel -> FullCheckpointFormat (what a full checkpoint holds) -> Parallelized (the
composition, with a table of which strategy does what in each call) -> the command line (`preflight`: every
collective once, with the usual fixes when one fails; `plan`: scaling.py's formulas for a model
preset, fed the counts this file stores).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import math
import os
import sys
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from model import ATTENTION_BACKENDS, GPT, MoE, document_ids, document_positions, mlp_hidden, repeat_kv

MESH_DIMS = ("pp", "dp", "cp", "tp")  # outermost to innermost (see "The mesh")

# ----------------------------------------------------------------------------------------------
# Process groups


@dataclass
class Layout:
    """Where this rank sits in the (pp, dp, cp, tp) mesh, and the groups it communicates in.

    groups: one per mesh dim, plus "data" (dp x cp: the ranks that average gradients) and
    "embedding" (first and last pipeline stage). A missing group means a group of one.
    """

    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh, or None for one process
    coords: dict = field(default_factory=dict)  # this rank's index along each mesh dim
    groups: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def rank(self, dim: str) -> int:
        if dim == "data":  # dp-major, cp-minor, as the mesh orders them
            return self.rank("dp") * self.cp + self.rank("cp")
        return self.coords.get(dim, 0)

    def size(self, dim: str) -> int:
        return self.dp * self.cp if dim == "data" else getattr(self, dim)

    def group(self, dim: str):
        return self.groups.get(dim)

    @property
    def is_rank0(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0


def check_degrees(dp: int, tp: int, pp: int, cp: int, world_size: int):
    """The one-line refusal for a layout that does not fill the processes torchrun started."""
    for name, n in (("dp", dp), ("tp", tp), ("pp", pp), ("cp", cp)):
        if n < 1:
            raise ValueError(f"--{name} must be at least 1, got {n}")
    if dp * tp * pp * cp != world_size:
        raise ValueError(f"--dp {dp} x --tp {tp} x --pp {pp} x --cp {cp} = {dp * tp * pp * cp} processes, but "
                         f"{world_size} were started: make the product equal torchrun's --nnodes x --nproc_per_node")


def init_distributed(dp: int = 1, tp: int = 1, pp: int = 1, cp: int = 1, device: torch.device | None = None,
                     timeout_s: float = 300) -> Layout:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment) and build the (pp, dp, cp, tp) mesh. NCCL on GPUs, gloo on CPUs. The timeout turns
    a collective that one rank never reaches (a hang) into an error after timeout_s seconds."""
    device = device or torch.device("cpu")
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    check_degrees(dp, tp, pp, cp, world)
    if world == 1:
        return Layout(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return build_layout(dp, tp, pp, cp, device, timeout_s)


def build_layout(dp: int, tp: int, pp: int, cp: int, device: torch.device, timeout_s: float | None = None) -> Layout:
    """The DeviceMesh and its groups, on an initialised default process group (every rank calls this).
    timeout_s: how long a collective in any of these groups may wait (None: torch's default per group)."""
    from torch.distributed.device_mesh import init_device_mesh

    check_degrees(dp, tp, pp, cp, dist.get_world_size())
    mesh = init_device_mesh(device.type, (pp, dp, cp, tp), mesh_dim_names=MESH_DIMS)
    layout = Layout(pp=pp, dp=dp, cp=cp, tp=tp, mesh=mesh, device=device)
    layout.coords = {d: mesh.get_local_rank(d) for d in MESH_DIMS}
    layout.groups = {d: mesh.get_group(d) for d in MESH_DIMS}
    ranks = mesh.mesh  # (pp, dp, cp, tp) grid of global ranks
    # the data group spans dp and cp: the ranks that hold the same weights and different tokens
    layout.groups["data"] = subgroup(ranks.permute(0, 3, 1, 2).reshape(pp * tp, dp * cp))
    if pp > 1:  # first and last stage of each pipeline: they share the tied embedding
        layout.groups["embedding"] = subgroup(ranks[[0, pp - 1]].permute(1, 2, 3, 0).reshape(-1, 2))
    if timeout_s is not None:
        # torch gives each new group its own default timeout (30 min on gloo, 10 on NCCL), not the
        # default group's: without this, a rank that skips a data- or tensor-parallel collective
        # would hang its peers for half an hour instead of --dist_timeout seconds (a test checks it)
        for group in layout.groups.values():
            if group is not None:
                dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
    return layout


def subgroup(rows: torch.Tensor):
    """One process group per row of global ranks; returns the one holding this rank. Every rank
    creates every group (torch requires it), in the same order."""
    mine = None
    for row in rows.tolist():
        group = dist.new_group(row)
        if dist.get_rank() in row:
            mine = group
    return mine


def log0(*args, **kwargs):
    """print on global rank 0 only: one log per job, not one per process."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def shutdown():
    """Leave the job cleanly (a process that exits without this can leave the others waiting)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# When a collective fails: one line naming the rank to look at, not the transport's traceback
#
# A rank that stops with an error leaves its message in the job's key-value store (torchrun's
# rendezvous store, which outlives the workers) before it exits. Its peers' next collective then
# fails ("Connection closed by peer"), or times out after --dist_timeout if a rank hangs; each of
# them adds its own note and gives the others a few seconds to do the same (fewer if the caller's
# stop() says so: train.py's, when torchrun's SIGTERM comes, which follows a worker's death). Whoever
# left nothing is the rank to check: hung, killed or crashed. (Under NCCL a timed-out collective is caught by
# torch's watchdog, which ends the process itself; this covers gloo and the errors every rank sees.)

FAILURE_KEY = "nanopretrain/failed/{rank}"
FAILURE_GRACE_S = 5.0  # seconds a failed rank waits for its peers' notes before naming the silent ones


def _store():
    """The default process group's store, or None (a private torch API, so every use is guarded)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 -- no group, or an older torch
        return None


def report_failure(message: str):
    """Leave this rank's error where its peers look (describe_failure); a no-op on one process."""
    if not dist.is_initialized() or (store := _store()) is None:
        return
    with contextlib.suppress(Exception):  # the store's host may be gone too: nothing more to do
        store.set(FAILURE_KEY.format(rank=dist.get_rank()), message)


def is_communication_failure(e: BaseException) -> bool:
    """Whether an exception comes from torch.distributed's transport (gloo, NCCL, the store)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return any(marker in str(e) for marker in ("gloo", "Connection closed by peer", "Connection reset by peer",
                                                "Timed out waiting", "NCCL", "c10d"))


def _peer_notes(note: str, grace_s: float, stop=None) -> dict | None:
    """Leave this rank's note, then wait up to grace_s for every peer's, or until stop() is true:
    {rank: note}, or None when the store cannot be reached."""
    store, rank, world = _store(), dist.get_rank(), dist.get_world_size()
    if store is None:
        return None
    import time

    notes, deadline = {}, time.monotonic() + grace_s
    try:
        store.set(FAILURE_KEY.format(rank=rank), note)
        while True:
            for q in range(world):
                key = FAILURE_KEY.format(rank=q)
                if q != rank and q not in notes and store.check([key]):
                    notes[q] = store.get(key).decode(errors="replace")
            if len(notes) == world - 1 or time.monotonic() > deadline or (stop is not None and stop()):
                return notes
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 -- the store's host went away (it was a rank's own process)
        return None


def describe_failure(e: BaseException, timeout_s: float, stop=None) -> str:
    """One line for a failed collective: the peer's own error if one stopped with an error, else
    which rank did not answer, and what to change. stop: a function that, once true, ends the wait
    for the peers' notes with those that came (train.py's: a stop signal came, as torchrun sends
    to the workers left when one dies; the peers that fail with this one leave theirs as they fail)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # gloo starts with [its/source.cc:123]
    first = first.split(". This is typically")[0][:200]
    if not dist.is_initialized():
        return (f"could not join the job ({first}): start every process with torchrun, check that MASTER_ADDR and "
                "MASTER_PORT (torchrun's --rdzv_endpoint) are reachable from every node, or raise --dist_timeout")
    rank = dist.get_rank()
    timed_out = "timed out" in first.lower() or "timeout" in first.lower()
    own = "timed out" if timed_out else "lost a peer"
    notes = _peer_notes(own, min(FAILURE_GRACE_S, timeout_s), stop)
    if notes is None:
        return f"rank {rank}: a collective failed ({first}): one of the other ranks stopped; see its log for why"
    errors = {q: m for q, m in notes.items() if m not in ("timed out", "lost a peer")}
    if errors:
        q = min(errors)
        return f"rank {rank}: stopped because rank {q} stopped with an error: {errors[q]}"
    silent = [str(q) for q in range(dist.get_world_size()) if q != rank and q not in notes]
    check = f"rank {', '.join(silent)}" if silent else "the other ranks' logs"
    if timed_out:
        return (f"rank {rank}: a collective waited --dist_timeout {timeout_s:g} s for its peers ({first}): raise "
                f"--dist_timeout or check {check}" + (" (it did not answer: hung, killed or crashed)" if silent else ""))
    return f"rank {rank}: lost the connection to another rank ({first}): check {check}" + (
        " (it did not answer: killed or crashed)" if silent else "")


# ----------------------------------------------------------------------------------------------
# Counted collectives: every byte this file sends goes through here


BYTES_SENT = Counter()  # bytes this rank sent, by purpose ("grads", "params", "tp", "pp", "cp", ...)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor, group, tag: str, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In-place sum (or max) over the group. Ring cost: 2 (n-1)/n of the tensor sent per rank."""
    n = group_size(group)
    if n == 1:
        return None
    BYTES_SENT[tag] += 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def reduce_scatter(output, input, group, tag: str, async_op: bool = False):
    """output (S) = slice r of the sum of input (n S) over the group. Sends (n-1) S per rank."""
    n = group_size(group)
    if n == 1:
        output.copy_(input)
        return None
    BYTES_SENT[tag] += (n - 1) * output.numel() * output.element_size()
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.10
    return scatter(output, input, group=group, async_op=async_op)


def all_gather(output, input, group, tag: str, async_op: bool = False):
    """output (n S) = every rank's input (S), in rank order. Sends (n-1) S per rank. input may be
    this rank's own slice of output (in place: NCCL and gloo both allow it)."""
    n = group_size(group)
    if n == 1:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)
        return None
    BYTES_SENT[tag] += (n - 1) * input.numel() * input.element_size()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10
    return gather(output, input, group=group, async_op=async_op)


def broadcast(tensor, group, tag: str):
    """Everyone gets group rank 0's tensor. BYTES_SENT counts the root's bytes only, the tensor
    once; in NCCL's ring or chain every rank but the last forwards it too, S bytes each."""
    if group_size(group) == 1:
        return
    if dist.get_rank(group) == 0:
        BYTES_SENT[tag] += tensor.numel() * tensor.element_size()
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def all_to_all(input, send_rows: list, recv_rows: list, group, tag: str):
    """Rank r sends send_rows[j] consecutive rows of input to rank j of the group and receives
    recv_rows[j] rows from rank j, in rank order: all_to_all_single with uneven splits (gloo and
    NCCL both have it). Sends the rows meant for the other ranks: sum over j != r of send_rows[j]
    rows of (input's row numel x element size) bytes; its own rows stay."""
    if group_size(group) == 1:
        return input
    row_bytes = math.prod(input.shape[1:]) * input.element_size()  # (a rank may have no rows to send)
    BYTES_SENT[tag] += (sum(send_rows) - send_rows[dist.get_rank(group)]) * row_bytes
    output = input.new_empty((sum(recv_rows), *input.shape[1:]))
    dist.all_to_all_single(output, input.contiguous(), output_split_sizes=recv_rows, input_split_sizes=send_rows, group=group)
    return output


def exchange(group, tag: str, sends=(), recvs=(), wait: bool = True):
    """Point to point: sends and recvs are (tensor, peer's rank in group) pairs, posted together
    and waited for together. Posting a pair at once is what keeps neighbours that both send and
    both receive from waiting on each other (NCCL would deadlock on two blocking sends).
    wait=False returns the requests instead, to overlap the transfer with computation."""
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group) for t, peer in recvs]
    BYTES_SENT[tag] += sum(t.numel() * t.element_size() for t, _ in sends)
    works = dist.batch_isend_irecv(ops) if ops else []
    if not wait:
        return works
    for work in works:
        work.wait()
    return []


# ----------------------------------------------------------------------------------------------
# One replica: the optimizer every strategy starts from, and the calls each strategy answers


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's values: the local shard of a DTensor (torch's native strategies hold parameters
    as DTensors), the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective), a plain tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def as_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A local piece as `like` holds it: wrapped as a DTensor with like's placements where like is one."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False)


# Sharded checkpoints (train.py's --checkpoint_format sharded) see each rank's state as pieces of the
# single-process model's tensors: (offsets, values), where offsets says where the piece starts in the
# whole tensor along each dim and values is a view of what this rank holds (never a copy). The pieces
# of one tensor over all ranks tile it (replicas repeat theirs; DCP writes one copy).


def dtensor_offsets(t: torch.Tensor) -> tuple:
    """Where this rank's values of t start in the whole, per dim: a DTensor's shard offset (torch's
    own rule, which covers uneven and nested FSDP2 x tensor-parallel shards), zeros for a plain tensor."""
    if not is_dtensor(t):
        return (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return tuple(compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1])


def flat_range_pieces(shape, start: int, values: torch.Tensor) -> list:
    """values, the elements [start, start + n) of a tensor of `shape` flattened row-major (a ZeRO
    shard's part of one parameter), as rectangles of the tensor: for a matrix, at most a partial first
    row, whole rows, a partial last row; for more dims (an MoE's experts, (E, C, H)) the same along
    dim 0, each partial row cut the same way one dim down. Each is a view of values."""
    n = values.numel()
    if len(shape) <= 1:
        return [((start,) * len(shape), values.view(-1) if shape else values.view(()))]
    inner, pieces, done = math.prod(shape[1:]), [], 0  # inner: the elements of one row along dim 0
    while done < n:
        row, col = divmod(start + done, inner)
        if col or n - done < inner:  # a partial row: up to its end, or up to the range's end
            length = min(inner - col, n - done)
            pieces += [((row, *offsets), part.unsqueeze(0))
                       for offsets, part in flat_range_pieces(shape[1:], col, values[done:done + length])]
        else:  # as many whole rows as the range holds
            length = (n - done) // inner * inner
            pieces.append(((row,) + (0,) * (len(shape) - 1), values[done:done + length].view(length // inner, *shape[1:])))
        done += length
    return pieces


def split_by_positions(offsets: tuple, values: torch.Tensor, dim: int, positions: torch.Tensor) -> list:
    """A piece in the coordinates of this rank's module -> pieces in the single-process tensor's,
    where module coordinate i along dim is positions[i] there (tensor parallelism's index lists: a
    rank's heads of c_attn's [q | k | v] rows are three runs). Split where positions stop being consecutive."""
    lo, n = offsets[dim], values.shape[dim]
    pos, out, start = positions[lo:lo + n].tolist(), [], 0
    for j in range(1, n + 1):
        if j == n or pos[j] != pos[j - 1] + 1:
            out.append((offsets[:dim] + (pos[start],) + offsets[dim + 1:], values.narrow(dim, start, j - start)))
            start = j
    return out


def is_decayed(p: torch.Tensor) -> bool:
    """The weight-decay rule, in its one home: matrices (embeddings, linear weights) decay, vectors
    (biases, norm gains) do not, since decaying those only pulls them towards zero (GPT-2's and
    nanoGPT's recipe). torch's AdamW groups, ZeRO's per-element decay and the checkpoint's
    parameter order are all built from this one function."""
    return p.dim() >= 2


def adamw_groups(params, weight_decay: float) -> list[dict]:
    """torch.optim.AdamW's two parameter groups: decayed, then not. Every parameter lands in
    exactly one of them (asserted, as minGPT does: a parameter in neither would never train)."""
    params = [p for p in params if p.requires_grad]
    decay, no_decay = [p for p in params if is_decayed(p)], [p for p in params if not is_decayed(p)]
    ids = [{id(p) for p in group} for group in (decay, no_decay)]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in params}, "a parameter in no group, or in both"
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_order(named_params) -> list[str]:
    """Parameter names in adamw_groups' order: the index of each in a single-process AdamW state_dict."""
    named = list(named_params)
    return [n for n, p in named if is_decayed(p)] + [n for n, p in named if not is_decayed(p)]


def make_adamw(params, lr: float, betas: tuple, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """torch's AdamW over adamw_groups (train.make_optimizer builds the single-process one with it)."""
    return torch.optim.AdamW(adamw_groups(params, weight_decay), lr=lr, betas=betas, fused=fused)


class Replicated:
    """No data parallelism: torch's AdamW on the parameters this rank holds, nothing sent between
    replicas. Alone it serves one process, and tensor, pipeline or context ranks, which share their
    replica's batch. Every data-parallel flavour below starts from it and changes what its section
    explains. The calls Parallelized makes, in the order of a step:

        forward_module                 what runs the forward (here the module itself)
        with no_sync(): backward       an accumulation micro-step: no gradient traffic
        finish_gradient_sync()         after the last micro-step's backward
        local_grads()                  name -> this rank's part of that gradient (norm, clipping)
        step(), zero_grad()            the update, and whatever must follow it
        held_tensors()                 (kind, tensor) of everything it keeps: the memory count
        full_state(), full_optimizer_state(), load_state()   checkpoints, whole over the data ranks
    """

    shards_over_data = False  # does each data rank hold a different part of the state (ZeRO, FSDP)?
    independent_workers = False  # do the data ranks train apart between syncs (DiLoCo)?

    def __init__(self, module: nn.Module, make_optimizer):
        self.module = self.forward_module = module
        self.optimizer = make_optimizer(module.parameters())

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_gradient_sync(self):
        pass

    def local_grads(self) -> dict:
        return {name: local_part(p.grad) for name, p in self.module.named_parameters() if p.grad is not None}

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.module.parameters():
            p.grad = None

    def held_tensors(self):
        yield from (("params", p) for p in self.module.parameters())
        yield from (("grads", p.grad) for p in self.module.parameters())
        yield from (("optimizer", t) for state in self.optimizer.state.values() for t in state.values())

    def full_state(self) -> dict:
        """name -> tensor for this rank's module, whole across the data ranks."""
        return {k: full_tensor(v).detach().clone() for k, v in self.module.state_dict().items()}

    def full_optimizer_state(self) -> dict:
        """name -> {"step", "exp_avg", "exp_avg_sq"} (AdamW) or {"momentum_buffer"} (Muon), whole
        across the data ranks."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        adamw = getattr(self.optimizer, "adamw", self.optimizer)  # MuonAdamW: its AdamW part here, Muon's below
        out = {names[id(p)]: {k: full_tensor(v).clone() for k, v in state.items()} for p, state in adamw.state.items()}
        if isinstance(self.optimizer, MuonAdamW):
            out.update(self.optimizer.muon.full_state())  # gathered from each matrix's owner (collective)
        return out

    @torch.no_grad()
    def load_state(self, model_state: dict, optimizer_state: dict | None, piece):
        """Load full tensors (a single-process checkpoint); piece(name, full, like) is this rank's
        part of one (its tensor-parallel slice, as a DTensor shard where `like` is one)."""
        for name, p in self.module.state_dict(keep_vars=True).items():
            local_part(p).copy_(piece(name, model_state[name], p))
        if optimizer_state:
            load_adamw_state(getattr(self.optimizer, "adamw", self.optimizer), self.module, optimizer_state, piece)
            if isinstance(self.optimizer, MuonAdamW):
                self.optimizer.muon.load_state(optimizer_state)

    def local_pieces(self) -> dict:
        """Sharded checkpoints: key -> (parameter name, [(offsets, values)]) for what this rank holds,
        in its module's coordinates: each parameter (a DTensor's local shard at its offset), its
        AdamW moments and step, and Muon's momenta of the matrices this rank owns. The optimizer
        state must exist (create_optimizer_state)."""
        out, names = {}, {id(p): n for n, p in self.module.named_parameters()}
        for name, p in self.module.named_parameters():
            out[f"model.{name}"] = (name, [(dtensor_offsets(p), local_part(p).detach())])
        for p, state in getattr(self.optimizer, "adamw", self.optimizer).state.items():  # MuonAdamW: its AdamW part
            name = names[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"optim.{name}.{key}"] = (name, [(dtensor_offsets(state[key]), local_part(state[key]))])
            out[f"optim.{name}.step"] = (name, [((), state["step"])])
        return out | (self.optimizer.muon.pieces() if isinstance(self.optimizer, MuonAdamW) else {})

    def any_rank(self, flag: bool) -> bool:
        """Is flag (a non-finite loss or norm) True on any rank? Here every rank already holds the
        same one: the loss and the norm were reduced over all of them."""
        return flag

    def mean_over_data(self, t: torch.Tensor, group):
        """A per-rank number (the loss, for the log) averaged over the data ranks (group), in place."""
        all_reduce(t, group, "loss")
        t /= group_size(group)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict):
        pass


def adamw_state_dict(named: dict, order: list, n_decayed: int, lr: float, betas: tuple, weight_decay: float) -> dict:
    """Per-name AdamW state -> the state_dict of a single-process torch AdamW over adamw_groups
    (order: adamw_order's names, the first n_decayed of them in the decayed group)."""
    template = torch.optim.AdamW([{"params": [torch.zeros(1)], "weight_decay": weight_decay},
                                  {"params": [torch.zeros(1)], "weight_decay": 0.0}], lr=lr, betas=betas)
    groups = template.state_dict()["param_groups"]
    groups[0]["params"], groups[1]["params"] = list(range(n_decayed)), list(range(n_decayed, len(order)))
    state = {i: {k: v.cpu() for k, v in named[name].items()} for i, name in enumerate(order) if name in named}
    return {"state": state, "param_groups": groups}


def storage_bytes(held) -> dict:
    """kind -> bytes, over (kind, tensor) pairs, each storage counted once (a view adds nothing) and
    0-dimensional tensors (AdamW's step counters) left out."""
    seen, out = set(), Counter()
    for kind, t in held:
        if torch.is_tensor(t) and t.dim() > 0:
            storage = local_part(t).untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes() > 0:
                seen.add(storage.data_ptr())
                out[kind] += storage.nbytes()
    return dict(out)


def load_adamw_state(optimizer, module: nn.Module, named: dict, piece):
    """torch AdamW state given by parameter name -> optimizer.load_state_dict's index form."""
    names, index = {id(p): n for n, p in module.named_parameters()}, 0
    local = {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            local["state"][index] = {"step": named[name]["step"].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                local["state"][index][key] = as_like(piece(name, named[name][key], p), p)
            index += 1
    optimizer.load_state_dict(local)


# ----------------------------------------------------------------------------------------------
# Muon: the hidden matrices step along their orthogonalised momentum
#
# AdamW scales every element of the update by its own running RMS. Muon (Jordan et al. 2024,
# "Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025, Kimi's "Muon is
# Scalable for LLM Training", arXiv:2502.16982) treats a weight matrix W (A x B) as a linear map
# and steps along the matrix that moves it most per unit of spectral norm: with the momentum
# M = U S V^T (its SVD), that matrix is the polar factor O = U V^T, every singular value set to 1.
# A gradient of a transformer's matrix is nearly low-rank (a few directions dominate); AdamW's
# update inherits that, and orthogonalising it gives the rare directions as large a step as the
# common ones. An SVD per matrix per step is slow on accelerators; a few matrix products are not,
# so O is approximated by a Newton-Schulz iteration (newton_schulz). Only the 2-D matrices inside
# the blocks take Muon: the embedding is a lookup table (a row per token, not a map), the output
# layer and the norms' gains and biases are not hidden matrices, and all of them stay on AdamW
# (Jordan et al.; Kimi, sec. 2). With Kimi's scale (muon_scale) the update's RMS matches
# AdamW's, so one learning rate and one weight decay serve both optimizers.

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of Jordan et al. 2024 (modded-nanogpt), also Kimi's
NS_STEPS = 5  # their number of iterations
NS_BAND = (0.68, 1.21)  # where 5 steps put every singular value s of G with s >= NS_MIN_RATIO ||G||_F (a test holds it)
NS_MIN_RATIO = 2e-3  # smaller ones are not yet grown into the band after 5 steps (they are multiplied by ~a^5 = 485)
MUON_MOMENTUM = 0.95  # Jordan et al. and Kimi


# EXERCISE: newton-schulz (tests/test_parallel.py -k 'newton_schulz_puts or muon_steps_equal')
def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximation of the polar factor U V^T of G = U S V^T (A x B), by the quintic
    Newton-Schulz iteration of Jordan et al. 2024, in G's dtype:

        X_0 = G / ||G||_F                      (every singular value now in [0, 1])
        X_{k+1} = a X_k + b (X_k X_k^T) X_k + c (X_k X_k^T)^2 X_k,   (a, b, c) = (3.4445, -4.7750, 2.0315)

    Why it approximates the polar factor: with X = U S V^T, X X^T = U S^2 U^T, so each step maps
    X to U p(S) V^T with p(s) = a s + b s^3 + c s^5 applied to each singular value on its own; the
    singular vectors never change. Iterating p drives every s > 0 towards a fixed point near 1,
    which is U V^T. The classic cubic (a, b, c) = (3/2, -1/2, 0) converges to exactly 1 but grows
    a small s only by 3/2 per step; these coefficients trade exactness for speed: the slope at 0
    is a = 3.4445, so a small s grows 485-fold in 5 steps, and p then oscillates in a band instead
    of settling at 1: after 5 steps every s >= 2e-3 ||G||_F lands in [0.68, 1.21] (NS_BAND,
    measured by iterating p in float64 and held by a test against an SVD). Jordan et al. report
    that a band this wide costs nothing measurable in training. The cubic, from the same 2e-3 until
    every s >= 0.68, needs 15 steps instead of 5 (float64, the band's grid; a test counts them):
    3x the iterations, but 2x the matrix products (30 against 15: a cubic step takes 2, a quintic
    one 3). Each quintic step's three matmuls go through the min(A, B) x min(A, B) Gram matrix, so
    a tall G is transposed first (p acts on singular values, so the result is the same).
    """
    a, b, c = NS_COEFFICIENTS
    X = G / (G.norm() + 1e-7)  # 1e-7: Jordan et al.'s guard for an all-zero update
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.mT  # (A, B) -> (B, A): the Gram matrix below is then min(A, B) square
    for _ in range(steps):
        gram = X @ X.mT  # (m, n) x (n, m) -> (m, m), m = min(A, B): U S^2 U^T
        X = a * X + (b * gram + c * gram @ gram) @ X  # U p(S) V^T
    return X.mT if tall else X


def muon_scale(shape) -> float:
    """Kimi's update scale, 0.2 sqrt(max(A, B)) (Liu et al. 2025, arXiv:2502.16982): the polar
    factor of an A x B matrix has min(A, B) singular values equal to 1, so its RMS is
    sqrt(min(A, B) / (A B)) = 1 / sqrt(max(A, B)); multiplying by 0.2 sqrt(max(A, B)) brings it to
    0.2, the RMS Kimi measured for AdamW's updates in practice (between 0.2 and 0.4). AdamW's
    learning rate and weight decay then mean the same step size for both optimizers."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


def is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    """The rule of what Muon updates: the 2-D weights inside the transformer blocks (attention's
    and the MLP's linear layers), and inside --mtp's extra heads (their blocks, and the sequential
    modules' projections M_k). Embeddings, the output layer, norms and biases stay on AdamW."""
    return p.dim() == 2 and name.startswith(("transformer.h.", "mtp_heads."))


class Muon(torch.optim.Optimizer):
    """Muon on a list of named matrices (Jordan et al. 2024), one step, with lr and wd as AdamW's:

        M = mu M + (1 - mu) G                 (momentum, mu = 0.95, an average as Adam's first moment)
        N = mu M + (1 - mu) G                 (Nesterov: the average one step further)
        W = W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) NewtonSchulz(N)

    The scale of M does not matter (Newton-Schulz normalises it away), so the average above and
    Jordan's plain sum (M = mu M + G) give the same step; the average keeps M on the gradient's scale.

    Distributed (the scheme of Kimi's Distributed Muon and nanochat's DistMuon): with a group of n
    data-parallel ranks the matrices are dealt out by shape, in chunks of n same-shaped matrices
    whose k-th belongs to rank k (a chunk may be short: its missing slots are zeros on the wire).
    Each rank keeps momentum for, and orthogonalises, only the matrices it owns (about 1/n of the
    Newton-Schulz work and of the momentum memory; exactly 1/n when each shape's count of matrices
    is a multiple of n, else the busiest rank owns ceil(k/n) of k); then one all-gather per chunk
    hands every rank every updated matrix. The owner needs the whole averaged gradient of its
    matrices: under DDP and ZeRO-1 every rank has all of them (an all-reduce); under ZeRO-2
    sync_grads reduce-scatters each chunk, so each rank receives only its own matrix's sum ((n-1)/n
    of the chunk sent, as ZeRO's flat reduce-scatter). Every rank therefore computes exactly what one process would.
    """

    def __init__(self, named_params: list, lr: float, weight_decay: float, momentum: float = MUON_MOMENTUM,
                 ns_steps: int = NS_STEPS, group=None):
        super().__init__([p for _, p in named_params], dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                                            ns_steps=ns_steps))
        self.group, self.name = group, {p: n for n, p in named_params}
        n, self.rank = group_size(group), (dist.get_rank(group) if group_size(group) > 1 else 0)
        by_shape = {}
        for _, p in named_params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.chunks = [same[i:i + n] for same in by_shape.values() for i in range(0, len(same), n)]
        self.owned = [chunk[self.rank] for chunk in self.chunks if self.rank < len(chunk)]
        for p in self.owned:  # zeros: the first step's average is then (1 - mu) G, as if the run had begun with M = 0
            self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    # EXERCISE: muon (tests/test_parallel.py -k muon_steps_equal)
    @torch.no_grad()
    def update(self, p: torch.Tensor, group: dict):
        """One Muon step on one matrix this rank owns (the formula in the class docstring)."""
        if p.grad is None:
            return
        mu, buf = group["momentum"], self.state[p]["momentum_buffer"]
        buf.lerp_(p.grad, 1 - mu)  # M = mu M + (1 - mu) G
        nesterov = p.grad.lerp(buf, mu)  # mu M + (1 - mu) G: the momentum one step ahead
        ortho = newton_schulz(nesterov, group["ns_steps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay, as AdamW's
        p.add_(ortho.to(p.dtype), alpha=-group["lr"] * muon_scale(p.shape))

    # EXERCISE: muon
    @torch.no_grad()
    def step(self, closure=None):
        """Update the matrices this rank owns, then all-gather every chunk so all ranks hold all of them."""
        group = self.param_groups[0]
        for p in self.owned:
            self.update(p, group)
        for chunk in self.chunks:
            self._gather(chunk, [p.data for p in chunk], "params")

    def _gather(self, chunk: list, tensors: list, tag: str):
        """tensors[k] (the k-th matrix of the chunk, or its momentum) <- its owner's, rank k's."""
        n = group_size(self.group)
        if n == 1:
            return
        numel = chunk[0].numel()
        flat = torch.empty(n * numel, dtype=tensors[0].dtype, device=tensors[0].device)
        mine = tensors[self.rank].reshape(-1) if self.rank < len(chunk) else torch.zeros_like(flat[:numel])
        all_gather(flat, mine, self.group, tag)
        for k, t in enumerate(tensors):
            t.copy_(flat[k * numel:(k + 1) * numel].view_as(t))

    def sync_grads(self, keep_all: bool):
        """The mean over the group of each matrix's gradient: on every rank (keep_all: an
        all-reduce, ZeRO-1), or on its owner alone (a reduce-scatter per chunk, ZeRO-2; the
        other ranks' copies are dropped)."""
        n = group_size(self.group)
        for chunk in self.chunks:
            numel, like = chunk[0].numel(), chunk[0]
            stacked = torch.zeros(n * numel, dtype=like.dtype, device=like.device)  # (n A B): slot k is matrix k's
            for k, p in enumerate(chunk):
                if p.grad is not None:
                    stacked[k * numel:(k + 1) * numel] = p.grad.reshape(-1)
                p.grad = None
            if keep_all:
                all_reduce(stacked, self.group, "grads")
                for k, p in enumerate(chunk):
                    p.grad = stacked[k * numel:(k + 1) * numel].view_as(p).div_(n)
            else:
                mine = torch.empty(numel, dtype=like.dtype, device=like.device)
                reduce_scatter(mine, stacked, self.group, "grads")
                if self.rank < len(chunk):
                    chunk[self.rank].grad = mine.view_as(like).div_(n)

    def owned_grads(self) -> dict:
        """name -> gradient of each matrix this rank updates (each counted once in the global norm)."""
        return {self.name[p]: p.grad for p in self.owned if p.grad is not None}

    def full_state(self) -> dict:
        """name -> {"momentum_buffer"} for every matrix, gathered from the owners (collective)."""
        out = {}
        for chunk in self.chunks:
            bufs = [self.state[p]["momentum_buffer"].clone() if p in self.state else torch.zeros_like(p) for p in chunk]
            self._gather(chunk, bufs, "checkpoint")
            out.update({self.name[p]: {"momentum_buffer": b} for p, b in zip(chunk, bufs)})
        return out

    def pieces(self) -> dict:
        """Sharded checkpoints: the momentum of each matrix this rank owns, whole (key -> (name,
        [(offsets, values)])); every matrix has one owner, so each momentum is written once, by it."""
        return {f"optim.{self.name[p]}.momentum_buffer": (self.name[p], [((0,) * p.dim(), self.state[p]["momentum_buffer"])])
                for p in self.owned}

    def load_state(self, named: dict):
        """The inverse: each rank keeps the momentum of the matrices it owns."""
        for p in self.owned:
            self.state[p]["momentum_buffer"].copy_(named[self.name[p]]["momentum_buffer"])


class MuonAdamW:
    """Muon on the hidden matrices and an AdamW (torch's, or ShardedAdamW under ZeRO) on the rest,
    stepped as one optimizer: param_groups lists both's groups, so the schedule's learning rate
    reaches each (Kimi's scale lets them share it)."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list:  # read anew each time: load_state_dict replaces an optimizer's group dicts
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        return {**self.adamw.state, **self.muon.state}

    def step(self):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)


def make_muon(params, names: dict, group, lr: float, betas: tuple, weight_decay: float, fused: bool) -> MuonAdamW:
    """MuonAdamW over params: Muon on is_muon_matrix's matrices, AdamW's two groups on the rest.
    names: id(p) -> its name in the GPT; group: the data-parallel group Muon deals matrices over."""
    params = [p for p in params if p.requires_grad]
    muon = [(names[id(p)], p) for p in params if is_muon_matrix(names[id(p)], p)]
    rest = [p for p in params if not is_muon_matrix(names[id(p)], p)]
    return MuonAdamW(Muon(muon, lr, weight_decay, group=group), make_adamw(rest, lr, betas, weight_decay, fused))


def check_optimizer(optimizer: str, tp: int, pp: int, cp: int, zero: int, impl: str, diloco_steps: int, dtype: str = ""):
    """Muon runs on one process, under --dp (scratch) and under --zero 1/2 (scratch); elsewhere one line."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"unknown --optimizer '{optimizer}': use adamw or muon")
    if optimizer == "muon" and (tp > 1 or pp > 1 or cp > 1 or zero == 3 or impl != "scratch" or diloco_steps):
        raise ValueError("--optimizer muon needs whole matrices on a rank: it runs on one process, with --dp and with "
                         "--zero 1 or 2 (--impl scratch); drop --tp, --pp, --cp, --zero 3, --impl native and --diloco_steps")
    if optimizer == "muon" and dtype == "float16":
        raise ValueError("--optimizer muon with --dtype float16: the gradient scaler does not know Muon; use bfloat16")


# ----------------------------------------------------------------------------------------------
# Data parallel from scratch: bucketed all-reduce launched from backward hooks


@dataclass
class Bucket:
    params: list  # in the order backward produces their gradients (last layer first)
    offsets: list  # where each gradient goes in the flat buffer
    buffer: torch.Tensor  # flat gradients, all-reduced as one message
    ready: int = 0  # gradients copied in so far this step
    work: object = None  # the in-flight all-reduce


class BucketedDataParallel(Replicated):
    """DDP from scratch (the idea of Li et al. 2020, PyTorch DDP), on top of Replicated's AdamW.

    1. Broadcast rank 0's parameters, so every replica starts equal (then equal gradients keep them so).
    2. Group parameters into buckets of about bucket_mb, in reverse order: backward computes the
       last layer's gradients first. One big message per bucket costs one latency, not one per tensor.
    3. A hook on each parameter fires when its gradient is final (post-accumulate); when a bucket's
       last gradient arrives its all-reduce starts asynchronously and backward continues meanwhile.
    4. finish_gradient_sync() waits, divides by d (mean over ranks) and writes the gradients back.
    Inside no_sync() the hooks do nothing: accumulation micro-steps send no bytes.
    """

    def __init__(self, module: nn.Module, make_optimizer, group, bucket_mb: float = 25.0):  # 25 MB: torch DDP's bucket_cap_mb
        super().__init__(module, make_optimizer)
        self.group, self.require_sync = group, True
        # expert weights under expert parallelism differ between ranks: ExpertParallel reduces them
        params = [p for p in module.parameters() if p.requires_grad and not getattr(p, "expert_parallel", False)]
        for p in params:
            broadcast(p.data, group, "init")
        self.buckets, self.slot = [], {}
        current, size = [], 0
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_mb * 2**20 or p is params[0]:
                self._close_bucket(current)
                current, size = [], 0
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _close_bucket(self, params):
        offsets = [0]
        for p in params[:-1]:
            offsets.append(offsets[-1] + p.numel())
        buffer = torch.zeros(offsets[-1] + params[-1].numel(), dtype=params[0].dtype, device=params[0].device)
        bucket = Bucket(params, offsets, buffer)
        self.buckets.append(bucket)
        for p, offset in zip(params, offsets):
            self.slot[p] = (bucket, offset)

    @contextlib.contextmanager
    def no_sync(self):
        before, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = before

    # EXERCISE: data-parallel (tests/test_parallel.py -k 'two_ranks and data_parallel')
    def _grad_ready(self, p):
        """Backward hook, p's gradient is final: copy it into its bucket; the bucket's last gradient
        starts the bucket's all-reduce, asynchronously. Nothing inside no_sync()."""
        if not self.require_sync:
            return
        bucket, offset = self.slot[p]
        bucket.buffer[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
        bucket.ready += 1
        if bucket.ready == len(bucket.params):  # the bucket is full: send it while backward goes on
            bucket.work = all_reduce(bucket.buffer, self.group, "grads", async_op=True)

    # EXERCISE: data-parallel
    def finish_gradient_sync(self):
        """After backward: wait for every bucket's all-reduce (sending now any bucket a parameter
        without a gradient left incomplete), divide by the group size, write the means into .grad."""
        n = group_size(self.group)
        for bucket in self.buckets:
            if bucket.ready < len(bucket.params):  # a parameter that got no gradient: send zeros for it
                for p, offset in zip(bucket.params, bucket.offsets):
                    grad = p.grad.reshape(-1) if p.grad is not None else 0.0
                    bucket.buffer[offset:offset + p.numel()] = grad
                bucket.work = all_reduce(bucket.buffer, self.group, "grads", async_op=True)
            if bucket.work is not None:
                bucket.work.wait()
            bucket.buffer /= n  # sum -> mean: the gradient of the mean loss over the global batch
            for p, offset in zip(bucket.params, bucket.offsets):
                mean = bucket.buffer[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
            bucket.ready, bucket.work = 0, None

    def held_tensors(self):
        yield from super().held_tensors()
        yield from (("buffers", bucket.buffer) for bucket in self.buckets)


# ----------------------------------------------------------------------------------------------
# ZeRO from scratch: flat parameter shards and an AdamW that updates only its shard
#
# The two collectives that define ZeRO sit in this section: stages 1 and 2 all-reduce or
# reduce-scatter the flat gradient in ZeRO.finish_gradient_sync and all-gather the updated shards
# in ZeRO.step; stage 3 does both inside GatherParams, once per block and micro-step.


class FlatShard:
    """A list of parameters laid end to end in one flat float32 vector, padded to a multiple of the
    group size n; this rank owns slice [r S, (r+1) S) with S = ceil(numel / n).

    keep_full=True (ZeRO 1, 2): the parameters become views into the full vector, and `shard` is a
    view of this rank's slice: updating the shard in place and all-gathering refreshes the model.
    keep_full=False (ZeRO 3): only the shard is kept; the parameters are emptied, and the full
    vector exists only between gather() and the end of its use.
    """

    def __init__(self, named_params: list, group, weight_decay: float, keep_full: bool, prefix: str = ""):
        self.group, self.prefix, self.names = group, prefix, [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [p.shape for p in self.params]
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        n, self.rank = group_size(group), (dist.get_rank(group) if group_size(group) > 1 else 0)
        self.numel, self.shard_numel = total, math.ceil(total / n)
        full = torch.zeros(self.shard_numel * n, dtype=self.params[0].dtype, device=self.params[0].device)
        decay = torch.zeros_like(full)  # per element: one flat vector holds matrices and vectors alike
        for p, offset in zip(self.params, self.offsets):
            full[offset:offset + p.numel()] = p.detach().reshape(-1)
            decay[offset:offset + p.numel()] = weight_decay if is_decayed(p) else 0.0
        lo, hi = self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel
        self.weight_decay = decay[lo:hi].clone()
        if keep_full:
            self.full = full
            for p, view in zip(self.params, self.views(full).values()):
                p.data = view  # the model now reads its weights out of the flat vector
            self.shard = nn.Parameter(full[lo:hi])  # shares storage with full
        else:
            self.full = None
            self.shard = nn.Parameter(full[lo:hi].clone())
            for p in self.params:  # free the full parameters: from now on they exist only while gathered
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                p.requires_grad_(False)

    def views(self, full: torch.Tensor) -> dict:
        """name -> the parameter's view into a full flat vector."""
        return {name: full[o:o + s.numel()].view(s) for name, o, s in zip(self.names, self.offsets, self.shapes)}

    def shard_views(self, shard: torch.Tensor) -> dict:
        """prefixed name -> the part of that parameter in a shard-shaped vector (1-D; maybe empty)."""
        lo, out = self.rank * self.shard_numel, {}
        for name, o, s in zip(self.names, self.offsets, self.shapes):
            a, b = max(o, lo), min(o + s.numel(), lo + self.shard_numel)
            if a < b:
                out[self.prefix + name] = shard[a - lo:b - lo]
        return out

    def range_pieces(self, shard: torch.Tensor, key: str) -> dict:
        """A shard-shaped vector (the parameters, or a moment) -> sharded-checkpoint pieces: for each
        parameter with elements in this rank's slice, those elements as rectangles of the parameter."""
        lo, out = self.rank * self.shard_numel, {}
        for name, o, s in zip(self.names, self.offsets, self.shapes):
            a, b = max(o, lo), min(o + s.numel(), lo + self.shard_numel)
            if a < b:
                out[key.format(self.prefix + name)] = (self.prefix + name, flat_range_pieces(s, a - o, shard[a - lo:b - lo]))
        return out

    def moment_pieces(self, state: dict) -> dict:
        """ShardedAdamW's state for this shard as sharded-checkpoint pieces (the step, one per unit,
        is written under every parameter's name, as torch's AdamW keeps it)."""
        out = {f"optim.{self.prefix + n}.step": (self.prefix + n, [((), state["step"])]) for n in self.names}
        for key in ("exp_avg", "exp_avg_sq"):
            out.update(self.range_pieces(state[key], "optim.{}." + key))
        return out

    def flatten(self, tensors: dict) -> torch.Tensor:
        """The inverse of views(): named full-size tensors -> this rank's slice of the flat vector."""
        full = torch.zeros(self.shard_numel * group_size(self.group), dtype=self.shard.dtype, device=self.shard.device)
        for name, o, s in zip(self.names, self.offsets, self.shapes):
            full[o:o + s.numel()] = tensors[name].reshape(-1).to(full)
        return full[self.rank * self.shard_numel:(self.rank + 1) * self.shard_numel].clone()

    def gather(self, tensor: torch.Tensor, tag: str) -> torch.Tensor:
        """All-gather a shard-shaped tensor (the parameters, or an optimizer moment) to full size."""
        full = torch.empty(self.shard_numel * group_size(self.group), dtype=tensor.dtype, device=tensor.device)
        all_gather(full, tensor.detach(), self.group, tag)
        return full

    def named_moments(self, state: dict) -> dict:
        """ShardedAdamW's state for this shard -> prefixed name -> {"step", "exp_avg", "exp_avg_sq"} (collective)."""
        moments = {k: self.views(self.gather(state[k], "checkpoint")) for k in ("exp_avg", "exp_avg_sq")}
        return {self.prefix + n: {"step": state["step"].clone(), "exp_avg": moments["exp_avg"][n].clone(),
                                  "exp_avg_sq": moments["exp_avg_sq"][n].clone()} for n in self.names}

    def load_moments(self, named: dict, piece) -> dict:
        """The inverse: saved per-name moments -> ShardedAdamW's state for this shard."""
        first = named[self.prefix + self.names[0]]
        return {"step": first["step"].clone().float(), **{k: self.flatten(
            {n: piece(self.prefix + n, named[self.prefix + n][k], named[self.prefix + n][k]) for n in self.names})
            for k in ("exp_avg", "exp_avg_sq")}}


class ShardedAdamW(torch.optim.Optimizer):
    """AdamW on flat shards, with weight decay given per element (matrices decay, vectors do not),
    so one flat vector can hold both kinds. The update is torch.optim.AdamW's, line for line
    (Loshchilov & Hutter 2017, arXiv:1711.05101, algorithm 2):
        theta *= 1 - lr wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        theta -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, units: list, lr: float, betas: tuple, eps: float = 1e-8, whole=(), weight_decay: float = 0.0):
        # eps 1e-8: torch's default. whole: parameters kept whole, outside any shard (expert parallelism's
        # experts, which differ between the data ranks), updated the same way with is_decayed's rule
        super().__init__([u.shard for u in units] + list(whole), dict(lr=lr, betas=betas, eps=eps))
        self.decay = {u.shard: u.weight_decay for u in units} | {p: weight_decay if is_decayed(p) else 0.0 for p in whole}

    # EXERCISE: adamw (tests/test_parallel.py -k 'sharded_adamw')
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"].item()
                p.mul_(1 - lr * self.decay[p])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


class ZeRO(Replicated):
    """ZeRO stages 1 and 2 (Rajbhandari et al. 2020): the whole model is one FlatShard kept whole,
    every rank updates only its slice with ShardedAdamW, then the slices are all-gathered. Stage 1
    all-reduces the gradient (each rank keeps all of it), stage 2 reduce-scatters it (each keeps
    its slice): the two stages differ in one collective, in finish_gradient_sync."""

    shards_over_data = True

    def __init__(self, model: nn.Module, group, stage: int, lr: float, betas: tuple, weight_decay: float, muon: bool = False):
        self.module = self.forward_module = model
        # expert parallelism's experts differ between the data ranks: they stay whole, outside the shard
        expert = lambda p: getattr(p, "expert_parallel", False)
        self.experts = {n: p for n, p in model.named_parameters() if expert(p)}
        named = [(n, p) for n, p in model.named_parameters() if not expert(p)]
        # with Muon the hidden matrices stay whole and are dealt out by matrix (Muon's docstring);
        # the flat shard and ShardedAdamW take the rest
        self.muon = Muon([(n, p) for n, p in named if is_muon_matrix(n, p)], lr, weight_decay, group=group) if muon else None
        flat = [(n, p) for n, p in named if not (muon and is_muon_matrix(n, p))]
        self.stage, self.unit = stage, FlatShard(flat, group, weight_decay, keep_full=True)
        self.optimizer = ShardedAdamW([self.unit], lr, betas, whole=self.experts.values(), weight_decay=weight_decay)
        self.full_grad = None
        if self.muon is not None:
            self.optimizer = MuonAdamW(self.muon, self.optimizer)

    # EXERCISE: zero (tests/test_parallel.py -k 'two_ranks and (zero1 or zero2)')
    def finish_gradient_sync(self):
        """ZeRO 1: all-reduce the flat gradient, keep it all. ZeRO 2: reduce-scatter it, keep the shard."""
        unit, n = self.unit, group_size(self.unit.group)
        flat = torch.zeros(unit.shard_numel * n, dtype=unit.shard.dtype, device=unit.shard.device)
        for p, offset in zip(unit.params, unit.offsets):
            if p.grad is not None:
                flat[offset:offset + p.numel()] = p.grad.reshape(-1)
                p.grad = None  # the flat copy is the gradient from here on
        if self.stage == 1:
            all_reduce(flat, unit.group, "grads")
            self.full_grad = flat.div_(n)
            unit.shard.grad = self.full_grad[unit.rank * unit.shard_numel:(unit.rank + 1) * unit.shard_numel]
        else:
            shard_grad = torch.empty(unit.shard_numel, dtype=flat.dtype, device=flat.device)
            reduce_scatter(shard_grad, flat, unit.group, "grads")
            unit.shard.grad = shard_grad.div_(n)
        if self.muon is not None:  # the same choice, made per matrix: all-reduce (1) or to its owner only (2)
            self.muon.sync_grads(keep_all=self.stage == 1)

    # EXERCISE: zero
    def step(self):
        """Update this rank's slice, then all-gather every rank's updated slice into the whole model."""
        self.optimizer.step()
        all_gather(self.unit.full, self.unit.shard.detach(), self.unit.group, "params")

    def local_grads(self) -> dict:
        grads = self.unit.shard_views(self.unit.shard.grad) if self.unit.shard.grad is not None else {}
        return grads | {n: p.grad for n, p in self.experts.items() if p.grad is not None} | (
            self.muon.owned_grads() if self.muon is not None else {})

    def zero_grad(self):
        super().zero_grad()
        self.full_grad = None

    def held_tensors(self):
        yield from (("params", p) for p in [*self.module.parameters(), self.unit.shard])
        yield from (("grads", g) for g in [*(p.grad for p in self.module.parameters()), self.unit.shard.grad, self.full_grad])
        yield from (("optimizer", t) for state in self.optimizer.state.values() for t in state.values())

    def full_optimizer_state(self) -> dict:
        adamw = getattr(self.optimizer, "adamw", self.optimizer)
        state = adamw.state.get(self.unit.shard)
        experts = {n: {k: v.clone() for k, v in adamw.state[p].items()} for n, p in self.experts.items()
                   if adamw.state.get(p)}
        out = (self.unit.named_moments(state) if state else {}) | experts
        return out | (self.muon.full_state() if self.muon is not None else {})

    def local_pieces(self) -> dict:
        """Every rank holds the whole weights (replicas: one copy is written), its slice of the flat
        moments, the whole moments of its experts (expert parallelism) and Muon's momenta of the matrices it owns."""
        out = {f"model.{n}": (n, [((0,) * p.dim(), p.detach())]) for n, p in self.module.named_parameters()}
        adamw = getattr(self.optimizer, "adamw", self.optimizer)
        out |= self.unit.moment_pieces(adamw.state[self.unit.shard])
        for name, p in self.experts.items():
            state = adamw.state[p]
            out |= {f"optim.{name}.{key}": (name, [((0,) * p.dim(), state[key])]) for key in ("exp_avg", "exp_avg_sq")}
            out[f"optim.{name}.step"] = (name, [((), state["step"])])
        return out | (self.muon.pieces() if self.muon is not None else {})

    @torch.no_grad()
    def load_state(self, model_state: dict, optimizer_state: dict | None, piece):
        for name, p in self.module.named_parameters():  # the flat shard's views and Muon's whole matrices
            p.copy_(piece(name, model_state[name], model_state[name]).view_as(p))
        for name, p in self.experts.items():
            p.copy_(piece(name, model_state[name], p))
        if optimizer_state:
            adamw = getattr(self.optimizer, "adamw", self.optimizer)
            adamw.state[self.unit.shard] = self.unit.load_moments(optimizer_state, piece)
            for name, p in self.experts.items():
                saved = optimizer_state[name]
                adamw.state[p] = {"step": saved["step"].clone().float(),
                                  **{k: piece(name, saved[k], p).clone() for k in ("exp_avg", "exp_avg_sq")}}
            if self.muon is not None:
                self.muon.load_state(optimizer_state)


class GatherParams(torch.autograd.Function):
    """ZeRO-3's two collectives as one differentiable step (Rajbhandari et al. 2020, sec. 5.3):
    forward all-gathers the flat shard into the full vector, backward reduce-scatters the full
    vector's gradient into this rank's slice and divides by n (the mean over data-parallel ranks)."""

    # EXERCISE: zero3-gather (tests/test_parallel.py -k 'two_ranks and zero3')
    @staticmethod
    def forward(ctx, shard, group):
        ctx.group = group
        full = torch.empty(shard.numel() * group_size(group), dtype=shard.dtype, device=shard.device)
        all_gather(full, shard, group, "params")
        return full

    # EXERCISE: zero3-gather
    @staticmethod
    def backward(ctx, grad_full):
        n = group_size(ctx.group)
        grad_shard = torch.empty(grad_full.numel() // n, dtype=grad_full.dtype, device=grad_full.device)
        reduce_scatter(grad_shard, grad_full.contiguous(), ctx.group, "grads")
        return grad_shard / n, None


class ZeRO3Block(nn.Module):
    """A transformer block whose parameters exist only as a flat shard. Forward: gather, run, free.
    Backward: torch.utils.checkpoint re-runs the forward, which gathers again, and GatherParams'
    backward reduce-scatters the gradient: gather, recompute, reduce-scatter, free."""

    def __init__(self, block: nn.Module, unit: FlatShard):
        super().__init__()
        self.block, self.flat_shard, self.unit = block, unit.shard, unit

    def forward(self, x, kv_cache=None, doc_ids=None, positions=None):  # model.Block's call (training: no cache)
        return torch.utils.checkpoint.checkpoint(self._gathered_forward, x, self.flat_shard, doc_ids, positions,
                                                 use_reentrant=False)

    def _gathered_forward(self, x, shard, doc_ids=None, positions=None):
        full = GatherParams.apply(shard, self.unit.group)  # (S) -> (n S): this block's weights, for now
        return torch.func.functional_call(self.block, self.unit.views(full), (x, None, doc_ids, positions))


class ZeRO3Model(nn.Module):
    """The root of a ZeRO-3 model: embeddings, final norm and (tied) output layer are gathered once
    per forward and kept until backward has passed them (FSDP keeps its root unsharded the same
    way); the blocks inside are ZeRO3Blocks."""

    def __init__(self, model: nn.Module, root: FlatShard):
        super().__init__()
        self.model, self.flat_shard, self.root = model, root.shard, root

    def forward(self, idx, targets=None):
        full = GatherParams.apply(self.flat_shard, self.root.group)
        return torch.func.functional_call(self.model, self.root.views(full), (idx, targets))


class ZeRO3(Replicated):
    """ZeRO stage 3: one FlatShard per block and one for the root (embeddings, final norm), none kept
    whole. The blocks are swapped for ZeRO3Blocks, so the gradient sync happens inside backward
    (GatherParams); the step updates the shards and nothing needs gathering after it."""

    shards_over_data = True

    def __init__(self, model: nn.Module, group, lr: float, betas: tuple, weight_decay: float):
        self.module, self.tied = model, model.config.tie_embeddings
        block_ids = {id(p) for p in model.transformer.h.parameters()}
        self.units = [FlatShard([(n, p) for n, p in model.named_parameters() if id(p) not in block_ids], group,
                                weight_decay, keep_full=False)]
        for i, block in enumerate(model.transformer.h):
            self.units.append(FlatShard(list(block.named_parameters()), group, weight_decay, keep_full=False,
                                        prefix=f"transformer.h.{i}."))
            model.transformer.h[i] = ZeRO3Block(block, self.units[-1])
        self.forward_module = ZeRO3Model(model, self.units[0])
        self.optimizer = ShardedAdamW(self.units, lr, betas)

    def local_grads(self) -> dict:
        return {n: g for u in self.units if u.shard.grad is not None for n, g in u.shard_views(u.shard.grad).items()}

    def held_tensors(self):
        yield from (("params", u.shard) for u in self.units)
        yield from (("grads", u.shard.grad) for u in self.units)
        yield from (("optimizer", t) for state in self.optimizer.state.values() for t in state.values())

    def full_state(self) -> dict:
        out = {}
        for unit in self.units:
            out.update({unit.prefix + k: v.clone() for k, v in unit.views(unit.gather(unit.shard, "checkpoint")).items()})
        if self.tied:
            out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def full_optimizer_state(self) -> dict:
        return {k: v for u in self.units if self.optimizer.state.get(u.shard)
                for k, v in u.named_moments(self.optimizer.state[u.shard]).items()}

    def local_pieces(self) -> dict:
        """Only this rank's slice of each unit: weights and moments alike."""
        out = {}
        for unit in self.units:
            out.update(unit.range_pieces(unit.shard.detach(), "model.{}"))
            out.update(unit.moment_pieces(self.optimizer.state[unit.shard]))
        return out

    @torch.no_grad()
    def load_state(self, model_state: dict, optimizer_state: dict | None, piece):
        for unit in self.units:
            unit.shard.copy_(unit.flatten({n: piece(unit.prefix + n, model_state[unit.prefix + n], model_state[unit.prefix + n])
                                           for n in unit.names}))
            if optimizer_state:
                self.optimizer.state[unit.shard] = unit.load_moments(optimizer_state, piece)


# ----------------------------------------------------------------------------------------------
# Tensor parallel from scratch (Megatron-LM)


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Megatron's f (Shoeybi et al. 2019, arXiv:1909.08053, sec. 3, fig. 3): identity forward,
    all-reduce backward. Placed before a column-parallel layer: every rank uses the same input, so
    the input's gradient is the sum of the ranks' partial gradients."""

    # EXERCISE: tensor-parallel (tests/test_parallel.py -k 'two_ranks and tensor_parallel')
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    # EXERCISE: tensor-parallel
    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce(grad, ctx.group, "tp")
        return grad, None


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Megatron's g (same paper, sec. 3, fig. 3): all-reduce forward, identity backward. Placed
    after a row-parallel layer, whose ranks each hold a partial sum of the output."""

    # EXERCISE: tensor-parallel
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        all_reduce(x, group, "tp")
        return x

    # EXERCISE: tensor-parallel
    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y_r = x A_r: this rank's rows of nn.Linear's weight (out, in), i.e. the columns of A = W^T.
    `rows` lists which output features this rank computes, in the order it holds them.
    sequence_parallel: the input arrives already all-gathered along T (apply_sequence_parallel),
    and that gather's backward, a reduce-scatter, sums the ranks' partial input gradients as f's
    all-reduce would: f is left out."""

    def __init__(self, linear: nn.Linear, rows: torch.Tensor, group):
        super().__init__()
        self.group, self.sequence_parallel = group, False
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())  # (out/t, in)
        self.bias = nn.Parameter(linear.bias.detach()[rows].clone()) if linear.bias is not None else None

    def forward(self, x):
        if not self.sequence_parallel:
            x = CopyToTensorParallelRegion.apply(x, self.group)
        return F.linear(x, self.weight, self.bias)  # (.., in) -> (.., out/t)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r B_r: this rank's input features `cols`; the bias is added once, after the sum.
    sequence_parallel: the sum is reduce-scattered along T instead of all-reduced, (B, T, C) ->
    (B, T/t, C), and the bias is added to this rank's positions only."""

    def __init__(self, linear: nn.Linear, cols: torch.Tensor, group):
        super().__init__()
        self.group, self.sequence_parallel = group, False
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())  # (out, in/t)
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x):
        partial = F.linear(x, self.weight)  # (B, T, in/t) -> (B, T, out), this rank's share of the sum
        if self.sequence_parallel:
            y = ReduceScatterToSequenceParallelRegion.apply(partial, self.group)  # -> (B, T/t, out)
        else:
            y = ReduceFromTensorParallelRegion.apply(partial, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [lo, hi) of the (V, C) embedding: look up the ids in range, zeros for the others, and
    all-reduce: every id is found on exactly one rank (Megatron-LM, sec. 3). sequence_parallel:
    reduce-scatter instead, so rank r sums only its positions: (B, T, C) -> (B, T/t, C)."""

    def __init__(self, embedding: nn.Embedding, lo: int, hi: int, group):
        super().__init__()
        self.lo, self.hi, self.group, self.sequence_parallel = lo, hi, group, False
        self.weight = nn.Parameter(embedding.weight.detach()[lo:hi].clone())  # (V/t, C)

    def forward(self, idx):
        outside = (idx < self.lo) | (idx >= self.hi)
        local = (idx - self.lo).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, C), zeros elsewhere
        if self.sequence_parallel:
            return ReduceScatterToSequenceParallelRegion.apply(x, self.group)
        return ReduceFromTensorParallelRegion.apply(x, self.group)


# EXERCISE: vocab-parallel-ce (tests/test_parallel.py -k 'vocab_parallel_cross_entropy or (two_ranks and tensor_parallel)')
def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Mean cross-entropy when rank r holds logits for vocabulary ids [vocab_start, vocab_start + V/t).

    loss = log sum_v exp(l_v) - l_target, computed from three all-reduces over (B, T) numbers,
    never the (B, T, V) logits: the max (for a stable exp), the sum of exp, and the target's logit
    (found on one rank, zero on the others). Megatron-LM's vocab-parallel cross-entropy.
    """
    logits = local_logits.to(torch.promote_types(local_logits.dtype, torch.float32))  # (B, T, V/t), float32 at least
    max_logit = logits.detach().amax(dim=-1)  # (B, T); no gradient: it only keeps exp() in range
    all_reduce(max_logit, group, "tp", op=dist.ReduceOp.MAX)
    shifted = logits - max_logit.unsqueeze(-1)
    sum_exp = ReduceFromTensorParallelRegion.apply(shifted.exp().sum(dim=-1), group)  # (B, T)
    local_target = targets - vocab_start
    mine = (local_target >= 0) & (local_target < logits.size(-1))
    picked = shifted.gather(-1, local_target.clamp(0, logits.size(-1) - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = ReduceFromTensorParallelRegion.apply(picked * mine, group)  # (B, T), from its one owner
    valid = targets != -1  # -1: ignored positions, as in the model's F.cross_entropy
    loss = (torch.log(sum_exp) - target_logit) * valid
    return loss.sum() / valid.sum()


def tensor_parallel_layouts(config, tp: int) -> dict:
    """For each kind of split layer, the output (or input) features rank r holds, r = 0..tp-1.

    c_attn's rows are [q (nh hs) | k (n_kv hs) | v (n_kv hs)]: rank r takes query heads
    [r nh/t, (r+1) nh/t) and the key/value heads they read, [r n_kv/t, (r+1) n_kv/t) (with GQA,
    query head h reads key head h // (nh/n_kv), so these line up). SwiGLU's c_fc is [gate | up]:
    rank r takes its slice of each, so chunk(2) still splits gate from up.
    """
    nh, nkv, hs, C = config.n_head, config.n_kv_head, config.head_size, config.n_embd
    hidden = mlp_hidden(config)

    def per_rank(n, r):  # slice r of tp equal parts of range(n)
        return torch.arange(r * n // tp, (r + 1) * n // tp)

    attn = [torch.cat([per_rank(nh * hs, r), nh * hs + per_rank(nkv * hs, r), (nh + nkv) * hs + per_rank(nkv * hs, r)])
            for r in range(tp)]
    if config.mlp == "swiglu":
        fc = [torch.cat([per_rank(hidden, r), hidden + per_rank(hidden, r)]) for r in range(tp)]
    else:
        fc = [per_rank(hidden, r) for r in range(tp)]
    return dict(c_attn=attn, attn_proj=[per_rank(C, r) for r in range(tp)], c_fc=fc,
                mlp_proj=[per_rank(hidden, r) for r in range(tp)], vocab=[per_rank(config.vocab_size, r) for r in range(tp)])


def check_tensor_parallel(config, tp: int):
    """Refuse, in one line, a split that does not divide evenly (pitfall: torchtitan #1136)."""
    for name, n in (("n_head", config.n_head), ("n_kv_head", config.n_kv_head), ("vocab_size", config.vocab_size),
                    ("MLP hidden size", mlp_hidden(config))):
        if n % tp:
            raise ValueError(f"--tp {tp} must divide {name}={n}: each rank takes an equal share; choose a --tp that divides it")


def apply_tensor_parallel(model: GPT, group) -> dict:
    """Swap the GPT's layers for their tensor-parallel versions, in place. Returns, per parameter
    name, (dim, [indices held by rank 0, rank 1, ...]): what a full checkpoint needs to reassemble it."""
    tp, r = group_size(group), dist.get_rank(group)
    check_tensor_parallel(model.config, tp)
    layouts, specs = tensor_parallel_layouts(model.config, tp), {}
    for i, block in enumerate(model.transformer.h):
        attn, mlp, prefix = block.attn, block.mlp, f"transformer.h.{i}."
        for module, name, kind, split in ((attn, "c_attn", "c_attn", "column"), (attn, "c_proj", "attn_proj", "row"),
                                          (mlp, "c_fc", "c_fc", "column"), (mlp, "c_proj", "mlp_proj", "row")):
            full_name = f"{prefix}{'attn' if module is attn else 'mlp'}.{name}"
            index = layouts[kind]
            if split == "column":
                setattr(module, name, ColumnParallelLinear(getattr(module, name), index[r], group))
                specs[f"{full_name}.weight"] = (0, index)
                if getattr(module, name).bias is not None:
                    specs[f"{full_name}.bias"] = (0, index)
            else:
                setattr(module, name, RowParallelLinear(getattr(module, name), index[r], group))
                specs[f"{full_name}.weight"] = (1, index)
        attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp  # this rank's heads
    vocab = layouts["vocab"]
    lo, hi = int(vocab[r][0]), int(vocab[r][-1]) + 1
    wte = VocabParallelEmbedding(model.transformer.wte, lo, hi, group)
    head = ColumnParallelLinear(model.lm_head, vocab[r], group)  # logits for ids [lo, hi) only
    model.transformer.wte, model.lm_head = wte, head
    if model.config.tie_embeddings:
        head.weight = wte.weight
    specs["transformer.wte.weight"] = specs["lm_head.weight"] = (0, vocab)
    return specs


def gather_tensor_parallel(tensors: dict, specs: dict, layout: Layout, scratch: bool) -> dict:
    """For a full checkpoint: tensor-parallel pieces -> full tensors in the GPT's layout (every tp
    rank takes part). specs: apply_tensor_parallel's (dim, indices per rank). Native DTensors arrive
    already gathered (full_tensor), only in the reordered layout, which index_copy_ undoes."""
    out = {}
    for name, t in tensors.items():
        if name not in specs:
            out[name] = t
            continue
        dim, index = specs[name]
        if scratch:
            parts = [torch.empty_like(t) for _ in range(layout.tp)]
            dist.all_gather(parts, t.contiguous(), group=layout.group("tp"))
            t = torch.cat(parts, dim)
        out[name] = torch.empty_like(t).index_copy_(dim, torch.cat(index).to(t.device), t)
    return out


def tensor_parallel_piece(name: str, full: torch.Tensor, specs: dict, layout: Layout, scratch: bool) -> torch.Tensor:
    """The inverse, when loading: this rank's rows (or columns) of a full tensor (scratch), or the
    whole tensor in the reordered layout (native: DTensor then takes its shard)."""
    if name not in specs:
        return full
    dim, index = specs[name]
    rows = index[layout.rank("tp")] if scratch else torch.cat(index)
    return full.index_select(dim, rows.to(full.device))


# ----------------------------------------------------------------------------------------------
# Sequence parallel from scratch (Korthikanti et al. 2022): tensor parallelism's leftovers split along T


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/t, C) on each rank -> (B, T, C) on every rank, chunks in rank order."""
    n = group_size(group)
    local = x.transpose(0, 1).contiguous()  # (T/t, B, C): T first, so a chunk is one contiguous block
    full = torch.empty((n * local.size(0), *local.shape[1:]), dtype=x.dtype, device=x.device)  # (T, B, C)
    all_gather(full, local, group, "tp")
    return full.transpose(0, 1)  # (B, T, C); Megatron keeps activations (T, B, C) throughout to skip these transposes


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, C) partial sums on each rank -> (B, T/t, C): the sum, at this rank's positions only."""
    n = group_size(group)
    full = x.transpose(0, 1).contiguous()  # (T, B, C)
    local = torch.empty((full.size(0) // n, *full.shape[1:]), dtype=x.dtype, device=x.device)  # (T/t, B, C)
    reduce_scatter(local, full, group, "tp")
    return local.transpose(0, 1)  # (B, T/t, C)


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Entering a tensor-parallel region (Korthikanti et al. 2022, sec. 4.2.2, fig. 5, their g):
    all-gather along T forward; backward, every rank holds a partial gradient of the whole (B, T, C)
    input (its heads' or columns' share), and rank r needs the sum at its own positions: a
    reduce-scatter. It replaces f, whose backward all-reduce was that same sum, kept everywhere."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_sequence(grad, ctx.group), None


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Leaving a tensor-parallel region (same paper, their g-bar): reduce-scatter along T forward,
    so the partial sums of a row-parallel layer become, on rank r, the full sum at its positions;
    backward, each rank's partial sum fed every position, so every rank needs the whole (B, T, C)
    gradient: an all-gather. It replaces g (all-reduce forward, identity backward)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence(grad, ctx.group), None


class SequenceParallelDropout(nn.Module):
    """Dropout on this rank's T/t positions, with a generator of its own. In plain tensor
    parallelism every rank draws the same mask (same seed), which keeps the replicated activations
    equal; here the ranks hold different positions, and the same stream would give position i of
    every chunk the same mask. Megatron forks a generator seeded seed + 2718 + tp rank for the same
    reason (megatron/core/tensor_parallel/random.py); so do we."""

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1 - self.p)  # inverted dropout, as F.dropout: the expectation is unchanged


def check_sequence_parallel(T: int, tp: int):
    if T % tp:
        raise ValueError(f"--sequence_parallel splits the T={T} positions of a sequence across --tp {tp} ranks: "
                         f"use a --block_size that is a multiple of {tp}")


def apply_sequence_parallel(model: GPT, group, specs: dict) -> list:
    """Turn a tensor-parallel GPT (apply_tensor_parallel) sequence-parallel, in place, without
    touching its code: the residual stream, norms and dropouts hold (B, T/t, C).

        embedding: reduce-scatter instead of all-reduce        -> (B, T/t, C)
        block:     ln_1 on T/t -> [all-gather] attention [reduce-scatter] -> dropout, residual on T/t
                   ln_2 on T/t -> [all-gather] MLP [reduce-scatter]       -> dropout, residual on T/t
        ln_f on T/t -> [all-gather] output layer -> (B, T, V/t) logits, the vocabulary-parallel loss

    The all-gather sits at the entrance of attention and the MLP (a forward pre-hook), not inside
    their first layer, because attention reads T from its input's shape. Position embeddings are
    looked up for this rank's positions. Returns the names of the parameters every rank holds whole
    (norms, row-parallel biases, position embeddings): used on T/t positions only, their gradients
    are partial sums over the tp ranks, to be all-reduced after backward
    (reduce_sequence_parallel_grads)."""
    check_sequence_parallel(model.config.block_size, group_size(group))

    def gather_input(module, args):  # (B, T/t, C) -> (B, T, C) entering attention, the MLP, the output layer
        return (GatherFromSequenceParallelRegion.apply(args[0], group), *args[1:])

    model.transformer.wte.sequence_parallel = True
    for block in model.transformer.h:
        for region, column, row in ((block.attn, block.attn.c_attn, block.attn.c_proj),
                                    (block.mlp, block.mlp.c_fc, block.mlp.c_proj)):
            column.sequence_parallel = row.sequence_parallel = True
            region.register_forward_pre_hook(gather_input)
    model.lm_head.sequence_parallel = True
    model.lm_head.register_forward_pre_hook(gather_input)
    split_positions_and_dropout(model, group)
    return [name for name, _ in model.named_parameters() if name not in specs]  # specs: the split ones


def split_positions_and_dropout(model: GPT, group):
    """What sequence parallelism needs outside the tensor-parallel layers, from scratch or native:
    learned positions looked up for this rank's chunk of T, and dropouts with a generator per rank."""
    tp, r = group_size(group), dist.get_rank(group)
    if model.transformer.wpe is not None:  # wpe(arange(T)) -> wpe(this rank's chunk of it)
        # (T,) arange, or --doc_mask's (B, T) positions inside documents: this rank's chunk of T
        model.transformer.wpe.register_forward_pre_hook(lambda module, args: (args[0].chunk(tp, dim=-1)[r],))
    generator = torch.Generator(device=model.transformer.wte.weight.device)
    generator.manual_seed(torch.initial_seed() + 2718 + r)  # Megatron's offset (model_parallel_cuda_manual_seed)
    model.transformer.drop = SequenceParallelDropout(model.config.dropout, generator)
    for block in model.transformer.h:
        block.attn.resid_dropout = SequenceParallelDropout(model.config.dropout, generator)
        block.mlp.dropout = SequenceParallelDropout(model.config.dropout, generator)


def reduce_sequence_parallel_grads(local_grads: dict, names: list, group):
    """Sum the partial gradients of the replicated parameters over the tp ranks, in one message:
    2 (t-1)/t 4 N_replicated bytes per step (Megatron-LM does the same after backward). In place,
    on this rank's part of each gradient (local_grads: the data-parallel flavour's, so a ZeRO or
    FSDP2 shard sums only its slice: the tp ranks of one data rank hold the same slices)."""
    grads = [local_grads[n] for n in names if n in local_grads]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce(flat, group, "sp_grads")
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


# ----------------------------------------------------------------------------------------------
# Pipeline parallel from scratch: stages, GPipe and 1F1B


def cut_to_stage(model: GPT, stage: int, n_stages: int) -> tuple[int, int]:
    """Keep in `model` only what stage `stage` of n_stages runs, in place; returns its blocks [lo, hi).

    The other stages' blocks become nn.Identity (no parameters), the embeddings stay on the first
    stage, the final norm and output layer on the last; with tied embeddings the last stage keeps
    the embedding too, as its output layer's weight (Megatron does the same). Every module keeps its
    GPT name (transformer.h.3...), so the stage's state_dict keys are the full model's, and the
    stage runs the GPT's own embed, run_blocks and head: activation checkpointing, the fused loss
    and every architecture option work unchanged."""
    L = model.config.n_layer
    if L < n_stages:
        raise ValueError(f"--pp {n_stages} needs at least as many layers, not n_layer={L}")
    bounds = [round(s * L / n_stages) for s in range(n_stages + 1)]  # as even as L allows
    lo, hi = bounds[stage], bounds[stage + 1]
    first, last = stage == 0, stage == n_stages - 1
    for i in range(L):
        if not lo <= i < hi:
            model.transformer.h[i] = nn.Identity()
    if not first:
        model.transformer.wpe = None
        if not (last and model.config.tie_embeddings):
            model.transformer.wte = None
    if not last:
        model.transformer.ln_f, model.lm_head = None, None
    return lo, hi


class Pipeline:
    """Runs micro-batches through this rank's stage, talking to the neighbouring stages.

    Its part of a training step: forward_backward (a schedule, GPipe or 1F1B, drawn in the module
    docstring), with data parallelism's sync only around the last micro-batch's backward, and
    finish_gradient_sync, which sums the tied embedding's two gradients (first and last stage)."""

    def __init__(self, model: GPT, layout: Layout, schedule: str, amp):
        self.model, self.group, self.amp, self.schedule = model, layout.group("pp"), amp, schedule
        self.rank, self.n = layout.rank("pp"), layout.pp
        self.lo, self.hi = cut_to_stage(model, self.rank, self.n)
        self.is_first, self.is_last = self.rank == 0, self.rank == self.n - 1
        self.embedding_group = layout.group("embedding")

    def stage_forward(self, x, tokens, targets=None):
        """The GPT's forward, cut at this stage's boundaries: token ids or (B, T, C) in, (B, T, C) or the
        loss out. tokens: the micro-batch's (B, T) ids, which every stage holds (the data is split by
        dp rank only): --doc_mask's document numbers and positions are computed from them on each
        stage (GPT.document_inputs), so nothing but the activations is sent."""
        doc_ids, positions = self.model.document_inputs(tokens)
        if self.is_first:
            x = self.model.embed(x, positions=positions)
        x = self.model.run_blocks(x, self.lo, self.hi, doc_ids=doc_ids, positions=positions)
        return self.model.head(x, targets)[1] if self.is_last else x

    # --- point to point with the neighbours (activations forward, their gradients backward)
    def recv_forward(self, shape):
        if self.is_first:
            return None
        x = torch.empty(shape, device=self.device)
        exchange(self.group, "pp", recvs=[(x, self.rank - 1)])
        return x.requires_grad_()

    def send_forward(self, y):
        if not self.is_last:
            exchange(self.group, "pp", sends=[(y.detach(), self.rank + 1)])

    def recv_backward(self, shape):
        if self.is_last:
            return None
        g = torch.empty(shape, device=self.device)
        exchange(self.group, "pp", recvs=[(g, self.rank + 1)])
        return g

    def send_backward(self, g):
        if not self.is_first:
            exchange(self.group, "pp", sends=[(g, self.rank - 1)])

    def send_forward_recv_backward(self, y, shape):
        if self.is_last:
            return None
        g = torch.empty(shape, device=self.device)
        exchange(self.group, "pp", sends=[(y.detach(), self.rank + 1)], recvs=[(g, self.rank + 1)])
        return g

    def send_backward_recv_forward(self, g, shape):
        if self.is_first:
            return None
        x = torch.empty(shape, device=self.device)
        exchange(self.group, "pp", sends=[(g, self.rank - 1)], recvs=[(x, self.rank - 1)])
        return x.requires_grad_()

    # --- one micro-batch through this stage
    def forward_step(self, i, received):
        # activations held from a micro-batch's forward to its backward: counted here, outside the
        # schedules, so a test reads the schedule's peak memory whatever bookkeeping a schedule keeps
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        inp = self.xs[i] if self.is_first else received
        with self.amp:
            out = self.stage_forward(inp, self.xs[i], self.ys[i] if self.is_last else None)
        if self.is_last:
            self.loss_sum += out.detach()
        return inp, out

    def backward_step(self, i, inp, out, grad_out):
        # data parallelism may start its all-reduce only in the last micro-batch's backward of the
        # last accumulation micro-step (sync): the accumulated gradients are final after it
        self.in_flight -= 1
        with self.no_sync() if i < len(self.xs) - 1 or not self.sync else contextlib.nullcontext():
            if self.is_last:
                (out / self.divisor).backward()
            else:
                out.backward(grad_out)
        return None if self.is_first else inp.grad

    def forward_backward(self, x, y, microbatches: int, divisor: int, sync: bool, no_sync) -> torch.Tensor:
        """Forward and backward of the batch (x, y) cut into micro-batches. Returns the mean loss on
        the last stage (0 elsewhere). divisor: loss = mean over micro-batches / grad_accum.
        sync, no_sync: may this batch's gradients be sent; the data-parallel flavour's context for
        the backwards that must not send them."""
        if x.size(0) % microbatches:
            raise ValueError(f"--microbatches {microbatches} must divide the per-rank batch of {x.size(0)} sequences")
        self.xs, self.ys = x.chunk(microbatches), y.chunk(microbatches)
        self.divisor, self.sync, self.no_sync = divisor * microbatches, sync, no_sync
        self.device = x.device
        self.loss_sum = torch.zeros((), device=x.device)
        self.in_flight = self.peak_in_flight = 0  # micro-batches whose activations are held (forward_step)
        shape = (x.size(0) // microbatches, x.size(1), self.model.config.n_embd)  # (B/m, T, C) float32
        (self.gpipe if self.schedule == "gpipe" else self.one_f_one_b)(microbatches, shape)
        return self.loss_sum / microbatches

    def gpipe(self, m, shape):
        """All forwards, then all backwards (Huang et al. 2018): holds m micro-batches' activations."""
        saved = []
        for i in range(m):
            inp, out = self.forward_step(i, self.recv_forward(shape))
            self.send_forward(out)
            saved.append((inp, out))
        for i in range(m):
            self.send_backward(self.backward_step(i, *saved[i], self.recv_backward(shape)))

    # EXERCISE: pipeline-1f1b (tests/test_parallel.py -k 'two_ranks and pipeline_1f1b')
    def one_f_one_b(self, m, shape):
        """1F1B as PipeDream-Flush (Narayanan et al. 2021): warm-up forwards to fill the pipe, then
        alternate one forward and one backward, then cool down with the remaining backwards. Stage s
        holds at most p - s micro-batches' activations."""
        warmup = min(self.n - self.rank - 1, m)
        steady = m - warmup
        in_flight = deque()
        for i in range(warmup):  # warm-up
            inp, out = self.forward_step(i, self.recv_forward(shape))
            self.send_forward(out)
            in_flight.append((i, inp, out))
        received = self.recv_forward(shape) if steady > 0 else None
        for j in range(steady):  # steady state: F(warmup + j), then B(j)
            inp, out = self.forward_step(warmup + j, received)
            in_flight.append((warmup + j, inp, out))
            grad_out = self.send_forward_recv_backward(out, shape)
            grad_in = self.backward_step(*in_flight.popleft(), grad_out)
            if j == steady - 1:
                self.send_backward(grad_in)
            else:
                received = self.send_backward_recv_forward(grad_in, shape)
        for _ in range(warmup):  # cool-down
            grad_in = self.backward_step(*in_flight.popleft(), self.recv_backward(shape))
            self.send_backward(grad_in)

    def finish_gradient_sync(self):
        """The tied embedding's gradient: the first stage's part (lookup) plus the last's (output
        layer), one all-reduce between the two, so both copies take the same step."""
        if self.model.config.tie_embeddings and (self.is_first or self.is_last):
            all_reduce(self.model.transformer.wte.weight.grad, self.embedding_group, "pp")

    @torch.no_grad()
    def forward_only(self, x, y) -> torch.Tensor:
        """Evaluation: one pass through the stages, no backward."""
        shape = (*x.shape, self.model.config.n_embd)
        self.device = x.device
        received = self.recv_forward(shape)
        with self.amp:
            out = self.stage_forward(x if self.is_first else received, x, y if self.is_last else None)
        self.send_forward(out)
        return out if self.is_last else torch.zeros((), device=x.device)


def gather_stages(tensors: dict, layout: Layout):
    """Every stage's dict -> one dict on pipeline rank 0 (None elsewhere). The first stage's copy
    of a tied weight wins (the two are equal: they take the same steps)."""
    if layout.pp == 1:
        return tensors
    group = layout.group("pp")
    received = [None] * layout.pp if layout.rank("pp") == 0 else None
    on_cpu = {k: ({n: t.cpu() for n, t in v.items()} if isinstance(v, dict) else v.cpu()) for k, v in tensors.items()}
    dist.gather_object(on_cpu, received, dst=dist.get_global_rank(group, 0), group=group)
    if received is None:
        return None
    merged = {}
    for part in received:
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


# ----------------------------------------------------------------------------------------------
# Context parallel from scratch: ring attention


def context_positions(T_local: int, rank: int, n: int, load_balance: bool) -> torch.Tensor:
    """The global positions of the T_local tokens rank holds. Plain: one contiguous chunk. Balanced:
    of 2n chunks, rank r takes chunk r and chunk 2n-1-r, so early (cheap under the causal mask) and
    late (expensive) positions are shared evenly."""
    if not load_balance:
        return torch.arange(rank * T_local, (rank + 1) * T_local)
    c = T_local // 2
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])


def _attend_block(q, k, qpos, kpos, scale, qdoc=None, kdoc=None):
    """Scores of queries (positions qpos) against one key block (kpos), future keys masked: (B, nh, Tq, Tk).
    qdoc (B, Tq), kdoc (B, Tk): --doc_mask's document numbers; keys of another document masked too."""
    s = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, hs) x (B, nh, hs, Tk) -> (B, nh, Tq, Tk)
    s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    if qdoc is not None:
        s = s.masked_fill((qdoc[:, :, None] != kdoc[:, None, :])[:, None], float("-inf"))  # (B, 1, Tq, Tk)
    return s


class RingAttention(torch.autograd.Function):
    """Causal attention over a sequence split across the ranks of `group` (Liu et al. 2023).

    forward: c steps; at each, attend to the K/V block held and pass it on round the ring,
    merging with the online softmax (running max m, running sum l, unnormalised output o).
    backward: the same ring again, with each block's dK, dV accumulator travelling beside it and
    one more hop to bring it home; per block the FlashAttention backward, from the saved
    log-sum-exp: P = exp(S - lse), dV += P^T dO, dS = P (dO V^T - rowsum(dO o)), dQ += dS K, dK += dS^T Q.
    doc_ids (B, T/c), --doc_mask: this rank's document numbers (of the whole window, so equal ids
    mean one document across ranks). A block's numbers travel round the ring beside its K/V (B T/c
    integers per hop, against the block's 2 B nh T/c hs floats), and every block is masked by
    document as well as by position. A row that meets no key of its own document in a block gets
    p = 0 there (the m_safe guard below); its own key, on the diagonal block, keeps l >= 1.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, positions, doc_ids=None):
        n, r = group_size(group), dist.get_rank(group)
        dtype, q, k, v = q.dtype, q.float(), k.float(), v.float()  # accumulate in float32
        B, nh, T, hs = q.shape
        scale = 1.0 / math.sqrt(hs)
        qpos_host = positions(r)  # the skip test below reads positions on the host: no device sync per block
        qpos = qpos_host.to(q.device)
        m = torch.full((B, nh, T), float("-inf"), device=q.device)  # running max of the scores
        l = torch.zeros(B, nh, T, device=q.device)  # running sum of exp(score - m)
        o = torch.zeros_like(q)  # running sum of exp(score - m) v
        kv = torch.stack([k, v])  # (2, B, nh, T, hs): one message per hop
        kdoc = doc_ids  # the document numbers of the block held, travelling with it (None: no mask)
        # EXERCISE BEGIN ring-merge (tests/test_parallel.py -k 'two_ranks and context_parallel')
        for step in range(n):
            src = (r - step) % n  # whose block this is
            nxt, works = (torch.empty_like(kv), None) if step < n - 1 else (None, [])
            if nxt is not None:  # pass this block on while computing with it
                sends, recvs = [(kv, (r + 1) % n)], [(nxt, (r - 1) % n)]
                if doc_ids is not None:
                    nxt_doc = torch.empty_like(kdoc)
                    sends, recvs = sends + [(kdoc, (r + 1) % n)], recvs + [(nxt_doc, (r - 1) % n)]
                works = exchange(group, "cp", sends, recvs, wait=False)
            kpos_host = positions(src)
            if kpos_host.min() <= qpos_host.max():  # a block wholly in the future adds nothing: skip it
                kpos = kpos_host.to(q.device)
                s = _attend_block(q, kv[0], qpos, kpos, scale, doc_ids, kdoc)
                m_new = torch.maximum(m, s.amax(dim=-1))
                m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)  # rows with no key yet: avoid inf - inf
                correction = torch.exp(m - m_safe)  # rescale what was summed under the old max
                p = torch.exp(s - m_safe.unsqueeze(-1))
                l = l * correction + p.sum(dim=-1)
                o = o * correction.unsqueeze(-1) + p @ kv[1]  # (B, nh, T, Tk) x (B, nh, Tk, hs)
                m = m_new
            for work in works:
                work.wait()
            if nxt is not None:
                kv, kdoc = nxt, (nxt_doc if doc_ids is not None else None)
        # EXERCISE END ring-merge
        out = o / l.unsqueeze(-1)
        lse = m + torch.log(l)  # log sum_j exp(s_ij): all the backward needs to rebuild P
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.group, ctx.positions, ctx.dtype = group, positions, dtype
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        group, positions = ctx.group, ctx.positions
        n, r = group_size(group), dist.get_rank(group)
        scale = 1.0 / math.sqrt(q.size(-1))
        do = grad_out.float()
        D = (do * out).sum(dim=-1, keepdim=True)  # (B, nh, T, 1): rowsum(dO o), from the softmax's Jacobian
        qpos_host = positions(r)
        qpos = qpos_host.to(q.device)
        dq = torch.zeros_like(q)
        kv, dkv = torch.stack([k, v]), torch.zeros(2, *k.shape, device=k.device)
        kdoc = doc_ids
        for step in range(n):
            src = (r - step) % n
            kpos_host = positions(src)
            if kpos_host.min() <= qpos_host.max():
                kpos = kpos_host.to(q.device)
                p = torch.exp(_attend_block(q, kv[0], qpos, kpos, scale, doc_ids, kdoc) - lse.unsqueeze(-1))  # (B, nh, T, Tk)
                dkv[1] += p.transpose(-2, -1) @ do  # dV
                ds = p * (do @ kv[1].transpose(-2, -1) - D)
                dq += ds @ kv[0] * scale
                dkv[0] += ds.transpose(-2, -1) @ q * scale  # dK
            # pass the block and its gradient on, as one message; after the last step only the
            # gradient travels, one hop, back to the rank that owns the block
            if n == 1:
                break
            bundle = torch.cat([kv, dkv]) if step < n - 1 else dkv  # (4 or 2, B, nh, T, hs)
            received = torch.empty_like(bundle)
            sends, recvs = [(bundle, (r + 1) % n)], [(received, (r - 1) % n)]
            if doc_ids is not None and step < n - 1:  # the block's document numbers go with it
                next_doc = torch.empty_like(kdoc)
                sends, recvs = sends + [(kdoc, (r + 1) % n)], recvs + [(next_doc, (r - 1) % n)]
            exchange(group, "cp", sends, recvs)
            kv, dkv = (received[:2], received[2:]) if step < n - 1 else (kv, received)
            kdoc = next_doc if doc_ids is not None and step < n - 1 else kdoc
        return dq.to(ctx.dtype), dkv[0].to(ctx.dtype), dkv[1].to(ctx.dtype), None, None, None


def ring_attention(q, k, v, dropout_p: float = 0.0, *, group, load_balance: bool, doc_ids=None):
    """The attention backend registered as "ring": q (B, nh, T/c, hs), k, v (B, n_kv, T/c, hs);
    doc_ids (B, T/c): --doc_mask's document numbers of this rank's positions.
    dropout_p is always 0: apply_context_parallel refuses a model with dropout."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # GQA: share key heads before the ring (autograd sums back)
    T_local, n = q.size(2), group_size(group)
    doc_ids = doc_ids.contiguous() if doc_ids is not None else None  # sent as it is: one contiguous buffer
    return RingAttention.apply(q, k, v, group, lambda rank: context_positions(T_local, rank, n, load_balance), doc_ids)


def apply_context_parallel(model: GPT, group, load_balance: bool):
    """Make the GPT attend across the ranks of group, each holding T/c positions, without touching
    its code: attention goes to the ring backend, and position embeddings (learned or RoPE) read
    the global positions of this rank's tokens instead of 0..T/c-1. With --doc_mask the caller
    passes the model the window's document numbers and positions, cut like the tokens
    (context_document_inputs): the hooks then leave those positions alone."""
    n, r = group_size(group), dist.get_rank(group)
    if model.config.dropout > 0:
        raise ValueError("context parallelism does not implement attention dropout: use --dropout 0")
    ATTENTION_BACKENDS["ring"] = functools.partial(ring_attention, group=group, load_balance=load_balance)
    if model.transformer.wpe is not None:  # wpe(arange(T/c)) -> wpe(this rank's positions)
        model.transformer.wpe.register_forward_pre_hook(  # (B, T/c) positions inside documents: already global
            lambda module, args: (context_positions(args[0].numel(), r, n, load_balance).to(args[0].device),)
            if args[0].dim() == 1 else None)
    for block in model.transformer.h:
        block.attn.backend = "ring"
        if block.attn.rope:  # apply_rope reads cos[:T]: give it the rows of this rank's positions
            full = (block.attn.rope_cos.clone(), block.attn.rope_sin.clone())

            def select_positions(attn, args, full=full):
                if len(args) > 3 and args[3] is not None:  # --doc_mask: the rows of its (B, T/c) positions, from the whole table
                    attn.rope_cos, attn.rope_sin = full
                    return
                pos = context_positions(args[0].size(1), r, n, load_balance).to(args[0].device)
                attn.rope_cos, attn.rope_sin = full[0][pos], full[1][pos]

            block.attn.register_forward_pre_hook(select_positions)


def context_document_inputs(x: torch.Tensor, eot_id: int, layout: Layout, load_balance: bool) -> dict:
    """--doc_mask under context parallelism: the document numbers and positions of the whole (B, T)
    window x, cut like its tokens, as keyword arguments of GPT.forward. Computed from a rank's
    T/c tokens alone they would be wrong: the count of end-of-text tokens and the distance to the
    document's start both reach back into earlier ranks' positions."""
    doc_ids = document_ids(x, eot_id)
    positions = document_positions(doc_ids)
    return {"doc_ids": context_slice(doc_ids, layout, load_balance), "positions": context_slice(positions, layout, load_balance)}


def context_slice(t: torch.Tensor, layout: Layout, load_balance: bool) -> torch.Tensor:
    """This rank's positions of a (B, T) batch."""
    n = layout.cp
    if t.size(1) % (2 * n if load_balance else n):
        raise ValueError(f"--cp {n} must divide the sequence length {t.size(1)} (twice over with load balancing)")
    pos = context_positions(t.size(1) // n, layout.rank("cp"), n, load_balance).to(t.device)
    return t.index_select(1, pos)


# ----------------------------------------------------------------------------------------------
# DiLoCo


class DiLoCo(Replicated):
    """Data-parallel workers that talk every H steps (Douillard et al. 2023, algorithm 1). Each
    worker takes Replicated's AdamW steps alone (no gradient sync: the norm is its own); then, every
    H inner steps,
        delta = mean over workers of (theta_global - theta_local)    (one all-reduce)
        theta_global = NesterovSGD(theta_global, delta; lr 0.7, momentum 0.9)
        theta_local = theta_global
    The inner AdamW keeps its state across outer steps, as in the paper."""

    independent_workers = True

    def __init__(self, module: nn.Module, make_optimizer, group, inner_steps: int, lr: float = 0.7,
                 momentum: float = 0.9):  # the paper's outer step, sec. 3
        super().__init__(module, make_optimizer)
        self.params, self.group, self.inner_steps = list(module.parameters()), group, inner_steps
        for p in self.params:
            broadcast(p.data, group, "init")
        self.global_params = [p.detach().clone() for p in self.params]
        # torch refuses Nesterov without momentum; momentum 0 and lr 1 is plain averaging (local SGD)
        self.outer = torch.optim.SGD(self.global_params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.steps = 0

    def step(self):
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.inner_steps == 0:
            self.outer_step()

    @torch.no_grad()
    def outer_step(self):
        flat = torch.cat([(g - p).reshape(-1) for g, p in zip(self.global_params, self.params)])  # pseudo-gradient
        all_reduce(flat, self.group, "diloco")
        flat /= group_size(self.group)
        offset = 0
        for g in self.global_params:
            g.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()
        self.outer.step()
        for g, p in zip(self.global_params, self.params):
            p.copy_(g)
            g.grad = None  # the averaged change is not kept between outer steps (the memory count: 24N)

    def any_rank(self, flag: bool) -> bool:
        """True on every worker if flag is True on any: workers train apart, so a NaN on one must
        stop all of them, not leave the others waiting at the next outer step's all-reduce."""
        t = torch.tensor(float(flag), device=self.params[0].device)
        all_reduce(t, self.group, "loss", op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean_over_data(self, t: torch.Tensor, group):
        pass  # workers do not talk between outer steps: each reports its own loss

    def held_tensors(self):
        yield from super().held_tensors()
        yield from (("diloco", g) for g in self.global_params)  # theta_global, 4N
        yield from (("diloco", t) for s in self.outer.state.values() for t in s.values() if torch.is_tensor(t))  # momentum, 4N

    def extra_state(self) -> dict:
        return {"diloco": {"global_params": [g.detach().cpu() for g in self.global_params],
                           "outer": self.outer.state_dict(), "steps": self.steps}}

    def load_extra_state(self, state: dict):
        if "diloco" in state:
            for g, saved in zip(self.global_params, state["diloco"]["global_params"]):
                g.copy_(saved)
            self.outer.load_state_dict(state["diloco"]["outer"])
            self.steps = state["diloco"]["steps"]


# ----------------------------------------------------------------------------------------------
# Expert parallelism: each rank holds E/ep of every MoE layer's experts; tokens travel to them


def expert_parallel_groups(layout: Layout, ep: int) -> tuple:
    """(this rank's expert-parallel group, its same-experts group). Each data group (dp x cp ranks,
    in data-rank order) is cut into runs of ep consecutive ranks: one run holds every expert once,
    rank i of it experts [i E/ep, (i+1) E/ep). The ranks at the same place in every run hold the
    same experts: their gradients are summed over that group. Every rank creates every group."""
    data = layout.size("data")
    dims = layout.mesh.mesh.permute(0, 3, 1, 2).reshape(-1, data)  # (pp tp, dp cp): one data group per row
    runs = dims.reshape(-1, ep)  # every run of ep consecutive data ranks
    same = dims.reshape(dims.size(0), data // ep, ep).transpose(1, 2).reshape(-1, data // ep)
    return subgroup(runs), subgroup(same)


class AllToAll(torch.autograd.Function):
    """all_to_all as an autograd function: forward sends send_rows[j] rows to rank j; backward sends
    each row's gradient back where the row came from (the same exchange with the splits swapped)."""

    @staticmethod
    def forward(ctx, x, send_rows, recv_rows, group):
        ctx.send_rows, ctx.recv_rows, ctx.group = send_rows, recv_rows, group
        return all_to_all(x, send_rows, recv_rows, group, "ep")

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.recv_rows, ctx.send_rows, ctx.group, "ep"), None, None, None


class ExpertDispatch:
    """MoE.dispatch under expert parallelism: f(xs (n, C) this rank's (token, expert) slots sorted
    by global expert, counts (E,) slots per expert) -> the experts' outputs for those slots (n, C).

    1. counts: each rank tells every rank of its group how many slots it sends to each of that
       rank's E/ep experts (an all-to-all of E int64 numbers), so all know the sizes of step 2;
    2. dispatch: the slots go to their experts' ranks (all-to-all; the slots for rank j are
       consecutive, because they are sorted by expert and j's experts are consecutive);
    3. the received slots, grouped by source rank, are regrouped by local expert, run as grouped
       matmuls (Experts.grouped), and put back in the received order;
    4. combine: the outputs return to the slots' ranks (all-to-all, the splits of step 2 swapped).
    """

    def __init__(self, experts: nn.Module, n_experts: int, group):
        self.experts, self.n_experts, self.group = experts, n_experts, group

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep = group_size(self.group)
        local = self.n_experts // ep
        received_counts = all_to_all(counts, [local] * ep, [local] * ep, self.group, "ep_counts")  # (ep local,): [source, expert]
        send_rows = counts.view(ep, local).sum(1).tolist()
        recv_rows = received_counts.view(ep, local).sum(1).tolist()
        received = AllToAll.apply(xs, send_rows, recv_rows, self.group)  # (m, C), by source rank, then by local expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(ep), received_counts,
                                                output_size=received.size(0))
        by_expert = torch.argsort(expert_of_row, stable=True)  # source-major -> expert-major
        ys = self.experts.grouped(received[by_expert], received_counts.view(ep, local).sum(0))
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=xs.device)  # the inverse permutation
        return AllToAll.apply(ys[back], recv_rows, send_rows, self.group)  # (n, C), in xs's order


EXPERT_WEIGHTS = ("w_fc", "w_proj", "b_fc", "b_proj")


class ExpertParallel:
    """Expert parallelism (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch, Fedus et al.
    2021), with ep ranks per group inside the data group (d = dp x cp ranks): rank i of each group
    keeps experts [i E/ep, (i+1) E/ep) of every MoE layer and routes its own tokens as one process
    would, then MoE.dispatch (an ExpertDispatch) carries the slots to the experts' ranks and back.

    Gradients. The backward all-to-alls bring each expert's weight gradient home, summed over the
    slots of all ep ranks of its group; the d/ep ranks holding the same experts (one per group) then
    sum theirs with one all-reduce, and divide by d, as data parallelism's mean does. The expert
    weights are left out of the data-parallel buckets (and of ZeRO-1/2's flat shard, whose
    ShardedAdamW updates them whole); everything else (attention, router, shared experts,
    embeddings) is data parallel, or ZeRO-sharded, as before.

    Per rank, float32, for N_e expert weights (every MoE layer's experts) and N_d the rest:
        memory    weights + gradients + AdamW: 16 N_e / ep  +  DDP's 20 N_d
        sent per MoE layer and micro-step, with n_{r->j} of rank r's slots going to rank j's experts,
        each row C values of b bytes:
            dispatch  sum_{j != r} n_{r->j} C b      combine  sum_{j != r} n_{j->r} C b
            backward: the same two the other way, so 2 (sum_{j != r} n_{r->j} + sum_{j != r} n_{j->r}) C b in all,
            4 (ep - 1)/ep N k C b when the N tokens' k slots spread evenly; counts (ep - 1) E/ep 8 bytes
        per step  the expert gradients' all-reduce, 2 (d/ep - 1)/(d/ep) 4 N_e / ep
    Test: tests/test_parallel.py holds the all-to-all bytes to this formula, and losses and weights
    to one process's.
    """

    def __init__(self, model: GPT, layout: Layout, ep: int):
        if ep > 1 and not model.moe_layers():
            raise ValueError(f"--ep {ep} splits the experts of an MoE model: add --moe_experts")
        if any(m.n_experts % ep for m in model.moe_layers()):
            raise ValueError(f"--ep {ep} must divide --moe_experts ({model.moe_layers()[0].n_experts})")
        self.layout, self.ep, self.names, self.params = layout, ep, set(), []
        if ep == 1:  # every rank holds every expert: no expert is split, and every call below passes through
            return
        self.group, self.same_experts = expert_parallel_groups(layout, ep)
        me = dist.get_rank(self.group)
        for name, module in model.named_modules():
            if not isinstance(module, MoE):
                continue
            local = module.n_experts // ep
            experts = module.experts
            experts.first = me * local
            for w in EXPERT_WEIGHTS:
                full = getattr(experts, w)
                if full is not None:  # keep only this rank's experts: rows [first, first + local)
                    setattr(experts, w, nn.Parameter(full.data[experts.first:experts.first + local].clone()))
                    self.names.add(f"{name}.experts.{w}")
            module.dispatch = ExpertDispatch(experts, module.n_experts, self.group)
        self.params = [p for n, p in model.named_parameters() if n in self.names]
        self.local_rows = {n: p.size(0) for n, p in model.named_parameters() if n in self.names}  # E/ep of each
        for p in self.params:
            p.expert_parallel = True  # data parallelism leaves these out (BucketedDataParallel)

    def finish_gradient_sync(self):
        """Sum each expert weight's gradient over the ranks holding the same experts, then divide by the data size."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce(p.grad, self.same_experts, "ep_grads")
            p.grad /= self.layout.size("data")

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a full (single-process) expert tensor; other tensors whole."""
        if name not in self.names:
            return full
        local = full.size(0) // self.ep
        me = dist.get_rank(self.group)
        return full[me * local:(me + 1) * local]

    def place(self, name: str, offsets: tuple) -> tuple:
        """Sharded checkpoints: offsets in this rank's expert tensor -> in the single-process one
        (its experts start at row me E/ep of dim 0); other tensors' as they are."""
        if name not in self.names or not offsets:
            return offsets
        return (offsets[0] + dist.get_rank(self.group) * self.local_rows[name],) + tuple(offsets[1:])

    def gather(self, tensors: dict) -> dict:
        """The inverse: every expert tensor all-gathered along its expert dimension. Collective."""
        out = dict(tensors)
        for name in sorted(self.names):
            if name in tensors:
                local = tensors[name].contiguous()
                full = local.new_empty((local.size(0) * self.ep, *local.shape[1:]))
                all_gather(full, local, self.group, "checkpoint")
                out[name] = full
        return out


# ----------------------------------------------------------------------------------------------
# torch's native versions of the same ideas (impl "native")


def apply_tensor_parallel_native(model: GPT, layout: Layout, sequence_parallel: bool = False) -> dict:
    """Megatron's split with DTensor's parallelize_module: ColwiseParallel is column-parallel (f
    before it), RowwiseParallel row-parallel (g after it), RowwiseParallel on the embedding is the
    vocabulary split. DTensor shards contiguous equal slices, so c_attn's fused [q|k|v] rows (and
    SwiGLU's [gate|up]) are first reordered so that slice r is rank r's heads; the returned specs
    undo that order when a full checkpoint is written.

    sequence_parallel (torchtitan's plan): the norms become SequenceParallel (inputs Shard(1), i.e.
    split along T; their weights Replicate DTensors, whose gradients come back Partial: see
    place_grads_like_params); PrepareModuleInput all-gathers T entering attention and the MLP; the
    row-parallel layers and the embedding reduce-scatter to Shard(1); the output layer gathers T
    first. The learned positions and the dropouts are handled as from scratch (split_positions_and_dropout)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    tp, mesh = layout.tp, layout.mesh["tp"]
    check_tensor_parallel(model.config, tp)
    layouts, specs = tensor_parallel_layouts(model.config, tp), {}
    split_t = Shard(1) if sequence_parallel else Replicate()  # the activations between the regions
    for i, block in enumerate(model.transformer.h):
        for linear, kind, name in ((block.attn.c_attn, "c_attn", "attn.c_attn"), (block.mlp.c_fc, "c_fc", "mlp.c_fc")):
            order = torch.cat(layouts[kind])
            for pname in ("weight", "bias"):
                if getattr(linear, pname) is not None:
                    getattr(linear, pname).data = getattr(linear, pname).data[order]
                    specs[f"transformer.h.{i}.{name}.{pname}"] = (0, layouts[kind])
        plan = {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(output_layouts=split_t),
                "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel(output_layouts=split_t)}
        if sequence_parallel:
            gather_t = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            # attention is called with (x, kv_cache, doc_ids, positions): only x is gathered, the rest pass as they are
            gather_x = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                          desired_input_layouts=(Replicate(), None, None, None))
            plan.update({"ln_1": SequenceParallel(), "attn": gather_x, "ln_2": SequenceParallel(), "mlp": gather_t})
        parallelize_module(block, mesh, plan)
        block.attn.n_head, block.attn.n_kv_head = block.attn.n_head // tp, block.attn.n_kv_head // tp
    # the output layer gathers the full logits (Replicate), so the model's own cross-entropy applies
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=split_t),
            "lm_head": ColwiseParallel(input_layouts=split_t, output_layouts=Replicate())}
    if sequence_parallel:
        plan["transformer.ln_f"] = SequenceParallel()
    parallelize_module(model, mesh, plan)
    if model.config.tie_embeddings:  # parallelize_module made two parameters of the tied one: tie again
        model.lm_head.weight = model.transformer.wte.weight
    return specs


def place_grads_like_params(module: nn.Module):
    """Give every DTensor gradient its parameter's placement. DTensor's backward does not promise it:
    under SequenceParallel the norms' gradients come back Partial (a sum over the tp ranks not yet
    taken: each rank saw T/t positions), and the vocabulary-split embedding's, untied, comes back
    Replicate, the whole (V, C) gradient on every rank beside a Shard(0) weight (seen with torch
    2.13). The optimizer would redistribute either lazily; the gradient norm counts each rank's
    local values now (_counts_in_norm reads the parameter's placement), so a Partial one would be
    counted short and a Replicate one t times over. Partial -> Replicate is an all-reduce (the
    scratch path's sp_grads); Replicate -> Shard only keeps this rank's rows, and frees the rest."""
    for p in module.parameters():
        if p.grad is not None and is_dtensor(p.grad) and tuple(p.grad.placements) != tuple(p.placements):
            p.grad = p.grad.redistribute(device_mesh=p.device_mesh, placements=p.placements)


def dtensor_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor, laid out as the DTensor `like` (a copy for a plain tensor)."""
    full = full.to(local_part(like).device)
    if not is_dtensor(like):
        return full.clone()  # never alias the caller's checkpoint: the optimizer updates its state in place
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


class TorchDDP(Replicated):
    """torch's DistributedDataParallel (the same buckets and hooks as BucketedDataParallel, in C++),
    with torch's AdamW, or with ZeroRedundancyOptimizer for ZeRO-1 (AdamW state split across dp)."""

    def __init__(self, model: nn.Module, make_optimizer, group, bucket_mb: float, zero: int, lr, betas, weight_decay):
        from torch.nn.parallel import DistributedDataParallel

        self.module = self.forward_module = model
        if group_size(group) > 1:
            # the only buffers (RoPE's cos/sin tables) are computed alike on every rank: no need to
            # broadcast them before each forward (torch 2.13 renamed the switch)
            import inspect

            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            self.forward_module = DistributedDataParallel(model, process_group=group, bucket_cap_mb=bucket_mb, **no_sync)
        self.zero1 = zero == 1
        if not self.zero1:
            self.optimizer = make_optimizer(model.parameters())
            return
        from torch.distributed.optim import ZeroRedundancyOptimizer

        groups = adamw_groups(model.parameters(), weight_decay)
        self.optimizer = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW, process_group=group,
                                                 lr=lr, betas=betas, weight_decay=weight_decay)
        self.optimizer.add_param_group(groups[1])

    def no_sync(self):
        return self.forward_module.no_sync() if self.forward_module is not self.module else contextlib.nullcontext()

    def finish_gradient_sync(self):
        place_grads_like_params(self.module)  # DDP averaged in backward; DTensor gradients go where their parameters are

    def full_optimizer_state(self) -> dict:
        if not self.zero1:
            return super().full_optimizer_state()
        self.optimizer.consolidate_state_dict(to=0)  # torch's ZeRO-1 gathers its shards itself (collective)
        if dist.get_rank() != 0:
            return {}
        order = adamw_order(self.module.named_parameters())  # its groups are adamw_groups': the same indices
        return {order[i]: state for i, state in self.optimizer.state_dict()["state"].items()}

    @torch.no_grad()
    def load_state(self, model_state: dict, optimizer_state: dict | None, piece):
        if not self.zero1:
            return super().load_state(model_state, optimizer_state, piece)
        super().load_state(model_state, None, piece)
        if optimizer_state:
            order = adamw_order(self.module.named_parameters())
            groups = [dict(g, params=[]) for g in self.optimizer.param_groups]
            groups[0]["params"], groups[1]["params"] = list(range(len(groups[0]["params"]))), list(
                range(len(groups[0]["params"]), len(order)))
            self.optimizer.load_state_dict({"state": {i: optimizer_state[n] for i, n in enumerate(order)}, "param_groups": groups})


class TorchFSDP(Replicated):
    """FSDP2 (fully_shard): each block, then the root, becomes a unit whose parameters are DTensors
    sharded over dp; forward all-gathers a unit's shard, backward reduce-scatters its gradient.
    reshard_after_forward=True frees the gathered parameters after forward (ZeRO-3); False keeps
    them until backward (ZeRO-2 traffic: no second all-gather). The rest is Replicated's: torch's
    AdamW works on DTensors as on tensors."""

    shards_over_data = True

    def __init__(self, model: GPT, make_optimizer, layout: Layout, reshard_after_forward: bool):
        from torch.distributed.fsdp import fully_shard

        mesh = layout.mesh["dp"]
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
        super().__init__(model, make_optimizer)

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def finish_gradient_sync(self):
        place_grads_like_params(self.module)  # reduce-scattered in backward; DTensor gradients go where their parameters are


class TensorParallel:
    """Tensor (and sequence) parallelism, from scratch or native, as Parallelized applies it, and its
    part of each call. It keeps:
        specs          name -> (dim, indices per rank) of every split weight: full checkpoints
                       gather (gather_tensor_parallel) and cut (tensor_parallel_piece) by them
        vocab_start    the vocabulary slice's first id where the loss is vocabulary-parallel (scratch)
        sequence_parallel_names   the weights whose gradients sequence parallelism leaves partial
    tp 1: nothing is split, and every call passes through."""

    def __init__(self, model: GPT, layout: Layout, scratch: bool, sequence_parallel: bool):
        self.layout, self.scratch = layout, scratch
        self.specs, self.vocab_start, self.sequence_parallel_names = {}, None, None
        if layout.tp == 1:
            return
        if scratch:
            self.specs = apply_tensor_parallel(model, layout.group("tp"))
            self.vocab_start = model.transformer.wte.lo
            if sequence_parallel:
                self.sequence_parallel_names = apply_sequence_parallel(model, layout.group("tp"), self.specs)
            return
        self.specs = apply_tensor_parallel_native(model, layout, sequence_parallel)
        if sequence_parallel:  # DTensor sums the norms' gradients; the position table is a plain tensor
            check_sequence_parallel(model.config.block_size, layout.tp)
            split_positions_and_dropout(model, layout.group("tp"))
            self.sequence_parallel_names = ["transformer.wpe.weight"] if model.transformer.wpe is not None else []

    def loss(self, forward_module, x, y, documents: dict) -> torch.Tensor:
        """The mean loss of a (B, T) batch; vocabulary-parallel, the logits are this rank's (B, T, V/t) slice."""
        if self.sequence_parallel_names is not None:
            check_sequence_parallel(x.size(1), self.layout.tp)
        if self.vocab_start is None:
            return forward_module(x, y, **documents)[1]
        logits, _ = forward_module(x, **documents)
        return vocab_parallel_cross_entropy(logits, y, self.vocab_start, self.layout.group("tp"))

    def finish_gradient_sync(self, local_grads):
        """Sequence parallelism: sum the replicated weights' partial gradients (local_grads(): the
        data-parallel flavour's name -> this rank's part) over the tp ranks."""
        if self.sequence_parallel_names is not None:
            reduce_sequence_parallel_grads(local_grads(), self.sequence_parallel_names, self.layout.group("tp"))

    def gather(self, tensors: dict) -> dict:
        return gather_tensor_parallel(tensors, self.specs, self.layout, self.scratch)

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return tensor_parallel_piece(name, full, self.specs, self.layout, self.scratch)


def make_data_parallel(model: GPT, layout: Layout, zero: int, impl: str, bucket_mb: float, diloco_steps: int,
                       diloco_outer: tuple, make_optimizer, lr: float, betas: tuple, weight_decay: float,
                       muon: bool = False) -> Replicated:
    """The data-parallel flavour over the data group (dp x cp), as --zero, --impl and --diloco_steps choose."""
    group = layout.group("data")
    if diloco_steps:
        return DiLoCo(model, make_optimizer, group, diloco_steps, *diloco_outer)
    if impl == "native" and zero in (2, 3):
        return TorchFSDP(model, make_optimizer, layout, reshard_after_forward=zero == 3)
    if impl == "native":
        return TorchDDP(model, make_optimizer, group, bucket_mb, zero, lr, betas, weight_decay)
    if zero == 3:
        return ZeRO3(model, group, lr, betas, weight_decay)
    if zero:
        return ZeRO(model, group, zero, lr, betas, weight_decay, muon=muon)
    if layout.size("data") > 1:
        return BucketedDataParallel(model, make_optimizer, group, bucket_mb)
    return Replicated(model, make_optimizer)


# ----------------------------------------------------------------------------------------------
# Parallelized: the strategies composed, and the calls train.py's loop makes


STRATEGY_HELP = ("--impl scratch supports every strategy; native covers --dp, --zero 1-3 and --tp, --sequence_parallel "
                 "(with --zero 2/3 for dp x tp)")


def native_zero_alone(zero: int) -> str:
    """Why --impl native --zero N needs torchrun: torch's sharded optimizer and FSDP2 shard over a process
    group (a device mesh), which one process started without torchrun does not have."""
    what = "ZeroRedundancyOptimizer" if zero == 1 else "FSDP2 (fully_shard)"
    return (f"--impl native --zero {zero} shards with torch's {what} over the data-parallel ranks' process group, "
            "which one process does not have: launch N processes with torchrun --nproc_per_node N train.py ... --dp N, "
            f"or use --impl scratch, whose --zero {zero} also runs in one process")


def check_strategy(layout: Layout, zero: int, impl: str, pp_schedule: str, diloco_steps: int, sequence_parallel: bool = False,
                   ep: int = 1):
    """Refuse, in one line each, the combinations this file does not implement."""
    if ep > 1 and (zero == 3 or impl != "scratch" or diloco_steps or layout.tp > 1 or layout.pp > 1 or layout.cp > 1):
        raise ValueError("--ep combines with data parallelism and ZeRO-1/2 only here: drop --zero 3, --impl native, "
                         "--diloco_steps, --tp, --pp and --cp")
    if layout.dp % ep:
        raise ValueError(f"--ep {ep} must divide --dp {layout.dp}: the experts are split inside groups of ep data-parallel ranks")
    if impl not in ("scratch", "native"):
        raise ValueError(f"unknown --impl '{impl}': use scratch or native")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, not {zero}")
    if pp_schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"unknown --pp_schedule '{pp_schedule}': use gpipe or 1f1b")
    if diloco_steps and (zero or layout.tp > 1 or layout.pp > 1 or layout.cp > 1):
        raise ValueError("--diloco_steps works on plain data parallelism: use it with --dp only")
    if layout.pp > 1 and (layout.tp > 1 or layout.cp > 1 or zero):
        raise ValueError("--pp combines with --dp only here: drop --tp, --cp and --zero")
    if layout.cp > 1 and (layout.tp > 1 or zero):
        raise ValueError("--cp combines with --dp only here: drop --tp and --zero")
    if impl == "native" and zero and layout.mesh is None:  # (train.check_config says it before any work)
        raise ValueError(native_zero_alone(zero))
    if impl == "native" and (layout.pp > 1 or layout.cp > 1 or diloco_steps):
        raise ValueError(f"pipeline, context parallelism and DiLoCo exist only from scratch: use --impl scratch ({STRATEGY_HELP})")
    if impl == "native" and layout.tp > 1 and layout.dp > 1 and zero in (0, 1):
        raise ValueError("--impl native combines --dp with --tp through FSDP2: add --zero 2 or --zero 3")
    if sequence_parallel and layout.tp == 1:
        raise ValueError("--sequence_parallel splits tensor parallelism's norms and dropouts along the sequence: "
                         "it needs --tp 2 or more")
    if sequence_parallel and zero == 3 and impl == "scratch":
        raise ValueError("--sequence_parallel does not combine with the scratch --zero 3 here: use --zero 0, 1 or 2, "
                         "or --impl native")


class FullCheckpointFormat:
    """A full checkpoint (--checkpoint_format full) is the single-process run's, whatever layout
    wrote it, so that a run with any other layout can resume from it. This is its one home:
        model      the GPT's state_dict, its keys in order (tied: the output layer is the embedding)
        optimizer  torch.optim.AdamW's state_dict over adamw_groups (adamw_order's indices, the first
                   n_decayed of them decayed); with Muon {"adamw": that over the other parameters,
                   "muon": name -> {"momentum_buffer"}}
    Read from the whole model, before any strategy reshapes it."""

    def __init__(self, model: GPT, optimizer: str, lr: float, betas: tuple, weight_decay: float):
        self.tied, self.state_keys = model.config.tie_embeddings, list(model.state_dict().keys())
        self.full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # the single-process shapes
        # with Muon, the names of the matrices it updates; AdamW's checkpoint order then lists the rest
        self.muon_names = [n for n, p in model.named_parameters() if optimizer == "muon" and is_muon_matrix(n, p)]
        named_adamw = [(n, p) for n, p in model.named_parameters() if n not in self.muon_names]
        self.adamw_order = adamw_order(named_adamw)  # the single-process optimizer's parameter order
        self.n_decayed = sum(is_decayed(p) for _, p in named_adamw)
        self.lr, self.betas, self.weight_decay = lr, betas, weight_decay

    def model_state(self, full: dict) -> dict:
        """name -> whole tensor (gathered) -> the GPT's state_dict, on the CPU."""
        if self.tied and "lm_head.weight" in self.state_keys:
            full["lm_head.weight"] = full["transformer.wte.weight"]
        return {k: full[k].cpu() for k in self.state_keys}

    def optimizer_state(self, full: dict) -> dict:
        """name -> {"step", "exp_avg", "exp_avg_sq"} or {"momentum_buffer"} (gathered) -> the optimizer's state_dict."""
        adamw = adamw_state_dict(full, self.adamw_order, self.n_decayed, self.lr, self.betas, self.weight_decay)
        if not self.muon_names:
            return adamw
        return {"adamw": adamw, "muon": {n: {"momentum_buffer": full[n]["momentum_buffer"].cpu()} for n in self.muon_names}}

    def named_optimizer_state(self, saved: dict) -> dict:
        """The inverse: a saved optimizer state_dict -> name -> that parameter's state."""
        adamw = saved["adamw"] if self.muon_names else saved
        return {**{self.adamw_order[i]: s for i, s in adamw["state"].items()}, **(saved["muon"] if self.muon_names else {})}


class Parallelized:
    """A GPT with a Layout's strategies applied, and the calls a training loop makes:

        loss = par.forward_backward(x, y, divisor, sync)   # per micro-step; sync=False: no gradient traffic
        par.finish_gradient_sync(); par.clip_grad_norm_(1.0); par.optimizer_step(); par.zero_grad()
        par.reduce_loss(loss)       # the global batch's mean loss, for the log
        par.full_state_dict(), par.full_optimizer_state_dict(), par.load_full_state(...)   # checkpoints

    x, y are this data-parallel rank's (B, T) batch. First the model is reshaped: tensor parallel
    (layers swapped; sequence parallel: hooks at the regions' edges), context parallel (attention
    swapped), pipeline (cut to this rank's stage), expert parallel (each rank keeps E/ep experts).
    Then one data-parallel flavour (make_data_parallel) takes the parameters this rank holds. Each
    call below hands the work to the strategies that own it, each in its own section:

        call                   data-parallel flavour                    Pipeline          TensorParallel, ExpertParallel
        forward_backward       no_sync() on accumulation micro-steps    1F1B or GPipe     loss(): vocab-parallel (cp: the
                                                                                            batch cut by context_slice first)
        finish_gradient_sync   DDP: wait buckets; ZeRO-1/2: all-reduce  tied embedding    sp: sum the replicated weights'
                               / reduce-scatter; ZeRO-3, FSDP2: done in   all-reduce        partial grads; ep: expert grads
                               backward (torch's: DTensor grads placed                      summed over the same experts
                               like their parameters); DiLoCo: nothing
        clip_grad_norm_        local_grads() (DiLoCo: a local norm)     -                 -
        optimizer_step         step(): ZeRO-1/2 all-gather the shards;  -                 -
                               DiLoCo: the outer step every H
        any_rank, reduce_loss  as is / the mean over the data ranks;    the last stage's  -
                               DiLoCo: one all-reduce / its own loss      loss, summed
        full_state_dict etc.   full_state(), full_optimizer_state(),    gather_stages     gather(), piece()
                               load_state(), extra_state()
    What a full checkpoint holds (the single-process run's) is FullCheckpointFormat's.
    """

    def __init__(self, model: GPT, layout: Layout, *, zero: int = 0, impl: str = "scratch", microbatches: int = 1,
                 pp_schedule: str = "1f1b", bucket_mb: float = 25.0, diloco_steps: int = 0, diloco_outer: tuple = (0.7, 0.9),
                 cp_load_balance: bool = False, sequence_parallel: bool = False, ep: int = 1,
                 lr: float = 1e-3, betas: tuple = (0.9, 0.95), weight_decay: float = 0.1, amp=None, scaler=None,
                 compile: bool = False, fused_adamw: bool | None = None, optimizer: str = "adamw"):
        check_strategy(layout, zero, impl, pp_schedule, diloco_steps, sequence_parallel, ep)
        check_optimizer(optimizer, layout.tp, layout.pp, layout.cp, zero, impl, diloco_steps)
        if compile and (layout.tp > 1 or layout.pp > 1 or layout.cp > 1 or zero):
            raise ValueError("--compile works with --dp alone here: drop --compile or the other strategies")
        self.layout, self.microbatches, self.cp_load_balance = layout, microbatches, cp_load_balance
        self.amp, self.scaler = amp or contextlib.nullcontext(), scaler
        self.format = FullCheckpointFormat(model, optimizer, lr, betas, weight_decay)
        fused = next(model.parameters()).device.type == "cuda" if fused_adamw is None else fused_adamw  # None: fused on CUDA
        make_optimizer = functools.partial(make_adamw, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
        if optimizer == "muon":
            make_optimizer = functools.partial(make_muon, names={id(p): n for n, p in model.named_parameters()},
                                               group=layout.group("data") if layout.size("data") > 1 else None,
                                               lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
        # 1. reshape the model
        self.tensor_parallel = TensorParallel(model, layout, impl == "scratch", sequence_parallel)
        if layout.cp > 1:
            apply_context_parallel(model, layout.group("cp"), cp_load_balance)
        self.pipeline = Pipeline(model, layout, pp_schedule, self.amp) if layout.pp > 1 else None
        self.expert_parallel = ExpertParallel(model, layout, ep)
        # 2. the data-parallel flavour, over the parameters this rank now holds
        before = list(model.named_parameters())  # (kept alive, so that no new parameter reuses an id)
        names = {id(p): n for n, p in before}  # ZeRO-3 wraps the blocks: keep the GPT's names
        self.data_parallel = make_data_parallel(model, layout, zero, impl, bucket_mb, diloco_steps, diloco_outer,
                                                make_optimizer, lr, betas, weight_decay, muon=optimizer == "muon")
        self.module, self.optimizer = model, self.data_parallel.optimizer
        self.forward_module = torch.compile(self.data_parallel.forward_module) if compile else self.data_parallel.forward_module
        self.counted = {names.get(id(p), n): self._counts_in_norm(names.get(id(p), n), p) for n, p in model.named_parameters()}

    def _counts_in_norm(self, name: str, p) -> bool:
        """Does this rank's part of p's gradient count in the global norm? Each element counts once:
        on the rank with coordinate 0 along every mesh dim over which that part is replicated."""
        if name in self.expert_parallel.names:
            return self.layout.rank("data") < self.expert_parallel.ep  # the first group of ep ranks holds each expert once
        split = {p.device_mesh.mesh_dim_names[i] for i, pl in enumerate(p.placements) if not pl.is_replicate()} \
            if is_dtensor(p) else set()  # not is_shard(): FSDP2 over tensor parallelism places _StridedShard
        split |= {"tp"} if name in self.tensor_parallel.specs else set()
        split |= {"pp"} if self.pipeline is not None and not (self.format.tied and name == "transformer.wte.weight") else set()
        split |= {"dp", "cp"} if self.data_parallel.shards_over_data or self.data_parallel.independent_workers else set()
        return all(self.layout.rank(d) == 0 for d in MESH_DIMS if self.layout.size(d) > 1 and d not in split)

    # --- one step
    def _local_loss(self, x, y):
        documents = {}
        if self.layout.cp > 1:  # this rank's positions of every sequence
            if self.module.config.doc_mask:
                documents = context_document_inputs(x, self.module.config.eot_id, self.layout, self.cp_load_balance)
            x, y = context_slice(x, self.layout, self.cp_load_balance), context_slice(y, self.layout, self.cp_load_balance)
        return self.tensor_parallel.loss(self.forward_module, x, y, documents)

    def forward_backward(self, x, y, divisor: int = 1, sync: bool = True) -> torch.Tensor:
        """Loss of this rank's batch, and its gradient (of loss / divisor) accumulated into .grad."""
        no_sync = self.data_parallel.no_sync
        if self.pipeline is not None:
            return self.pipeline.forward_backward(x, y, self.microbatches, divisor, sync, no_sync)
        with contextlib.nullcontext() if sync else no_sync():
            with self.amp:
                loss = self._local_loss(x, y)
            scaled = loss / divisor
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def finish_gradient_sync(self):
        """After the last micro-step: complete the gradient averaging (native: then put each gradient
        where its parameter is, place_grads_like_params), then the sums across the ranks holding the
        same experts, across stages (tied embedding) and across tensor-parallel ranks (sequence
        parallelism's replicated weights)."""
        self.data_parallel.finish_gradient_sync()
        self.expert_parallel.finish_gradient_sync()
        if self.pipeline is not None:
            self.pipeline.finish_gradient_sync()
        self.tensor_parallel.finish_gradient_sync(self.data_parallel.local_grads)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm, sqrt(sum over all distinct gradient elements of g^2), as
        torch.nn.utils.clip_grad_norm_ does on one process: each rank sums the squares of the
        elements it counts (_counts_in_norm), one all-reduce adds them up. DiLoCo workers clip alone."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.layout.world_size == 1 and not self.data_parallel.shards_over_data:
            return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        # EXERCISE BEGIN grad-clip (tests/test_parallel.py -k 'clip_grad_norm or (two_ranks and zero1)')
        grads = self.data_parallel.local_grads()
        sum_sq = torch.zeros((), device=self.layout.device)
        for name, g in grads.items():
            if self.counted[name]:
                sum_sq += g.float().pow(2).sum()
        if not self.data_parallel.independent_workers and dist.is_initialized():
            all_reduce(sum_sq, dist.group.WORLD, "clip")
        total = sum_sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's formula, 1e-6 included
        for g in grads.values():  # every copy is scaled, counted or not, so replicas stay equal
            g.mul_(coef)
        return float(total)
        # EXERCISE END grad-clip

    def optimizer_step(self):
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # it calls optimizer.step(); a ZeRO-1/2 gather would be missed
            self.scaler.update()              # (float16 runs on one device only: train.check_config)
        else:
            self.data_parallel.step()

    def zero_grad(self):
        self.data_parallel.zero_grad()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if flag (a non-finite loss or norm) is True on any (DiLoCo.any_rank)."""
        return self.data_parallel.any_rank(flag)

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The global batch's mean loss: from the last pipeline stage, averaged over the data group.
        DiLoCo workers do not talk between outer steps, so each reports its own."""
        t = loss.detach().float().reshape(()).clone()
        if self.layout.pp > 1:
            all_reduce(t, self.layout.group("pp"), "loss")  # only the last stage's is non-zero
        self.data_parallel.mean_over_data(t, self.layout.group("data"))
        return t.item()

    @torch.no_grad()
    def eval_loss(self, x, y) -> torch.Tensor:
        """Forward only, on every rank (a collective left to rank 0 alone would hang: nanoGPT PR #356)."""
        self.module.eval()
        try:
            if self.pipeline is not None:
                return self.pipeline.forward_only(x, y)
            with self.amp:
                return self._local_loss(x, y)
        finally:
            self.module.train()

    def memory_bytes(self) -> dict:
        """Bytes this rank holds in parameters, gradients, optimizer state and communication buffers."""
        return storage_bytes(self.data_parallel.held_tensors())

    # --- full, unsharded checkpoints: the single-process model's tensors, gathered to global rank 0
    def _gather(self, tensors: dict) -> dict:
        """name -> this rank's tensor (whole over the data ranks) -> whole over the expert and tensor
        parallel ranks too. Collective; the pipeline's stages are gathered after (gather_stages)."""
        return self.tensor_parallel.gather(self.expert_parallel.gather(tensors))

    def _piece(self, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse, when loading: this rank's part of a full tensor, laid out as `like` (a DTensor shard where it is one)."""
        return dtensor_piece(self.tensor_parallel.piece(name, self.expert_parallel.piece(name, full)), like)

    def full_state_dict(self) -> dict | None:
        """The single-process GPT's state_dict, on global rank 0 (None on the others). Collective."""
        full = gather_stages(self._gather(self.data_parallel.full_state()), self.layout)
        return self.format.model_state(full) if full is not None and self.layout.is_rank0 else None

    def full_optimizer_state_dict(self) -> dict | None:
        """The single-process optimizer's state_dict (FullCheckpointFormat), on global rank 0 (None
        elsewhere), so a run with any other layout can resume from it. Collective."""
        local = self.data_parallel.full_optimizer_state()
        for key in ("exp_avg", "exp_avg_sq"):
            split = self._gather({name: s[key] for name, s in local.items() if key in s})
            for name in split:  # Muon's momenta have no AdamW moments (and Muon runs without --tp)
                local[name][key] = split[name]
        full = gather_stages(local, self.layout)
        return self.format.optimizer_state(full) if full is not None and self.layout.is_rank0 else None

    def load_full_state(self, model_state: dict, optimizer_state: dict | None = None):
        """Load a single-process checkpoint (as full_state_dict wrote it) into any layout: each rank
        keeps its part (_piece). Every rank reads the same full tensors."""
        named = self.format.named_optimizer_state(optimizer_state) if optimizer_state else None
        self.data_parallel.load_state(model_state, named, self._piece)


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints: each rank's pieces of the single-process tensors (train.py writes them with DCP)


def check_sharded(par: "Parallelized"):
    """Refuse, in one line, the two flavours whose state sharded checkpoints do not describe."""
    if par.data_parallel.independent_workers:
        raise ValueError("--checkpoint_format sharded with --diloco_steps: DiLoCo's workers hold different weights "
                         "between outer steps, which pieces of one model cannot describe; use --checkpoint_format full")
    if isinstance(par.data_parallel, TorchDDP) and par.data_parallel.zero1:
        raise ValueError("--checkpoint_format sharded with --impl native --zero 1: torch's ZeroRedundancyOptimizer keeps "
                         "its state its own way; use --impl scratch --zero 1, or --checkpoint_format full")


@torch.no_grad()
def create_optimizer_state(par: "Parallelized"):
    """AdamW creates its moments at its first step; a sharded checkpoint loads into them in place,
    so they must exist first: one step with zero gradients at learning rate 0 creates them
    (the load then overwrites weights, moments and step counts alike)."""
    adamw = getattr(par.optimizer, "adamw", par.optimizer)  # Muon's momenta exist from its start
    lrs = [group["lr"] for group in adamw.param_groups]
    for group in adamw.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    adamw.step()
    for group, lr in zip(adamw.param_groups, lrs):
        group["lr"] = lr
    par.data_parallel.zero_grad()


def sharded_pieces(par: "Parallelized") -> tuple[dict, dict]:
    """(key -> [(offsets, values)], key -> the single-process shape): everything this rank holds,
    as pieces of the single-process model's tensors (model.<name>, and its persistent buffers: an
    MoE's balancer bias), AdamW's state (optim.<name>.exp_avg, .exp_avg_sq, .step) and Muon's
    (optim.<name>.momentum_buffer). The data-parallel flavour gives them in its module's
    coordinates (local_pieces); tensor-parallel slices are then placed by their index lists (a
    scratch rank's own, or the native reordering DTensor shards), expert-parallel ones by the
    first expert the rank holds. Views, not copies."""
    check_sharded(par)
    if not getattr(par.optimizer, "adamw", par.optimizer).state:
        create_optimizer_state(par)
    pieces, shapes = {}, {}
    for key, (name, local) in par.data_parallel.local_pieces().items():
        shapes[key] = () if key.endswith(".step") else par.format.full_shapes[name]
        if name in par.tensor_parallel.specs and not key.endswith(".step"):
            dim, index = par.tensor_parallel.specs[name]
            positions = index[par.layout.rank("tp")] if par.tensor_parallel.scratch else torch.cat(index)
            local = [q for offsets, values in local for q in split_by_positions(offsets, values, dim, positions)]
        local = [(par.expert_parallel.place(name, offsets), values) for offsets, values in local]
        if kept := [(offsets, values) for offsets, values in local if values.numel() > 0]:
            pieces[key] = kept
    parameters = {n for n, _ in par.module.named_parameters()}
    for name, b in par.module.named_buffers():  # persistent ones (in the state dict), replicated on every rank
        if name in par.format.state_keys and name not in parameters:
            pieces[f"model.{name}"], shapes[f"model.{name}"] = [((0,) * b.dim(), b)], tuple(b.shape)
    return pieces, shapes


# ----------------------------------------------------------------------------------------------
# Command line: a preflight of the collectives, and the formulas for a model


PREFLIGHT_FIXES = """usual fixes for a first multi-node run (nanoGPT PR #55):
  - every node must reach --rdzv_endpoint HOST:PORT (and MASTER_ADDR): open the port, use an address, not localhost
  - NCCL picks the wrong network interface: NCCL_SOCKET_IFNAME=eth0 (or ib0, ...); gloo: GLOO_SOCKET_IFNAME
  - no InfiniBand, or a broken one: NCCL_IB_DISABLE=1
  - GPUs that cannot talk peer to peer (some PCIe boxes, VMs): NCCL_P2P_DISABLE=1
  - see what NCCL does: NCCL_DEBUG=INFO; a hang becomes an error after --timeout seconds"""


def preflight(timeout_s: float, megabytes: float = 16.0):
    """Run each collective once on every rank and report its bus bandwidth; on failure, the fixes above."""
    import time

    if not timeout_s > 0 or not megabytes > 0:
        raise ValueError(f"--timeout and --megabytes must be positive, got {timeout_s:g} and {megabytes:g}")
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("preflight checks the collectives between processes, so it needs two or more: launch it with "
                         "torchrun, e.g. torchrun --standalone --nproc_per_node 2 parallel.py preflight")
    layout = init_distributed(dp=int(os.environ.get("WORLD_SIZE", "1")), device=torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"), timeout_s=timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    n = int(megabytes * 2**20 // 4)
    x = torch.ones(n, device=layout.device)
    checks = {
        "all-reduce": lambda: all_reduce(x, dist.group.WORLD, "preflight"),
        "all-gather": lambda: all_gather(torch.empty(n * world, device=x.device), x, dist.group.WORLD, "preflight"),
        "reduce-scatter": lambda: reduce_scatter(torch.empty(n // world, device=x.device), x[: n // world * world],
                                                 dist.group.WORLD, "preflight"),
        "send/recv ring": lambda: exchange(dist.group.WORLD, "preflight", [(x, (rank + 1) % world)],
                                           [(torch.empty_like(x), (rank - 1) % world)]),
    }
    for name, run in checks.items():
        BYTES_SENT.clear()
        run()  # warm-up: the first call sets up connections
        if layout.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if layout.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        log0(f"{name:15s} {megabytes:.0f} MB on {world} ranks: {1000 * seconds:8.2f} ms, "
             f"{BYTES_SENT['preflight'] / 2 / seconds / 1e9:6.2f} GB/s sent per rank")
    log0("preflight passed: every rank reached every collective")


def plan(config, dp: int, tp: int, zero: int, batch_tokens: int) -> dict:
    """The docstring's per-rank formulas for a model, float32: memory held and bytes sent per step.
    The formulas live in scaling.py (model_state_bytes, data_parallel_bytes, tensor_parallel_bytes);
    this feeds them the counts parallel.py really stores: N rounded up to a multiple of dp (ZeRO's
    flat vector), or, for stage 3, each flat unit (root, then every block) rounded up. buffers:
    plain data parallelism's gradient buckets, 4N (the docstring's 20N); ZeRO has none."""
    import scaling

    model = GPT(config)
    N = model.num_params()
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = N - config.n_layer * block
    padded = (lambda n: math.ceil(n / dp) * dp) if zero else (lambda n: n)
    stored = padded(root) + config.n_layer * padded(block) if zero == 3 else padded(N)
    states = scaling.model_state_bytes(stored, "fp32", zero, dp, tp)
    sent = scaling.data_parallel_bytes(stored, zero, dp, 4, n_root=padded(root) if zero == 3 else 0)
    buffers = 4 * stored / tp if zero == 0 else 0.0  # DDP's buckets: a float32 copy of every gradient
    return dict(params=states["weights"], grads=states["grads"], buffers=buffers, optimizer=states["optimizer"],
                data_parallel_bytes=sent / tp,
                tensor_parallel_bytes=scaling.tensor_parallel_bytes(config, batch_tokens, tp, 4) if tp > 1 else 0.0)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (python parallel.py {{preflight,plan}} --help lists the flags)\n")


def main(argv=None):
    parser = OneLineParser(description="Parallelism from collectives. train.py applies it (--dp, --tp, "
                                       "--pp, --cp, --zero); this command checks a cluster and prints the formulas. "
                                       "`parallel.py --check` is `parallel.py preflight`.")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    pre = sub.add_parser("preflight", help="run every collective once on every rank: torchrun --nproc_per_node N parallel.py preflight")
    pre.add_argument("--timeout", type=float, default=60, help="seconds before a hang becomes an error")
    pre.add_argument("--megabytes", type=float, default=16, help="message size")
    pl = sub.add_parser("plan", help="per-rank memory and bytes per step for a model preset, from the docstring's formulas")
    pl.add_argument("--preset", default="gpt2-124m", help="a model.MODEL_PRESETS name")
    pl.add_argument("--dp", type=int, default=8)
    pl.add_argument("--tp", type=int, default=1)
    pl.add_argument("--zero", type=int, default=0)
    pl.add_argument("--batch_tokens", type=int, default=16 * 1024, help="tokens per rank per step (B x T)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--check"]:  # `parallel.py --check`: the same preflight, under the name torchtitan users look for
        argv = ["preflight", *argv[1:]]
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            raise ValueError("name a command: torchrun --nproc_per_node N parallel.py preflight (checks the "
                             "collectives), or python parallel.py plan (memory and traffic per rank)")
        if args.command == "preflight":
            try:
                preflight(args.timeout, args.megabytes)
            except RuntimeError as e:  # gloo's and NCCL's errors, and the store's (DistError is a RuntimeError)
                print(f"error: preflight failed on this rank: {describe_failure(e, args.timeout)}\n{PREFLIGHT_FIXES}",
                      file=sys.stderr)
                sys.exit(1)
            finally:
                shutdown()
            return
        from model import MODEL_PRESETS, GPTConfig

        if args.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset '{args.preset}': choose one of {', '.join(MODEL_PRESETS)}")
        if args.zero not in (0, 1, 2, 3) or args.dp < 1 or args.tp < 1:
            raise ValueError("--zero must be 0-3, --dp and --tp at least 1")
        if args.batch_tokens < 1:
            raise ValueError(f"--batch_tokens must be at least 1 (tokens per rank per step), got {args.batch_tokens}")
        config = GPTConfig(**{**MODEL_PRESETS[args.preset], "vocab_size": 50304})
        check_tensor_parallel(config, args.tp)
        for key, value in plan(config, args.dp, args.tp, args.zero, args.batch_tokens).items():
            print(f"{key:22s} {value / 2**30:9.3f} GiB" + ("  per step" if key.endswith("bytes") else "  per rank"))
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
