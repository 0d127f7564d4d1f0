"""`livecall`: serve calls, try it offline, measure it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="livecall",
    help="Answer phone calls with a Gemini Live voice agent.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(
    help="Benchmarks that print numbers (see bench/ and the README).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


def _register_subcommands() -> None:
    from livecall.outbound_cli import call_command
    from livecall.outcomes.cli import webhooks_app
    from livecall.store.cli import calls_app, db_app

    app.add_typer(calls_app, name="calls")
    app.add_typer(db_app, name="db")
    app.add_typer(webhooks_app, name="webhooks")
    app.command("call")(call_command)


_register_subcommands()
console = Console(stderr=True)


def uvicorn_config(
    app_obj: object,
    host: str,
    port: int,
    *,
    request_timeout_s: float = 10.0,
    ws_max_size: int = 1 << 20,
    **kw: object,
) -> object:
    """The uvicorn server livecall runs on: whole-request deadline at the protocol level,
    WebSocket messages capped by uvicorn itself (frames above MAX_MESSAGE_BYTES but under
    this are read, logged and ignored), and forwarded headers left to livecall, which
    believes them only from TRUSTED_PROXIES (uvicorn's own would trust 127.0.0.1)."""
    import uvicorn

    from livecall.server.conn_guard import guarded_http_protocol

    edge = getattr(getattr(app_obj, "state", None), "edge", None)
    if edge is not None:
        edge.server_ws_max_size = ws_max_size  # the app need not check each message again
    return uvicorn.Config(
        app_obj,  # type: ignore[arg-type]
        host=host,
        port=port,
        http=guarded_http_protocol(request_timeout_s),
        # uvicorn's sans-I/O websockets protocol: 23 % less CPU than the legacy `websockets`
        # one on the null bridge (docs/benchmarks.md); `auto` picks it since uvicorn 0.50 only
        ws="websockets-sansio",
        ws_max_size=ws_max_size,
        ws_ping_interval=20.0,
        ws_ping_timeout=60.0,
        log_config=None,
        access_log=False,
        # X-Forwarded-* are believed from TRUSTED_PROXIES only (server/forwarded.py); uvicorn's
        # own default would rewrite scheme and client address for any loopback peer first
        proxy_headers=False,
        lifespan="on",
        **kw,  # type: ignore[arg-type]
    )


def _admin_socket(path: Path) -> object:
    """The ADMIN_SOCKET Unix socket, readable and writable by this user only."""
    import os
    import socket
    import stat

    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise typer.BadParameter(f"ADMIN_SOCKET {path} exists and is not a socket")
        path.unlink()  # a stale socket from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_problem(settings: object, host: str) -> str | None:
    """Why `serve` must not start as configured (fail closed), else None."""
    if getattr(settings, "twilio_auth_token", None) is not None:
        return None
    if not getattr(settings, "insecure_dev", False):
        return (
            "TWILIO_AUTH_TOKEN is not set, so nothing could tell Twilio's requests from anyone "
            "else's. Set TWILIO_AUTH_TOKEN (the account's auth token). On a development "
            "machine only, --insecure-dev (or LIVECALL_INSECURE_DEV=true) runs without it, "
            "on loopback."
        )
    if not _is_loopback(host):
        return (
            f"--insecure-dev serves unsigned Twilio requests, so it binds loopback only; "
            f"refusing --host {host}. Use 127.0.0.1 (and a tunnel), or set TWILIO_AUTH_TOKEN."
        )
    return None


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="interface to bind (default 0.0.0.0; 127.0.0.1 with --insecure-dev)"),
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (default $PORT or 8080)")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="LIVECALL_WORKERS",
            help="worker processes (one event loop each) behind the one port",
        ),
    ] = 1,
    worker_socket: Annotated[
        str,
        typer.Option(
            envvar="LIVECALL_WORKER_SOCKET",
            help="with --workers: 'reuseport' (a socket each, kernel-balanced) or 'shared'",
        ),
    ] = "reuseport",
    insecure_dev: Annotated[
        bool,
        typer.Option(
            "--insecure-dev",
            help="development only: run without TWILIO_AUTH_TOKEN (unsigned Twilio requests "
            "accepted, loopback only, a warning on every call)",
        ),
    ] = False,
) -> None:
    """Run the server Twilio calls: POST /twiml and the /ws/twilio media stream."""
    from livecall.log import configure_logging
    from livecall.settings import Settings

    settings = Settings()
    if insecure_dev:
        settings = settings.model_copy(update={"insecure_dev": True})
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    unsigned = settings.insecure_dev and settings.twilio_auth_token is None
    if host is None and unsigned and "host" not in settings.model_fields_set:
        host = "127.0.0.1"  # unsigned requests: never reachable from another machine
    if not settings.has_gemini_credentials():
        console.print(
            "[red]No Gemini credentials.[/red] Set [bold]GEMINI_API_KEY[/bold] (Gemini Developer "
            "API), or GOOGLE_GENAI_USE_VERTEXAI=true with GOOGLE_CLOUD_PROJECT and "
            "GOOGLE_CLOUD_LOCATION (Vertex AI, application default credentials).\n"
            "To see livecall work without any key, run [bold]livecall demo[/bold]."
        )
        raise typer.Exit(2)
    bind = host or settings.host
    problem = insecure_problem(settings, bind)
    if problem is not None:
        console.print(f"[red]Not starting.[/red] {problem}")
        raise typer.Exit(2)
    if workers > 1:
        from livecall.server.workers import run_workers

        if worker_socket not in ("reuseport", "shared"):
            raise typer.BadParameter("--worker-socket is 'reuseport' or 'shared'")
        if settings.insecure_dev:
            os.environ["LIVECALL_INSECURE_DEV"] = "true"  # the workers check it again
        raise typer.Exit(
            run_workers(
                workers,
                bind,
                port or settings.port,
                mode=worker_socket,  # type: ignore[arg-type]
                max_calls=settings.max_concurrent_calls,
                max_gemini_sessions=settings.max_gemini_sessions,
                admin_socket=settings.admin_socket,
                instance_id=settings.instance_id,
            )
        )
    from livecall.metrics import LoopLagMonitor
    from livecall.server.app import create_app
    from livecall.server.drain import DrainingServer

    app_obj = create_app(settings)
    config = uvicorn_config(
        app_obj,
        bind,
        port or settings.port,
        request_timeout_s=settings.request_timeout_s,
        ws_max_size=settings.ws_max_size,
    )
    state = app_obj.state.livecall
    server = DrainingServer(
        config,  # type: ignore[arg-type]
        state.registry,
        settings.drain_timeout_s,
        drain=state.drain,
        lag_monitor=LoopLagMonitor(state.metrics),
    )
    listen = _worker_listen_socket(bind, port or settings.port)
    if settings.admin_socket is None and listen is None:
        server.run()
        return
    sockets = [listen if listen is not None else config.bind_socket()]  # type: ignore[attr-defined]
    if settings.admin_socket is not None:
        sockets.append(_admin_socket(settings.admin_socket))
    try:
        server.run(sockets=sockets)  # type: ignore[arg-type]
    finally:
        if settings.admin_socket is not None:
            settings.admin_socket.unlink(missing_ok=True)


