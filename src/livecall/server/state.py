"""What the routes of one app share (`AppState`): settings, the live calls, and how a call is
set up (its profile, options, caller memory, observers, recording and tools).

`server.app` builds one and mounts the routes over it; the routes import it from here, so no
route module needs the app factory (which imports them all).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from livecall.agent.gemini import LiveOptions
from livecall.agent.http_tools import HttpToolRunner
from livecall.agent.knowledge import KnowledgeBase
from livecall.agent.knowledge_sources import (
    FallbackSource,
    LocalSource,
    VertexSearch,
    VertexSearchTarget,
)
from livecall.agent.profiles import AgentProfile, KnowledgeSettings, ProfileRegistry
from livecall.agent.tools import function_declarations
from livecall.assets import apology_ulaw, recovery_ulaw
from livecall.audio.recording import StereoRecorder
from livecall.call.options import CallOptions
from livecall.cluster import LiveCalls, LocalRegistry
from livecall.live_feed import FanOut, LiveFeed
from livecall.metrics import Metrics
from livecall.outcomes import memory
from livecall.outcomes.analysis import AnalysisWorker, EndNotifier
from livecall.outcomes.webhooks import WebhookService
from livecall.records import CallObserver
from livecall.server.drain import Drain
from livecall.server.outbound_limits import OutboundLimits
from livecall.server.registry import CallRegistry
from livecall.settings import Settings
from livecall.store.claims import ClaimStore, MemoryClaims
from livecall.store.recordings import LocalRecordingStore, RecordingStore
from livecall.store.writer import CallStore
from livecall.telephony.twilio import TwilioSignature
from livecall.telephony.twilio_rest import TwilioCallControl
from livecall.telephony.whisper import SharedStash, Whispers
from livecall.tracing import traced

__all__ = ["AppState"]

log = structlog.get_logger("livecall.server")


@dataclass
class AppState:
    """What the routes share: settings, the live calls, and how a call is set up."""

    settings: Settings
    registry: CallRegistry
    signature: TwilioSignature | None
    store: CallStore
    recordings: RecordingStore
    feed: LiveFeed = field(default_factory=LiveFeed)
    observer_factory: Callable[[str], CallObserver] | None = None
    # answering-machine verdicts that came before their call's stream, oldest first
    answered_by: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # agents: who answers, what they may do (see `call_setup`)
    profiles: ProfileRegistry | None = None
    call_control: TwilioCallControl | None = None  # None: no Twilio REST credentials
    http_tools: HttpToolRunner = field(default_factory=HttpToolRunner)
    knowledge: dict[str, KnowledgeBase] = field(default_factory=dict)
    # one search client per (search config, local fallback folder)
    knowledge_sources: dict[tuple[KnowledgeSettings, str | None], FallbackSource] = field(
        default_factory=dict
    )
    # operations: Prometheus metrics, the live calls of every instance, a drain in progress
    metrics: Metrics = field(default_factory=Metrics)
    cluster: LiveCalls = field(default_factory=LocalRegistry)
    webhooks: WebhookService | None = None  # end-of-call webhooks (livecall.outcomes)
    drain: Drain | None = None  # set by create_app: SIGTERM and /admin/drain share it
    # key material of the per-call stream tokens (Twilio streams, the softphone)
    stream_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    # after the call: post-call analysis (and the caller memory built from it)
    analysis: AnalysisWorker | None = None
    # set by the outbound API: the carriers' webhooks re-key an answered call's place in its caps
    outbound_limits: OutboundLimits | None = None
    # closed at shutdown once no call needs them (the carriers' REST clients)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # single-use tokens and what a carrier's webhook said about a call, shared by every worker
    # and instance on the database (`store.claims_db`; create_app sets it): one per app
    claims: ClaimStore = field(default_factory=MemoryClaims)
    # where one-shot documents (briefings, transfer documents) wait for whichever worker or
    # instance the carrier's fetch reaches: Redis when set, else the database (create_app);
    # None: the cluster store
    stash: SharedStash | None = None
    # warm transfers' briefings for the person answering (through `stash`)
    whispers: Whispers = field(init=False)

    def __post_init__(self) -> None:
        if self.stash is None:
            self.stash = self.cluster
        self.whispers = Whispers(self.stash)

    def knowledge_for(self, profile: AgentProfile) -> FallbackSource | None:
        """What the profile's `lookup` searches, shared by every call that searches the same.

        One local index per documents folder; one Vertex AI Search client (and its failure
        breaker) per search target, with the local index as its fallback when configured.
        """
        config = profile.knowledge
        local: LocalSource | None = None
        if profile.knowledge_dir is not None:
            folder = str(profile.knowledge_dir.resolve())
            kb = self.knowledge.get(folder)
            if kb is None:
                kb = self.knowledge[folder] = KnowledgeBase(profile.knowledge_dir)
            local = LocalSource(kb)
        if config.backend == "local" or config.vertex_search is None:
            return FallbackSource(local) if local is not None else None
        key = (config, str(local.index.folder) if local is not None else None)
        source = self.knowledge_sources.get(key)
        if source is None:
            v = config.vertex_search
            target = VertexSearchTarget(
                project=v.project,
                location=v.location,
                data_store=v.data_store,
                engine=v.engine,
                serving_config=v.serving_config,
                collection=v.collection,
                endpoint=v.endpoint,
            )
            fallback = local if config.fallback == "local" else None
            source = FallbackSource(VertexSearch(target, timeout_s=config.timeout_s), fallback)
            self.knowledge_sources[key] = source
        return source

    def non_blocking_tools(self) -> bool:
        """NON_BLOCKING tool declarations and response `scheduling`, on both APIs.

        Vertex AI takes both like the Developer API (the SDK sends `behavior` to either),
        and 3.8 models treat tools as non-blocking anyway: without `scheduling` the server
        applies WHEN_IDLE and the model speaks again after `end_call`/`transfer_call`.
        """
        configured = self.settings.gemini_non_blocking_tools
        return True if configured is None else configured

    def match_profile(self, params: Mapping[str, str]) -> AgentProfile:
        """The profile for a call: its `profile` parameter, else our number, else the default.

        Our number is the called one (`to`) on inbound calls, the caller ID (`from`) on
        outbound ones, where `to` is the person being called.
        """
        if self.profiles is None:
            self.profiles = ProfileRegistry(None, self.settings)
        outbound = params.get("direction", "inbound").startswith("outbound")
        ours = params.get("from") if outbound else params.get("to")
        return self.profiles.current.match(ours or None, params.get("profile") or None)

    def observer_for(self, call_sid: str) -> CallObserver:
        """Where a call's records go: the store, the live feed, metrics and (when on) traces."""
        observers: list[CallObserver] = [
            self.store.observer(call_sid),
            self.feed.observer(call_sid),
        ]
        if self.observer_factory is not None:
            observers.append(self.observer_factory(call_sid))
        if self.webhooks is not None:  # after the store's writer: its op follows the call's end
            observers.append(self.webhooks.observer(call_sid))
        if self.analysis is not None:
            observers.append(EndNotifier(self.analysis))
        return traced(self.metrics.observer(FanOut(*observers)))

    async def close_clients(self) -> None:
        """Close what `closers` holds (at shutdown, once no call can use it); one failing
        must not keep the others open."""
        closers, self.closers = self.closers, []
        for close in closers:
            try:
                await close()
            except Exception as exc:
                log.warning("shutdown.close_failed", error=type(exc).__name__)

    async def call_is_live(self, call_sid: str) -> bool:
        """A call in progress here or (Redis reachable) on another instance."""
        return call_sid in self.registry.active or await self.cluster.locate(call_sid) is not None

    async def on_control(self, call_sid: str, action: str, args: dict[str, Any]) -> bool:
        """A control request for a call this process holds, from the API of any instance."""
        call = self.registry.active.get(call_sid)
        if call is None or call.bridge is None:
            return False
        actions = call.actions
        if action == "end":
            reason = str(args.get("reason") or "operator")[:64]
            log.info("call.ended_by_request", call_sid=call_sid, reason=reason)
            call.bridge.end(reason)
            return True
        if action == "transfer":
            target = str(args.get("target") or "")
            number = actions.profile.transfer_targets.get(target) if actions else None
            if actions is None or actions.control is None or number is None:
                log.info("call.transfer_refused", call_sid=call_sid, target=target[:64])
                return False
            # BridgeActions.transfer first lets the caller hear the agent out (seconds):
            # it runs beside the call, and the request is answered now.
            actions.spawn(actions.transfer(target, number), "transfer")
            return True
        return False

    async def save_recording(self, call_sid: str, recorder: StereoRecorder, end_ms: float) -> str:
        """Writes the call's stereo recording and hands it to the recording store."""
        fmt = self.settings.recording_format
        if isinstance(self.recordings, LocalRecordingStore):
            target = self.recordings.path_for(call_sid, fmt)
        else:
            target = self.settings.spool_dir / f"{call_sid}.{fmt}"
        path = await recorder.finish_async(target, fmt, end_ms=end_ms)
        return await self.recordings.put(call_sid, path)

    async def caller_memory(self, profile: AgentProfile, options: CallOptions) -> str:
        """What the agent remembers of this caller (profile memory on), for its instruction.

        Time-boxed by MEMORY_TIMEOUT: a slow or dead database costs the call at most that,
        then it starts without. Never for anonymous, withheld or non-E.164 numbers.
        """
        raw = memory.remote_number(options.direction, options.from_number, options.to_number)
        number = memory.normalize_number(raw)
        if not profile.memory.enabled or number is None:
            return ""
        try:
            async with asyncio.timeout(self.settings.memory_timeout_s):
                entries = await memory.recall(
                    self.store.repo.sessions,
                    number,
                    profile.name,
                    max_calls=profile.memory.max_calls,
                    max_age_days=profile.memory.max_age_days,
                    retention_days=self.settings.retention_days,
                )
        except TimeoutError:
            log.warning("memory.timeout", timeout_s=self.settings.memory_timeout_s)
            return ""
        except Exception as exc:
            log.warning("memory.unavailable", error=type(exc).__name__)
            return ""
        if entries:
            log.info("memory.recalled", calls=len(entries), profile=profile.name)
        return memory.memory_instruction(entries)

    async def call_setup(self, params: Mapping[str, str]) -> tuple[CallOptions, LiveOptions]:
        """The per-call options for a stream's `<Parameter>`s, from the matched profile.

        The profile itself rides along in ``options.context.agent_profile`` for the tools.
        An outbound call with answering-machine detection (``amd`` parameter) greets only
        once Twilio says a person answered, so a voicemail greeting is not talked over.
        A returning caller's memory (when the profile keeps one) joins the system prompt.
        """
        s = self.settings
        profile = self.match_profile(params)
        amd = params.get("amd") == "1"
        options = CallOptions(
            greeting=None if amd else profile.greeting,
            max_duration_s=profile.max_call_duration_s,
            connect_timeout_s=s.gemini_connect_timeout_s,
            direction=params.get("direction", "inbound").split("-")[0] or "inbound",
            profile=profile.name,
            from_number=params.get("from") or None,
            to_number=params.get("to") or None,
            recording_sink=self.save_recording if profile.recording else None,
            apology_ulaw=apology_ulaw(),
            recovery_ulaw=recovery_ulaw(),
            reconnect_attempts=s.gemini_reconnect_attempts,
            stall_timeout_s=s.gemini_stall_timeout_s,
            rotation_overlap=s.gemini_rotation_overlap,
            metrics=self.metrics,
            non_blocking_tools=self.non_blocking_tools(),
        )
        options.context.agent_profile = profile
        options.context.log_dtmf = s.log_dtmf
        options.context.log_transcripts = s.log_transcripts
        if amd:
            options.context.deferred_greeting = profile.greeting
        vad = profile.vad
        remembered = await self.caller_memory(profile, options)
        live = LiveOptions(
            model=profile.model,
            system_prompt=(
                f"{profile.system_prompt}\n\n{remembered}" if remembered else profile.system_prompt
            ),
            voice=profile.voice,
            language=profile.language,
            function_declarations=function_declarations(
                profile, non_blocking=self.non_blocking_tools()
            ),
            vad_start_sensitivity=vad.start_sensitivity,
            vad_end_sensitivity=vad.end_sensitivity,
            vad_prefix_padding_ms=vad.prefix_padding_ms,
            vad_silence_duration_ms=vad.silence_duration_ms,
            google_search=profile.google_search,
        )
        return options, live
