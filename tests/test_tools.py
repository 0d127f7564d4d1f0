"""The tool layer: declarations Gemini accepts, and a runner that always answers (or cancels)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from google.genai import types

from livecall.agent.http_tools import HttpToolRunner
from livecall.agent.knowledge import KnowledgeBase
from livecall.agent.profiles import AgentProfile, HttpToolSpec
from livecall.agent.tools import (
    CallActions,
    ToolRunner,
    function_declarations,
    function_response,
    validate_args,
)


class FakeActions:
    """The bridge's side: records what the agent did; `transfer` can be made to hang."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.transfer_started = asyncio.Event()
        self.transfer_cancelled = asyncio.Event()
        self.hang_transfer = False
        self.summaries: list[str | None] = []

    async def end_call(self, reason: str) -> dict[str, Any]:
        self.calls.append(("end_call", reason))
        return {"result": "ok"}

    async def transfer(
        self, target_name: str, number: str, summary: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("transfer", (target_name, number)))
        self.summaries.append(summary)
        self.transfer_started.set()
        if self.hang_transfer:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.transfer_cancelled.set()
                raise
        return {"result": f"transferring to {target_name}"}

    async def send_dtmf(self, digits: str) -> dict[str, Any]:
        self.calls.append(("send_dtmf", digits))
        if digits == "0000":
            raise RuntimeError("stream closed")
        return {"result": "sent", "digits": digits}


def profile(tmp_path: Path, **kw: Any) -> AgentProfile:
    values: dict[str, Any] = {
        "name": "front-desk",
        "system_prompt": "You are the front desk.",
        "voice": "Kore",
        "language": "en-US",
        "model": "gemini-3.8-live",
        "max_call_duration_s": 600,
        "tools": ["end_call", "transfer_call", "send_dtmf", "lookup"],
        "transfer_targets": {"manager": "+15551239999", "support": "sip:help@pbx.example.com"},
        "knowledge_dir": tmp_path,
        "http_tools": [
            HttpToolSpec(
                name="check_order",
                description="Look up an order's status.",
                url="http://shop.test/orders",
                method="GET",
                parameters={
                    "type": "object",
                    "properties": {
                        "order_id": {"type": "string", "pattern": "^[A-Z][0-9]+$"},
                        "count": {"type": "integer", "minimum": 1},
                    },
                    "required": ["order_id"],
                },
            )
        ],
    }
    values.update(kw)
    return AgentProfile(**values)


@pytest.fixture
def actions() -> FakeActions:
    return FakeActions()


@pytest.fixture
async def runner(tmp_path: Path, actions: FakeActions):
    (tmp_path / "hours.md").write_text("# Hours\n\nOpen daily from 11am to 10pm.\n")
    app = FastAPI()

    @app.get("/orders")
    async def orders(order_id: str, count: int = 1) -> dict[str, Any]:
        return {"order_id": order_id, "count": count, "status": "baking"}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        yield ToolRunner(
            profile(tmp_path), actions, KnowledgeBase(tmp_path), HttpToolRunner(client)
        )


def test_declarations_are_valid_and_non_blocking(tmp_path: Path) -> None:
    decls = function_declarations(profile(tmp_path))
    assert [d.name for d in decls] == [
        "end_call",
        "transfer_call",
        "send_dtmf",
        "lookup",
        "check_order",
    ]
    for decl in decls:
        # Each survives a round trip through the SDK type, as the setup frame needs.
        assert types.FunctionDeclaration.model_validate(decl.model_dump()) == decl
        assert decl.behavior == types.Behavior.NON_BLOCKING
        assert decl.description and decl.parameters.type == types.Type.OBJECT
    by_name = {d.name: d for d in decls}
    target = by_name["transfer_call"].parameters.properties["target"]
    assert target.enum == ["manager", "support"]
    assert by_name["transfer_call"].parameters.required == ["target"]
    assert by_name["send_dtmf"].parameters.properties["digits"].pattern == "^[0-9*#wW]{1,64}$"
    assert "goodbye" in by_name["end_call"].description.lower()
    assert by_name["check_order"].parameters.properties["order_id"].type == types.Type.STRING
    tool = types.Tool(function_declarations=decls)
    assert json.loads(tool.model_dump_json(exclude_none=True))  # serialisable for the wire

    blocking = function_declarations(profile(tmp_path), non_blocking=False)
    assert all(d.behavior is None for d in blocking)


def test_only_enabled_tools_are_declared(tmp_path: Path) -> None:
    decls = function_declarations(profile(tmp_path, tools=["end_call"], http_tools=[]))
    assert [d.name for d in decls] == ["end_call"]


def test_validate_args(tmp_path: Path) -> None:
    decls = {d.name: d for d in function_declarations(profile(tmp_path))}
    assert validate_args(decls["end_call"], None) == {}
    assert validate_args(decls["transfer_call"], {"target": "Manager"}) == {"target": "manager"}
    assert validate_args(decls["check_order"], {"order_id": "A1", "count": 2.0, "x": 1}) == {
        "order_id": "A1",
        "count": 2,
    }


async def test_actions_are_called(runner: ToolRunner, actions: FakeActions) -> None:
    assert await runner.run("end_call", {"reason": "caller said bye"}) == {"result": "ok"}
    assert await runner.run("transfer_call", {"target": "support"}) == {
        "result": "transferring to support"
    }
    assert await runner.run("send_dtmf", {"digits": "1w2#"}) == {"result": "sent", "digits": "1w2#"}
    assert actions.calls == [
        ("end_call", "caller said bye"),
        ("transfer", ("support", "sip:help@pbx.example.com")),
        ("send_dtmf", "1w2#"),
    ]
    assert isinstance(actions, CallActions)


