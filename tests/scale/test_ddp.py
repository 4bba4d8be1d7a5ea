"""DDP training (tasks/distributed.py): the all-gathered global batch gives the single-process gradient, the
learning rate follows the single-process schedule step for step, and two CPU processes under torchrun reach the
single-process model's holdout quality."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from towerflow.config import ExamplesConfig, ModelConfig, TrainConfig, WorldConfig
from towerflow.data.source import ParquetSource
from towerflow.data.synthetic import generate_world
from towerflow.models.two_tower import TwoTower
from towerflow.tasks.build_examples import Examples, build_examples
from towerflow.tasks.distributed import (
    DistEnv,
    env_from_torchrun,
    global_batch_loss,
    init_distributed,
    torchrun_command,
    train_ddp,
)
from towerflow.tasks.scoring import model_metrics
from towerflow.tasks.train import EpochStats, TrainError, TrainResult, batch_loss, init_model, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ModelConfig(dim=32, d_model=32, hidden=64, n_layers=1)
# No dropout of any kind: a forward pass is then a pure function of weights and rows, on any rank.
DETERMINISTIC = SMALL.model_copy(update={"dropout": 0.0, "context_dropout": 0.0, "id_dropout": 0.0})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic world (600 users, 5 days) as saved Examples: ~9k train rows, ~300 holdout users."""
    root = tmp_path_factory.mktemp("ddp")
    generate_world(str(root / "source"), WorldConfig(n_users=600, n_items=500, n_topics=8, days=5,
                                                     events_per_day=5_000, new_items_per_day=10))
    source, end = ParquetSource(str(root / "source")), datetime(2026, 1, 6, tzinfo=UTC)
    examples = build_examples(source.read_events(datetime(2026, 1, 1, tzinfo=UTC), end), source.read_users(),
                              source.read_items(), end, ExamplesConfig())
    return examples.save(root / "examples")


