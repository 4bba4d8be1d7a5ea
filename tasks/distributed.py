"""Data-parallel training with torch DistributedDataParallel: one process per core or GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 scripts/train_ddp.py --examples DIR --out DIR

Every rank holds the whole model and a ``DistributedSampler`` shard of the training examples, and runs
``config.batch_size / world_size`` examples per step. The in-batch softmax must see the *global* batch, as the
single-process ``tasks.train.train`` does, or each rank would only score its positives against its own few
hundred rows: so every step all-gathers the user vectors, the positive item vectors and their item ids from all
ranks with ``torch.distributed.nn.functional.all_gather`` (it carries gradients back to the rank that produced
each row; ``torch.distributed.all_gather`` does not) and computes ``tasks.train.batch_loss`` over the global batch,
with log q scaled to the global batch size.

Why the gradient is right: every rank computes the same global loss L. The all-gather's backward sums the
gradient each rank sends to a row, so rank r's parameters get ``world_size * dL/dθ`` through its own rows; DDP's
gradient averaging divides by ``world_size``, leaving exactly the single-process gradient of one global batch.

Rank 0 runs the early-stopping evaluation and broadcasts it, so every rank stops at the same epoch and keeps the
same best weights. Nothing here touches Prefect or MLflow.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from towerflow.config import TrainConfig
from towerflow.models.two_tower import TwoTower
from towerflow.progress import say
from towerflow.tasks.build_examples import Examples
from towerflow.tasks.refit import refit_wanted
from towerflow.tasks.train import (
    EpochStats,
    Progress,
    TrainError,
    TrainResult,
    averaged,
    batch_loss,
    finish,
    init_model,
    make_optimizer,
    resume,
    run_average,
    run_epoch,
    save_checkpoint,
    stopping_metrics,
    stopping_split,
    torch_threads,
    training_rows,
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, number of processes, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun(environ: dict[str, str] | None = None) -> DistEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them; a clear error when they are missing."""
    environ = dict(os.environ if environ is None else environ)
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in environ]
    if missing:
        raise TrainError(f"not started by torchrun: {', '.join(missing)} not set "
                         "(run `torchrun --standalone --nproc_per_node N scripts/train_ddp.py ...`)")
    env = DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    if not 0 <= env.rank < env.world_size:
        raise TrainError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
    return env


def init_distributed(env: DistEnv, device: str = "auto", init_method: str | None = None) -> torch.device:
    """Join the process group: NCCL with one GPU per local rank when CUDA is used, gloo on CPU.

    ``device``: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``. ``init_method`` defaults to torchrun's
    ``env://`` rendezvous (MASTER_ADDR / MASTER_PORT); tests pass ``file://...``.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise TrainError("device 'cuda' requested but no GPU is available")
        if env.local_rank >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                             "start at most one process per GPU")
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method or "env://",
                            rank=env.rank, world_size=env.world_size)
    return torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank -> (world_size * b, ...) in rank order, with gradients flowing back to every rank."""
    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of a private module (_functional_collectives); it is the
        # public autograd-aware all-gather and works on gloo and NCCL.
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """(b,) integer ids on each rank -> (world_size * b,) in rank order (no gradient)."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def global_batch_loss(model: TwoTower, u: torch.Tensor, v: torch.Tensor, target_items: torch.Tensor,
                      config: TrainConfig) -> torch.Tensor:
    """This rank's u (b, d), v (b, d), target_items (b,) -> the loss of the global batch (world_size * b rows).

    Every rank's positives are every other rank's in-batch negatives; log q is scaled to the global batch.
    """
    u_all, v_all, ids_all = gather_rows(u), gather_rows(v), gather_ids(target_items)
    return batch_loss(model, u_all, v_all, ids_all, config, batch_size=len(ids_all))


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_ddp(
    examples: Examples,
    config: TrainConfig,
    env: DistEnv,
    device: torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Fit a TwoTower on ``examples.train`` across ``env.world_size`` processes of an initialised process group.

    ``config.batch_size`` is the *global* batch (it must divide by the world size), so a run on N processes takes
    the same steps of the same size as ``tasks.train.train`` on one. Every rank returns the same TrainResult (the
    best epoch's weights, on CPU); ``on_epoch`` and the checkpoint (``checkpoint_dir``, on storage every rank can
    read) are handled by rank 0, and a restarted job resumes after the last finished epoch. The optimizer step,
    learning-rate schedule, early stopping and ``config.num_threads`` are ``tasks.train``'s own code. No refit
    (``config.refit``, tasks/refit.py) on this path: the early-stopped model is returned, and rank 0 says so.
    """
    if env.is_main and refit_wanted(config, examples)[0]:
        say("refit skipped: train_ddp returns the early-stopped model (the refit runs in tasks.train.train)")
    with torch_threads(config.num_threads):
        return _train_ddp(examples, config, env, device or torch.device("cpu"), checkpoint_dir, on_epoch)


