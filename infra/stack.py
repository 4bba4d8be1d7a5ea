"""The local stack: a Prefect server, an MLflow server and a process worker, all on 127.0.0.1.

Each service runs detached in its own process group (so ``down`` also stops the children it spawns: uvicorn
workers, flow-run subprocesses), with its pid and log under ``<data_root>/stack/``. The ports used by ``up`` are
written to ``<data_root>/stack/stack.json`` so ``status`` and ``down`` find the same services without flags.

Nothing is imported from prefect or mlflow here: the services are started through their own CLIs with the current
interpreter, and health is read over HTTP, so the library stays cheap to import and to test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from towerflow.errors import TowerflowError
from towerflow.procs import proc_stat

SERVICES: tuple[str, ...] = ("prefect", "mlflow", "worker")
LOOPBACK = "127.0.0.1"


class StackError(TowerflowError):
    """A stack service could not start or stop; the message names the service and where its log is."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it binds."""

    data_root: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    work_pool: str = "towerflow-process"
    worker_name: str = "towerflow-worker"
    services: tuple[str, ...] = SERVICES
    # How often the worker asks for scheduled runs; Prefect's default (10 s) makes manual triggers feel slow.
    worker_query_seconds: float = 5.0
    mlflow_workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root).resolve())
        unknown = [s for s in self.services if s not in SERVICES]
        if unknown:
            raise StackError(f"unknown stack service(s) {unknown}; choose from {list(SERVICES)}")
        if "worker" in self.services and "prefect" not in self.services:
            raise StackError("the worker needs the Prefect server: add 'prefect' to the services")

    @property
    def stack_dir(self) -> Path:
        return self.data_root / "stack"

    @property
    def prefect_home(self) -> Path:
        return self.data_root / "prefect"

    @property
    def prefect_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{LOOPBACK}:{self.mlflow_port}"

    @property
    def mlflow_db(self) -> Path:
        # The same file the embedded default (Settings.tracking_uri) writes, so both see the same runs.
        return self.data_root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.data_root / "mlflow-artifacts"

    def client_env(self) -> dict[str, str]:
        """What a shell (or a flow run) exports to talk to this stack."""
        env = {
            "PREFECT_API_URL": self.prefect_api_url,
            "TOWERFLOW_PREFECT_API_URL": self.prefect_api_url,
            "TOWERFLOW_DATA_ROOT": str(self.data_root),
        }
        if "mlflow" in self.services:
            env["TOWERFLOW_MLFLOW_TRACKING_URI"] = self.mlflow_url
        return env

    def to_json(self) -> str:
        d = asdict(self)
        d["data_root"] = str(self.data_root)
        d["services"] = list(self.services)
        return json.dumps(d, indent=2)

    @classmethod
    def load(cls, data_root: Path) -> StackConfig | None:
        """The config that ``up`` recorded under ``data_root``, or None if the stack was never started there."""
        path = Path(data_root).resolve() / "stack" / "stack.json"
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        d["services"] = tuple(d["services"])
        return cls(**d)


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    url: str
    log: Path


# ---------------------------------------------------------------------------------------------------------------
# process bookkeeping


def _pid_file(cfg: StackConfig, name: str) -> Path:
    return cfg.stack_dir / f"{name}.pid"


def _log_file(cfg: StackConfig, name: str) -> Path:
    return cfg.stack_dir / f"{name}.log"


