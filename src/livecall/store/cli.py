"""`livecall calls` and `livecall db`: read call records and manage the schema from a shell.

The main CLI registers `calls_app` as `calls` and `db_app` as `db`. Both read `DATABASE_URL`
(or `.env`) like the server, or take `--database-url`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from livecall.settings import Settings
from livecall.store import db
from livecall.store.models import Call
from livecall.store.repository import Repository

__all__ = ["calls_app", "db_app"]

T = TypeVar("T")

calls_app = typer.Typer(help="Recorded calls: recent calls, one call's transcript.")
db_app = typer.Typer(help="The call records database schema (Alembic migrations).")

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", help="default: DATABASE_URL or .env", show_default=False),
]


def _url(database_url: str | None) -> str:
    return database_url or Settings().database_url.get_secret_value()


def _with_repo(database_url: str | None, action: Callable[[Repository], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = db.make_engine(_url(database_url))
        try:
            return await action(Repository(db.make_sessionmaker(engine)))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _fail(console: Console, error: Exception) -> typer.Exit:
    console.print(f"[red]cannot read call records:[/red] {error.__class__.__name__}")
    console.print("Is the database reachable, and migrated (`livecall db upgrade`)?")
    return typer.Exit(1)


def _clock(ms: float | None) -> str:
    if ms is None:
        return "--:--.-"
    minutes, seconds = divmod(ms / 1000, 60)
    return f"{int(minutes):02d}:{seconds:04.1f}"


def _when(value: datetime | None, seconds: bool = True) -> str:
    pattern = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return value.astimezone(UTC).strftime(pattern) if value else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


# --- livecall calls --------------------------------------------------------------------------


def _list(
    limit: int, number: str | None, status: str | None, since: datetime | None, url: str | None
) -> None:
    console = Console()
    try:
        page = _with_repo(
            url,
            lambda repo: repo.list_calls(
                limit=limit,
                number=number,
                status=status,
                since=since.replace(tzinfo=since.tzinfo or UTC) if since else None,
            ),
        )
    except (SQLAlchemyError, OSError) as error:
        raise _fail(console, error) from error
    if not page.items:
        console.print("No calls recorded yet.")
        return
    wide = console.width >= 120  # narrow terminals: the columns that matter most
    table = Table(title=f"Recent calls ({len(page.items)} of {page.total})")
    table.add_column("Started (UTC)", no_wrap=True)
    table.add_column("Call SID", overflow="fold", min_width=17)
    table.add_column("From", no_wrap=True, min_width=12)
    if wide:
        table.add_column("To", no_wrap=True, min_width=12)
    table.add_column("Status", no_wrap=True, min_width=9)
    table.add_column("Length", justify="right", no_wrap=True)
    if wide:
        table.add_column("Turns", justify="right", no_wrap=True)
        table.add_column("Ended by", min_width=8)
    colors = {"completed": "green", "failed": "red", "in_progress": "yellow"}
    for call in page.items:
        status_cell = Text(call.status, style=colors.get(call.status, ""))
        duration = _duration(call.duration_s)
        started = _when(call.started_at, seconds=False)
        if wide:
            table.add_row(
                started,
                call.call_sid,
                call.from_number or "-",
                call.to_number or "-",
                status_cell,
                duration,
                str(call.turn_count),
                call.end_reason or "-",
            )
        else:
            table.add_row(started, call.call_sid, call.from_number or "-", status_cell, duration)
    console.print(table)


@calls_app.callback(invoke_without_command=True)
def calls(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=200)] = 20,
    number: Annotated[str | None, typer.Option(help="caller or called number")] = None,
    status: Annotated[str | None, typer.Option(help="in_progress, completed, failed")] = None,
    since: Annotated[datetime | None, typer.Option(help="started at or after (UTC)")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Recent calls (the default), or a subcommand."""
    if ctx.invoked_subcommand is None:
        _list(limit, number, status, since, database_url)


