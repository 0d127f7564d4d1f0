"""Agent profiles: who answers which number, and what that agent may do.

A YAML file (``PROFILES_FILE``) lists the profiles; a call picks one by its ``profile``
stream parameter, its called number, or the default. Mistakes in the file are reported as one
`ProfileError` naming the file, the profile and the field, because the person reading it is
editing YAML by hand. `ProfileRegistry` re-reads the file when it changes so a running server
picks up edits, and keeps the last good profiles when an edit is broken.

File shape::

    defaults:            # optional: merged into every profile (a profile's own keys win)
      voice: Kore
    profiles:            # a list, or a mapping name -> profile
      - name: front-desk
        default: true
        numbers: ["+15551230000"]
        system_prompt_file: prompts/front-desk.md   # relative to this file
        greeting: "Thanks for calling Rosa's, how can I help?"
        tools: [end_call, transfer_call, lookup]
        transfer_targets: {manager: "+15551239999", support: "sip:help@pbx.example.com"}
        transfer: {mode: warm, hold_message: "Please hold while I connect you."}  # default cold
        knowledge_dir: docs/front-desk
        webhook_url: https://crm.example.com/hooks/calls   # end-of-call report (CALL_WEBHOOK_URL)
        knowledge:           # optional: lookup through Vertex AI Search, local index as fallback
          backend: vertex_search
          vertex_search: {project: my-project, location: global, data_store: front-desk-faq}
          timeout_s: 2.5
          fallback: local
        google_search: false # Gemini's built-in Google Search grounding
        analysis:        # after the call: summary, fields, success (off by default)
          enabled: true
          goal: A table is booked with a name, party size and time.
          fields: {type: object, properties: {name: {type: string}, party_size: {type: integer}}}
        memory: {enabled: true, max_calls: 3, max_age_days: 90}   # needs analysis
        http_tools:
          - name: check_order
            description: Look up the status of an order by its number.
            url: https://shop.example.com/api/orders/status
            method: GET
            headers: {Authorization: "Bearer ${SHOP_API_TOKEN}"}
            signing_secret: ${SHOP_SIGNING_KEY}   # signs X-Livecall-* (default HTTP_TOOLS_SECRET)
            parameters:
              type: object
              properties: {order_id: {type: string, description: The order number}}
              required: [order_id]
"""

from __future__ import annotations

import asyncio
import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from google.genai import types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from livecall.log import get_logger
from livecall.settings import Settings

__all__ = [
    "BUILTIN_TOOLS",
    "ENV_REF",
    "AgentProfile",
    "AnalysisSettings",
    "HttpToolSpec",
    "KnowledgeSettings",
    "MemorySettings",
    "ProfileError",
    "ProfileRegistry",
    "ProfileSet",
    "TransferSettings",
    "VadSettings",
    "VertexSearchSettings",
]

log = get_logger("livecall.profiles")

BUILTIN_TOOLS: tuple[str, ...] = ("end_call", "transfer_call", "send_dtmf", "lookup")
BuiltinTool = Literal["end_call", "transfer_call", "send_dtmf", "lookup"]

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_SIP = re.compile(r"^sips?:[^\s@]+@[^\s@]+$|^sips?:[^\s@:]+(:\d+)?$")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
ENV_REF = re.compile(r"\$\{([^}]*)\}")
_BRANCH_TAG = re.compile(r"^[\w-]+\[.*\]$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProfileError(ValueError):
    """A profiles file that cannot be used; the message says where and why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _check_e164(value: str) -> str:
    if not _E164.match(value):
        raise ValueError(f"{value!r} is not an E.164 number (like +15551230000)")
    return value


def _check_target(value: str) -> str:
    if not (_E164.match(value) or _SIP.match(value)):
        raise ValueError(f"{value!r} is not an E.164 number or sip: URI")
    return value


E164Number = Annotated[str, AfterValidator(_check_e164)]
TransferTarget = Annotated[str, AfterValidator(_check_target)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VadSettings(_Strict):
    """Gemini's automatic activity detection knobs; None leaves the server default."""

    start_sensitivity: Literal["high", "low"] | None = None
    end_sensitivity: Literal["high", "low"] | None = None
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10_000)


def _empty_object_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


