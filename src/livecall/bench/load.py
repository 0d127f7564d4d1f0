"""Load benchmark: what N concurrent callers hear, next to a floor measured in the same run.

Per level, fresh processes each time, in this order: the **null bridge**
(`livecall.bench.null_bridge`: same Twilio webhook + Media Stream on the same uvicorn stack,
each caller frame echoed straight back, no model, no codec), then **livecall** (`livecall
serve --workers W` exactly as deployed, for each W asked) with the **fake Gemini Live in echo
mode** (`livecall.bench._fake_gemini_proc --echo-min-peak`: it returns only loud audio, so
nothing but a stall can delay a probe) in a process of its own. The **callers**
(``python -m livecall.bench.load _callers``) are a third process: N `EarCaller`s started evenly
over `ramp_s` (a burst of arrivals), each sending a 20 ms frame on an absolute clock and,
every `probe_interval_ms`, a one-frame 1.8 kHz probe followed by a short loud reply.

Each caller plays its received audio out in real time, 20 ms per tick, as Twilio does, and a
probe counts when its echo is **played** (at the ear), not when it reaches the socket (kept
too). Reported per run: ear delay p50/p99/max over probes sent in the hold window, probes
back, playout underruns inside replies, the server's event-loop lag (its
`livecall_event_loop_lag_seconds` histogram, scraped from /metrics), call setup (stream
`start` -> Gemini session ready, `livecall_call_setup_seconds`) and webhook -> first agent
audio at the ear, server CPU per call over the hold and over ramp + hold (utime+stime of the
server's process tree from /proc, per call-second), RSS per call, and the CPU the simulators
and other processes used, since on a shared 2-core machine they compete for the same cores.

Run: ``livecall bench load --levels 30,60,100 --ramp 2 --hold 20 --workers 1,2``. Writes
``load.json``, ``load.md`` (the table) and ``load.png`` (the plot needs matplotlib: the
``bench`` extra) into ``--out`` (``bench/out``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LEVELS",
    "QUICK_LEVELS",
    "TARGET_P99_MS",
    "print_load_table",
    "profile_server",
    "run_load_benchmark",
]

DEFAULT_LEVELS = (10, 50, 100, 150, 200)
QUICK_LEVELS = (10, 50)
TARGET_P99_MS = 60.0
"""Issue 3 / issue 8: echo round trip p99 at or under this holds real time."""
TARGET_RSS_MB_PER_CALL = 3.0
FRAME_MS = 20
IN_BYTES_PER_FRAME = 640  # 20 ms of PCM16 at 16 kHz: what livecall sends Gemini per frame
ECHO_BYTES_PER_FRAME = 960  # 20 ms of PCM16 at 24 kHz: what the fake echoes per frame
ULAW_BYTES_PER_FRAME = 160  # 20 ms of μ-law at 8 kHz: what the caller hears per frame
AUTH_TOKEN = "bench-twilio-auth-token-0123456789"
API_KEY = "bench-gemini-api-key-0123456789"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- /proc sampling


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from the first line of /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])  # guest time is already counted in user
    return total - idle, total


@dataclass(slots=True)
class _Snapshot:
    t: float
    cpu: dict[str, float]
    machine: tuple[int, int]


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers of `serve --workers N`)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def _tree_cpu(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += _cpu_seconds(p)
    return total


def _tree_rss(pid: int) -> float:
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError, ValueError):
            total += _rss_mb(p)
    return total


def _snapshot(pids: dict[str, int]) -> _Snapshot:
    cpu = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            cpu[name] = _tree_cpu(pid)
    return _Snapshot(time.monotonic(), cpu, _machine_ticks())


def _scrape(base_url: str) -> dict[str, list[tuple[float, float]]]:
    """The lag and setup histograms (cumulative buckets) and the max lag from /metrics."""
    import httpx

    wanted = ("livecall_event_loop_lag_seconds", "livecall_call_setup_seconds")
    out: dict[str, list[tuple[float, float]]] = {w: [] for w in wanted}
    out["lag_max"] = []
    with contextlib.suppress(httpx.HTTPError):
        body = httpx.get(base_url + "/metrics", timeout=10.0, trust_env=False).text
        for line in body.splitlines():
            if line.startswith("livecall_event_loop_lag_max_seconds "):
                out["lag_max"].append((0.0, float(line.split()[-1])))
            elif line.startswith("livecall_event_loop_cpu_wait_seconds_total "):
                out["cpu_wait"] = [(0.0, float(line.split()[-1]))]
            for w in wanted:
                if line.startswith(w + "_bucket{"):
                    le = line.split('le="', 1)[1].split('"', 1)[0]
                    out[w].append((float(le), float(line.split()[-1])))
    return out


def _hist_stats(
    a: dict[str, list[tuple[float, float]]], b: dict[str, list[tuple[float, float]]], name: str
) -> dict[str, float | None]:
    """p50/p99 (linear within a bucket) and the top non-empty bucket's bound, in ms, of
    what was observed between scrapes `a` and `b`."""
    before = dict(a.get(name, []))
    cum = [(le, n - before.get(le, 0.0)) for le, n in b.get(name, [])]
    total = cum[-1][1] if cum else 0.0
    if total <= 0:
        return {"p50": None, "p99": None, "max_le": None, "n": 0}

    def q(f: float) -> float:
        prev_le, prev_n = 0.0, 0.0
        for le, n in cum:
            if n >= f * total:
                if le == float("inf"):
                    return prev_le * 1000
                share = (f * total - prev_n) / max(1e-9, n - prev_n)
                return 1000 * (prev_le + share * (le - prev_le))
            prev_le, prev_n = le, n
        return prev_le * 1000

    top = next((le for le, n in cum if n >= total), float("inf"))
    return {
        "p50": round(q(0.5), 1),
        "p99": round(q(0.99), 1),
        "max_le": None if top == float("inf") else round(top * 1000, 1),
        "n": int(total),
    }


# --------------------------------------------------------------------------- child processes


class _Child:
    """A child process whose stdout lines are collected by a thread (waits never block)."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        log: Path,
        pipe_stdout: bool = True,
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("wb")
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []  # every stdout line, also those `wait_line` skipped
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, we stop the children
        )
        if pipe_stdout:
            threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.seen.append(line)
            self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with `prefix`; raises if the child dies or is slow."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no {prefix!r} line within {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}): {self.tail()}"
                    ) from None
                continue
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (and stdin closed), then SIGKILL if it does not go in time."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        return ""