async def test_lookup_and_http_tools(runner: ToolRunner) -> None:
    result = await runner.run("lookup", {"query": "when do you open"})
    (passage,) = result["passages"]
    assert passage["source"] == "hours.md › Hours" and "11am" in passage["text"]
    assert (await runner.run("lookup", {"query": "zebra"}))["passages"] == []

    order = await runner.run("check_order", {"order_id": "B12", "count": 3})
    assert order == {"result": {"order_id": "B12", "count": 3, "status": "baking"}}


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("fly", {}, "unknown tool 'fly'; available tools: end_call, transfer_call"),
        (
            "transfer_call",
            {},
            "invalid arguments for transfer_call: missing required argument(s): target",
        ),
        ("transfer_call", {"target": "ceo"}, "target must be one of: manager, support"),
        ("send_dtmf", {"digits": "12x"}, "digits '12x' does not match"),
        ("send_dtmf", {"digits": 12}, "digits must be a string"),
        ("lookup", "not a dict", "arguments must be an object"),
        ("check_order", {"order_id": "b1"}, "order_id 'b1' does not match"),
        ("check_order", {"order_id": "B1", "count": 0}, "count must be at least 1"),
        ("check_order", {"order_id": "B1", "count": True}, "count must be an integer"),
        ("check_order", {"order_id": None}, "missing required argument(s): order_id"),
    ],
)
async def test_bad_calls_become_error_results(
    runner: ToolRunner, actions: FakeActions, name: str, args: Any, expected: str
) -> None:
    result = await runner.run(name, args)
    assert set(result) == {"error"} and expected in result["error"]
    assert actions.calls == []


async def test_failing_action_is_an_error_result(runner: ToolRunner) -> None:
    result = await runner.run("send_dtmf", {"digits": "0000"})
    assert result == {"error": "send_dtmf failed: RuntimeError: stream closed"}


async def test_timeout_is_an_error_result(runner: ToolRunner, actions: FakeActions) -> None:
    actions.hang_transfer = True
    result = await runner.run("transfer_call", {"target": "manager"}, timeout_s=0.05)
    assert result == {"error": "transfer_call timed out after 0.05 s"}
    assert actions.transfer_cancelled.is_set()  # the stuck action was stopped


async def test_cancellation_propagates(runner: ToolRunner, actions: FakeActions) -> None:
    actions.hang_transfer = True
    done: list[str] = []
    task = runner.start(
        "fc-1",
        "transfer_call",
        {"target": "manager"},
        on_done=lambda cid, name, res: done.append(cid),
    )
    await asyncio.wait_for(actions.transfer_started.wait(), 5)
    assert runner.pending == ["fc-1"]
    assert runner.cancel(["fc-1", "fc-unknown"]) == ["fc-1"]
    with pytest.raises(asyncio.CancelledError):
        await task
    assert actions.transfer_cancelled.is_set() and done == [] and runner.pending == []


async def test_start_reports_results_and_aclose_cancels(
    runner: ToolRunner, actions: FakeActions
) -> None:
    results: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()

    async def on_done(cid: str, name: str, result: dict[str, Any]) -> None:
        await results.put((cid, name, result))

    runner.start("fc-2", "end_call", {}, on_done=on_done)
    cid, name, result = await asyncio.wait_for(results.get(), 5)
    assert (cid, name, result) == ("fc-2", "end_call", {"result": "ok"})
    assert actions.calls == [("end_call", "the agent ended the call")]

    actions.hang_transfer = True
    task = runner.start("fc-3", "transfer_call", {"target": "manager"}, on_done=on_done)
    await asyncio.wait_for(actions.transfer_started.wait(), 5)
    await runner.aclose()
    assert task.cancelled() and results.empty()


async def test_missing_services_are_error_results(tmp_path: Path, actions: FakeActions) -> None:
    bare = ToolRunner(profile(tmp_path), actions)
    assert "not available" in (await bare.run("lookup", {"query": "hours"}))["error"]
    assert "not available" in (await bare.run("check_order", {"order_id": "A1"}))["error"]


async def test_results_are_json_safe(tmp_path: Path) -> None:
    class OddActions(FakeActions):
        async def end_call(self, reason: str) -> Any:
            return Path("/tmp/x")  # not a dict, not JSON

    runner = ToolRunner(profile(tmp_path), OddActions())
    result = await runner.run("end_call", {})
    assert result == {"result": "/tmp/x"} and json.dumps(result)


def test_function_response_wire_shape() -> None:
    assert function_response("fc-1", "lookup", {"passages": []}) == {
        "id": "fc-1",
        "name": "lookup",
        "response": {"passages": []},
        "scheduling": "WHEN_IDLE",
    }
    assert function_response("fc-2", "end_call", {"result": "ok"})["scheduling"] == "SILENT"
    assert "scheduling" not in function_response("fc-3", "x", {}, non_blocking=False)


def test_http_tool_without_parameters_declares_none(tmp_path: Path) -> None:
    bare = HttpToolSpec(name="ping", description="Check the shop is up.", url="https://x.test")
    (decl,) = function_declarations(profile(tmp_path, tools=[], http_tools=[bare]))
    assert decl.parameters is None
    assert validate_args(decl, {"junk": 1}) == {}