class AnalysisSettings(_Strict):
    """Post-call analysis (`livecall.outcomes.analysis`): off unless `enabled`.

    `fields` is a JSON Schema (type: object) of what to extract from the call, e.g. name,
    party size, time, callback number; `goal` is what a successful call achieves, judged
    afterwards; `model` defaults to ANALYSIS_MODEL.
    """

    enabled: bool = False
    model: str | None = Field(None, min_length=1)
    goal: str | None = Field(None, min_length=1, max_length=2000)
    fields: dict[str, Any] = Field(default_factory=_empty_object_schema)

    @field_validator("fields")
    @classmethod
    def _fields_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import Draft202012Validator, SchemaError

        if value.get("type") != "object":
            raise ValueError("must be a JSON schema with type: object")
        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(top)"
            raise ValueError(f"not a valid JSON schema at {where}: {exc.message}") from None
        return value


class MemorySettings(_Strict):
    """Caller memory (`livecall.outcomes.memory`): opt-in; needs analysis (its summaries)."""

    enabled: bool = False
    max_calls: int = Field(3, ge=1, le=20)
    max_age_days: float = Field(90.0, gt=0, le=3650)


def _to_gemini_schema(schema: dict[str, Any], *, strict: bool = False) -> types.Schema:
    """JSON schema -> Gemini `types.Schema` (the subset Gemini understands; `$schema` ignored)."""
    clean = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
    return types.Schema.from_json_schema(
        json_schema=types.JSONSchema.model_validate(clean),
        api_option="GEMINI_API",
        raise_error_on_unsupported_field=strict,
    )


class HttpToolSpec(_Strict):
    """A business webhook the agent may call as a function.

    `headers` values may reference environment variables as ``${NAME}`` (e.g.
    ``"Bearer ${SHOP_TOKEN}"``); they are resolved when the tool runs, so secrets stay out of
    the profiles file, and the resolved values never appear in results or logs.
    """

    name: str
    description: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(5.0, gt=0, le=60)
    # HMAC key for the X-Livecall-Signature of the call context: ``${NAME}`` only (default:
    # HTTP_TOOLS_SECRET), so the secret stays out of the profiles file
    signing_secret: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TOOL_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid function name (letters, digits, _ or -, "
                "starting with a letter or _, at most 64)"
            )
        if value in BUILTIN_TOOLS:
            raise ValueError(f"{value!r} is the name of a built-in tool")
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _method_upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an absolute http(s) URL")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header, template in value.items():
            if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", header):
                raise ValueError(f"{header!r} is not a valid HTTP header name")
            for ref in ENV_REF.findall(template):
                if not _ENV_NAME.match(ref):
                    raise ValueError(
                        f"header {header}: ${{{ref}}} is not an environment variable reference"
                    )
            if "${" in ENV_REF.sub("", template):
                raise ValueError(f"header {header}: unclosed ${{ in the value")
        return value

    @field_validator("signing_secret")
    @classmethod
    def _signing_secret(cls, value: str | None) -> str | None:
        if value is None:
            return None
        ref = ENV_REF.fullmatch(value)
        if ref is None or not _ENV_NAME.match(ref.group(1)):
            raise ValueError("must be an environment variable reference like ${TOOL_SECRET}")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError("must be a JSON schema with type: object")
        try:
            _to_gemini_schema(value, strict=True)
        except ValidationError as exc:
            detail = _describe(exc.errors()[0], unknown_hint=False)
            raise ValueError(f"not a JSON schema Gemini accepts: {detail}") from None
        except (ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"not a JSON schema Gemini accepts: {first}") from None
        return value

    def env_vars(self) -> list[str]:
        """The environment variables the headers (and signing secret) need, checked at call time."""
        refs = {ref for t in self.headers.values() for ref in ENV_REF.findall(t)}
        if self.signing_secret is not None:
            refs.update(ENV_REF.findall(self.signing_secret))
        return sorted(refs)

    def gemini_schema(self) -> types.Schema:
        """The parameters as the `types.Schema` a FunctionDeclaration carries."""
        return _to_gemini_schema(self.parameters)


