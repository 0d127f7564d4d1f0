"""Structured logs: every line carries the call it belongs to, and no line carries a secret.

Call context rides in structlog's contextvars (bound once per call task), so code deep in the
bridge logs `log.info("gemini.goaway")` and the line still names the call. Every configured
secret is scrubbed twice: from the event's values, and from the finished line itself, so
nothing gets past whatever path it took (an exception message quoting a URL, a repr of a
header dict, a traceback uvicorn, asyncio or SQLAlchemy logged through the stdlib chain).
Tracebacks are rendered plainly, never with the local variables of each frame.
When tracing is on, lines logged inside a call's span also name its `trace_id` and `span_id`,
so a log search and a trace viewer meet on the same call.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from livecall.tracing import add_trace_context

_secrets: set[str] = set()
REDACTED = "[redacted]"


def register_secret(value: str | None) -> None:
    """Never print this value: it is replaced wherever it appears in a log line."""
    if value and len(value) >= 4:
        _secrets.add(value)


def scrub_text(value: str) -> str:
    """`value` with every registered secret replaced by `REDACTED` (longest first: a URL
    goes whole before the password inside it does)."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in value:
            value = value.replace(secret, REDACTED)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact_secrets(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if not _secrets:
        return event_dict
    for key, value in list(event_dict.items()):
        if isinstance(value, BaseException):
            value = repr(value)
        event_dict[key] = _scrub(value)
    return event_dict


def _scrub_line(_logger: Any, _name: str, line: Any) -> Any:
    """Last step, on the rendered line: what the value scrub could not see is caught here."""
    if not _secrets:
        return line
    if isinstance(line, bytes):
        return scrub_text(line.decode("utf-8", "replace")).encode()
    return scrub_text(line) if isinstance(line, str) else line


def configure_logging(
    level: str = "info", fmt: str = "console", secrets: Iterable[str] = ()
) -> None:
    """Route structlog and stdlib logging (uvicorn, websockets) through one renderer."""
    for secret in secrets:
        register_secret(secret)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_context,  # returns at once while tracing is off
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
                _scrub_line,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                add_trace_context,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                # a stdlib record's traceback (uvicorn, asyncio…) becomes text to scrub
                structlog.processors.format_exc_info,
                redact_secrets,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # uvicorn's own logging config (any uvicorn.Config made without log_config=None) gives
    # its loggers handlers of their own that do not propagate: a traceback logged there would
    # bypass the redaction above. Every record goes through the root handler instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    # websockets logs every frame at debug; keep it quiet unless asked for.
    logging.getLogger("websockets").setLevel(max(numeric, logging.INFO))
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str = "livecall") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
