"""A retrain SIGKILLed inside its promote stage (at each step of the protocol) wedges nothing: the next retrain
promotes, without waiting out the lease, and the champion is whole throughout. A retrain that finds a live
promotion holding the lease waits, then fails naming it. Real Prefect (test harness), real MLflow, real processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.worlds import AS_OF, LOOKBACK, tiny_retrain_config, tiny_world
from towerflow.config import RetrainConfig, Settings
from towerflow.infra.promote import STEPS

pytestmark = pytest.mark.usefixtures("prefect_harness", "one_thread")

# wait_s < lease_s: a retrain that had to wait for the dead holder's lease to expire would fail, so passing
# shows the kill freed it at once (same host); the expiry path is tests/reliability/test_lease.py's
PROMOTION = {"lease_s": 60, "wait_s": 20}

# Runs the retrain flow in a child process whose promotion stops at one step of infra/promote.py (writing a marker
# file and sleeping) until the test SIGKILLs it there.
CHILD = """
import os, sys, time
from pathlib import Path
import towerflow.infra.promote as p
from towerflow.config import RetrainConfig
from towerflow.flows.retrain import retrain

step, marker, config, as_of, lookback = sys.argv[1:]
real_step = p._step

def stop_at(on_step, name):
    if name == step:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)
    real_step(on_step, name)

p._step = stop_at
retrain(as_of=as_of, lookback_days=int(lookback), config=RetrainConfig.model_validate_json(Path(config).read_text()))
"""


def config() -> RetrainConfig:
    c = tiny_retrain_config(gates={"max_release_latency_ms": 10_000}, epochs=2)
    return c.model_copy(update={"promotion": c.promotion.model_copy(update=PROMOTION)})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    with tiny_world(tmp_path_factory.mktemp("crash") / "towerflow") as settings:
        from towerflow.flows.retrain import retrain

        assert retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=config()).status == "promoted"
        yield settings


def champion(settings: Settings):
    from towerflow.infra.releases import load_release

    return load_release(settings)


def kill_retrain_at(step: str, settings: Settings, tmp: Path) -> int:
    """Run a retrain in a child process until its promotion reaches ``step``, SIGKILL it there; returns its pid.
    Fails (with the child's stderr) if it never gets there: e.g. when it gave up waiting for the lease."""
    from prefect.settings import PREFECT_API_URL

    tmp.mkdir()
    (tmp / "config.json").write_text(config().model_dump_json())
    marker = tmp / "at-step"
    env = {**os.environ, "TOWERFLOW_DATA_ROOT": str(settings.data_root), "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, step, str(marker), str(tmp / "config.json"),
                             AS_OF.isoformat(), str(LOOKBACK)], env=env, cwd=Path(__file__).parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the retrain never reached {step}: exit {proc.poll()}\n{proc.stderr.read()[-3000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.pid


@pytest.mark.slow
def test_retrains_killed_at_each_promotion_step_wedge_nothing(world: Settings, tmp_path: Path):
    """Six retrains, each SIGKILLed at the next step of the protocol; each is also "the next retrain" of the one
    killed before it, and a last one promotes. A dead holder's lease is on disk each time, so reaching the
    following step (with wait_s < lease_s) shows it was freed at once, not waited out."""
    from towerflow.flows.retrain import retrain
    from towerflow.infra.lease import read_holder
    from towerflow.infra.promote import lease_path

    before = champion(world)
    for step in STEPS:
        pid = kill_retrain_at(step, world, tmp_path / step)
        now = champion(world)  # whole: the old release, or (killed after the flip) the killed run's own
        if step == "flipped":
            assert now.version > before.version
        else:
            assert now.version == before.version
        holder = read_holder(lease_path(world))
        if step in ("locked", "previous_recorded", "before_flip", "flipped"):
            assert holder.pid == pid and "retrain flow run" in holder.note  # held by the dead run
        else:
            assert holder is None  # killed while registering: the lease was not taken yet
        before = now

    result = retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=config())  # would fail after wait_s if wedged
    assert result.status == "promoted" and result.previous_champion == before.release_id
    assert champion(world).release_id == result.release_id
    assert read_holder(lease_path(world)) is None  # released


def test_waiting_retrain_gives_up_naming_the_live_holder(world: Settings, caplog: pytest.LogCaptureFixture):
    from towerflow.flows.retrain import retrain
    from towerflow.flows.stages import StageFailed
    from towerflow.infra.lease import lease
    from towerflow.infra.promote import lease_path

    before = champion(world)
    quick = config()
    quick = quick.model_copy(update={"promotion": quick.promotion.model_copy(update={"wait_s": 1})})
    with lease(lease_path(world), note="an operator's towerflow release promote"), \
            pytest.raises(StageFailed, match=rf"stage 'promote' failed: another promotion of '{world.registered_model}'"
                                             r" is in progress \(gave up after waiting 1\.\ds for .* held by pid "
                                             rf"{os.getpid()} on .* \(an operator's towerflow release promote\) "
                                             "since .*"):
        retrain(as_of=AS_OF, lookback_days=LOOKBACK, config=quick)
    assert champion(world).release_id == before.release_id
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "waiting for" in r.getMessage()]
    assert len(said) == 1 and f"held by pid {os.getpid()} on " in said[0] and "(an operator's" in said[0]