@calls_app.command("list")
def list_calls(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=200)] = 20,
    number: Annotated[str | None, typer.Option(help="caller or called number")] = None,
    status: Annotated[str | None, typer.Option(help="in_progress, completed, failed")] = None,
    since: Annotated[datetime | None, typer.Option(help="started at or after (UTC)")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Recent calls, newest first."""
    _list(limit, number, status, since, database_url)


def _transcript_rows(call: Call) -> list[tuple[float, int, Any]]:
    rows: list[tuple[float, int, Any]] = [(t.start_ms, 0, t) for t in call.turns]
    rows += [(e.at_ms, 1, e) for e in call.events]
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows


@calls_app.command("show")
def show(
    sid: Annotated[str, typer.Argument(help="the call SID")],
    database_url: DatabaseUrl = None,
) -> None:
    """One call: its details, then the transcript and events with timestamps."""
    console = Console()
    try:
        call = _with_repo(database_url, lambda repo: repo.get_call(sid))
    except (SQLAlchemyError, OSError) as error:
        raise _fail(console, error) from error
    if call is None:
        console.print(f"[red]No call {sid}.[/red]")
        raise typer.Exit(1)
    console.print(f"[bold]{call.call_sid}[/bold]  {call.status}  {call.direction}")
    console.print(
        f"  {call.from_number or '?'} -> {call.to_number or '?'}   profile {call.profile or '-'}"
        f"   model {call.model or '-'}"
    )
    console.print(
        f"  started {_when(call.started_at)}  ended {_when(call.ended_at)}"
        f"  length {_duration(call.duration_s)}  ended by {call.end_reason or '-'}"
    )
    console.print(
        f"  Gemini sessions {call.gemini_sessions}  tokens {call.total_tokens}"
        f"  interruptions {call.interruptions}"
        f"  recording {'yes' if call.recording_key else 'no'}"
    )
    console.print()
    for at_ms, _, item in _transcript_rows(call):
        stamp = Text(f"[{_clock(at_ms)}] ", style="dim")
        if hasattr(item, "speaker"):
            who = Text(
                "Caller: " if item.speaker == "caller" else "Agent:  ",
                style="cyan" if item.speaker == "caller" else "magenta",
            )
            line = Text.assemble(stamp, who)
            if item.interrupted and item.heard_text is not None:
                heard = item.heard_text
                rest = item.text[len(heard) :] if item.text.startswith(heard) else ""
                line.append(heard)
                if rest.strip():
                    line.append(f" [not heard: {rest.strip()}]", style="dim")
                line.append("  (interrupted)", style="yellow")
                if item.heard_estimated:  # the carrier confirmed no playout: pacing says
                    line.append("  (heard: estimated)", style="yellow")
            else:
                line.append(item.text)
                if item.interrupted:
                    line.append("  (interrupted)", style="yellow")
            if item.first_audio_latency_ms is not None:
                line.append(f"  [{item.first_audio_latency_ms:.0f} ms]", style="dim")
            console.print(line)
        else:
            detail = item.name or ", ".join(f"{k}={v}" for k, v in item.data.items())
            line = Text.assemble(stamp, Text(f"· {item.kind}", style="yellow"))
            if detail:
                line.append(f" {detail}")
            if item.duration_ms is not None:
                line.append(f" ({item.duration_ms:.0f} ms)", style="dim")
            console.print(line)


# --- livecall db -----------------------------------------------------------------------------


def _migrate(database_url: str | None, action: Callable[[Any], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        engine = db.make_engine(_url(database_url))
        try:
            return await action(engine)
        finally:
            await engine.dispose()

    console = Console()
    try:
        return asyncio.run(main())
    except (SQLAlchemyError, OSError) as error:
        console.print(f"[red]database error:[/red] {error}")
        raise typer.Exit(1) from error


@db_app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
    database_url: DatabaseUrl = None,
) -> None:
    """Create or update the schema (creates the SQLite file on first use)."""
    _migrate(database_url, lambda engine: db.upgrade(engine, revision))
    target = db.head_revision() if revision == "head" else revision
    Console().print(f"database at revision {target}")


@db_app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="target revision, e.g. -1 or base")],
    database_url: DatabaseUrl = None,
) -> None:
    """Step the schema back (base drops every call-records table)."""
    _migrate(database_url, lambda engine: db.downgrade(engine, revision))
    Console().print(f"database downgraded to {revision}")


@db_app.command()
def current(database_url: DatabaseUrl = None) -> None:
    """The schema revision the database is at, and the newest one this version knows."""
    rev = _migrate(database_url, db.current_revision)
    head = db.head_revision()
    state = "up to date" if rev == head else "needs `livecall db upgrade`"
    Console().print(f"current {rev or 'none'}, head {head}: {state}")
