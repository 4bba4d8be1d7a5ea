"""bench/train_throughput.py times the training step run_epoch takes: the weight average's update included."""

import numpy as np
import pandas as pd
import torch

from bench.train_throughput import _setup, _step
from tests.model.test_train import START, TINY_MODEL, planted_world
from towerflow.config import ExamplesConfig, TrainConfig
from towerflow.tasks.build_examples import build_examples


def test_a_timed_step_updates_the_weight_average_as_run_epoch_does():
    events, users, items = planted_world()
    ex = build_examples(events, users, items, START + pd.Timedelta(days=3), ExamplesConfig(max_seq_len=8))
    cfg = TrainConfig(model=TINY_MODEL, batch_size=64, average_epochs=2.5)  # auto: none on this time split
    model, opt, sched, average = _setup(ex, cfg, seed=0, steps=len(ex.train) // 64)
    assert average is not None and average.steps == 0
    _step(model, opt, sched, cfg, ex.train, ex.user_feats, np.random.default_rng(0), 64, average)
    assert average.steps == 1  # after one step the average is the live weights (share 1/1)
    live = model.state_dict()
    assert all(torch.equal(w, live[k]) for k, w in average.weights.items())
    off = _setup(ex, cfg.model_copy(update={"average_epochs": 0}), seed=0, steps=1)
    assert off[3] is None
