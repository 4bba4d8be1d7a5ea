"""A retrain stage gets its arguments as they are: Prefect does not walk into them (so it neither resolves what is
inside nor rebuilds them), and the task run still names the task run whose result it took (the UI's graph)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prefect import flow
from prefect.states import Completed, State

from towerflow.flows.stages import stage

pytestmark = pytest.mark.usefixtures("prefect_harness")

BUILT: list[int] = []


@dataclass
class Payload:
    rows: list
    meta: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        BUILT.append(len(self.rows))  # a dataclass Prefect changed while walking it is rebuilt: it shows here


@stage("echo")
def echo(x: Payload) -> Payload:
    return x


@flow(name="test-stage-inputs")
def two_stages() -> tuple[bool, bool, int]:
    # a State deep inside: Prefect's walk would replace it by its result (and rebuild the Payload around it)
    payload = Payload([*range(1000), Completed(data=7)], {"a": 1})
    BUILT.clear()
    first = echo(payload)
    second = echo(x=first)
    return first is payload and isinstance(first.rows[-1], State), second is payload, len(BUILT)


def test_stage_arguments_are_passed_as_is_and_linked_to_the_task_that_made_them():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = two_stages(return_state=True)
    assert state.result() == (True, True, 0)  # the same objects, never rebuilt
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    by_start = sorted(runs, key=lambda r: r.start_time)
    assert [r.name.rsplit("-", 1)[0] for r in by_start] == ["echo", "echo"]
    assert by_start[0].task_inputs["x"] == []  # built in the flow body
    assert [i.id for i in by_start[1].task_inputs["x"]] == [by_start[0].id]  # the first echo's result