def _clean_env() -> dict[str, str]:
    """Our environment without anything that would point the server somewhere real."""
    drop = (
        "GEMINI_",
        "GOOGLE_",
        "TWILIO_",
        "LIVECALL_",
        "SSL_CERT",
        "DATABASE_URL",
        "PUBLIC_URL",
        "SERVICE_URL",
        "RECORDING",
        "PROMETHEUS_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    src = str(_REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, child: _Child, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"server exited ({child.proc.returncode}): {child.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url + "/health").status_code == 200:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"server not healthy within {timeout:.0f} s: {child.tail()}")


def _code_version() -> str:
    """HEAD plus a hash of the working tree's product code: the lead edits in parallel."""
    head = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=_REPO,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or head
        )
    h = hashlib.sha256()
    for path in sorted((_REPO / "src" / "livecall").rglob("*.py")):
        if "bench" not in path.parts and "sim" not in path.parts:
            h.update(path.read_bytes())
    return f"{head}+src:{h.hexdigest()[:10]}"


# --------------------------------------------------------------------------- one level


@dataclass(slots=True)
class LevelConfig:
    """How one level is run (the numbers every level of a run shares)."""

    hold_s: float = 20.0
    ramp_s: float = 5.0
    settle_s: float = 1.0
    probe_interval_ms: int = 240
    recording: bool = False
    callers_uvloop: bool = False
    seed: int = 1
    server_log_level: str = "warning"
    gemini_compression: bool = False  # the fake accepts permessage-deflate (the SDK offers it)
    target: str = "livecall"  # or "null": the null bridge (the floor)
    workers: int = 1
    worker_socket: str = "reuseport"
    echo_min_peak: int = 1000  # the echo model returns only loud audio
    null_ws: str = "auto"  # the null bridge's uvicorn WebSocket implementation


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p90": round(float(np.percentile(a, 90)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "n": len(values),
    }


def _start_null(cfg: LevelConfig, work: Path, env_base: dict[str, str]) -> tuple[_Child, int]:
    port = _free_port()
    server = _Child(
        "null-bridge",
        [
            *[sys.executable, "-m", "livecall.bench.null_bridge"],
            *["--port", str(port), "--ws", cfg.null_ws],
        ],
        env=env_base,
        cwd=work,
        log=work / "server.log",
        pipe_stdout=False,
    )
    _wait_healthy(f"http://127.0.0.1:{port}", server, 60)
    return server, port