class VertexSearchSettings(_Strict):
    """A Vertex AI Search app (`engine`) or data store to answer `lookup` from."""

    project: str = Field(min_length=1)
    location: str = Field("global", min_length=1)
    data_store: str | None = None
    engine: str | None = None
    serving_config: str = "default_search"
    collection: str = "default_collection"
    endpoint: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> VertexSearchSettings:
        if bool(self.data_store) == bool(self.engine):
            raise ValueError("set exactly one of data_store or engine")
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError(f"endpoint {self.endpoint!r} is not an http(s) URL")
            if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError("endpoint: plain http is only for a simulator on this machine")
        return self


class KnowledgeSettings(_Strict):
    """Where `lookup` searches: the local index of `knowledge_dir` or Vertex AI Search.

    With Vertex AI Search, a search that fails or takes longer than `timeout_s` falls back
    to the local index when `fallback: local` (and `knowledge_dir` is set), else the agent
    is told to say politely that it cannot look that up right now.
    """

    backend: Literal["local", "vertex_search"] = "local"
    vertex_search: VertexSearchSettings | None = None
    timeout_s: float = Field(3.0, gt=0, le=30)
    fallback: Literal["local", "none"] = "local"

    @model_validator(mode="after")
    def _backend_configured(self) -> KnowledgeSettings:
        if self.backend == "vertex_search" and self.vertex_search is None:
            raise ValueError("backend vertex_search needs a vertex_search: block")
        return self


class TransferSettings(_Strict):
    """How `transfer_call` hands the caller over.

    `cold` (the default) dials the target at once. `warm` briefs the person who answers first:
    they hear the agent's summary (or a fallback naming the line and the caller's number)
    before the caller is connected; the caller hears `hold_message`, then ringing, and
    `no_answer_message` if no one takes the call.
    """

    mode: Literal["cold", "warm"] = "cold"
    hold_message: str | None = Field(
        "Please hold while I connect you.", min_length=1, max_length=300
    )
    no_answer_message: str | None = Field(
        "Sorry, no one could take your call right now. Please try again later. Goodbye.",
        min_length=1,
        max_length=300,
    )


