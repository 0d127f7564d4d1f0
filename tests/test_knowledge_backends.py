"""Knowledge backends behind `lookup`: Vertex AI Search through Google's own client against
the simulated service, the local index as its fallback, the polite answer when nothing can
be searched, the failure breaker, and Gemini's Google Search grounding switch."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from livecall.agent.knowledge import KnowledgeBase
from livecall.agent.knowledge_sources import (
    FallbackSource,
    LocalSource,
    SearchUnavailable,
    VertexSearch,
    VertexSearchTarget,
    passages_from_results,
)
from livecall.agent.profiles import AgentProfile, ProfileError, ProfileSet
from livecall.settings import Settings
from livecall.sim.vertex_search import SimDocument, VertexSearchSim, serve_vertex_search

DOCS = [
    SimDocument(
        "hours",
        "Opening hours",
        "We open at noon on Sundays. On weekdays we open at eleven.",
        "https://bella.example/hours",
    ),
    SimDocument("parking", "Parking", "Free parking behind the restaurant after six."),
]


@pytest.fixture
async def vertex() -> AsyncIterator[tuple[VertexSearchSim, str]]:
    sim = VertexSearchSim(documents=list(DOCS))
    async with serve_vertex_search(sim) as endpoint:
        yield sim, endpoint


def target(endpoint: str, **overrides: Any) -> VertexSearchTarget:
    values: dict[str, Any] = {"project": "sim-project", "data_store": "sim-store"}
    return VertexSearchTarget(endpoint=endpoint, **{**values, **overrides})


@pytest.fixture
def local_docs(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hours.md").write_text("# Hours\n\n## Sundays\n\nLocal copy: Sundays from noon.\n")
    return docs


# ----------------------------------------------------------------------------- pure parts


def test_serving_config_paths_and_endpoints() -> None:
    store = VertexSearchTarget(project="p", location="eu", data_store="faq")
    assert store.serving_config_path == (
        "projects/p/locations/eu/collections/default_collection/dataStores/faq/"
        "servingConfigs/default_search"
    )
    assert store.host_and_scheme() == ("eu-discoveryengine.googleapis.com", "https")
    app = VertexSearchTarget(project="p", engine="front-desk")
    assert "/engines/front-desk/servingConfigs/default_search" in app.serving_config_path
    assert app.host_and_scheme() == ("discoveryengine.googleapis.com", "https")


def test_results_become_plain_spoken_passages_with_their_source() -> None:
    results = [
        {
            "document": {
                "id": "d1",
                "derived_struct_data": {
                    "title": "Menu &amp; prices",
                    "snippets": [{"snippet": "Pizza <b>Margherita</b> costs &quot;12&quot;"}],
                },
            }
        },
        {"document": {"id": "empty", "derived_struct_data": {"title": "nothing"}}},
        {
            "document": {
                "id": "d2",
                "derived_struct_data": {
                    "title": "FAQ",
                    "extractive_answers": [{"content": "We  deliver\nuntil ten."}],
                    "snippets": [{"snippet": "ignored when an extractive answer exists"}],
                },
            }
        },
    ]
    passages = passages_from_results(results)
    assert [(p.source, p.text) for p in passages] == [
        ("Menu & prices", 'Pizza Margherita costs "12"'),
        ("FAQ", "We deliver until ten."),
    ]
    assert passages[0].score > passages[1].score


def _profile(**knowledge: Any) -> dict[str, Any]:
    return {"name": "a", "default": True, "system_prompt": "x", "tools": ["lookup"], **knowledge}


def _load(tmp_path: Path, profile: dict[str, Any]) -> AgentProfile:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump({"profiles": [profile]}))
    return ProfileSet.load(path, Settings()).profiles[0]


def test_profile_knowledge_settings_are_checked(tmp_path: Path) -> None:
    vertex = {"project": "p", "data_store": "faq"}
    profile = _load(
        tmp_path,
        _profile(
            knowledge={"backend": "vertex_search", "vertex_search": vertex, "fallback": "none"}
        ),
    )
    assert profile.knowledge.backend == "vertex_search" and profile.knowledge.timeout_s == 3.0
    bad = [
        ({"backend": "vertex_search"}, "needs a vertex_search"),
        ({"backend": "vertex_search", "vertex_search": vertex}, "fallback local needs"),
        (
            {"backend": "vertex_search", "fallback": "none", "vertex_search": {"project": "p"}},
            "exactly one of data_store or engine",
        ),
        (
            {
                "backend": "vertex_search",
                "fallback": "none",
                "vertex_search": {**vertex, "endpoint": "http://search.example.com"},
            },
            "only for a simulator",
        ),
    ]
    for knowledge, problem in bad:
        with pytest.raises(ProfileError, match=problem):
            _load(tmp_path, _profile(knowledge=knowledge))


# ------------------------------------------------------- Google's client against the fake


async def test_vertex_search_answers_through_the_official_client(
    vertex: tuple[VertexSearchSim, str],
) -> None:
    sim, endpoint = vertex
    passages = await VertexSearch(target(endpoint)).asearch("When do you open on Sunday?", 3)
    assert passages[0].source == "Opening hours"
    assert "noon on Sundays" in passages[0].text
    sent = sim.requests[-1]
    assert sent["query"] == "When do you open on Sunday?" and sent["pageSize"] == 3
    assert sent["contentSearchSpec"]["snippetSpec"]["returnSnippet"] is True


async def test_vertex_search_failures_are_bounded_and_named(
    vertex: tuple[VertexSearchSim, str],
) -> None:
    sim, endpoint = vertex
    sim.fail_status = 503
    with pytest.raises(SearchUnavailable, match="503"):
        await VertexSearch(target(endpoint)).asearch("open", 3)
    sim.fail_status = None
    with pytest.raises(SearchUnavailable, match="404"):
        await VertexSearch(target(endpoint, data_store="other")).asearch("open", 3)
    sim.delay_s = 5.0
    started = time.monotonic()
    with pytest.raises(SearchUnavailable):
        await VertexSearch(target(endpoint), timeout_s=0.5).asearch("open", 3)
    assert time.monotonic() - started < 2.0


async def test_a_failing_backend_falls_back_to_the_local_index_then_is_skipped(
    vertex: tuple[VertexSearchSim, str], local_docs: Path
) -> None:
    sim, endpoint = vertex
    kb = KnowledgeBase(local_docs)
    try:
        source = FallbackSource(VertexSearch(target(endpoint)), LocalSource(kb))
        healthy = await source.lookup("Sunday opening", 3)
        assert healthy.backend == "vertex_search" and healthy.degraded is None

        sim.fail_status = 500
        asked = len(sim.queries)
        for _ in range(3):
            outcome = await source.lookup("Sunday opening", 3)
            assert outcome.backend == "local"
            assert outcome.degraded and "vertex_search unavailable" in outcome.degraded
            assert "Local copy" in outcome.passages[0].text
        assert len(sim.queries) == asked + 3
        # three failures in a row: the remote backend is skipped, callers do not wait on it
        skipped = await source.lookup("Sunday opening", 3)
        assert skipped.backend == "local" and "skipped" in (skipped.degraded or "")
        assert len(sim.queries) == asked + 3
    finally:
        kb.close()


async def test_without_a_fallback_the_agent_is_told_to_say_it_cannot_look_it_up(
    vertex: tuple[VertexSearchSim, str],
) -> None:
    from livecall.agent.tools import ToolRunner

    sim, endpoint = vertex
    sim.fail_status = 503
    profile = AgentProfile(
        name="a",
        system_prompt="x",
        voice="Kore",
        language="en-US",
        model="m",
        max_call_duration_s=60,
        tools=["lookup"],
        knowledge={
            "backend": "vertex_search",
            "fallback": "none",
            "vertex_search": {"project": "sim-project", "data_store": "sim-store"},
        },
    )

    class NoActions:
        pass

    runner = ToolRunner(profile, NoActions(), FallbackSource(VertexSearch(target(endpoint))))  # type: ignore[arg-type]
    result = await runner.run("lookup", {"query": "opening hours"})
    assert result["unavailable"] is True and result["passages"] == []
    assert "can't look that up" in result["result"]


# ------------------------------------------------------------ a real call through livecall


def _profiles_file(tmp_path: Path, **profile: Any) -> Path:
    path = tmp_path / "profiles.yaml"
    base = {"name": "agent", "default": True, "system_prompt": "You answer for Bella Vista."}
    path.write_text(yaml.safe_dump({"profiles": [{**base, **profile}]}))
    return path


async def _lookup_call(make_stack: Any, profiles: Path) -> tuple[dict[str, Any], Any]:
    """A call whose caller asks a question the model looks up; returns its answer and record."""
    from livecall.sim.clips import load_clip
    from livecall.sim.gemini import Scenario, ToolCallFault
    from livecall.sim.twilio import Say, WaitForAgentSilence

    scenario = Scenario(
        seed=4,
        tool_calls=[
            ToolCallFault(
                after_caller_turn=1,
                name="lookup",
                args={"query": "When do you open on Sundays?"},
                reply="one_moment",
            )
        ],
    )
    stack = await make_stack(scenario, profiles_file=profiles, recording_enabled=False)
    samples, rate = load_clip("yes")
    result = await stack.caller(
        [Say(samples, rate, "yes"), WaitForAgentSilence(silence_ms=500, timeout=10)], timeout=30
    ).run()
    assert not result.protocol_errors, result.protocol_errors
    state = stack.app.state.livecall
    assert await state.registry.wait_idle(15)
    assert await state.store.flush()
    record = await state.store.repo.get_call(result.call_sid)
    answer = {r.name: r.response for r in stack.gemini.sessions[-1].tool_responses}["lookup"]
    return answer, record


async def test_a_call_looks_up_through_vertex_search_and_cites_it(
    make_stack: Any, tmp_path: Path, vertex: tuple[VertexSearchSim, str]
) -> None:
    sim, endpoint = vertex
    profiles = _profiles_file(
        tmp_path,
        tools=["lookup"],
        knowledge={
            "backend": "vertex_search",
            "fallback": "none",
            "vertex_search": {
                "project": "sim-project",
                "data_store": "sim-store",
                "endpoint": endpoint,
            },
        },
    )
    answer, record = await _lookup_call(make_stack, profiles)
    assert sim.queries == ["When do you open on Sundays?"]
    assert answer["backend"] == "vertex_search"
    assert answer["passages"][0]["source"] == "Opening hours"
    cited = next(e for e in record.events if e.kind == "tool_result").data["result"]
    assert cited["passages"][0]["source"] == "Opening hours"


async def test_a_call_falls_back_to_local_documents_when_vertex_search_is_down(
    make_stack: Any, tmp_path: Path, vertex: tuple[VertexSearchSim, str], local_docs: Path
) -> None:
    sim, endpoint = vertex
    sim.fail_status = 503
    profiles = _profiles_file(
        tmp_path,
        tools=["lookup"],
        knowledge_dir=str(local_docs),
        knowledge={
            "backend": "vertex_search",
            "vertex_search": {
                "project": "sim-project",
                "data_store": "sim-store",
                "endpoint": endpoint,
            },
        },
    )
    answer, record = await _lookup_call(make_stack, profiles)
    assert answer["backend"] == "local" and answer["fallback"] is True
    assert answer["passages"][0]["source"] == "hours.md › Sundays"
    assert record is not None


async def test_google_search_grounding_is_a_profile_switch(make_stack: Any, tmp_path: Path) -> None:
    from livecall.sim.clips import load_clip
    from livecall.sim.twilio import Say

    profiles = _profiles_file(tmp_path, google_search=True)
    stack = await make_stack(profiles_file=profiles, recording_enabled=False)
    samples, rate = load_clip("yes")
    await stack.caller([Say(samples, rate, "yes")], timeout=30).run()
    tools = stack.gemini.sessions[-1].setup["tools"]
    assert {"googleSearch": {}} in tools
    assert any("functionDeclarations" in tool for tool in tools)  # end_call stays