def _start_stack(
    n: int, cfg: LevelConfig, work: Path, env_base: dict[str, str]
) -> tuple[_Child | None, _Child, int]:
    if cfg.target == "null":
        null, port = _start_null(cfg, work, env_base)
        return None, null, port
    fake = _Child(
        "fake-gemini",
        [
            sys.executable,
            "-m",
            "livecall.bench._fake_gemini_proc",
            "--mode",
            "echo",
            "--stats-out",
            str(work / "fake-stats.json"),
            "--ca-file",
            str(work / "ca.pem"),
            "--uvloop",
            "--echo-min-peak",
            str(cfg.echo_min_peak),
            "--max-seconds",
            str(3 * cfg.ramp_s + cfg.hold_s + 300),
            *(["--compression"] if cfg.gemini_compression else []),
        ],
        env=env_base,
        cwd=work,
        log=work / "fake.log",
    )
    fake.wait_line("READY", 30)
    base_url = ca_file = ""
    for line in list(fake.seen):  # the settings lines come before READY
        if line.startswith("GEMINI_BASE_URL="):
            base_url = line.split("=", 1)[1]
        elif line.startswith("SSL_CERT_FILE="):
            ca_file = line.split("=", 1)[1]
    port = _free_port()
    env = dict(env_base)
    env.update(
        GEMINI_API_KEY=API_KEY,
        GEMINI_BASE_URL=base_url,
        GEMINI_CA_FILE=ca_file,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        PUBLIC_URL=f"http://127.0.0.1:{port}",
        HOST="127.0.0.1",
        PORT=str(port),
        DATABASE_URL=f"sqlite+aiosqlite:///{work / 'calls.db'}",
        LOG_LEVEL=cfg.server_log_level,
        RECORDING_ENABLED="true" if cfg.recording else "false",
        RECORDINGS_DIR=str(work / "recordings"),
        SPOOL_DIR=str(work / "spool"),
        MAX_CONCURRENT_CALLS=str(max(500, 2 * n)),
    )
    server = _Child(
        "livecall-serve",
        [
            *[sys.executable, "-m", "livecall.cli", "serve", "--host", "127.0.0.1"],
            *["--port", str(port), "--workers", str(cfg.workers)],
            *["--worker-socket", cfg.worker_socket],
        ],
        env=env,
        cwd=work,
        log=work / "server.log",
        pipe_stdout=False,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", server, 60)
    except BaseException:
        fake.stop()
        raise
    return fake, server, port


def _run_level(
    n: int,
    cfg: LevelConfig,
    work: Path,
    *,
    profile_out: Path | None = None,
    profile_rate: int = 100,
    profile_native: bool = False,
    logs_to: Path | None = None,
) -> dict[str, Any]:
    """One level: fresh fake, fresh server, fresh callers; measure the hold window."""
    env_base = _clean_env()
    children: list[_Child] = []
    results_path = work / "callers.json"
    spec = {
        "base_url": "",
        "auth_token": AUTH_TOKEN,
        "n": n,
        "ramp_s": cfg.ramp_s,
        "settle_s": cfg.settle_s,
        "hold_s": cfg.hold_s,
        "probe_interval_ms": cfg.probe_interval_ms,
        "seed": cfg.seed,
        "results_path": str(results_path),
    }
    samples: list[tuple[float, float]] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        fake, server, port = _start_stack(n, cfg, work, env_base)
        children += [c for c in (fake, server) if c is not None]
        spec["base_url"] = f"http://127.0.0.1:{port}"
        spec_path = work / "callers-spec.json"
        spec_path.write_text(json.dumps(spec))
        callers_args = [sys.executable, "-m", "livecall.bench.load", "_callers", str(spec_path)]
        if cfg.callers_uvloop:
            callers_args.append("--uvloop")
        callers = _Child("callers", callers_args, env=env_base, cwd=work, log=work / "callers.log")
        children.append(callers)
        warm = json.loads(callers.wait_line("WARM_DONE", 60).split(" ", 1)[1])
        time.sleep(1.0)  # let the warm-up call's teardown (records, logs) finish
        idle_rss = _tree_rss(server.pid)
        pids = {"server": server.pid, "callers": callers.pid}
        if fake is not None:
            pids["fake"] = fake.pid
        base = f"http://127.0.0.1:{port}"
        m_go = _scrape(base)
        t0 = time.monotonic() + 0.5
        s_go = _snapshot(pids)
        callers.send(f"GO {t0!r}")
        hold_start = t0 + cfg.ramp_s + cfg.settle_s
        hold_end = hold_start + cfg.hold_s
        time.sleep(max(0.0, hold_start - time.monotonic()))
        if profile_out is not None:
            spy = _start_py_spy(
                server.pid, cfg.hold_s, profile_rate, profile_out, work, profile_native
            )
        s0 = _snapshot(pids)
        m0 = _scrape(base)
        worker_cpu0 = {p: _cpu_seconds(p) for p in _tree(server.pid)[1:]}
        while True:
            now = time.monotonic()
            if now >= hold_end:
                break
            samples.append((now, _tree_rss(server.pid)))
            time.sleep(min(0.5, hold_end - now))
        s1 = _snapshot(pids)
        m1 = _scrape(base)
        worker_cpu = [
            round(_cpu_seconds(p) - c0, 2)
            for p, c0 in worker_cpu0.items()
            if Path(f"/proc/{p}").exists()
        ]
        samples.append((s1.t, _tree_rss(server.pid)))
        callers.wait_line("DONE", cfg.ramp_s * 2 + cfg.settle_s + 90)
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        after_rss = _tree_rss(server.pid)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(5)
        for child in reversed(children):
            child.stop()
        if logs_to is not None:  # what each process said, kept past the temp folder
            logs_to.mkdir(parents=True, exist_ok=True)
            for name in (
                "server.log",
                "fake.log",
                "callers.log",
                "py-spy.log",
                "callers.json",
                "fake-stats.json",
            ):
                if (work / name).exists():
                    shutil.copyfile(work / name, logs_to / name)
    server_log = (work / "server.log").read_text("utf-8", "replace")
    calls = json.loads(results_path.read_text())
    stats_path = work / "fake-stats.json"
    fake_stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"sessions": []}
    extra = {
        "target": cfg.target,
        "workers": cfg.workers,
        "worker_socket": cfg.worker_socket if cfg.workers > 1 else None,
        "worker_cpu_s_in_hold": worker_cpu,
        "lag_ms_hold": _hist_stats(m0, m1, "livecall_event_loop_lag_seconds"),
        "lag_ms_ramp_and_hold": _hist_stats(m_go, m1, "livecall_event_loop_lag_seconds"),
        "lag_max_ms_since_start": round(1000 * max((v for _, v in m1["lag_max"]), default=0), 1),
        "setup_ms": _hist_stats(m_go, m1, "livecall_call_setup_seconds"),
        # share of the hold the server's loop thread(s) waited for a CPU, summed over workers
        "cpu_wait_pct_of_hold": round(
            100
            * (
                sum(v for _, v in m1.get("cpu_wait", []))
                - sum(v for _, v in m0.get("cpu_wait", []))
            )
            / max(1e-9, hold_end - hold_start),
            1,
        ),
        "s_go": s_go,
    }
    return _summarize_level(
        n,
        cfg,
        calls,
        fake_stats,
        s0,
        s1,
        samples,
        idle_rss,
        after_rss,
        warm,
        t0,
        hold_start,
        hold_end,
        server_log,
        extra,
    )


def _ear_figures(
    calls: list[dict[str, Any]], hold_start: float, hold_end: float, t0: float
) -> dict[str, Any]:
    """At the ear: probe delay over the hold (by send time) and over the whole call, probes
    back, reply underruns, webhook -> first agent audio, and call-seconds since GO."""
    ear_hold: list[float] = []
    ear_all: list[float] = []
    sock_hold: list[float] = []
    sent_hold = back_hold = 0
    under_hold = under_all = replies = 0
    first_audio: list[float] = []
    call_seconds = 0.0
    for c in calls:
        sent_hold += sum(1 for t in c.get("probes_sent_at", []) if hold_start <= t <= hold_end)
        for sent, _heard, ms in c.get("ear", []):
            ear_all.append(ms)
            if hold_start <= sent <= hold_end:
                ear_hold.append(ms)
                back_hold += 1
        for t_arr, ms in c.get("socket", []):
            if hold_start <= t_arr - ms / 1000.0 <= hold_end:
                sock_hold.append(ms)
        under = c.get("underruns", [])
        under_all += len(under)
        under_hold += sum(1 for t in under if hold_start <= t <= hold_end + 1.0)
        replies += c.get("replies_heard", 0)
        if c.get("first_audio_at") is not None and c.get("webhook_at") is not None:
            first_audio.append(1000.0 * (c["first_audio_at"] - c["webhook_at"]))
        if c.get("stream_started") is not None:
            end = c.get("ended") or hold_end
            call_seconds += max(0.0, min(end, hold_end) - max(c["stream_started"], t0))
    return {
        "ear_ms": _percentiles(ear_hold),
        "ear_ms_whole_call": _percentiles(ear_all),
        "socket_ms": _percentiles(sock_hold),
        "probes_sent_hold": sent_hold,
        "probes_back_hold": back_hold,
        "underruns_hold": under_hold,
        "underruns_whole_call": under_all,
        "replies_heard": replies,
        "webhook_to_first_audio_ms": _percentiles(first_audio),
        "call_seconds": call_seconds,
    }