def _worker_listen_socket(host: str, port: int) -> object | None:
    """In a worker of `serve --workers N`: the parent's shared socket, or our own
    SO_REUSEPORT one; None in a single process (uvicorn binds as usual)."""
    import os
    import socket

    from livecall.server.workers import WORKER_FD_ENV, WORKER_REUSEPORT_ENV, listen_socket

    fd = os.environ.get(WORKER_FD_ENV)
    if fd:
        return socket.socket(fileno=int(fd))
    if os.environ.get(WORKER_REUSEPORT_ENV) == "1":
        return listen_socket(host, port, reuseport=True)
    return None


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the caller-side recording")] = Path(
        "demo-out"
    ),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show server logs")] = False,
) -> None:
    """A whole phone call, offline: livecall + a simulated Gemini + a simulated caller."""
    import asyncio

    from livecall.demo import run_demo

    code = asyncio.run(run_demo(out, verbose=verbose))
    raise typer.Exit(code)


@bench_app.command("audio")
def bench_audio(
    seconds: Annotated[float, typer.Option(help="seconds of audio per candidate")] = 10.0,
) -> None:
    """Resampler candidates and the per-frame codec path, compared."""
    from livecall.bench.audio import run_audio_benchmark

    run_audio_benchmark(seconds=seconds)


@bench_app.command("gemini-wire")
def bench_gemini_wire(
    n: Annotated[int, typer.Option(help="iterations per path")] = 20000,
) -> None:
    """The SDK's message objects vs livecall's per-frame Gemini path."""
    from livecall.bench.gemini_wire import run_gemini_wire_benchmark

    run_gemini_wire_benchmark(n=n)


@bench_app.command("load")
def bench_load(
    levels: Annotated[str, typer.Option(help="concurrent calls per level, comma-separated")] = (
        "10,50,100,150,200"
    ),
    hold: Annotated[float, typer.Option(help="seconds each level is held")] = 20.0,
    ramp: Annotated[float, typer.Option(help="seconds to ramp calls up")] = 5.0,
    quick: Annotated[bool, typer.Option(help="levels 10,50 held 8 s: a smoke run")] = False,
    recording: Annotated[bool, typer.Option(help="keep recordings on in the server")] = False,
    workers: Annotated[str, typer.Option(help="livecall worker counts per level, e.g. 1,2")] = "1",
    worker_socket: Annotated[str, typer.Option(help="reuseport or shared")] = "reuseport",
    floor: Annotated[bool, typer.Option(help="run the null bridge too (the floor)")] = True,
    out: Annotated[Path, typer.Option(help="folder for load.json, load.md, load.png")] = Path(
        "bench/out"
    ),
) -> None:
    """N simulated calls against the real server and a null bridge: delay at the ear, stalls,
    setup time, CPU and RSS per call."""
    from livecall.bench.load import QUICK_LEVELS, run_load_benchmark

    counts = tuple(int(x) for x in workers.split(",") if x.strip())
    kw = {
        "recording": recording,
        "workers": counts,
        "worker_socket": worker_socket,
        "floor": floor,
        "out_dir": out,
    }
    if quick:
        run_load_benchmark(QUICK_LEVELS, 8.0, 3.0, **kw)  # type: ignore[arg-type]
    else:
        parsed = tuple(int(x) for x in levels.split(",") if x.strip())
        run_load_benchmark(parsed, hold, ramp, **kw)  # type: ignore[arg-type]


@bench_app.command("quality")
def bench_quality() -> None:
    """PESQ of what the model hears and what the caller hears, through the bridge."""
    from livecall.bench.quality import run_quality_benchmark

    run_quality_benchmark()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
