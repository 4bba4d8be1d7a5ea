"""Is a process that wrote a lease row or a temporary directory still running? One answer for the whole house.

A pid means something only in the PID namespace it came from, on the boot it came from. ``host_identity()`` names
that place: the hostname, the kernel's boot id (``/proc/sys/kernel/random/boot_id``) and the PID namespace
(``/proc/self/ns/pid``). Two processes in containers that share a hostname (host networking, k8s hostNetwork) differ
in the namespace; a rebooted host differs in the boot id. A recorder whose identity is not exactly ours may be alive
where we cannot see it: callers then rely on a deadline or an age, never on the pid.

``process_alive`` also guards against a recycled pid (the process's start time, when recorded) and against /proc
mounted with ``hidepid`` (another user's process is hidden from /proc but the kernel still says it exists).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first, start time at index 19); None when no such process, or a
    zombie (killed, not yet reaped: it runs nothing). Raises OSError where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields


def process_start(pid: int) -> str:
    """An id of the process's start (clock ticks since boot on Linux; '' where unknown), so a recycled pid differs."""
    try:
        fields = proc_stat(pid)
    except OSError:
        return ""
    return fields[19] if fields else ""


def _kernel_says_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_alive(pid: int, start: str = "") -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs in this host identity's namespace."""
    try:
        fields = proc_stat(pid)
    except OSError:  # no /proc: ask the kernel
        return _kernel_says_exists(pid)
    if fields is None:
        # Not in /proc: gone, a zombie (its /proc entry is still there), or hidden by hidepid (the kernel knows it).
        return not Path(f"/proc/{pid}").exists() and _kernel_says_exists(pid)
    return not start or fields[19] == start


def _read(path: str, link: bool = False) -> str:
    try:
        return os.readlink(path) if link else Path(path).read_text().strip()
    except OSError:
        return ""


@functools.cache
def host_identity() -> str:
    """``<hostname> <boot id> <pid namespace>`` of this process; where a pid seen here means the same process.

    On a system without /proc (no PID namespaces there) the last two parts are ``-``."""
    boot = _read("/proc/sys/kernel/random/boot_id") or "-"
    pidns = _read("/proc/self/ns/pid", link=True) or "-"
    return f"{socket.gethostname()} {boot} {pidns}"


def host_key() -> str:
    """12 hex digits of ``host_identity()``, for file names."""
    return hashlib.sha256(host_identity().encode()).hexdigest()[:12]