def _py_spy() -> str:
    """py-spy from the venv we run in (pip puts it beside python), else from PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: pip install py-spy")
    return found


def _start_py_spy(
    pid: int, seconds: float, rate: int, out: Path, work: Path, native: bool
) -> subprocess.Popen[bytes]:
    """Sample `pid`, collapsed stacks into `out`. Without `native` it never pauses the server
    (--nonblocking) but time in C (the event loop, TLS, syscalls) shows as the Python frame
    that called it; `native` unwinds C frames too, pausing the process for each sample."""
    args = [
        _py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    args.append("--native" if native else "--nonblocking")
    with (work / "py-spy.log").open("wb") as log:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip


def _summarize_level(
    n: int,
    cfg: LevelConfig,
    callers: dict[str, Any],
    fake_stats: dict[str, Any],
    s0: _Snapshot,
    s1: _Snapshot,
    rss_samples: list[tuple[float, float]],
    idle_rss: float,
    after_rss: float,
    warm: dict[str, Any],
    t0: float,
    hold_start: float,
    hold_end: float,
    server_log: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    calls = callers["calls"]
    hold_rtts: list[float] = []
    all_rtts: list[float] = []
    for c in calls:
        for t_heard, rtt in c["probes"]:
            all_rtts.append(rtt)
            if hold_start <= t_heard - rtt / 1000.0 and t_heard <= hold_end:
                hold_rtts.append(rtt)
    connected = sum(1 for c in calls if c["stream_started"] is not None)
    frames_sent = sum(c["frames_sent"] for c in calls)
    sessions = [s for s in fake_stats["sessions"] if s["opened_at"] >= t0 - 0.05]
    frames_at_model = sum(round(s["audio_bytes_received"] / IN_BYTES_PER_FRAME) for s in sessions)
    echo_frames_sent = sum(round(s["audio_bytes_sent"] / ECHO_BYTES_PER_FRAME) for s in sessions)
    echo_frames_heard = sum(round(c["received_media_bytes"] / ULAW_BYTES_PER_FRAME) for c in calls)
    elapsed = s1.t - s0.t
    cpu = {k: s1.cpu[k] - s0.cpu[k] for k in s1.cpu if k in s0.cpu}
    busy = (s1.machine[0] - s0.machine[0]) / max(1, s1.machine[1] - s0.machine[1])
    active = min(callers["active_at_hold_start"], callers["active_at_hold_end"])
    server_cpu = cpu.get("server", float("nan"))
    hold_rss = [r for _, r in rss_samples]
    rss_peak = max(hold_rss) if hold_rss else float("nan")
    per_call_cpu = server_cpu / elapsed / max(1, active)
    frames_per_s = active * 1000 / FRAME_MS  # each way
    lat = _percentiles(hold_rtts)
    probes_lost = sum(c["probes_lost"] for c in calls)
    probes_sent = sum(c["probes_sent"] for c in calls)
    # Net count: duplicates the model got (e.g. audio sent twice around a session switch)
    # would hide as many losses, so both directions are reported.
    frames_lost_in = max(0, frames_sent - frames_at_model)
    frames_extra_in = max(0, frames_at_model - frames_sent)
    lines = server_log.splitlines()
    errors = sum(1 for line in lines if "[error" in line or "Traceback" in line)
    warnings = sum(1 for line in lines if "[warning" in line)
    events = collections.Counter(
        line.split("]", 1)[1].split()[0]
        for line in lines
        if ("[warning" in line or "[error" in line)
        and "]" in line
        and line.split("]", 1)[1].split()
    )
    problems = []
    if connected < n:
        problems.append(f"{n - connected} call(s) never streamed")
    if lat["p99"] is None or lat["p99"] > TARGET_P99_MS:
        problems.append(f"p99 {lat['p99']} ms > {TARGET_P99_MS:g} ms")
    if probes_lost:
        problems.append(f"{probes_lost} probe(s) lost")
    if frames_lost_in > 0 and (extra or {}).get("target") != "null":  # the null bridge has no model
        problems.append(f"{frames_lost_in} caller frame(s) never reached the model")
    late = sum(c["clock_late_ticks"] for c in calls)
    notes = []
    if frames_extra_in:
        notes.append(
            f"the model got {frames_extra_in} more frame(s) than the callers sent "
            f"({frames_extra_in / max(1, connected):.1f} per call): audio sent twice"
        )
    extra = dict(extra or {})
    s_go = extra.pop("s_go", None)
    ear = _ear_figures(calls, hold_start, hold_end, t0)
    if s_go is not None:
        server_cpu_all = s1.cpu.get("server", 0.0) - s_go.cpu.get("server", 0.0)
        ear["server_cpu_pct_core_per_call_ramp_and_hold"] = round(
            100 * server_cpu_all / max(1e-9, ear.pop("call_seconds")), 3
        )
    else:
        ear.pop("call_seconds")
    missing = ear["probes_sent_hold"] - ear["probes_back_hold"]
    if missing > 0:
        problems.append(f"{missing} probe(s) sent in the hold never heard")
    return {
        **extra,
        **ear,
        "calls": n,
        "connected": connected,
        "active_in_hold": active,
        "hold_s": round(elapsed, 2),
        "echo_rtt_ms": lat,
        "echo_rtt_ms_whole_call": _percentiles(all_rtts),
        "probes_sent": probes_sent,
        "probes_lost": probes_lost,
        "caller_frames_sent": frames_sent,
        "frames_at_model": frames_at_model,
        "frames_lost_to_model": frames_lost_in,
        "frames_extra_at_model": frames_extra_in,
        "echo_frames_sent_by_model": echo_frames_sent,
        "echo_frames_heard": echo_frames_heard,
        "echo_frames_unheard": echo_frames_sent - echo_frames_heard,
        "echo_frames_unheard_per_call": round(
            (echo_frames_sent - echo_frames_heard) / max(1, n), 1
        ),
        "caller_clock_late_ticks": late,
        "caller_clock_late_max_ms": round(
            max((c["clock_late_max_ms"] for c in calls), default=0), 1
        ),
        "caller_protocol_errors": sum(c["n_protocol_errors"] for c in calls),
        "caller_script_errors": sum(len(c["script_errors"]) for c in calls),
        "caller_errors_sample": [
            e for c in calls for e in c["protocol_errors"] + c["script_errors"]
        ][:5],
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_pct_of_core": round(100 * server_cpu / elapsed, 1),
        "server_cpu_pct_core_per_call": round(100 * per_call_cpu, 3),
        "server_cpu_us_per_frame": round(
            1e6 * server_cpu / elapsed / max(1.0, frames_per_s * 2), 1
        ),
        "server_cpu_us_per_call_tick": round(
            1e6 * server_cpu / elapsed / max(1.0, frames_per_s), 1
        ),
        "fake_cpu_pct_of_core": round(100 * cpu.get("fake", float("nan")) / elapsed, 1),
        "callers_cpu_pct_of_core": round(100 * cpu.get("callers", float("nan")) / elapsed, 1),
        "machine_busy_pct": round(100 * busy, 1),
        # other processes on the machine (tests, editors): they take cores from the server too
        "other_cpu_pct_of_core": round(
            100 * (busy * (os.cpu_count() or 1) - sum(cpu.values()) / elapsed), 1
        ),
        "server_rss_idle_mb": round(idle_rss, 1),
        "server_rss_hold_peak_mb": round(rss_peak, 1),
        "server_rss_after_mb": round(after_rss, 1),
        "server_rss_mb_per_call": round((rss_peak - idle_rss) / max(1, n), 3),
        "server_log_errors": errors,
        "server_log_warnings": warnings,
        "server_log_events": dict(events.most_common(10)),
        "warmup_rtt_ms": warm.get("rtts"),
        "holds_real_time": not problems,
        "problems": problems,
        "notes": notes,
    }


# --------------------------------------------------------------------------- whole run


def run_load_benchmark(
    levels: Sequence[int] = DEFAULT_LEVELS,
    hold_s: float = 20.0,
    ramp_s: float = 5.0,
    *,
    probe_interval_ms: int = 240,
    recording: bool = False,
    gemini_compression: bool = False,
    callers_uvloop: bool = False,
    workers: Sequence[int] = (1,),
    worker_socket: str = "reuseport",
    floor: bool = True,
    null_ws: str = "auto",
    stop_after_failures: int | None = None,
    out_dir: Path | str = Path("bench/out"),
    plot: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run every level in turn and write load.json (+ load.png). Per level, in this order and
    each with fresh processes: the null bridge (the floor, unless `floor` is off), then
    livecall with each worker count in `workers`.

    `stop_after_failures`: skip the remaining levels after this many consecutive levels where
    single-worker livecall missed real time (None: run them all).
    """
    if probe_interval_ms % FRAME_MS or probe_interval_ms < 6 * FRAME_MS:
        raise ValueError("probe_interval_ms must be a multiple of 20 ms, at least 120")
    cfg = LevelConfig(
        hold_s=hold_s,
        ramp_s=ramp_s,
        probe_interval_ms=probe_interval_ms,
        recording=recording,
        callers_uvloop=callers_uvloop,
        gemini_compression=gemini_compression,
        worker_socket=worker_socket,
        null_ws=null_ws,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "load",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": _code_version(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        },
        "config": asdict(cfg),
        "target": {
            "echo_rtt_p99_ms": TARGET_P99_MS,
            "lost_frames": 0,
            "rss_mb_per_call": TARGET_RSS_MB_PER_CALL,
        },
        "levels": [],
    }
    runs: list[tuple[str, int]] = ([("null", 1)] if floor else []) + [
        ("livecall", w) for w in workers
    ]
    failures = 0
    for n in levels:
        for target, w in runs:
            name = "null bridge" if target == "null" else f"livecall x{w}"
            if not quiet:
                print(f"# {n} calls, {name}: ramp {ramp_s:g} s, hold {hold_s:g} s", flush=True)
            run_cfg = replace(cfg, target=target, workers=w)
            tag = f"level-{n}-{target}-{w}"
            with tempfile.TemporaryDirectory(prefix=f"livecall-load-{n}-") as tmp:
                try:
                    level = _run_level(n, run_cfg, Path(tmp), logs_to=out / "logs" / tag)
                except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
                    level = {
                        "calls": n,
                        "target": target,
                        "workers": w,
                        "holds_real_time": False,
                        "problems": [f"run failed: {exc}"],
                    }
            report["levels"].append(level)
            if not quiet:
                print(_one_line(level), flush=True)
        main = _find(report, n, "livecall", min(workers)) if workers else None
        failures = 0 if main and main.get("holds_real_time") else failures + 1
        if stop_after_failures is not None and failures >= stop_after_failures:
            break
    ok = [
        lv["calls"]
        for lv in report["levels"]
        if lv.get("target") == "livecall"
        and lv.get("workers") == min(workers, default=1)
        and lv.get("holds_real_time")
    ]
    report["max_calls_real_time"] = max(ok) if ok else 0
    (out / "load.json").write_text(json.dumps(report, indent=2))
    (out / "load.md").write_text(markdown_table(report) + "\n")
    if plot:
        try:
            _plot(report, out / "load.png")
            report["plot"] = str(out / "load.png")
        except ImportError:
            report["plot"] = None
            if not quiet:
                print("# matplotlib missing: no plot (pip install 'livecall[bench]')", flush=True)
    if not quiet:
        print_load_table(report)
    return report


