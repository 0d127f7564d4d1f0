"""The agent's tools: what Gemini is told it can call, and running those calls safely.

`function_declarations` turns a profile into the functions declared in the Live `setup`.
`ToolRunner` executes a call from the model: it checks the arguments against the same
declaration, dispatches to the call bridge (`CallActions`), the knowledge base or an HTTP
webhook, bounds the time taken and always answers with a JSON-serialisable dict, because the
model needs *some* answer for every call it makes and the audio must never wait on a tool.
Tasks started with `start` can be cancelled by id when Gemini sends `toolCallCancellation`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from google.genai import types

from livecall.agent.http_tools import CallToolRunner, HttpToolRunner
from livecall.agent.knowledge import KnowledgeBase
from livecall.agent.knowledge_sources import FallbackSource, LocalSource
from livecall.agent.profiles import AgentProfile
from livecall.log import get_logger

__all__ = [
    "DTMF_PATTERN",
    "CallActions",
    "ToolRunner",
    "function_declarations",
    "function_response",
    "response_scheduling",
    "validate_args",
]

log = get_logger("livecall.tools")

DTMF_PATTERN = r"^[0-9*#wW]{1,64}$"
LOOKUP_RESULTS = 3


@runtime_checkable
class CallActions(Protocol):
    """What the call bridge does when the agent acts on the call itself.

    Each returns a small dict the model gets back (e.g. ``{"result": "ok"}``). `end_call`
    should let the goodbye already sent finish playing before hanging up.
    """

    async def end_call(self, reason: str) -> dict[str, Any]: ...

    async def transfer(
        self, target_name: str, number: str, summary: str | None = None
    ) -> dict[str, Any]: ...

    async def send_dtmf(self, digits: str) -> dict[str, Any]: ...


def _obj(properties: dict[str, types.Schema], required: list[str]) -> types.Schema:
    return types.Schema(type=types.Type.OBJECT, properties=properties, required=required or None)


def _builtin_declaration(name: str, profile: AgentProfile) -> types.FunctionDeclaration:
    string = types.Type.STRING
    if name == "end_call":
        return types.FunctionDeclaration(
            name="end_call",
            description=(
                "Hang up the phone call. Use it only when the conversation is over: the caller "
                "said goodbye, asked to end the call, or nothing more can be done. Say a short "
                "goodbye first; it is played to the end before the line is cut."
            ),
            parameters=_obj(
                {
                    "reason": types.Schema(
                        type=string,
                        description="Why the call ends, in a few words (for the call log).",
                    )
                },
                [],
            ),
        )
    if name == "transfer_call":
        targets = list(profile.transfer_targets)
        properties = {
            "target": types.Schema(
                type=string,
                enum=targets,
                description="Who to transfer to, one of the available targets.",
            )
        }
        if profile.transfer.mode == "warm":
            properties["summary"] = types.Schema(
                type=string,
                description=(
                    "A one- or two-sentence briefing for the person you transfer to: who is "
                    "calling and what they need. They hear it before the caller is connected."
                ),
            )
        return types.FunctionDeclaration(
            name="transfer_call",
            description=(
                "Transfer the caller to a person or department. Use it when the caller asks for "
                "a human or for something only they can handle. Tell the caller you are "
                "transferring them before calling this; the call leaves you once it connects. "
                f"Available targets: {', '.join(targets)}."
            ),
            parameters=_obj(properties, ["target"]),
        )
    if name == "send_dtmf":
        return types.FunctionDeclaration(
            name="send_dtmf",
            description=(
                "Press keys on the phone keypad, to navigate an automated phone menu (for "
                "example 'press 1 for sales') or enter a number the menu asks for. Use digits "
                "0-9, * and #; 'w' waits half a second between keys. Do not speak the digits."
            ),
            parameters=_obj(
                {
                    "digits": types.Schema(
                        type=string,
                        pattern=DTMF_PATTERN,
                        description="Keys to press in order, e.g. '1', '2#' or '1w4402#'.",
                    )
                },
                ["digits"],
            ),
        )
    if name == "lookup":
        return types.FunctionDeclaration(
            name="lookup",
            description=(
                "Search the business's own documents (opening hours, prices, policies, menus, "
                "FAQs) and get the most relevant passages with their sources. Use it before "
                "answering any factual question about the business instead of guessing; if "
                "nothing relevant comes back, say you don't know."
            ),
            parameters=_obj(
                {
                    "query": types.Schema(
                        type=string,
                        description="What to look for, as keywords or a short question.",
                    )
                },
                ["query"],
            ),
        )
    raise ValueError(f"unknown built-in tool {name!r}")


def function_declarations(
    profile: AgentProfile, *, non_blocking: bool = True
) -> list[types.FunctionDeclaration]:
    """The functions this profile's agent may call: enabled built-ins, then its HTTP tools.

    With `non_blocking` (the default) each declaration carries ``behavior=NON_BLOCKING`` so the
    model keeps talking while a tool runs; pass False for a model that rejects the field.
    """
    behavior = types.Behavior.NON_BLOCKING if non_blocking else None
    declarations = [_builtin_declaration(name, profile) for name in profile.tools]
    for spec in profile.http_tools:
        schema = spec.gemini_schema()
        declarations.append(
            types.FunctionDeclaration(
                name=spec.name,
                description=spec.description,
                # An OBJECT without properties is refused by the API: declare no parameters.
                parameters=schema if schema.properties else None,
            )
        )
    if behavior is not None:
        declarations = [d.model_copy(update={"behavior": behavior}) for d in declarations]
    return declarations


def response_scheduling(name: str, spoke_first: bool = True) -> types.FunctionResponseScheduling:
    """When the model should react to a NON_BLOCKING tool's result.

    Call-control results need no words when the agent already said what it is doing
    (SILENT); when it called `end_call`/`transfer_call` before saying anything in that turn
    (decide, call, then speak), the answer lets it speak its goodbye or handoff line
    (WHEN_IDLE). A lookup or webhook answer is spoken once the current sentence ends.
    """
    if name in ("end_call", "transfer_call") and spoke_first:
        return types.FunctionResponseScheduling.SILENT
    return types.FunctionResponseScheduling.WHEN_IDLE


def function_response(
    call_id: str,
    name: str,
    result: dict[str, Any],
    *,
    non_blocking: bool = True,
    spoke_first: bool = True,
) -> dict[str, Any]:
    """One entry of ``toolResponse.functionResponses`` as wire JSON.

    `spoke_first`: the agent had spoken in the turn in which it made the call.
    """
    response: dict[str, Any] = {"id": call_id, "name": name, "response": result}
    if non_blocking:
        response["scheduling"] = response_scheduling(name, spoke_first).value
    return response


# ---------------------------------------------------------------- argument checks


class ArgumentError(ValueError):
    """Arguments that do not fit the declaration; the message is written for the model."""


_TYPE_NAMES = {
    types.Type.STRING: "a string",
    types.Type.INTEGER: "an integer",
    types.Type.NUMBER: "a number",
    types.Type.BOOLEAN: "true or false",
    types.Type.ARRAY: "a list",
    types.Type.OBJECT: "an object",
}


def _check(value: Any, schema: types.Schema, path: str) -> Any:
    """`value` checked (and lightly normalised: 3.0 -> 3 for integers) against `schema`."""
    where = path or "arguments"
    if value is None:
        if schema.nullable or schema.type in (None, types.Type.NULL):
            return None
        raise ArgumentError(f"{where} must not be null")
    if schema.any_of:
        for option in schema.any_of:
            try:
                return _check(value, option, path)
            except ArgumentError:
                continue
        raise ArgumentError(f"{where} does not match any allowed form")
    kind = schema.type
    if kind == types.Type.OBJECT:
        if not isinstance(value, dict):
            raise ArgumentError(f"{where} must be {_TYPE_NAMES[kind]}")
        props = schema.properties or {}
        missing = [r for r in schema.required or [] if value.get(r) is None]
        if missing:
            raise ArgumentError(f"missing required argument(s): {', '.join(missing)}")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key in props:
                out[key] = _check(item, props[key], f"{path}.{key}" if path else key)
            elif not props and schema.properties is None:
                out[key] = item  # a free-form object
            # unknown keys are dropped: models sometimes invent extras, the target never sees them
        return out
    if kind == types.Type.ARRAY:
        if not isinstance(value, list):
            raise ArgumentError(f"{where} must be {_TYPE_NAMES[kind]}")
        if schema.min_items is not None and len(value) < int(schema.min_items):
            raise ArgumentError(f"{where} needs at least {schema.min_items} item(s)")
        if schema.max_items is not None and len(value) > int(schema.max_items):
            raise ArgumentError(f"{where} allows at most {schema.max_items} item(s)")
        if schema.items is None:
            return value
        return [_check(v, schema.items, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == types.Type.STRING:
        if not isinstance(value, str):
            raise ArgumentError(f"{where} must be {_TYPE_NAMES[kind]}")
        if schema.min_length is not None and len(value) < int(schema.min_length):
            raise ArgumentError(f"{where} must be at least {schema.min_length} characters")
        if schema.max_length is not None and len(value) > int(schema.max_length):
            raise ArgumentError(f"{where} must be at most {schema.max_length} characters")
        if schema.enum and value not in schema.enum:
            # "Manager" for "manager": the intent is clear, take the declared spelling.
            folded = [e for e in schema.enum if e.casefold() == value.strip().casefold()]
            value = folded[0] if len(folded) == 1 else value
        if schema.pattern and not re.search(schema.pattern, value):
            raise ArgumentError(f"{where} {value!r} does not match {schema.pattern}")
    elif kind == types.Type.INTEGER:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"{where} must be {_TYPE_NAMES[kind]}")
    elif kind == types.Type.NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ArgumentError(f"{where} must be {_TYPE_NAMES[kind]}")
    elif kind == types.Type.BOOLEAN and not isinstance(value, bool):
        raise ArgumentError(f"{where} must be {_TYPE_NAMES[kind]}")
    if kind in (types.Type.INTEGER, types.Type.NUMBER):
        if schema.minimum is not None and value < schema.minimum:
            raise ArgumentError(f"{where} must be at least {schema.minimum:g}")
        if schema.maximum is not None and value > schema.maximum:
            raise ArgumentError(f"{where} must be at most {schema.maximum:g}")
    if schema.enum and str(value) not in schema.enum:
        raise ArgumentError(f"{where} must be one of: {', '.join(schema.enum)}")
    return value


def validate_args(declaration: types.FunctionDeclaration, args: Any) -> dict[str, Any]:
    """`args` checked against the declaration's parameters; raises `ArgumentError`."""
    schema = declaration.parameters or types.Schema(type=types.Type.OBJECT, properties={})
    result = _check({} if args is None else args, schema, "")
    assert isinstance(result, dict)
    return result


