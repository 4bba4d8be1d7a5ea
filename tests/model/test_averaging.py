"""models/averaging.py: the weight average, with numbers worked out by hand."""

import pytest
import torch
from torch import nn

from towerflow.models.averaging import WeightAverage


def _model(w: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    m.register_buffer("scale", torch.tensor([7.0]))  # a buffer: a constant in training, not averaged
    return m


def _step(m: nn.Module, avg: WeightAverage, w: float) -> float:
    with torch.no_grad():
        m.weight.fill_(w)
    avg.update()
    return avg.weights["weight"].item()


def test_a_plain_mean_for_the_first_span_steps_then_exponential():
    m = _model(100.0)  # the initial weights carry no weight once a step is taken
    avg = WeightAverage(m, span=2)
    assert _step(m, avg, 4.0) == 4.0  # share 1/1
    assert _step(m, avg, 0.0) == 2.0  # share 1/2: mean of 4 and 0
    assert _step(m, avg, 1.0) == 1.5  # share 1/min(3, 2): 2 + (1 - 2) / 2
    assert list(avg.weights) == ["weight"]
    with avg.applied():
        assert m.weight.item() == 1.5
    assert m.weight.item() == 1.0  # the live weight is back


def test_live_weights_come_back_when_the_block_raises():
    m = _model(1.0)
    avg = WeightAverage(m, span=10)
    with torch.no_grad():
        m.weight.fill_(3.0)
    with pytest.raises(RuntimeError), avg.applied():
        assert m.weight.item() == 1.0
        raise RuntimeError("evaluation failed")
    assert m.weight.item() == 3.0


def test_restore_from_a_checkpoint_and_refuse_a_foreign_one():
    m = _model(1.0)
    avg = WeightAverage(m, span=2)
    avg.load_state_dict({"steps": 5, "weights": {"weight": torch.tensor([[5.0]])}})
    assert _step(m, avg, 1.0) == 3.0  # step 6: share 1/2, not 1/1
    with pytest.raises(KeyError, match="weight"):
        avg.load_state_dict({"steps": 1, "weights": {"bias": torch.zeros(1)}})
    with pytest.raises(ValueError, match="span"):
        WeightAverage(m, span=0.5)


def test_auto_averages_on_a_leave_one_out_split_only_and_a_number_wins():
    from pydantic import ValidationError

    from towerflow.config import TrainConfig
    from towerflow.tasks.train import averaging_epochs

    auto = TrainConfig()
    assert auto.average_epochs == "auto"
    epochs, why = averaging_epochs(auto, "leave_one_out")
    assert epochs == 2.5 and why.startswith("average_epochs auto -> 2.5 (leave-one-out split")
    assert averaging_epochs(auto, "time") == (
        0.0, "average_epochs auto -> 0 (time split: epochs judged with the live weights)")
    assert averaging_epochs(TrainConfig(average_epochs=1), "time") == (1.0, None)
    assert averaging_epochs(TrainConfig(average_epochs=0), "leave_one_out") == (0.0, None)
    with pytest.raises(ValidationError, match="auto or a number of epochs >= 0"):
        TrainConfig(average_epochs=-1)
    with pytest.raises(ValidationError, match="average_epochs"):
        TrainConfig(average_epochs="sometimes")