def _find(report: dict[str, Any], n: int, target: str, workers: int) -> dict[str, Any] | None:
    for lv in report["levels"]:
        if lv["calls"] == n and lv.get("target") == target and lv.get("workers", 1) == workers:
            return lv
    return None


def _name(lv: dict[str, Any]) -> str:
    if lv.get("target") == "null":
        return "null bridge"
    return f"livecall x{lv.get('workers', 1)}"


def _one_line(lv: dict[str, Any]) -> str:
    if "ear_ms" not in lv:
        return f"  {lv['calls']} calls, {_name(lv)}: {'; '.join(lv['problems'])}"
    e = lv["ear_ms"]
    lag = lv["lag_ms_hold"]
    return (
        f"  {lv['calls']} calls, {_name(lv)}: ear p50 {e['p50']} p99 {e['p99']} max {e['max']}"
        f" ms, back {lv['probes_back_hold']}/{lv['probes_sent_hold']}, lag p99 {lag['p99']} ms,"
        f" underruns {lv['underruns_hold']}, server {lv['server_cpu_pct_of_core']}% core"
        f" ({lv['server_cpu_pct_core_per_call']}%/call), {lv['server_rss_mb_per_call']} MB/call"
    )


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def load_table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table (header, rows): each livecall run next to the same level's floor."""
    cols = [
        "calls",
        "server",
        "ear p50/p99/max ms",
        "floor p50/p99 ms",
        "socket p99 ms",
        "probes back",
        "lag p99 / max≤ ms",
        "CPU wait %",
        "underruns",
        "setup p50/p99 ms",
        "webhook→audio p50/p99 ms",
        "CPU %/call hold (ramp+hold)",
        "RSS MB/call",
        "others %core",
    ]
    rows: list[list[str]] = []
    for lv in report["levels"]:
        if "ear_ms" not in lv:
            rows.append([str(lv["calls"]), _name(lv), "FAILED: " + "; ".join(lv["problems"])])
            continue
        e, lag = lv["ear_ms"], lv["lag_ms_hold"]
        fl = _find(report, lv["calls"], "null", 1)
        floor = fl["ear_ms"] if fl and "ear_ms" in fl else {}
        setup, first = lv["setup_ms"], lv["webhook_to_first_audio_ms"]
        workers = lv.get("worker_cpu_s_in_hold") or []
        split = f" [{'/'.join(_fmt(w) for w in workers)} s]" if len(workers) > 1 else ""
        rows.append(
            [
                str(lv["calls"]),
                _name(lv) + (f" ({lv['worker_socket']})" if lv.get("worker_socket") else ""),
                f"{_fmt(e['p50'])}/{_fmt(e['p99'])}/{_fmt(e['max'])}",
                f"{_fmt(floor.get('p50'))}/{_fmt(floor.get('p99'))}",
                _fmt(lv["socket_ms"]["p99"]),
                f"{lv['probes_back_hold']}/{lv['probes_sent_hold']}",
                f"{_fmt(lag['p99'])} / {_fmt(lag['max_le'])}",
                _fmt(lv.get("cpu_wait_pct_of_hold")),
                str(lv["underruns_hold"]),
                f"{_fmt(setup['p50'])}/{_fmt(setup['p99'])}",
                f"{_fmt(first['p50'])}/{_fmt(first['p99'])}",
                f"{lv['server_cpu_pct_core_per_call']}"
                f" ({lv.get('server_cpu_pct_core_per_call_ramp_and_hold', '-')}){split}",
                str(lv["server_rss_mb_per_call"]),
                _fmt(lv.get("other_cpu_pct_of_core")),
            ]
        )
    return cols, rows


