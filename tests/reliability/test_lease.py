"""The lease behind promotions (infra/lease.py): a holder that dies frees it, a live one makes waiters wait and
then fail naming it. Real processes, a real SQLite lease file; no Prefect, no MLflow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from towerflow.infra.lease import (
    Holder,
    LeaseHeldError,
    LeaseLostError,
    LeaseTimeoutError,
    lease,
    read_holder,
    try_take,
)
from towerflow.procs import host_identity, process_alive, process_start

HOLD = """
import sys, time
from towerflow.infra.lease import lease
with lease(sys.argv[1], note="child", lease_s=60):
    print("held", flush=True)
    time.sleep(600)
"""


def test_holder_killed_with_sigkill_frees_the_lease_at_once(tmp_path: Path):
    path = tmp_path / "promote.lease"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        holder = read_holder(path)
        assert (holder.pid, holder.note, holder.deadline - holder.since) == (child.pid, "child", 60)
        with pytest.raises(LeaseHeldError, match=rf"held by pid {child.pid} on .* \(child\) since"), \
                lease(path, wait_s=0):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    said: list[str] = []
    t0 = time.monotonic()
    with lease(path, note="next", wait_s=5, on_wait=said.append):  # 60 s before its deadline
        assert read_holder(path).note == "next"
    assert time.monotonic() - t0 < 2
    assert said == [f"broke the lease of {holder.describe()}: its process is gone"]
    assert read_holder(path) is None  # released on exit


def test_holder_on_another_host_blocks_until_its_deadline_then_the_waiter_takes_it(tmp_path: Path):
    path = tmp_path / "promote.lease"
    now = time.time()
    # a pid that is alive here means nothing on another host: only the deadline frees it
    assert try_take(path, Holder("t0", os.getpid(), "other-host", "", "remote retrain", now, now + 1.5)) == (None, None)
    said: list[str] = []
    t0 = time.monotonic()
    with lease(path, wait_s=20, on_wait=said.append):
        waited = time.monotonic() - t0
    assert 1.0 < waited < 5
    assert said[0].startswith(f"waiting for {path}: held by pid {os.getpid()} on other-host (remote retrain) since")
    assert said[-1].endswith("its lease expired at " + said[-1].rsplit("expired at ", 1)[1])


def test_a_live_holder_keeps_renewing_and_a_waiter_gives_up_naming_it(tmp_path: Path):
    path = tmp_path / "promote.lease"
    with lease(path, note="slow promotion", lease_s=0.4) as held:  # renewed every 0.1 s
        first = read_holder(path).deadline
        said: list[str] = []
        with pytest.raises(LeaseTimeoutError, match=r"gave up after waiting 1\.\ds for .* held by pid \d+ on .* "
                                                    r"\(slow promotion\) since .* renewed until"), \
                lease(path, wait_s=1.0, on_wait=said.append):
            pass
        assert read_holder(path).deadline > first + 0.5  # renewed while the waiter waited (1 s > lease_s)
        held.check()  # still ours
        assert len(said) == 1 and "slow promotion" in said[0]


def test_a_holder_that_stops_renewing_loses_the_lease_and_finds_out(tmp_path: Path):
    path = tmp_path / "promote.lease"
    with lease(path, lease_s=0.3) as held:
        held._stop.set()  # a hung holder: its renewal thread no longer runs
        held._thread.join()
        time.sleep(0.4)
        with lease(path, wait_s=0), pytest.raises(LeaseLostError, match="was taken from this holder"):  # expired
            held.check()


def test_threads_of_one_process_exclude_each_other_and_a_recycled_pid_counts_as_dead(tmp_path: Path):
    path = tmp_path / "promote.lease"
    inside, out = threading.Event(), threading.Event()

    def hold() -> None:
        with lease(path):
            inside.set()
            out.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(10)
    with pytest.raises(LeaseHeldError), lease(path):
        pass
    out.set()
    t.join()
    # same pid and host, another start time: the pid was reused by an unrelated process
    assert process_start(os.getpid()) != ""
    now = time.time()
    stale = Holder("t1", os.getpid(), socket.gethostname(), "1", "old", now, now + 60, host_identity())
    assert stale.dead(now) == "its process is gone"
    assert Holder("t2", os.getpid(), socket.gethostname(), process_start(os.getpid()), "", now, now + 60,
                  host_identity()).dead(now) is None


def test_check_fails_when_another_holder_took_the_lease_and_already_let_go(tmp_path: Path):
    path = tmp_path / "promote.lease"
    with lease(path, lease_s=0.3) as held:
        held._stop.set()  # hung: no renewals
        held._thread.join()
        time.sleep(0.4)
        with lease(path, wait_s=0):  # takes the expired lease, then releases it: the file names no one
            pass
        assert read_holder(path) is None
        with pytest.raises(LeaseLostError, match="was taken from this holder"):
            held.check()


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_same_hostname_in_another_pid_namespace_or_boot_waits_for_the_deadline(tmp_path: Path):
    # containers sharing a hostname (host networking) do not see each other's pids: a pid missing here may be alive
    hostname, boot, pidns = host_identity().split(" ")
    assert boot != "-" and pidns.startswith("pid:[")  # Linux: both are known
    now, pid = time.time(), _dead_pid()
    assert not process_alive(pid)
    here = Holder("t", pid, hostname, "", "", now, now + 60, host_identity())
    assert here.dead(now) == "its process is gone"
    for other in (f"{hostname} {boot} pid:[1]", f"{hostname} 00000000-0000-0000-0000-000000000000 {pidns}",
                  hostname, ""):  # another PID namespace, another boot, a row from before host_id
        assert Holder("t", pid, hostname, "", "", now, now + 60, other).dead(now) is None
        assert Holder("t", pid, hostname, "", "", now, now + 60, other).dead(now + 61).startswith("its lease expired")


def test_a_lease_file_from_before_host_ids_is_migrated_and_its_holder_waits_for_the_deadline(tmp_path: Path):
    import sqlite3

    path = tmp_path / "promote.lease"
    now = time.time()
    with sqlite3.connect(path) as con:  # the table as it was: no host_id column
        con.execute("CREATE TABLE lease (id INTEGER PRIMARY KEY CHECK (id = 1), token, pid, host, start, note, since, "
                    "deadline)")
        con.execute("INSERT INTO lease VALUES (1, 'old', ?, ?, '', 'old cli', ?, ?)",
                    (_dead_pid(), socket.gethostname(), now, now + 60))
    con.close()
    assert read_holder(path).host_id == ""
    with pytest.raises(LeaseHeldError, match=r"\(old cli\)"), lease(path, wait_s=0):
        pass
    with sqlite3.connect(path) as con:
        con.execute("UPDATE lease SET deadline = ?", (now - 1,))
    con.close()
    with lease(path, wait_s=0):
        assert read_holder(path).host_id == host_identity()
