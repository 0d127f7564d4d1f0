"""OpenTelemetry traces, one per call with a span per turn: optional, and free when off.

Off unless `LIVECALL_TRACING=1` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`LIVECALL_TRACING=0`
or `OTEL_SDK_DISABLED=true` turn it off again) *and* the SDK is installed
(`pip install 'livecall[tracing]'`). When off, `call_span`/`turn_span` return one shared
do-nothing context manager and `traced()` hands back the observer it was given: nothing is
added to any call, let alone to the per-frame path.

Spans are built from the call's records (`TracingObserver`), not from the audio path: a turn's
span is created when the turn record is final, with the start and end times the bridge
measured. Transcripts and phone numbers are deliberately not put in spans (they are personal
data and live in the call store); spans carry ids, timings, counts and outcomes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

import structlog

from livecall.records import CallEventRecord, CallInfo, CallObserver, CallSummary, TurnRecord

__all__ = [
    "TracingObserver",
    "add_trace_context",
    "call_span",
    "configure_tracing",
    "shutdown_tracing",
    "traced",
    "tracing_enabled",
    "tracing_requested",
    "turn_span",
]

log = structlog.get_logger("livecall.tracing")

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Any = None
_provider: Any = None

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (before checking anything is installed)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    flag = env.get("LIVECALL_TRACING", "").strip().lower()
    if flag in _FALSE:
        return False
    return flag in _TRUE or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())


def tracing_enabled() -> bool:
    return _tracer is not None


def _otlp_exporter() -> Any:
    # HTTP if installed, else gRPC: both exporters are optional, so they're imported by name.
    for module_name in (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module.OTLPSpanExporter()
    return None


def configure_tracing(
    service_name: str = "livecall",
    *,
    exporter: Any = None,
    instance_id: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Turns tracing on when asked for and possible; returns whether it is on.

    With `exporter` (tests, or a caller with its own exporter) tracing is on regardless of the
    environment, spans are exported one by one and the global provider is left alone.
    Otherwise spans go through a batching OTLP exporter configured by the standard `OTEL_*`
    variables, and the provider becomes the global one so other instrumentation joins in.
    """
    global _tracer, _provider
    if exporter is None and not tracing_requested(environ):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning("tracing.unavailable", hint="pip install 'livecall[tracing]'")
        return False
    processor: Any
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    else:
        otlp = _otlp_exporter()
        if otlp is None:
            log.warning(
                "tracing.no_exporter",
                hint="pip install opentelemetry-exporter-otlp-proto-http (livecall[tracing])",
            )
            return False
        processor = BatchSpanProcessor(otlp)
    attrs: dict[str, Any] = {"service.name": service_name}
    if instance_id:
        attrs["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(processor)
    if exporter is None:
        trace.set_tracer_provider(provider)
    shutdown_tracing()
    _provider = provider
    _tracer = provider.get_tracer("livecall")
    log.info("tracing.on", exporter=type(exporter or processor.span_exporter).__name__)
    return True


def shutdown_tracing() -> None:
    """Flushes and stops the exporter (call at process shutdown); tracing is off afterwards."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        with contextlib.suppress(Exception):
            provider.shutdown()


def _attr(value: Any) -> Any:
    if isinstance(value, bool | int | float):
        return value
    text = str(value)
    return text if len(text) <= 256 else text[:253] + "..."


def _attrs(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars only: nested data (tool arguments…) may hold personal data and is left out."""
    return {
        f"{prefix}{k}": _attr(v)
        for k, v in values.items()
        if v is not None and isinstance(v, str | bool | int | float)
    }


def call_span(call_sid: str, **attrs: Any) -> AbstractContextManager[Any]:
    """A span around a whole call, made current for the tasks the call starts inside it."""
    if _tracer is None:
        return _NOOP
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(
        "call",
        kind=SpanKind.SERVER,
        attributes={"livecall.call_sid": call_sid, **_attrs("livecall.", attrs)},
    )


def turn_span(call_sid: str, index: int, speaker: str, **attrs: Any) -> AbstractContextManager[Any]:
    """A span for one turn, child of the current (call) span."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(
        f"turn.{speaker}",
        attributes={
            "livecall.call_sid": call_sid,
            "livecall.turn.index": index,
            "livecall.turn.speaker": speaker,
            **_attrs("livecall.turn.", attrs),
        },
    )


class TracingObserver:
    """A `CallObserver` (one per call) that turns the call's records into spans, then passes
    every record on to `inner`.

    `call_started` opens the call span and makes it current in the calling task, so tasks the
    bridge creates afterwards (pumps, tools and their HTTP requests) are inside it;
    `call_ended`, in the same task, ends it and restores the context.
    """

    def __init__(self, inner: CallObserver, *, attach_context: bool = True) -> None:
        self.inner = inner
        self.attach_context = attach_context
        self._span: Any = None
        self._token: Any = None
        self._t0_ns = 0

    def call_started(self, info: CallInfo) -> None:
        tracer = _tracer
        if tracer is not None and self._span is None:
            from opentelemetry import context, trace
            from opentelemetry.trace import SpanKind

            self._t0_ns = int(info.started_at.timestamp() * 1e9)
            self._span = tracer.start_span(
                "call",
                kind=SpanKind.SERVER,
                start_time=self._t0_ns,
                attributes={
                    "livecall.call_sid": info.call_sid,
                    **_attrs(
                        "livecall.",
                        {
                            "stream_sid": info.stream_sid,
                            "direction": info.direction,
                            "profile": info.profile,
                            "model": info.model,
                        },
                    ),
                },
            )
            if self.attach_context:
                self._token = context.attach(trace.set_span_in_context(self._span))
        self.inner.call_started(info)

    def turn(self, turn: TurnRecord) -> None:
        span = self._span
        if span is not None and _tracer is not None:
            from opentelemetry import trace

            start = self._t0_ns + int(turn.start_ms * 1e6)
            end_ms = turn.end_ms if turn.end_ms is not None else turn.start_ms
            child = _tracer.start_span(
                f"turn.{turn.speaker}",
                context=trace.set_span_in_context(span),
                start_time=start,
                attributes={
                    "livecall.call_sid": turn.call_sid,
                    "livecall.turn.index": turn.index,
                    "livecall.turn.speaker": turn.speaker,
                    "livecall.turn.interrupted": turn.interrupted,
                    "livecall.turn.text_chars": len(turn.text),
                    **_attrs(
                        "livecall.turn.",
                        {
                            "first_audio_latency_ms": turn.first_audio_latency_ms,
                            "barge_in_stop_ms": turn.barge_in_stop_ms,
                        },
                    ),
                },
            )
            child.end(end_time=max(start, self._t0_ns + int(end_ms * 1e6)))
        self.inner.turn(turn)

    def event(self, event: CallEventRecord) -> None:
        if self._span is not None:
            self._span.add_event(
                event.kind,
                attributes=_attrs("", event.data),
                timestamp=self._t0_ns + int(event.at_ms * 1e6),
            )
        self.inner.event(event)

    def call_ended(self, summary: CallSummary) -> None:
        span, self._span = self._span, None
        if span is not None:
            from opentelemetry import context
            from opentelemetry.trace import Status, StatusCode

            span.set_attributes(
                _attrs(
                    "livecall.",
                    {
                        "end_reason": summary.end_reason,
                        "status": summary.status,
                        "duration_s": summary.duration_s,
                        "turns": summary.turns,
                        "interruptions": summary.interruptions,
                        "frames_in": summary.frames_in,
                        "frames_out": summary.frames_out,
                        "frames_missing": summary.frames_missing,
                        "total_tokens": summary.total_tokens,
                    },
                )
            )
            if summary.status == "failed":
                span.set_status(Status(StatusCode.ERROR, summary.end_reason))
            span.end()
            token, self._token = self._token, None
            if token is not None:
                with contextlib.suppress(Exception):
                    context.detach(token)
        self.inner.call_ended(summary)

    def partial(self, lines: list[TurnRecord]) -> None:
        """Words so far, for the live page: not traced, passed on."""
        partial = getattr(self.inner, "partial", None)
        if partial is not None:
            partial(lines)


def traced(observer: CallObserver) -> CallObserver:
    """`observer` wrapped in a `TracingObserver` when tracing is on, else `observer` itself."""
    return TracingObserver(observer) if _tracer is not None else observer


def add_trace_context(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: log lines name the trace they belong to, when tracing is on."""
    if _tracer is None:
        return event_dict
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict
