"""A local Ray head and MLflow server that this project starts, and stops, by session.

``make sweep`` and the integration tests need a real cluster and a real tracking server on
one machine. Each is started in a new session (``start_new_session``), recorded in
``<state_dir>/<name>.json`` by its process group id, which is also its session id. Stopping
signals that group, then kills whatever is left of the session: Ray puts each of its worker
processes in a process group of its own, but they stay in the session. It never touches
another Ray or MLflow on the machine (no ``ray stop``).
Both bind to 127.0.0.1. Ray's token authentication is on: the token lives in the state
directory and every child process gets ``RAY_AUTH_MODE=token`` and its path.

Usage: ``python -m sweeps.stack start|stop|status [--state-dir .run]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(".run")


@dataclass
class Service:
    name: str
    pgid: int
    url: str
    log: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(state_dir: Path) -> dict[str, str]:
    """Environment for anything that talks to our Ray head (token auth on, our token file)."""
    token_path = state_dir.resolve() / "ray_auth_token"
    if not token_path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    env = dict(os.environ)
    # Job entrypoints say `python ...`: make that this environment's interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true"})
    return env


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
    return proc.pid  # the session leader: its pid is the process group id


def _wait_http(url: str, pgid: int, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered (e.g. 401 without a token): it is up
        except OSError:
            pass
        if not _alive(pgid):
            raise RuntimeError(f"process group {pgid} exited during start-up; see {log}:\n{_tail(log)}")
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s; see {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def start_ray(state_dir: Path = DEFAULT_STATE_DIR, *, num_cpus: int | None = None, timeout: float = 90.0) -> Service:
    """``ray start --head --block`` in its own process group, dashboard on 127.0.0.1."""
    state_dir = state_dir.resolve()
    # Ray's socket paths must stay short (AF_UNIX limit): keep the temp dir near the root.
    temp_dir = Path("/tmp") / f"ray-{os.getuid()}-{abs(hash(str(state_dir))) % 10**8}"
    gcs_port, dash_port = free_port(), free_port()
    # The job agent's default port (52365) is shared by every Ray on the machine: with another
    # Ray holding it, job submission fails with "No available agent". Take a free one.
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={temp_dir}",
           f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--dashboard-agent-listen-port={free_port()}",
           "--include-dashboard=true", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    log = state_dir / "ray.log"
    env = ray_env(state_dir)
    # Every process of this cluster (and Train's state-API helpers) must find *this* head, even
    # when other Ray instances run on the machine.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    pgid = _spawn(cmd, log, env)
    service = Service("ray", pgid, f"http://127.0.0.1:{dash_port}", str(log))
    _save(state_dir, service, extra={"address": f"127.0.0.1:{gcs_port}", "temp_dir": str(temp_dir)})
    _wait_http(f"{service.url}/api/version", pgid, timeout, log)
    return service


def start_ray_worker(state_dir: Path, head_address: str, *, num_cpus: int | None = None,
                     resources: dict[str, float] | None = None, name: str = "ray-worker-1",
                     timeout: float = 90.0) -> Service:
    """``ray start --address=<head> --block``: one more node for the head in ``state_dir``.

    Several nodes on one machine stand in for a multi-node cluster in tests: each node is its
    own session recorded as ``<name>.json``, so ``stop(state_dir, name, grace=0)`` kills every
    process of that node at once (a simulated machine loss) and nothing else. It uses the head's
    token and its own temp dir and agent port, so it never collides with the head or another Ray
    on the machine.
    """
    state_dir = state_dir.resolve()
    temp_dir = Path("/tmp") / f"ray-{os.getuid()}-{abs(hash(str(state_dir) + name)) % 10**8}"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={head_address}", "--block",
           f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={free_port()}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    log = state_dir / f"{name}.log"
    env = ray_env(state_dir)
    env["RAY_ADDRESS"] = head_address
    start = log.stat().st_size if log.exists() else 0
    pgid = _spawn(cmd, log, env)
    service = Service(name, pgid, head_address, str(log))
    _save(state_dir, service, extra={"address": head_address, "temp_dir": str(temp_dir)})
    deadline = time.monotonic() + timeout
    # `ray start` prints this once the raylet has registered with the head, then blocks.
    while "Ray runtime started" not in log.read_text(errors="replace")[start:]:
        if not _alive(pgid):
            raise RuntimeError(f"worker node {name} exited during start-up; see {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker node {name} did not join {head_address} within {timeout:.0f}s; "
                               f"see {log}:\n{_tail(log)}")
        time.sleep(0.5)
    return service


def start_mlflow(state_dir: Path = DEFAULT_STATE_DIR, *, backend_uri: str | None = None, timeout: float = 90.0,
                 port: int | None = None) -> Service:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and served artifacts in the state dir."""
    state_dir = state_dir.resolve()
    port = port or free_port()
    backend_uri = backend_uri or f"sqlite:///{state_dir / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", backend_uri, "--artifacts-destination", str(state_dir / "mlartifacts"),
           "--serve-artifacts", "--workers", "1"]
    log = state_dir / "mlflow.log"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    pgid = _spawn(cmd, log, env)
    service = Service("mlflow", pgid, f"http://127.0.0.1:{port}", str(log))
    _save(state_dir, service)
    _wait_http(f"{service.url}/health", pgid, timeout, log)
    return service


def _save(state_dir: Path, service: Service, extra: dict | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / f"{service.name}.json").write_text(json.dumps({**asdict(service), **(extra or {})}, indent=2))


def load(state_dir: Path, name: str) -> dict | None:
    path = state_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _session_members(sid: int) -> list[int]:
    """Every live process in session ``sid`` (Linux ``/proc``; elsewhere none are found)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(entry.name)) == sid:
                members.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return members


def stop(state_dir: Path = DEFAULT_STATE_DIR, name: str | None = None, *, grace: float = 15.0) -> list[str]:
    """Stop the services recorded in ``state_dir`` (all, or ``name``): SIGTERM, then SIGKILL.

    ``grace=0`` sends SIGKILL at once: a lost machine, whose Ray node gets no chance to drain
    or to tell the cluster. Either way no process of the service's session outlives this call.
    """
    stopped = []
    for service_name in [name] if name else ["ray", "mlflow"]:
        record = load(state_dir, service_name)
        if record is None:
            continue
        pgid = int(record["pgid"])
        if _alive(pgid) and grace > 0:
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.3)
        if _alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        for pid in _session_members(pgid):  # Ray's workers, each in a process group of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (state_dir / f"{service_name}.json").unlink(missing_ok=True)
        stopped.append(f"{service_name} (process group {pgid})")
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where pids, logs and the MLflow store live")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for the Ray head (default: all)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stopped = stop(args.state_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.action == "status":
        for name in ("ray", "mlflow"):
            record = load(args.state_dir, name)
            state = "running" if record and _alive(int(record["pgid"])) else "stopped"
            print(f"{name}: {state}" + (f" at {record['url']}" if record else ""))
        return 0
    for name, starter in (("ray", lambda: start_ray(args.state_dir, num_cpus=args.num_cpus)),
                          ("mlflow", lambda: start_mlflow(args.state_dir))):
        record = load(args.state_dir, name)
        if record and _alive(int(record["pgid"])):
            print(f"{name}: already running at {record['url']}")
            continue
        service = starter()
        print(f"{name}: started at {service.url} (process group {service.pgid})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