def markdown_table(report: dict[str, Any]) -> str:
    cols, rows = load_table_rows(report)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r + [""] * (len(cols) - len(r))) + " |" for r in rows]
    return "\n".join(out)


def print_load_table(report: dict[str, Any]) -> None:
    """The runs as one table (rich), plus the verdict; also written as load.md."""
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    t = Table(
        title=f"livecall load at the ear ({report['code']}, {report['machine']['cpus']} cores; "
        f"ramp {cfg['ramp_s']:g} s, hold {cfg['hold_s']:g} s)"
    )
    cols, rows = load_table_rows(report)
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*(r + ["-"] * (len(cols) - len(r))))
    console = Console(width=max(200, Console().width))
    console.print(t)
    console.print(
        f"largest N holding real time (ear p99 ≤ {TARGET_P99_MS:g} ms, every probe back): "
        f"[bold]{report['max_calls_real_time']}[/bold]"
    )
    for lv in report["levels"]:
        for line in [*lv.get("problems", []), *lv.get("notes", [])]:
            console.print(f"  {lv['calls']} calls, {_name(lv)}: {line}")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    series: dict[str, list[dict[str, Any]]] = {}
    for lv in report["levels"]:
        if "ear_ms" in lv and lv["ear_ms"]["p99"] is not None:
            series.setdefault(_name(lv), []).append(lv)
    styles = {"null bridge": "k", "livecall x1": "tab:blue", "livecall x2": "tab:orange"}
    for name, lvs in series.items():
        x = [lv["calls"] for lv in lvs]
        c = styles.get(name)
        ax.plot(x, [lv["ear_ms"]["p50"] for lv in lvs], "o--", color=c, label=f"{name} p50")
        ax.plot(x, [lv["ear_ms"]["p99"] for lv in lvs], "s-", color=c, label=f"{name} p99")
        if name != "null bridge":
            ax2.plot(
                x,
                [lv["server_cpu_pct_core_per_call"] for lv in lvs],
                "^-",
                color=c,
                label=f"{name}: hold",
            )
            ax2.plot(
                x,
                [lv.get("server_cpu_pct_core_per_call_ramp_and_hold") for lv in lvs],
                "v:",
                color=c,
                label=f"{name}: ramp + hold",
            )
    ax.axhline(TARGET_P99_MS, color="red", ls="--", lw=1, label=f"target {TARGET_P99_MS:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("probe sent -> its echo played at the caller's ear (ms)")
    ax.set_title("at the ear (hold window)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_xlabel("concurrent calls")
    ax2.set_ylabel("server CPU per call (% of one core)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("server CPU per call", fontsize=9)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    cfg = report["config"]
    fig.suptitle(
        f"livecall vs null bridge, {report['machine']['cpus']} cores shared with the simulators;"
        f" ramp {cfg['ramp_s']:g} s, hold {cfg['hold_s']:g} s ({report['code']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- profiling


def profile_server(
    calls: int = 100,
    hold_s: float = 15.0,
    ramp_s: float = 5.0,
    *,
    rate: int = 100,
    top: int = 20,
    native: bool = False,
    recording: bool = False,
    out_dir: Path | str = Path("bench/out"),
    quiet: bool = False,
) -> dict[str, Any]:
    """One level with py-spy sampling the server over the hold window: where its CPU goes.

    Writes ``profile-<calls>.txt`` (collapsed stacks, for flamegraph tools) and returns the top
    functions by own time and by inclusive time, in % of the samples.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = (out / f"profile-{calls}.txt").resolve()
    cfg = LevelConfig(hold_s=hold_s, ramp_s=ramp_s, recording=recording)
    with tempfile.TemporaryDirectory(prefix=f"livecall-profile-{calls}-") as tmp:
        level = _run_level(
            calls,
            cfg,
            Path(tmp),
            profile_out=raw,
            profile_rate=rate,
            profile_native=native,
            logs_to=out / "logs" / f"profile-{calls}",
        )
        spy_log = (Path(tmp) / "py-spy.log").read_text("utf-8", "replace")
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no profile: {spy_log[-2000:]}")
    result = {"level": level, "collapsed_stacks": str(raw), **_top_costs(raw, top)}
    (out / f"profile-{calls}.json").write_text(json.dumps(result, indent=2))
    if not quiet:
        _print_profile(result)
    return result


_COMPONENTS = (
    ("livecall/audio/", "livecall audio (transcode, resample, g711)"),
    ("livecall/call/", "livecall bridge (call/)"),
    ("livecall/agent/", "livecall Gemini link + live_protocol"),
    ("livecall/telephony/", "livecall Twilio protocol"),
    ("livecall/server/", "livecall server routes"),
    ("livecall/store/", "livecall call store"),
    ("livecall/", "livecall other"),
    ("websockets/", "websockets library"),
    ("uvicorn/", "uvicorn"),
    ("starlette/", "starlette"),
    ("ssl.py", "ssl (Python side)"),
    ("structlog/", "structlog"),
    ("sqlalchemy/", "sqlalchemy"),
    ("asyncio/", "asyncio / event loop"),
    ("uvloop", "uvloop (C)"),
    ("libssl", "OpenSSL (C)"),
    ("libcrypto", "OpenSSL (C)"),
    ("_ssl", "OpenSSL (C)"),
    ("numpy", "numpy (C)"),
    ("soxr", "soxr (C)"),
    ("libc", "libc / syscalls"),
    ("python3", "CPython interpreter (C)"),
    ("libpython", "CPython interpreter (C)"),
)


def _component(frame: str) -> str:
    where = frame[frame.rfind("(") + 1 :]
    for key, name in _COMPONENTS:
        if key in where:
            return name
    return "other"


def _top_costs(path: Path, top: int) -> dict[str, Any]:
    """Own and inclusive time per function (line numbers dropped) and own time per component,
    from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    comp: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = []
        for f in stack.split(";"):
            if not f or f.startswith(("process ", "thread ")):
                continue
            name, _, where = f.partition(" (")
            frames.append(f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})")
        if not frames:
            continue
        own[frames[-1]] += k
        comp[_component(frames[-1])] += k
        for f in set(frames):
            incl[f] += k

    def pct(items: list[tuple[str, int]]) -> list[tuple[str, float]]:
        return [(f, round(100 * k / max(1, total), 1)) for f, k in items]

    everywhere = {f for f, k in incl.items() if k >= 0.98 * total}  # the process's own entry
    return {
        "samples": total,
        "top_own": pct(own.most_common(top)),
        "top_inclusive": pct([(f, k) for f, k in incl.most_common() if f not in everywhere][:top]),
        "own_by_component": pct(comp.most_common()),
    }


def _print_profile(result: dict[str, Any]) -> None:
    print(_one_line(result["level"]))
    print(f"# {result['samples']} samples; collapsed stacks in {result['collapsed_stacks']}")
    print("# own time (% of samples):")
    for f, p in result["top_own"]:
        print(f"  {p:5.1f}%  {f}")
    print("# own time by component (% of samples):")
    for f, p in result["own_by_component"]:
        print(f"  {p:5.1f}%  {f}")
    print("# inclusive time (% of samples):")
    for f, p in result["top_inclusive"]:
        print(f"  {p:5.1f}%  {f}")


# --------------------------------------------------------------------------- callers process


def _call_summary(r: Any, caller: Any = None) -> dict[str, Any]:
    from livecall.bench.ear import ear_summary

    heard = [e.t for e in r.timeline if e.kind == "probe_heard"]
    return {
        **(ear_summary(caller) if caller is not None else {}),
        "probes_sent_at": [round(e.t, 4) for e in r.timeline if e.kind == "probe_sent"],
        "call_sid": r.call_sid,
        "webhook_status": r.webhook_status,
        "stream_started": r.stream_started,
        "ended": r.ended,
        "ended_by": r.ended_by,
        "close_code": r.close_code,
        "frames_sent": r.frames_sent,
        "clock_late_ticks": r.clock_late_ticks,
        "clock_late_max_ms": r.clock_late_max_ms,
        "probes_sent": r.probes_sent,
        "probes_lost": r.probes_lost,
        "probes": [[t, round(rtt, 3)] for t, rtt in zip(heard, r.probe_rtts_ms, strict=False)],
        "received_media_bytes": r.received_media_bytes,
        "n_protocol_errors": len(r.protocol_errors),
        "protocol_errors": r.protocol_errors[:3],
        "script_errors": r.script_errors[:3],
    }


async def _drive_callers(spec: dict[str, Any]) -> dict[str, Any] | None:
    import httpx

    from livecall.bench.ear import EarCaller, ear_script

    loop = asyncio.get_running_loop()
    n = int(spec["n"])
    ramp, settle, hold = float(spec["ramp_s"]), float(spec["settle_s"]), float(spec["hold_s"])
    probe_ms = int(spec["probe_interval_ms"])
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=30.0, trust_env=False, limits=limits) as http:
        warm = EarCaller(
            spec["base_url"],
            auth_token=spec["auth_token"],
            http_client=http,
            timeout=30.0,
            script=ear_script(1.0, 240, 0),
        )
        w = await warm.run()
        print(
            "WARM_DONE " + json.dumps({"rtts": w.probe_rtts_ms, "errors": w.script_errors}),
            flush=True,
        )
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.startswith("GO "):
            return None
        t0 = float(line.split()[1])
        duration = ramp + settle + hold
        rng = random.Random(int(spec["seed"]))
        callers = [
            EarCaller(
                spec["base_url"],
                auth_token=spec["auth_token"],
                http_client=http,
                timeout=duration + 60.0,
                seed=i,
                script=ear_script(duration, probe_ms, rng.randrange(probe_ms // FRAME_MS)),
            )
            for i in range(n)
        ]

        async def one(i: int) -> Any:
            await asyncio.sleep(max(0.0, t0 + i * ramp / n - loop.time()))
            return await callers[i].run()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]

        def active() -> int:
            return sum(
                1
                for c, t in zip(callers, tasks, strict=True)
                if c.result.stream_started is not None and not t.done()
            )

        async def count_at(when: float) -> int:
            await asyncio.sleep(max(0.0, when - loop.time()))
            return active()

        hold_start = t0 + ramp + settle
        at_start, at_end = await asyncio.gather(count_at(hold_start), count_at(hold_start + hold))
        results = await asyncio.gather(*tasks, return_exceptions=True)
    calls = []
    for r, caller in zip(results, callers, strict=True):
        if isinstance(r, BaseException):
            calls.append({**_call_summary(_EmptyResult()), "script_errors": [repr(r)]})
        else:
            calls.append(_call_summary(r, caller))
    return {"calls": calls, "active_at_hold_start": at_start, "active_at_hold_end": at_end}


class _EmptyResult:
    """Stands in for the result of a caller task that raised (the simulator never should)."""

    call_sid = webhook_status = stream_started = ended = ended_by = close_code = None
    frames_sent = clock_late_ticks = probes_sent = probes_lost = received_media_bytes = 0
    clock_late_max_ms = 0.0
    timeline: list[Any] = []  # noqa: RUF012 (read-only class constant)
    probe_rtts_ms: list[float] = []  # noqa: RUF012
    protocol_errors: list[str] = []  # noqa: RUF012
    script_errors: list[str] = []  # noqa: RUF012


def _callers_main(argv: Sequence[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if "--uvloop" in argv:
        import uvloop

        results = uvloop.run(_drive_callers(spec))
    else:
        results = asyncio.run(_drive_callers(spec))
    if results is None:
        return 1
    Path(spec["results_path"]).write_text(json.dumps(results))
    print("DONE", flush=True)
    return 0


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["_callers"]:
        return _callers_main(args_list[1:])
    p = argparse.ArgumentParser(prog="python bench/load.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: levels 10 50, hold 8 s")
    p.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated call counts (default 10,50,100,150,200)",
    )
    p.add_argument("--hold", type=float, default=None, help="seconds all calls are on (20)")
    p.add_argument("--ramp", type=float, default=None, help="seconds to ramp up and down (5)")
    p.add_argument("--probe-ms", type=int, default=240, help="probe interval per call")
    p.add_argument("--recording", action="store_true", help="server records calls (default off)")
    p.add_argument("--native", action="store_true", help="with --profile: C frames too")
    p.add_argument(
        "--gemini-compression",
        action="store_true",
        help="let the Gemini link negotiate permessage-deflate",
    )
    p.add_argument("--stop-after-failures", type=int, default=None)
    p.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[1],
        help="livecall worker counts to run per level, e.g. 1,2 (default 1)",
    )
    p.add_argument("--worker-socket", choices=("reuseport", "shared"), default="reuseport")
    p.add_argument("--no-floor", action="store_true", help="skip the null bridge runs")
    p.add_argument(
        "--null-ws",
        default="auto",
        choices=("auto", "websockets", "websockets-sansio", "wsproto"),
        help="the null bridge's uvicorn WebSocket implementation (a stack-cost comparison)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="N",
        help="instead: profile the server with py-spy at N calls",
    )
    a = p.parse_args(args_list)
    if a.profile is not None:
        profile_server(
            a.profile, a.hold or 15.0, a.ramp or 5.0, recording=a.recording, out_dir=a.out
        )
        return 0
    levels = a.levels or (list(QUICK_LEVELS) if a.quick else list(DEFAULT_LEVELS))
    hold = a.hold if a.hold is not None else (8.0 if a.quick else 20.0)
    ramp = a.ramp if a.ramp is not None else (3.0 if a.quick else 5.0)
    report = run_load_benchmark(
        levels,
        hold,
        ramp,
        probe_interval_ms=a.probe_ms,
        recording=a.recording,
        gemini_compression=a.gemini_compression,
        stop_after_failures=a.stop_after_failures,
        workers=a.workers,
        worker_socket=a.worker_socket,
        floor=not a.no_floor,
        null_ws=a.null_ws,
        out_dir=a.out,
    )
    return 0 if report["levels"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