def test_env_from_torchrun_names_what_is_missing():
    assert env_from_torchrun({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == DistEnv(1, 2, 1)
    with pytest.raises(TrainError, match="WORLD_SIZE, LOCAL_RANK not set"):
        env_from_torchrun({"RANK": "0"})
    with pytest.raises(TrainError, match="RANK=2 is outside WORLD_SIZE=2"):
        env_from_torchrun({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


GLOBAL_BATCH = 64


def _fresh_model(examples: Examples, config: TrainConfig) -> TwoTower:
    return init_model(examples, config, torch.device("cpu"))


def _grads(model: TwoTower) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_job(rank: int, examples_dir: str, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo job that serves two tests (starting processes that import torch is the slow
    part): gradients of the first global batch with and without the all-gather, then train_ddp's schedule."""
    torch.set_num_threads(1)
    env = DistEnv(rank, 2, rank)
    init_distributed(env, "cpu", init_method=f"file://{init_file}")
    try:
        _rank_step(env, Examples.load(examples_dir), Path(out_dir))
        _rank_lr(env, Examples.load(examples_dir), Path(out_dir))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs _rank_job on 2 processes once; the directory of what rank 0 saved."""
    out = tmp_path_factory.mktemp("two_ranks")
    torch_mp.spawn(_rank_job, args=(str(examples_dir), str(out / "rendezvous"), str(out)), nprocs=2)
    return out


def _rank_step(env: DistEnv, examples: Examples, out_dir: Path) -> None:
    """Gradients of the first global batch, with and without the all-gather (rank 0 saves them)."""
    from torch.nn.parallel import DistributedDataParallel

    config = TrainConfig(model=DETERMINISTIC, batch_size=GLOBAL_BATCH)
    local_b = GLOBAL_BATCH // 2
    batch = examples.train.to_batch(np.arange(env.rank * local_b, (env.rank + 1) * local_b), examples.user_feats)
    out = {}
    for mode in ("global", "local"):
        model = _fresh_model(examples, config)
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        u, v = ddp(batch)
        if mode == "global":
            loss = global_batch_loss(model, u, v, batch.target_items, config)
        else:  # each rank's positives only compete with its own rows: what the all-gather is there to avoid
            loss = batch_loss(model, u, v, batch.target_items, config, local_b)
        loss.backward()
        out[mode] = {"loss": loss.item(), "grads": _grads(model)}
    if env.is_main:
        torch.save(out, out_dir / "rank0.pt")


def test_global_batch_gradient_equals_single_process_gradient(examples_dir: Path, two_ranks: Path):
    examples = Examples.load(examples_dir)
    config = TrainConfig(model=DETERMINISTIC, batch_size=GLOBAL_BATCH)
    model = _fresh_model(examples, config)
    batch = examples.train.to_batch(torch.arange(GLOBAL_BATCH).numpy(), examples.user_feats)
    u, v = model(batch)
    loss = batch_loss(model, u, v, batch.target_items, config, GLOBAL_BATCH)
    loss.backward()
    single = _grads(model)

    ddp = torch.load(two_ranks / "rank0.pt")

    # The loss over the gathered 64 rows is the single-process loss of the same 64 rows ...
    assert ddp["global"]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    # ... and after DDP averages the two ranks' gradients, every parameter's gradient is the single-process one.
    assert single.keys() == ddp["global"]["grads"].keys()
    scale = max(g.abs().max().item() for g in single.values())
    worst = max((single[n] - g).abs().max().item() for n, g in ddp["global"]["grads"].items())
    assert worst < 1e-4 * scale
    # Without the gather each rank sees 32 candidates: a different loss and different gradients.
    assert ddp["local"]["loss"] < loss.item() - 0.3  # ln(32) vs ln(64) candidates: ~0.69 apart at init
    local_worst = max((single[n] - g).abs().max().item() for n, g in ddp["local"]["grads"].items())
    assert local_worst > 100 * worst


def test_torchrun_two_cpu_processes_reach_single_process_quality(examples_dir: Path, tmp_path: Path):
    # like for like: train_ddp does no refit (tasks/distributed.py), so the single process does none either
    config = TrainConfig(model=SMALL, epochs=3, batch_size=256, lr=3e-3, patience=3, device="cpu", refit=False)
    examples = Examples.load(examples_dir)
    single = train(examples, config)

    config_file = tmp_path / "train.json"
    config_file.write_text(config.model_dump_json())
    cmd = torchrun_command(2, ROOT / "scripts" / "train_ddp.py",
                           ["--examples", str(examples_dir), "--out", str(tmp_path / "out"),
                            "--config", str(config_file), "--device", "cpu"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = TrainResult.load(tmp_path / "out")

    def quality(model: TwoTower) -> dict[str, float]:
        return model_metrics(model, examples.holdout, examples.user_feats, examples.holdout_seen, ks=(10, 50))

    untrained = quality(_fresh_model(examples, config))
    q_single, q_ddp = quality(single.model), quality(ddp.model)
    assert len(ddp.history) == len(single.history) == 3  # same global batch -> same number of epochs and steps
    # Both learned (far above the untrained towers), and 2 processes are as good as 1 up to holdout noise
    # (~300 users: one standard error of recall@50 is about 0.03).
    assert q_single["recall@50"] > untrained["recall@50"] + 0.15
    assert q_ddp["recall@50"] >= q_single["recall@50"] - 0.06
    assert q_ddp["recall@10"] >= q_single["recall@10"] - 0.06


def test_a_restarted_job_resumes_after_the_last_checkpointed_epoch(examples_dir: Path, tmp_path: Path):
    """One rank (gloo in this process) is enough to exercise the checkpoint path of train_ddp."""
    examples = Examples.load(examples_dir)
    config = TrainConfig(model=SMALL, epochs=1, batch_size=256, device="cpu")
    init_distributed(DistEnv(0, 1, 0), "cpu", init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        first = train_ddp(examples, config, DistEnv(0, 1, 0), checkpoint_dir=tmp_path / "ckpt")
        seen: list[int] = []
        resumed = train_ddp(examples, config.model_copy(update={"epochs": 2}), DistEnv(0, 1, 0),
                            checkpoint_dir=tmp_path / "ckpt", on_epoch=lambda s: seen.append(s.epoch))
    finally:
        dist.destroy_process_group()
    assert [e.epoch for e in resumed.history] == [1, 2]
    assert seen == [1, 2]  # the checkpointed epoch is replayed to the caller, then epoch 2 runs
    assert resumed.history[0].loss == first.history[0].loss
    assert resumed.history[0].metrics == first.history[0].metrics


# 960 rows in global batches of 64: 15 steps an epoch, on 1 process or as 2 x 32 on 2 ranks (480 rows each).
LR_ROWS, LR_CONFIG = 960, TrainConfig(model=SMALL, epochs=3, batch_size=64, lr=3e-3, lr_schedule="cosine",
                                      warmup=0.4, patience=3, device="cpu")


def _first_rows(examples: Examples, n: int) -> Examples:
    return dataclasses.replace(examples, train=examples.train.take(np.arange(n)))


def _lr_after_each_epoch(checkpoint_dir: Path, seen: list[tuple[int, float]]) -> Callable[[EpochStats], None]:
    """on_epoch hook: (scheduler steps taken, learning rate of the next step) from the checkpoint just written."""
    def on_epoch(stats: EpochStats) -> None:
        state = torch.load(checkpoint_dir / "checkpoint.pt", weights_only=False)
        seen.append((state["scheduler"]["last_epoch"], state["optimizer"]["param_groups"][0]["lr"]))
    return on_epoch


def _rank_lr(env: DistEnv, examples: Examples, out_dir: Path) -> None:
    """train_ddp on LR_ROWS rows; rank 0 saves the schedule it followed."""
    seen: list[tuple[int, float]] = []
    ckpt = out_dir / "ddp"
    train_ddp(_first_rows(examples, LR_ROWS), LR_CONFIG, env, checkpoint_dir=ckpt,
              on_epoch=_lr_after_each_epoch(ckpt, seen) if env.is_main else None)
    if env.is_main:
        torch.save(seen, out_dir / "lr.pt")


def test_ddp_follows_the_single_process_learning_rate_schedule(examples_dir: Path, two_ranks: Path,
                                                               tmp_path: Path):
    """3 epochs x 15 steps = 45 steps, warm-up round(0.4 * 45) = 18 steps, then cosine to 0 at step 45."""
    single: list[tuple[int, float]] = []
    train(_first_rows(Examples.load(examples_dir), LR_ROWS), LR_CONFIG, checkpoint_dir=tmp_path / "single",
          on_epoch=_lr_after_each_epoch(tmp_path / "single", single))
    ddp = torch.load(two_ranks / "lr.pt")

    by_hand = [
        (15, 3e-3 * 16 / 18),  # still warming up: the rate of step 16 is 16/18 of the peak
        (30, 3e-3 * 0.5 * (1 + math.cos(math.pi * 12 / 27))),  # 12 of the 27 decay steps done: 1.7605e-3
        (45, 0.0),  # cosine ends at 0 on the last step
    ]
    assert [s for s, _ in ddp] == [s for s, _ in single] == [s for s, _ in by_hand]
    assert [lr for _, lr in ddp] == pytest.approx([lr for _, lr in by_hand], rel=1e-12, abs=1e-15)
    assert [lr for _, lr in single] == pytest.approx([lr for _, lr in by_hand], rel=1e-12, abs=1e-15)
