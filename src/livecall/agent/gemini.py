"""One Gemini Live connection: opened by the official SDK, then driven frame by frame.

`google-genai` does what it is good at — endpoint and API version, API key or Vertex AI
credentials, the `setup` frame built from a typed `LiveConnectConfig`, the `setupComplete`
handshake and its error mapping. Once the session is open, audio frames and server messages
go through `live_protocol` on the session's own WebSocket, which is what the SDK itself
writes to; see that module for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import certifi
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from websockets.asyncio.connection import Connection as AsyncioConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State as WsState

from livecall.agent import live_protocol as lp
from livecall.settings import Settings

__all__ = [
    "GeminiClosed",
    "GeminiConnectError",
    "GeminiLink",
    "LiveOptions",
    "SessionCounter",
]

CLOSE_TIMEOUT_S = 2.0  # Gemini's side of the close handshake; after that the socket is cut

# Close codes after which retrying the same request cannot help (bad setup, key, model, handle).
PERMANENT_CLOSE_CODES = frozenset({1007, 1008})


class GeminiConnectError(RuntimeError):
    """The session could not be opened; `code` is the WebSocket close code when there was one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class GeminiClosed(RuntimeError):
    """The open session ended: the server closed it, or the connection dropped."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"Gemini Live session closed ({code}): {reason}" if code else reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class LiveOptions:
    """What a session is set up with: the agent's voice, mind and ears."""

    model: str
    system_prompt: str
    voice: str | None = "Kore"
    language: str | None = "en-US"
    function_declarations: list[types.FunctionDeclaration] = field(default_factory=list)
    vad_start_sensitivity: str | None = None  # "high" | "low"
    vad_end_sensitivity: str | None = None
    vad_prefix_padding_ms: int | None = None
    vad_silence_duration_ms: int | None = None
    resumption_handle: str | None = None
    context_compression: bool = True
    compression_trigger_tokens: int | None = None
    google_search: bool = False  # Gemini's built-in Google Search grounding

    def connect_config(self) -> types.LiveConnectConfig:
        speech = None
        if self.voice or self.language:
            speech = types.SpeechConfig(
                voice_config=(
                    types.VoiceConfig(
                        prebuilt_voice_config=types.PrebuiltVoiceConfig(voice_name=self.voice)
                    )
                    if self.voice
                    else None
                ),
                language_code=self.language,
            )
        detection = types.AutomaticActivityDetection(
            start_of_speech_sensitivity=(
                {
                    "high": types.StartSensitivity.START_SENSITIVITY_HIGH,
                    "low": types.StartSensitivity.START_SENSITIVITY_LOW,
                }[self.vad_start_sensitivity]
                if self.vad_start_sensitivity
                else None
            ),
            end_of_speech_sensitivity=(
                {
                    "high": types.EndSensitivity.END_SENSITIVITY_HIGH,
                    "low": types.EndSensitivity.END_SENSITIVITY_LOW,
                }[self.vad_end_sensitivity]
                if self.vad_end_sensitivity
                else None
            ),
            prefix_padding_ms=self.vad_prefix_padding_ms,
            silence_duration_ms=self.vad_silence_duration_ms,
        )
        tools: list[types.ToolUnion] = (
            [types.Tool(function_declarations=self.function_declarations)]
            if self.function_declarations
            else []
        )
        if self.google_search:
            tools.append(types.Tool(google_search=types.GoogleSearch()))
        compression = (
            types.ContextWindowCompressionConfig(
                sliding_window=types.SlidingWindow(),
                trigger_tokens=self.compression_trigger_tokens,
            )
            if self.context_compression
            else None
        )
        return types.LiveConnectConfig(
            response_modalities=[types.Modality.AUDIO],
            speech_config=speech,
            system_instruction=types.Content(
                role="user", parts=[types.Part(text=self.system_prompt)]
            ),
            tools=tools or None,
            input_audio_transcription=types.AudioTranscriptionConfig(),
            output_audio_transcription=types.AudioTranscriptionConfig(),
            realtime_input_config=types.RealtimeInputConfig(
                automatic_activity_detection=detection,
                activity_handling=types.ActivityHandling.START_OF_ACTIVITY_INTERRUPTS,
            ),
            session_resumption=types.SessionResumptionConfig(handle=self.resumption_handle),
            context_window_compression=compression,
        )


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None  # the SDK's own default (honours SSL_CERT_FILE)
    ctx = ssl.create_default_context(cafile=certifi.where())
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


@lru_cache(maxsize=8)
def _client(
    api_key: str | None,
    vertexai: bool,
    project: str | None,
    location: str | None,
    base_url: str | None,
    api_version: str | None,
    ca_file: Path | None,
) -> genai.Client:
    http_options = types.HttpOptions(base_url=base_url, api_version=api_version)
    ctx = _ssl_context(ca_file)
    if ctx is not None:
        http_options.async_client_args = {"ssl": ctx}
    if vertexai:
        if api_key and not project:  # Vertex AI express mode: an API key, no project
            return genai.Client(vertexai=True, api_key=api_key, http_options=http_options)
        return genai.Client(
            vertexai=True, project=project, location=location, http_options=http_options
        )
    return genai.Client(api_key=api_key, http_options=http_options)