def _json_safe(value: Any) -> dict[str, Any]:
    """Whatever a tool returned, as a dict that `json.dumps` accepts."""
    if not isinstance(value, dict):
        value = {"result": value}
    safe: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return safe


# ------------------------------------------------------------------------ runner


class ToolRunner:
    """Runs the model's function calls for one call, each bounded in time, never raising.

    `run` is the whole contract: validation, dispatch, timeout, a dict back. `start`/`cancel`
    add bookkeeping by call id for the bridge: start a task per function call, cancel the ids
    Gemini withdraws, `aclose` at hang-up.
    """

    def __init__(
        self,
        profile: AgentProfile,
        actions: CallActions,
        knowledge: FallbackSource | KnowledgeBase | None = None,
        http: HttpToolRunner | CallToolRunner | None = None,
        *,
        non_blocking: bool = True,
    ) -> None:
        self.profile = profile
        self.actions = actions
        self.knowledge = (
            FallbackSource(LocalSource(knowledge))
            if isinstance(knowledge, KnowledgeBase)
            else knowledge
        )
        self.http = http
        self.declarations = {
            d.name: d for d in function_declarations(profile, non_blocking=non_blocking) if d.name
        }
        self._tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}

    async def run(
        self, name: str, args: dict[str, Any] | None, timeout_s: float = 10
    ) -> dict[str, Any]:
        """Run one function call and return its result; errors come back as ``{"error": …}``.

        HTTP tools get at least their own `timeout_s` (plus a margin so their own, more precise
        timeout message wins). Cancelling the awaiting task cancels the tool: a
        CancelledError is never turned into a result.
        """
        declaration = self.declarations.get(name)
        if declaration is None:
            log.warning("tool.unknown", tool=name)
            known = ", ".join(self.declarations) or "none"
            return {"error": f"unknown tool {name!r}; available tools: {known}"}
        try:
            clean = validate_args(declaration, args)
        except ArgumentError as exc:
            log.warning("tool.bad_args", tool=name, problem=str(exc))
            return {"error": f"invalid arguments for {name}: {exc}"}

        spec = self.profile.http_tool(name)
        limit = max(timeout_s, spec.timeout_s + 1.0) if spec is not None else timeout_s
        try:
            async with asyncio.timeout(limit):
                result = await self._dispatch(name, clean)
        except TimeoutError:
            log.warning("tool.timeout", tool=name, timeout_s=limit)
            return {"error": f"{name} timed out after {limit:g} s"}
        except Exception as exc:  # a failing tool is an answer for the model, not a crash
            log.exception("tool.failed", tool=name)
            return {"error": f"{name} failed: {type(exc).__name__}: {exc}"}
        try:
            return _json_safe(result)
        except (TypeError, ValueError) as exc:
            return {"error": f"{name} returned a result that is not JSON: {exc}"}

    async def _dispatch(self, name: str, args: dict[str, Any]) -> Any:
        if name == "end_call":
            return await self.actions.end_call(args.get("reason") or "the agent ended the call")
        if name == "transfer_call":
            target = args["target"]
            number = self.profile.transfer_targets.get(target)
            if number is None:
                return {"error": f"unknown transfer target {target!r}"}
            return await self.actions.transfer(target, number, summary=args.get("summary"))
        if name == "send_dtmf":
            return await self.actions.send_dtmf(args["digits"])
        if name == "lookup":
            return await self._lookup(args["query"])
        spec = self.profile.http_tool(name)
        if spec is not None:
            if self.http is None:
                return {"error": f"{name} is not available on this call"}
            return await self.http.call(spec, args)
        return {"error": f"{name} is not available on this call"}

    async def _lookup(self, query: str) -> dict[str, Any]:
        if self.knowledge is None:
            return {"error": "lookup is not available: no documents are configured"}
        outcome = await self.knowledge.lookup(query, LOOKUP_RESULTS)
        if outcome.backend is None:
            return {
                "result": (
                    "The document search is not available right now. Tell the caller politely "
                    "that you can't look that up at the moment, and offer another way to help."
                ),
                "passages": [],
                "unavailable": True,
            }
        answer: dict[str, Any] = {"backend": outcome.backend}
        if outcome.degraded:
            answer["fallback"] = True
        if not outcome.passages:
            return {"result": "no matching passages in the documents", "passages": [], **answer}
        return {"passages": [p.as_dict() for p in outcome.passages], **answer}

    # ------------------------------------------------------------ bookkeeping

    def start(
        self,
        call_id: str,
        name: str,
        args: dict[str, Any] | None,
        *,
        timeout_s: float = 10,
        on_done: Callable[[str, str, dict[str, Any]], Awaitable[None] | None] | None = None,
    ) -> asyncio.Task[dict[str, Any]]:
        """Run a function call in its own task; `on_done(call_id, name, result)` when it ends.

        `on_done` is not called for a cancelled call: Gemini withdrew it and expects no answer.
        """

        async def job() -> dict[str, Any]:
            try:
                result = await self.run(name, args, timeout_s)
            finally:
                self._tasks.pop(call_id, None)
            if on_done is not None:
                try:
                    maybe = on_done(call_id, name, result)
                    if maybe is not None:
                        await maybe
                except Exception:
                    log.exception("tool.on_done_failed", tool=name, id=call_id)
            return result

        task = asyncio.create_task(job(), name=f"tool:{name}:{call_id}")
        self._tasks[call_id] = task
        return task

    def cancel(self, call_ids: Iterable[str]) -> list[str]:
        """Cancel running calls by id (``toolCallCancellation``); returns the ids cancelled."""
        cancelled = []
        for call_id in call_ids:
            task = self._tasks.pop(call_id, None)
            if task is not None and not task.done():
                task.cancel()
                cancelled.append(call_id)
        if cancelled:
            log.info("tool.cancelled", ids=cancelled)
        return cancelled

    @property
    def pending(self) -> list[str]:
        return [cid for cid, task in self._tasks.items() if not task.done()]

    async def aclose(self) -> None:
        """Cancel whatever is still running and wait for it to stop (at hang-up)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