def _cmdline(pid: int) -> str | None:
    """The command line of ``pid``, or None if no such process (zombies count as gone)."""
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            if proc_stat(pid) is None:
                return None
            return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            return None
    out = subprocess.run(["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True)
    line = out.stdout.strip()
    if out.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split(None, 1)[1] if " " in line else line


def _marker(cfg: StackConfig, name: str) -> str:
    """A string the service's command line contains: guards against killing an unrelated process that reused a pid."""
    return {"prefect": "server start", "mlflow": "mlflow", "worker": "worker start"}[name]


def read_pid(cfg: StackConfig, name: str) -> int | None:
    """The pid of a running service of this stack, or None (a stale pid file is removed)."""
    path = _pid_file(cfg, name)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        path.unlink(missing_ok=True)
        return None
    cmd = _cmdline(pid)
    if cmd is None or _marker(cfg, name) not in cmd:
        path.unlink(missing_ok=True)
        return None
    return pid


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _spawn(cfg: StackConfig, name: str, argv: list[str], env: dict[str, str]) -> int:
    log = _log_file(cfg, name).open("ab")
    log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
    log.flush()
    # A new session makes the pid the group id: `down` signals the whole group, children included, and the
    # service outlives the terminal that started it.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, close_fds=True)
    log.close()
    _pid_file(cfg, name).write_text(str(proc.pid))
    return proc.pid


def _base_env(cfg: StackConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(cfg.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(cfg.extra_env)
    return env


# ---------------------------------------------------------------------------------------------------------------
# health


def _get_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_online(cfg: StackConfig, since: float | None = None) -> bool:
    """Our worker is ONLINE (and, with ``since``, has sent a heartbeat after that epoch time).

    ``since`` matters on a restart: the server keeps a killed worker ONLINE until its heartbeat times out.
    """
    try:
        r = httpx.post(f"{cfg.prefect_api_url}/work_pools/{cfg.work_pool}/workers/filter", json={}, timeout=2.0)
    except httpx.HTTPError:
        return False
    if r.status_code != 200:
        return False
    for w in r.json():
        if w.get("name") != cfg.worker_name or w.get("status") != "ONLINE":
            continue
        beat = w.get("last_heartbeat_time")
        if since is None or (beat and datetime.fromisoformat(beat).timestamp() >= since - 1.0):
            return True
    return False


def healthy(cfg: StackConfig, name: str, since: float | None = None) -> bool:
    """Whether a service answers: the Prefect and MLflow health endpoints, the worker's ONLINE heartbeat."""
    if name == "prefect":
        return _get_ok(f"{cfg.prefect_api_url}/health")
    if name == "mlflow":
        return _get_ok(f"{cfg.mlflow_url}/health")
    return _worker_online(cfg, since)


def _wait_healthy(cfg: StackConfig, name: str, pid: int, timeout: float, since: float | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(cfg, name, since):
            return
        if _cmdline(pid) is None:
            raise StackError(f"{name} exited during start-up; log {_log_file(cfg, name)}:\n"
                             f"{_tail(_log_file(cfg, name))}")
        time.sleep(0.5)
    raise StackError(f"{name} did not become healthy within {timeout:.0f}s; log {_log_file(cfg, name)}:\n"
                     f"{_tail(_log_file(cfg, name))}")


# ---------------------------------------------------------------------------------------------------------------
# the services


def _prefect_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _init_mlflow_store(cfg: StackConfig) -> None:
    """Create the SQLite store (and run its migrations) once, before the server's processes race to do it."""
    if cfg.mlflow_db.exists():
        return
    code = ("import sys\nfrom mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore\n"
            "SqlAlchemyStore(sys.argv[1], sys.argv[2])\n")
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{cfg.mlflow_db}", cfg.mlflow_artifacts.as_uri()],
                         capture_output=True, text=True, env=_base_env(cfg))
    if out.returncode != 0:
        raise StackError(f"could not create the MLflow store {cfg.mlflow_db}:\n{out.stderr[-2000:]}")


def _start_prefect(cfg: StackConfig) -> int:
    # the UI asks the server where its API is; without this it points at :4200 whatever the port
    env = {**_base_env(cfg), "PREFECT_UI_API_URL": cfg.prefect_api_url}
    return _spawn(cfg, "prefect", _prefect_argv("server", "start", "--host", LOOPBACK,
                                                 "--port", str(cfg.prefect_port)), env)


def _start_mlflow(cfg: StackConfig) -> int:
    env = _base_env(cfg)
    # The job runner (GenAI scorers) starts seven consumer processes that a laptop stack has no use for.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    argv = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(cfg.mlflow_port),
            "--backend-store-uri", f"sqlite:///{cfg.mlflow_db}",
            "--artifacts-destination", str(cfg.mlflow_artifacts),
            "--workers", str(cfg.mlflow_workers)]
    return _spawn(cfg, "mlflow", argv, env)


def _ensure_work_pool(cfg: StackConfig) -> None:
    r = httpx.get(f"{cfg.prefect_api_url}/work_pools/{cfg.work_pool}", timeout=5.0)
    if r.status_code == 200:
        return
    # The CLI fills in the process worker's default base job template, which a bare REST call would leave empty.
    out = subprocess.run(_prefect_argv("work-pool", "create", cfg.work_pool, "--type", "process"),
                         capture_output=True, text=True, env={**_base_env(cfg), **cfg.client_env()})
    if out.returncode != 0:
        raise StackError(f"could not create work pool {cfg.work_pool!r}:\n{out.stdout[-1000:]}{out.stderr[-2000:]}")


def _start_worker(cfg: StackConfig) -> int:
    env = {**_base_env(cfg), **cfg.client_env(), "PREFECT_WORKER_QUERY_SECONDS": str(cfg.worker_query_seconds)}
    # --type process with the default --create-pool-if-not-found: the worker creates the pool, with the process
    # worker's default base job template, when it does not exist yet.
    argv = _prefect_argv("worker", "start", "--pool", cfg.work_pool, "--type", "process",
                         "--name", cfg.worker_name, "--install-policy", "never")
    return _spawn(cfg, "worker", argv, env)


_STARTERS: dict[str, Callable[[StackConfig], int]] = {
    "prefect": _start_prefect, "mlflow": _start_mlflow, "worker": _start_worker,
}


def _port_of(cfg: StackConfig, name: str) -> int | None:
    return {"prefect": cfg.prefect_port, "mlflow": cfg.mlflow_port}.get(name)


def up(cfg: StackConfig, timeout: float = 120.0, say: Callable[[str], None] = print) -> list[ServiceStatus]:
    """Start every service of ``cfg`` that is not already running and wait until all answer.

    The servers start together (they are independent); once they answer, the worker starts and creates its work
    pool if it is missing (without a worker, the pool is created directly). On a failure every service started by
    this call is stopped again.
    """
    for d in (cfg.stack_dir, cfg.prefect_home, cfg.mlflow_artifacts):
        d.mkdir(parents=True, exist_ok=True)
    recorded = StackConfig.load(cfg.data_root)
    if recorded and any(read_pid(recorded, s) for s in recorded.services) and recorded != cfg:
        raise StackError(f"a stack with other settings already runs under {cfg.data_root}; "
                         "run 'towerflow stack down' first")
    (cfg.stack_dir / "stack.json").write_text(cfg.to_json())

    started: list[str] = []
    try:
        pids: dict[str, int] = {}
        servers = [s for s in ("prefect", "mlflow") if s in cfg.services]
        for name in servers:
            pid = read_pid(cfg, name)
            if pid is None:
                port = _port_of(cfg, name)
                if port is not None and not _port_free(port):
                    raise StackError(f"{name}: port {port} on {LOOPBACK} is already in use by another program; "
                                     f"choose another with --{name}-port")
                if name == "mlflow":
                    _init_mlflow_store(cfg)
                pid = _STARTERS[name](cfg)
                started.append(name)
                say(f"started {name} (pid {pid}), log {_log_file(cfg, name)}")
            pids[name] = pid
        for name in servers:
            _wait_healthy(cfg, name, pids[name], timeout)
        if "worker" not in cfg.services and "prefect" in cfg.services:
            _ensure_work_pool(cfg)  # with a worker, the worker creates its pool (one Prefect start-up fewer)
        if "worker" in cfg.services:
            pid, since = read_pid(cfg, "worker"), None
            if pid is None:
                since = time.time()
                pid = _start_worker(cfg)
                started.append("worker")
                say(f"started worker (pid {pid}) for pool {cfg.work_pool!r}, log {_log_file(cfg, 'worker')}")
            _wait_healthy(cfg, "worker", pid, timeout, since)
    except BaseException:
        for name in reversed(started):
            _stop(cfg, name, grace=5.0)
        raise
    return status(cfg)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren ...), from one ``ps`` listing."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _terminate(pids: list[int], grace: float, group: bool = False) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left (``group``: signal process groups)."""
    kill = os.killpg if group else os.kill
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        alive = [p for p in pids if _cmdline(p) is not None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(p, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _cmdline(p) is not None]
        if not alive:
            return


def _stop(cfg: StackConfig, name: str, grace: float) -> bool:
    pid = read_pid(cfg, name)
    if pid is None:
        return False
    # Prefect starts each flow run in a session of its own, out of reach of a signal to the worker's group: note
    # the whole tree first, stop the group, then stop what it left behind (a flow run that gets SIGTERM reports
    # itself crashed to the server, which is still up: the worker is stopped first).
    tree = _descendants(pid)
    _terminate([pid], grace, group=True)
    _terminate(tree, grace)
    _pid_file(cfg, name).unlink(missing_ok=True)
    return True


IN_FLIGHT = ["PENDING", "RUNNING", "CANCELLING"]


def _in_flight_runs(cfg: StackConfig) -> list[str]:
    """Ids of the pool's flow runs that are still in flight, and of their subflows (all levels)."""
    state = {"type": {"any_": IN_FLIGHT}}
    url = f"{cfg.prefect_api_url}/flow_runs/filter"
    try:
        r = httpx.post(url, json={"flow_runs": {"state": state}, "work_pools": {"name": {"any_": [cfg.work_pool]}}},
                       timeout=5.0)
        r.raise_for_status()
        ids = [run["id"] for run in r.json()]
        frontier = ids
        while frontier:
            r = httpx.post(url, json={"flow_runs": {"state": state, "parent_flow_run_id": {"any_": frontier}}},
                           timeout=5.0)
            r.raise_for_status()
            frontier = [run["id"] for run in r.json() if run["id"] not in ids]
            ids += frontier
    except httpx.HTTPError:
        return []
    return ids


def _mark_cancelled(cfg: StackConfig, ids: list[str]) -> int:
    """Record runs whose processes ``down`` stopped as Cancelled, so the UI does not show them running forever."""
    done = 0
    for run_id in ids:
        try:
            current = httpx.get(f"{cfg.prefect_api_url}/flow_runs/{run_id}", timeout=5.0).json()
            if current.get("state_type") not in IN_FLIGHT:
                continue  # it ended on its own while the worker stopped
            r = httpx.post(f"{cfg.prefect_api_url}/flow_runs/{run_id}/set_state", timeout=5.0, json={
                "state": {"type": "CANCELLED", "name": "Cancelled",
                          "message": "stopped by 'towerflow stack down' while in flight"},
                "force": True})
            done += r.status_code in (200, 201)
        except (httpx.HTTPError, ValueError):
            pass
    return done


def down(cfg: StackConfig, grace: float = 15.0, say: Callable[[str], None] = print) -> list[str]:
    """Stop the stack's services: the worker and its flow runs first, then MLflow, then the Prefect server.

    Flow runs the worker was executing are stopped with it and recorded as Cancelled (the server is still up
    then): a run killed under its worker cannot report its own end, and would otherwise show Running forever.
    Returns the names of the services that were running and are now stopped.
    """
    in_flight = _in_flight_runs(cfg) if read_pid(cfg, "worker") and read_pid(cfg, "prefect") else []
    stopped = []
    for name in ("worker", "mlflow", "prefect"):
        if name == "prefect" and in_flight:
            say(f"marked {_mark_cancelled(cfg, in_flight)} in-flight flow run(s) Cancelled")
        if _stop(cfg, name, grace):
            say(f"stopped {name}")
            stopped.append(name)
    return stopped


def status(cfg: StackConfig) -> list[ServiceStatus]:
    """What runs, whether it answers, and where."""
    urls = {"prefect": cfg.prefect_url, "mlflow": cfg.mlflow_url, "worker": f"pool {cfg.work_pool}"}
    out = []
    for name in cfg.services:
        pid = read_pid(cfg, name)
        out.append(ServiceStatus(name=name, pid=pid, running=pid is not None,
                                 healthy=pid is not None and healthy(cfg, name), url=urls[name],
                                 log=_log_file(cfg, name)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# a temporary Prefect API for one CLI run, tied to it


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when ``parent`` dies (Linux ``PR_SET_PDEATHSIG``),
    or None where there is no prctl. The signal follows the forking THREAD: fork from one that outlives the child."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork: the child only calls it
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody would signal us
            os._exit(1)

    return preexec


def spawn_tied(argv: list[str], **popen: object) -> subprocess.Popen:
    """Start ``argv`` as a child process that dies with this one, even by ``kill -9`` (Linux)."""
    return subprocess.Popen(argv, preexec_fn=_die_with_parent(os.getpid()), **popen)  # noqa: PLW1509


@dataclass(frozen=True)
class TemporaryServer:
    pid: int
    api_url: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the TCP socket listening on loopback ``port`` (Linux /proc; True elsewhere)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return True
    inodes = {f[9] for f in (line.split() for line in table.read_text().splitlines()[1:])
              if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port}  # 0A: LISTEN
    try:
        links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False
    return any(f"socket:[{inode}]" in links for inode in inodes)


@contextlib.contextmanager
def temporary_prefect_server(timeout: float = 180.0) -> Iterator[TemporaryServer]:
    """Prefect's ephemeral API server, started the way Prefect starts it (uvicorn on a free loopback port, no UI,
    the PREFECT_* environment of this process) but with ``spawn_tied``: a killed CLI run leaves no server behind
    (Prefect's own ephemeral server is a plain child and outlives a ``kill -9`` of its parent). Stopped on exit."""
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    port = _free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", LOOPBACK,
            "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    proc = spawn_tied(argv, env=env, stdin=subprocess.DEVNULL)
    server = TemporaryServer(proc.pid, f"http://{LOOPBACK}:{port}/api")
    try:
        deadline = time.monotonic() + timeout
        while True:  # ours first: another server that took the port meanwhile would answer /health too
            if proc.poll() is not None:
                raise StackError(f"the temporary Prefect server exited with code {proc.returncode} during start-up"
                                 f" (port {port})")
            if _get_ok(f"{server.api_url}/health") and _listens_on(proc.pid, port):
                break
            if time.monotonic() > deadline:
                raise StackError(f"the temporary Prefect server did not answer {server.api_url}/health within "
                                 f"{timeout:.0f}s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
