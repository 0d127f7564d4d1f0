"""`livecall serve --workers N`: N worker processes, one event loop per core, behind one port.

One event loop carries the calls one core can; a host with more cores runs more loops. The
parent is a small supervisor that serves nothing itself:

* **One port.** `reuseport` (the default): each worker binds its own listening socket with
  SO_REUSEPORT and the kernel spreads new connections over them by a hash of the peer's
  address and port. `shared`: the parent binds one socket and every worker accepts on it;
  whichever loop wakes first takes the connection, which on Linux tends to favour the same
  worker (measured in docs/benchmarks.md). The webhook and its stream are two connections and
  may reach different workers; admission holds because a stream without a reservation in its
  worker takes a free place there, and the other worker's unused reservation expires.
* **Admission per worker.** `MAX_CONCURRENT_CALLS` (and `MAX_GEMINI_SESSIONS`) is split
  evenly: each worker admits its share, so no worker takes more calls than its core carries in
  real time and no shared lock sits on the call path. The sum never exceeds the global limit.
* **Drain.** SIGTERM is forwarded to every worker, each drains its own calls (finish, then
  the goodbye) and exits; the parent exits 0 when all of them did. SIGINT: stop now.
  A worker that dies on its own is restarted (its live gauges are marked dead); more than
  MAX_RESTARTS in a minute is a crash loop: the others are stopped and the parent exits 1.
* **Metrics.** `PROMETHEUS_MULTIPROC_DIR` (a fresh temp folder unless set; emptied at start)
  makes any worker's `/metrics` the sum over all workers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import structlog

__all__ = [
    "WORKER_FD_ENV",
    "WORKER_INDEX_ENV",
    "WORKER_REUSEPORT_ENV",
    "SocketMode",
    "listen_socket",
    "run_workers",
    "split_limit",
    "worker_env",
]

log = structlog.get_logger("livecall.workers")

SocketMode = Literal["reuseport", "shared"]
WORKER_INDEX_ENV = "LIVECALL_WORKER_INDEX"
WORKER_FD_ENV = "LIVECALL_WORKER_FD"
WORKER_REUSEPORT_ENV = "LIVECALL_WORKER_REUSEPORT"
RESTART_DELAY_S = 1.0
MAX_RESTARTS = 5  # in RESTART_WINDOW_S: more is a crash loop, and the parent gives up
RESTART_WINDOW_S = 60.0


def split_limit(total: int, workers: int, index: int) -> int:
    """Worker `index`'s share of `total`: even, the remainder to the first ones; sums to total."""
    base, extra = divmod(total, workers)
    return base + (1 if index < extra else 0)


def worker_env(
    base: Mapping[str, str],
    index: int,
    workers: int,
    *,
    max_calls: int,
    max_gemini_sessions: int | None,
    admin_socket: Path | None,
    instance_id: str | None,
    multiproc_dir: str,
) -> dict[str, str]:
    """The environment of worker `index` (pure): its share of the limits, its own names."""
    env = dict(base)
    env[WORKER_INDEX_ENV] = str(index)
    env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    env["MAX_CONCURRENT_CALLS"] = str(max(1, split_limit(max_calls, workers, index)))
    if max_gemini_sessions is not None:
        env["MAX_GEMINI_SESSIONS"] = str(max(1, split_limit(max_gemini_sessions, workers, index)))
    if admin_socket is not None:
        env["ADMIN_SOCKET"] = f"{admin_socket}.w{index}"
    if instance_id:
        env["INSTANCE_ID"] = f"{instance_id}-w{index}"
    return env


def listen_socket(host: str, port: int, *, reuseport: bool) -> socket.socket:
    """A listening TCP socket as uvicorn would make it, optionally with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _prepare_multiproc_dir() -> tuple[str, bool]:
    """(folder, made_here): the set PROMETHEUS_MULTIPROC_DIR emptied, or a fresh temp one."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):  # values of a previous run would be summed in
            old.unlink(missing_ok=True)
        return str(path), False
    return tempfile.mkdtemp(prefix="livecall-metrics-"), True


def run_workers(
    workers: int,
    host: str,
    port: int,
    *,
    mode: SocketMode = "reuseport",
    max_calls: int,
    max_gemini_sessions: int | None = None,
    admin_socket: Path | None = None,
    instance_id: str | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Start `workers` copies of `livecall serve` on one port and supervise them.

    Returns the exit code: 0 when every worker exited 0 after a SIGTERM or SIGINT.
    """
    from livecall.metrics import mark_worker_dead

    if workers < 2:
        raise ValueError("run_workers needs at least 2 workers")
    multiproc_dir, made_dir = _prepare_multiproc_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir  # mark_worker_dead reads it
    shared: socket.socket | None = None
    if mode == "shared":
        shared = listen_socket(host, port, reuseport=False)
    cmd = list(argv or [sys.executable, "-m", "livecall.cli", "serve"])
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    stopping: list[int] = []  # the signal that asked us to stop, once

    def spawn(index: int) -> subprocess.Popen[bytes]:
        env = worker_env(
            os.environ,
            index,
            workers,
            max_calls=max_calls,
            max_gemini_sessions=max_gemini_sessions,
            admin_socket=admin_socket,
            instance_id=instance_id,
            multiproc_dir=multiproc_dir,
        )
        fds: tuple[int, ...] = ()
        if shared is not None:
            env[WORKER_FD_ENV] = str(shared.fileno())
            fds = (shared.fileno(),)
        else:
            env[WORKER_REUSEPORT_ENV] = "1"
        return subprocess.Popen(cmd, env=env, pass_fds=fds)

    procs: list[subprocess.Popen[bytes]] = []

    def forward(sig: int, _frame: object) -> None:
        if not stopping:
            stopping.append(sig)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    codes: dict[int, int] = {}
    crashed: list[int] = []
    try:
        procs.extend(spawn(i) for i in range(workers))
        log.info("workers.started", workers=workers, port=port, socket=mode)
        restart_at: dict[int, float] = {}
        restarts: list[float] = []
        while True:
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or i in codes:
                    continue
                if stopping:
                    mark_worker_dead(p.pid)
                    codes[i] = code
                elif i not in restart_at:
                    mark_worker_dead(p.pid)
                    log.warning("workers.died", worker=i, pid=p.pid, code=code)
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                    restart_at[i] = now + RESTART_DELAY_S
                    if len(restarts) > MAX_RESTARTS:
                        log.error("workers.crash_loop", restarts=len(restarts))
                        forward(signal.SIGINT, None)
                        crashed.append(code or 1)
            for i, due in list(restart_at.items()):
                if stopping:
                    codes[i] = procs[i].returncode
                    restart_at.pop(i)
                elif time.monotonic() >= due:
                    restart_at.pop(i)
                    procs[i] = spawn(i)
            if stopping and len(codes) == len(procs):
                break
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:  # only if we are leaving on an exception
            if p.poll() is None:
                p.kill()
                p.wait()
        if shared is not None:
            shared.close()
        if made_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    if crashed:
        return 1
    # killed by the forwarded SIGTERM itself: a worker still starting (no handler yet, no call)
    bad = {i: c for i, c in codes.items() if c not in (0, -signal.SIGTERM)}
    log.info("workers.stopped", exit_codes=[codes[i] for i in sorted(codes)])
    return next(iter(bad.values())) if bad else 0