class AgentProfile(_Strict):
    """Everything that makes one agent: its voice, its words and what it is allowed to do.

    Fields left out of the file come from the server settings (voice, language, model, VAD,
    recording, maximum duration, system prompt).
    """

    name: str
    default: bool = False
    numbers: list[E164Number] = Field(default_factory=list)
    system_prompt: str
    system_prompt_file: Path | None = None
    greeting: str | None = None
    voice: str = Field(min_length=1)
    language: str = Field(min_length=2)
    model: str = Field(min_length=1)
    vad: VadSettings = Field(default_factory=VadSettings)
    tools: list[BuiltinTool] = Field(default_factory=lambda: list[BuiltinTool](["end_call"]))
    transfer_targets: dict[str, TransferTarget] = Field(default_factory=dict)
    knowledge_dir: Path | None = None
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings)
    google_search: bool = False
    http_tools: list[HttpToolSpec] = Field(default_factory=list)
    recording: bool = True
    max_call_duration_s: float = Field(gt=0)
    voicemail_message: str | None = None
    on_failure: str = "hangup"
    # end-of-call webhook for this profile's calls (default: CALL_WEBHOOK_URL)
    webhook_url: str | None = None
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    # what the caller hears when the agent hangs up without a word: the model is asked to say
    # this line; unset (or when it still says nothing), a recorded "Thank you for calling,
    # goodbye!" plays
    goodbye_line: str | None = None
    # cold (dial at once) or warm (the person answering is briefed first)
    transfer: TransferSettings = Field(default_factory=TransferSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PROFILE_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid profile name (letters, digits, '.', '_' or '-')"
            )
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an absolute http(s) URL")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list[str]) -> list[str]:
        dupes = sorted({t for t in value if value.count(t) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(dupes)}")
        return value

    @field_validator("transfer_targets")
    @classmethod
    def _target_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _TOOL_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid target name (letters, digits, _ or -)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AgentProfile:
        problems: list[str] = []
        if "transfer_call" in self.tools and not self.transfer_targets:
            problems.append("tools: transfer_call is enabled but transfer_targets is empty")
        remote = self.knowledge.backend == "vertex_search"
        if "lookup" in self.tools and self.knowledge_dir is None and not remote:
            problems.append("tools: lookup is enabled but knowledge_dir is not set")
        if remote and self.knowledge.fallback == "local" and self.knowledge_dir is None:
            problems.append("knowledge: fallback local needs knowledge_dir (or fallback: none)")
        if self.on_failure != "hangup" and self.on_failure not in self.transfer_targets:
            problems.append(
                f"on_failure: {self.on_failure!r} is neither 'hangup' nor a transfer target "
                f"({', '.join(self.transfer_targets) or 'none defined'})"
            )
        if self.memory.enabled and not self.analysis.enabled:
            problems.append("memory: enabled, but it is built from analysis: enable analysis too")
        names = [t.name for t in self.http_tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"http_tools: tool name used more than once: {', '.join(dupes)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tool_names(self) -> list[str]:
        """Every function the model may call: enabled built-ins, then the HTTP tools."""
        return [*self.tools, *(t.name for t in self.http_tools)]

    def http_tool(self, name: str) -> HttpToolSpec | None:
        return next((t for t in self.http_tools if t.name == name), None)


def _settings_defaults(settings: Settings | None) -> dict[str, Any]:
    """Profile fields a file may leave out, taken from the server settings."""
    s = settings if settings is not None else Settings()
    return {
        "system_prompt": s.resolved_system_prompt(),
        "greeting": s.greeting,
        "voice": s.voice,
        "language": s.language,
        "model": s.gemini_model,
        "vad": {
            "start_sensitivity": s.vad_start_sensitivity,
            "end_sensitivity": s.vad_end_sensitivity,
            "prefix_padding_ms": s.vad_prefix_padding_ms,
            "silence_duration_ms": s.vad_silence_duration_ms,
        },
        "recording": s.recording_enabled,
        "max_call_duration_s": s.max_call_duration_s,
    }


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(profile)"


def _fields_for(loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid where an unknown key was found, for a did-you-mean hint."""
    if loc[:1] == ("vad",):
        return list(VadSettings.model_fields)
    if loc[:1] == ("http_tools",):
        return list(HttpToolSpec.model_fields)
    if loc[:1] == ("analysis",):
        return list(AnalysisSettings.model_fields)
    if loc[:1] == ("memory",):
        return list(MemorySettings.model_fields)
    return list(AgentProfile.model_fields)


def _describe(err: Mapping[str, Any], *, unknown_hint: bool = True) -> str:
    # Union and validator errors add the failing branch to the path ("function-after[…]",
    # "enum[JSONSchemaType]"): keep the field path only.
    loc = tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and _BRANCH_TAG.match(p)))
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        field = str(loc[-1]) if loc else "?"
        hint = difflib.get_close_matches(field, _fields_for(loc), n=1) if unknown_hint else []
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{_loc(loc)}: unknown field{suffix}"
    if kind == "missing":
        return f"{_loc(loc)}: required field is missing"
    msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    if kind != "value_error" and isinstance(value, str | int | float | bool | None):
        msg = f"{msg}, got {value!r}"
    return f"{_loc(loc)}: {msg}" if loc else msg


@dataclass(frozen=True)
class ProfileSet:
    """An immutable, validated set of profiles and the rules to pick one for a call."""

    profiles: tuple[AgentProfile, ...]
    source: Path | None = None

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ProfileError([f"{self.source or 'profiles'}: no profiles defined"])

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    @property
    def default(self) -> AgentProfile:
        """The profile marked ``default: true``, else the first one."""
        return next((p for p in self.profiles if p.default), self.profiles[0])

    def get(self, name: str) -> AgentProfile | None:
        return next((p for p in self.profiles if p.name == name), None)

    def match(self, to_number: str | None, parameter: str | None = None) -> AgentProfile:
        """The profile for a call: the `profile` stream parameter, the called number, the default.

        An unknown parameter is logged and ignored (a stale outbound script must not drop
        the call), then the other rules apply.
        """
        if parameter:
            chosen = self.get(parameter.strip())
            if chosen is not None:
                return chosen
            log.warning("profiles.unknown_parameter", profile=parameter, known=self.names)
        if to_number:
            wanted = to_number.strip()
            for profile in self.profiles:
                if wanted in profile.numbers:
                    return profile
        return self.default

    @classmethod
    def default_from_settings(cls, settings: Settings) -> ProfileSet:
        """One profile called ``default`` built from the settings, when no file is configured."""
        return cls((AgentProfile(name="default", default=True, **_settings_defaults(settings)),))

    @classmethod
    def load(cls, path: str | Path, settings: Settings | None = None) -> ProfileSet:
        """Read and validate a profiles YAML file; every problem found is in the `ProfileError`."""
        path = Path(path)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError([f"{where}: cannot read: {exc.strerror or exc}"]) from None
        try:
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ProfileError([f"{where}: {at}invalid YAML: {exc.problem}"]) from None
        except yaml.YAMLError as exc:
            raise ProfileError([f"{where}: invalid YAML: {exc}"]) from None
        return cls._from_data(data, path, settings)

    @classmethod
    def _from_data(cls, data: Any, path: Path, settings: Settings | None) -> ProfileSet:
        where = str(path)
        if not isinstance(data, dict):
            raise ProfileError([f"{where}: expected a mapping with a 'profiles' key"])
        unknown = sorted(set(data) - {"profiles", "defaults"})
        if unknown:
            raise ProfileError(
                [f"{where}: unknown top-level key(s): {', '.join(map(str, unknown))}"]
            )
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise ProfileError([f"{where}: defaults: expected a mapping"])
        per_profile = sorted({"name", "default", "numbers"} & set(defaults))
        if per_profile:
            raise ProfileError(
                [
                    f"{where}: defaults: {', '.join(per_profile)} belong(s) in each "
                    "profile, not in defaults"
                ]
            )
        raw = data.get("profiles")
        entries: list[tuple[str, Any]]
        if isinstance(raw, list):
            entries = [
                (str(p.get("name", f"#{i + 1}")) if isinstance(p, dict) else f"#{i + 1}", p)
                for i, p in enumerate(raw)
            ]
        elif isinstance(raw, dict):
            entries = []
            for key, p in raw.items():
                if isinstance(p, dict):
                    p = {"name": str(key), **p}
                entries.append((str(key), p))
        else:
            raise ProfileError([f"{where}: 'profiles' must be a list or a mapping of profiles"])
        if not entries:
            raise ProfileError([f"{where}: no profiles defined"])

        base = _settings_defaults(settings)
        problems: list[str] = []
        profiles: list[AgentProfile] = []
        for label, entry in entries:
            prefix = f"{where}: profile {label!r}"
            if not isinstance(entry, dict):
                problems.append(f"{prefix}: expected a mapping of fields")
                continue
            merged: dict[str, Any] = {**base, **defaults, **entry}
            layers = [base["vad"], defaults.get("vad") or {}, entry.get("vad") or {}]
            if all(isinstance(layer, dict) for layer in layers):
                server = {k: v for k, v in layers[0].items() if v is not None}
                merged["vad"] = {**server, **layers[1], **layers[2]}
            file_problems = cls._resolve_paths(merged, entry, defaults, path.parent)
            if file_problems:
                problems.extend(f"{prefix}: {p}" for p in file_problems)
                continue
            try:
                profiles.append(AgentProfile.model_validate(merged))
            except ValidationError as exc:
                problems.extend(f"{prefix}: {_describe(e)}" for e in exc.errors())

        seen_names: dict[str, int] = {}
        seen_numbers: dict[str, str] = {}
        for profile in profiles:
            seen_names[profile.name] = seen_names.get(profile.name, 0) + 1
            for number in profile.numbers:
                other = seen_numbers.setdefault(number, profile.name)
                if other != profile.name:
                    problems.append(
                        f"{where}: profile {profile.name!r}: numbers: {number} is already "
                        f"answered by profile {other!r}"
                    )
        problems.extend(
            f"{where}: profile {name!r} is defined {n} times"
            for name, n in seen_names.items()
            if n > 1
        )
        defaults_marked = [p.name for p in profiles if p.default]
        if len(defaults_marked) > 1:
            problems.append(
                f"{where}: more than one profile has default: true ({', '.join(defaults_marked)})"
            )
        if problems:
            raise ProfileError(problems)
        return cls(tuple(profiles), source=path)

    @staticmethod
    def _resolve_paths(
        merged: dict[str, Any], entry: dict[str, Any], defaults: dict[str, Any], base_dir: Path
    ) -> list[str]:
        """Pick the prompt (the profile's own beats `defaults`), read `system_prompt_file`,
        and anchor relative paths at the profiles file's folder."""
        problems: list[str] = []
        prompt_file: Any = None
        for source in (entry, defaults):
            has_text, has_file = "system_prompt" in source, "system_prompt_file" in source
            if has_text and has_file:
                where = "" if source is entry else "defaults: "
                problems.append(f"{where}system_prompt and system_prompt_file are both set")
                break
            if has_text:
                merged["system_prompt"] = source["system_prompt"]
                break
            if has_file:
                prompt_file = source["system_prompt_file"]
                break
        merged.pop("system_prompt_file", None)
        if prompt_file is not None:
            if not isinstance(prompt_file, str):
                problems.append("system_prompt_file: expected a file path")
            else:
                file = _anchor(prompt_file, base_dir)
                try:
                    merged["system_prompt"] = file.read_text(encoding="utf-8").strip()
                    merged["system_prompt_file"] = file
                except OSError as exc:
                    problems.append(f"system_prompt_file: cannot read {file}: {exc.strerror}")
        knowledge = merged.get("knowledge_dir")
        if knowledge is not None:
            if not isinstance(knowledge, str):
                problems.append("knowledge_dir: expected a folder path")
            else:
                folder = _anchor(knowledge, base_dir)
                if not folder.is_dir():
                    problems.append(f"knowledge_dir: {folder} is not a folder")
                merged["knowledge_dir"] = folder
        return problems

    def watched_files(self) -> list[Path]:
        """The profiles file and every prompt file it pulls in (a change to any reloads)."""
        files = [self.source] if self.source else []
        files += [p.system_prompt_file for p in self.profiles if p.system_prompt_file]
        return list(dict.fromkeys(files))


def _anchor(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base_dir / path


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ProfileRegistry:
    """The live profile set: loaded at start (errors are fatal), reloaded when files change.

    A broken edit is logged and the previous profiles stay active, so a typo never takes
    the phone line down. Listeners hear about each successful reload and each failure.
    """

    def __init__(
        self, path: str | Path | None, settings: Settings, *, poll_interval_s: float = 1.0
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self.last_error: ProfileError | None = None
        self.on_reload: list[Callable[[ProfileSet], None]] = []
        self.on_error: list[Callable[[ProfileError], None]] = []
        if self.path is None:
            self._current = ProfileSet.default_from_settings(settings)
        else:
            self._current = ProfileSet.load(self.path, settings)
        self._stamps = self._snapshot(self._current)

    @property
    def current(self) -> ProfileSet:
        return self._current

    def _snapshot(self, profile_set: ProfileSet) -> dict[Path, tuple[int, int, int] | None]:
        files = profile_set.watched_files() or ([self.path] if self.path else [])
        return {f: _stat_key(f) for f in files}

    def changed(self) -> bool:
        """Whether any watched file looks different from when it was last loaded."""
        return any(_stat_key(f) != stamp for f, stamp in self._stamps.items())

    def _load(self) -> ProfileSet | ProfileError:
        assert self.path is not None
        try:
            return ProfileSet.load(self.path, self.settings)
        except ProfileError as exc:
            return exc

    def _apply(self, result: ProfileSet | ProfileError) -> bool:
        assert self.path is not None
        if isinstance(result, ProfileError):
            # Remember what we saw so one broken save is reported once, not at every poll.
            self._stamps = {f: _stat_key(f) for f in [*self._stamps, self.path]}
            self.last_error = result
            log.error(
                "profiles.reload_failed",
                file=str(self.path),
                problems=result.problems,
                keeping=self._current.names,
            )
            for on_error in list(self.on_error):
                on_error(result)
            return False
        self._current = result
        self._stamps = self._snapshot(result)
        self.last_error = None
        log.info("profiles.reloaded", file=str(self.path), profiles=result.names)
        for on_reload in list(self.on_reload):
            on_reload(result)
        return True

    def reload_now(self) -> bool:
        """Load the file again; True if the new profiles are active, False if it was invalid."""
        if self.path is None:
            return False
        return self._apply(self._load())

    async def run(self) -> None:
        """Poll the watched files' mtime/size/inode and reload on change (runs until cancelled).

        Polling survives editors that replace the file and bind mounts where inotify is
        silent; one stat per file per second costs nothing. Parsing runs in a thread; the new
        set is swapped in (and listeners called) on the event loop.
        """
        if self.path is None:
            return
        while True:
            await asyncio.sleep(self.poll_interval_s)
            if self.changed():
                self._apply(await asyncio.to_thread(self._load))