def client_for(settings: Settings) -> genai.Client:
    """One SDK client per distinct configuration, shared by every call of the process."""
    key = settings.gemini_api_key.get_secret_value() if settings.gemini_api_key else None
    return _client(
        key,
        settings.gemini_use_vertexai,
        settings.gemini_project,
        settings.gemini_location,
        settings.gemini_base_url,
        settings.gemini_api_version,
        settings.gemini_ca_file,
    )


class SessionCounter:
    """Open Gemini sessions in this process, against the project's concurrent-session quota."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.active = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.active >= self.limit


class GeminiLink:
    """An open Live session: send caller audio/text/tool results, receive events."""

    def __init__(
        self, client: genai.Client, options: LiveOptions, counter: SessionCounter | None = None
    ) -> None:
        self._client = client
        self.options = options
        self.counter = counter or SessionCounter()
        self._counted = False
        self._stack = contextlib.AsyncExitStack()
        self._ws: Any = None
        self._protocol: Any = None  # the socket's sans-I/O protocol, for `_write_now`
        self.session_id: str | None = None
        self.closed = False

    async def connect(self) -> None:
        if self.closed:
            raise GeminiConnectError("session link already closed")
        try:
            session = await self._stack.enter_async_context(
                self._client.aio.live.connect(
                    model=self.options.model, config=self.options.connect_config()
                )
            )
        except genai_errors.APIError as exc:
            await self._stack.aclose()
            raise GeminiConnectError(f"Gemini refused the session: {exc}", exc.code) from None
        except (OSError, ConnectionClosed, ssl.SSLError) as exc:
            await self._stack.aclose()
            raise GeminiConnectError(f"cannot reach Gemini Live: {exc}") from None
        ws = getattr(session, "_ws", None)
        if ws is None:  # pragma: no cover - guarded by the google-genai version pin
            await self._stack.aclose()
            raise GeminiConnectError("unsupported google-genai version: no session socket")
        self._ws = ws
        # the write-at-once path needs websockets' asyncio connection; any other: `send` only
        self._protocol = ws.protocol if isinstance(ws, AsyncioConnection) else None
        self.session_id = session.session_id
        self.counter.active += 1
        self._counted = True

    async def _send(self, frame: str | bytes) -> None:
        try:
            await self._ws.send(frame, text=True)
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None

    def _write_now(self, frame: bytes) -> bool:
        """One text frame straight to the socket when nothing stands in the way: the
        connection open, no fragmented message under way, the transport not pushing back.
        False: `send` must go the library's way (which waits, or raises ConnectionClosed).

        `Connection.send` does the same three steps (frame, write, drain) through an async
        context manager and its checks: 10.4 µs a frame against 6.6 µs this way, TLS included,
        ~50 times a second per call (docs/benchmarks.md)."""
        ws = self._ws
        protocol = self._protocol
        if (
            protocol is None
            or protocol.state is not WsState.OPEN
            or ws.send_in_progress is not None
            or ws.paused
            or ws.transport.is_closing()
        ):
            return False
        try:
            protocol.send_text(frame)
            ws.send_data()
        except Exception as exc:  # as `send` would: the connection is gone, drop the socket
            ws.transport.abort()
            raise GeminiClosed(1006, f"connection dropped: {type(exc).__name__}") from None
        return True

    async def send_audio(self, pcm16k: bytes) -> None:
        frame = lp.audio_message_utf8(pcm16k)
        if not self._write_now(frame):
            await self._send(frame)

    async def send_text(self, text: str) -> None:
        await self._send(lp.text_message(text))

    async def send_client_turn(self, text: str, *, turn_complete: bool = True) -> None:
        await self._send(lp.client_text_turn_message(text, turn_complete=turn_complete))

    async def send_turn_complete(self) -> None:
        """Completes the client turn left open by partial content (answers what came since)."""
        await self._send(lp.turn_complete_message())

    async def send_tool_responses(self, responses: list[dict[str, Any]]) -> None:
        await self._send(lp.tool_response_message(responses))

    async def send_audio_stream_end(self) -> None:
        await self._send(lp.audio_stream_end_message())

    async def receive(self) -> list[lp.LiveEvent]:
        """The events of the next server frame; raises GeminiClosed when the session ends."""
        try:
            frame = await self._ws.recv(decode=False)
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from None
        return lp.parse_server_message(frame)

    def _closed_error(self, exc: ConnectionClosed) -> GeminiClosed:
        self.closed = True
        if exc.rcvd is not None:
            return GeminiClosed(exc.rcvd.code, exc.rcvd.reason or "closed by the server")
        return GeminiClosed(1006, "connection dropped")

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:  # noqa: ASYNC109
        """Closes politely, but never waits long: a silent server gets its socket cut."""
        self.closed = True
        if self._counted:
            self._counted = False
            self.counter.active -= 1
        try:
            async with asyncio.timeout(timeout):
                await self._stack.aclose()
        except TimeoutError:
            transport = getattr(self._ws, "transport", None)
            if transport is not None:
                transport.abort()
        except Exception:  # closing a broken session must not raise into call teardown
            pass