def _train_ddp(
    examples: Examples,
    config: TrainConfig,
    env: DistEnv,
    device: torch.device,
    checkpoint_dir: str | Path | None,
    on_epoch: Callable[[EpochStats], None] | None,
) -> TrainResult:
    if not dist.is_initialized():
        raise TrainError("train_ddp needs an initialised process group (see init_distributed)")
    world = env.world_size
    if config.batch_size % world:
        raise TrainError(f"batch_size {config.batch_size} (the global batch) must divide by world_size {world}")
    local_b = config.batch_size // world
    examples = training_rows(examples, config, main=env.is_main)
    n_train = len(examples.train)
    if n_train < 2 * world:
        raise TrainError(f"need at least {2 * world} training examples for {world} ranks, got {n_train}")

    model = init_model(examples, config, device)  # the same weights on every rank (DDP also broadcasts rank 0's)
    # Buffers (feature table, log q) never change in training: synced once at init, not before every step.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False)
    torch.manual_seed(config.seed + 1 + env.rank)  # dropout masks and mixed negatives differ between ranks
    # range(n) is all the sampler needs: it shards and shuffles positions, the same permutation on every rank.
    sampler = DistributedSampler(range(n_train), num_replicas=world, rank=env.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    # floor(floor(n / world) / (b / world)) = floor(n / b): the steps per epoch, and so the learning-rate
    # schedule, of tasks.train on one process with the same global batch b.
    n_batches = max(1, len(sampler) // local_b)
    opt, sched = make_optimizer(model, config, n_batches)  # DDP wraps these very parameters
    progress = Progress(config.early_stopping_metric, config.patience)

    def loss_fn(u: torch.Tensor, v: torch.Tensor, target_items: torch.Tensor) -> torch.Tensor:
        return global_batch_loss(model, u, v, target_items, config)

    ckpt, state = resume(checkpoint_dir, device, model, opt, sched, progress, on_epoch, "DDP training",
                         main=env.is_main)
    start_epoch = state["epoch"] + 1 if state is not None else 1
    # on every rank: all ranks hold the same weights after a step
    average = run_average(model, examples, config, n_batches, state, main=env.is_main)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        if progress.should_stop(epoch):
            break
        ddp.train()
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        shard = np.fromiter(iter(sampler), dtype=np.int64)  # this rank's positions, equal length on every rank
        total = run_epoch(examples, shard, local_b, n_batches, ddp, loss_fn, opt, sched, device,
                          f"epoch {epoch} on rank {env.rank}", average)
        train_s = time.perf_counter() - t0
        dist.all_reduce(total)  # sum over ranks of each rank's summed loss; ranks differ only by dropout/negatives
        with averaged(average):
            metrics = _broadcast(stopping_metrics(model, examples) if env.is_main else {})
            stats = EpochStats(epoch=epoch, loss=float(total) / (n_batches * world),
                               seconds=time.perf_counter() - t0,
                               examples_per_s=n_batches * config.batch_size / train_s, metrics=metrics)
            value, improved = progress.record(stats, model)
        if env.is_main:
            say(progress.line(stats, config.epochs, value, improved, f" ({world} ranks)"))
            if ckpt:  # before on_epoch: a failure there (e.g. logging) must not lose the epoch
                save_checkpoint(ckpt, model, opt, sched, progress, epoch,
                                average=average.state_dict() if average else None)
            if on_epoch:
                on_epoch(stats)
        dist.barrier()  # nobody starts the next epoch (or reads the checkpoint) before rank 0 is done
    return finish(model, progress, t_start, stopping_split(examples)[0])


def torchrun_command(nproc_per_node: int, script: str | Path, args: Sequence[str] = ()) -> list[str]:
    """The argv that runs ``script`` on ``nproc_per_node`` local processes with this interpreter's torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            str(script), *args]
