"""Live calls across instances through Redis: two `ClusterRegistry`s in one process are two
instances. Against the real local Redis (127.0.0.1:6379), each test under its own key prefix;
the outage test runs a private redis-server it can stop and restart."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livecall.cluster import ClusterRegistry, LocalRegistry, create_cluster
from support import eventually, redis_reachable, service_missing

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("LIVECALL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_url() -> str:
    if not await redis_reachable(REDIS_URL):
        service_missing(f"Redis is not reachable at {REDIS_URL}")
    return REDIS_URL


class Handler:
    """`on_control` for an instance: remembers what it was asked and answers `answer`."""

    def __init__(self, answer: bool | None = True) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.called = asyncio.Event()

    async def __call__(self, call_sid: str, action: str, args: dict[str, Any]) -> bool | None:
        self.calls.append((call_sid, action, args))
        self.called.set()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[ClusterRegistry]]]:
    """Starts instances under a prefix of this test's own; stops them and deletes its keys."""
    import redis.asyncio as aioredis

    prefix = f"lctest-{uuid.uuid4().hex[:10]}"
    made: list[ClusterRegistry] = []

    async def make(instance_id: str, **kw: Any) -> ClusterRegistry:
        kw.setdefault("ttl_s", 3.0)
        kw.setdefault("heartbeat_s", 0.5)
        reg = ClusterRegistry(redis_url, f"{prefix}-{instance_id}", prefix=prefix, **kw)
        made.append(reg)
        await reg.start()
        return reg

    yield make
    for reg in made:
        await reg.stop()
    client = aioredis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_instance_b_lists_and_ends_a_call_held_by_instance_a(cluster: Any) -> None:
    on_a = Handler()
    a = await cluster("a", on_control=on_a)
    b = await cluster("b", on_control=Handler())
    await a.announce("CA100", {"from": "+15550100", "profile": "sales"})

    calls = await b.list_calls()
    assert [(c["call_sid"], c["instance"], c["profile"]) for c in calls] == [
        ("CA100", a.instance_id, "sales")
    ]
    assert await b.locate("CA100") == a.instance_id

    assert await b.request("CA100", "end", reason="operator") is True
    assert on_a.calls == [("CA100", "end", {"reason": "operator"})]

    await a.withdraw("CA100")
    assert await b.list_calls() == []
    assert await b.request("CA100", "end") is False  # nobody holds it any more
    assert len(on_a.calls) == 1


async def test_transfer_args_refusals_and_failures_reach_the_requester(cluster: Any) -> None:
    on_a = Handler(answer=True)
    a = await cluster("a", on_control=on_a)
    b = await cluster("b")
    await a.announce("CA1", {})
    assert await b.request("CA1", "transfer", to="+15550199") is True
    assert on_a.calls[-1] == ("CA1", "transfer", {"to": "+15550199"})

    on_a.answer = False  # the handler declines (e.g. the call is already ending)
    assert await b.request("CA1", "transfer", to="+15550199") is False
    on_a.answer = RuntimeError("twilio said no")  # type: ignore[assignment]
    assert await b.request("CA1", "end") is False
    with pytest.raises(ValueError, match="unknown control action"):
        await b.request("CA1", "explode")
    assert await b.request("CA-nobody", "end") is False


async def test_fire_and_forget_and_local_calls(cluster: Any) -> None:
    on_a = Handler()
    a = await cluster("a", on_control=on_a)
    b = await cluster("b")
    await a.announce("CA2", {})
    assert await b.request("CA2", "end", ack_timeout=None) is True
    async with asyncio.timeout(5):
        await on_a.called.wait()
    # a call held here is handled directly
    on_a.calls.clear()
    assert await a.request("CA2", "end", reason="api") is True
    assert on_a.calls == [("CA2", "end", {"reason": "api"})]


async def test_instances_are_listed_with_their_call_counts(cluster: Any) -> None:
    a = await cluster("a")
    b = await cluster("b")
    await a.announce("CA3", {})
    await a.announce("CA4", {})

    async def both() -> dict[str, int] | None:
        got = {i["instance"]: i["calls"] for i in await b.list_instances()}
        return got if got.get(a.instance_id) == 2 and b.instance_id in got else None

    counts = await eventually(both, within=5.0)
    assert counts[b.instance_id] == 0
    assert sorted(c["call_sid"] for c in await b.list_calls()) == ["CA3", "CA4"]


async def test_a_call_taken_over_by_another_instance_stays_with_it(cluster: Any) -> None:
    a = await cluster("a", heartbeat_s=0.1)
    b = await cluster("b")
    await a.announce("CA5", {"leg": "first"})
    await b.announce("CA5", {"leg": "second"})  # a newer stream for the call landed on b
    assert await a.locate("CA5") == a.instance_id  # a still thinks it's local…
    assert await b.locate("CA5") == b.instance_id
    await a._beat()  # …but its heartbeat does not steal the call back
    assert [(c["instance"], c["leg"]) for c in await b.list_calls()] == [(b.instance_id, "second")]
    await a.withdraw("CA5")  # nor does its withdraw remove b's entry
    assert [c["instance"] for c in await a.list_calls()] == [b.instance_id]


async def test_heartbeat_refreshes_the_ttl_of_every_local_call(cluster: Any) -> None:
    a = await cluster("a", ttl_s=2.0, heartbeat_s=0.2)
    await a.announce("CA6", {})
    await a.announce("CA6b", {})
    keys = [f"{a.prefix}:call:CA6", f"{a.prefix}:call:CA6b"]
    last = [await a._redis.pttl(k) for k in keys]
    assert all(0 < t <= 2000 for t in last)
    rose = [False, False]

    async def both_refreshed() -> bool:  # the TTL counts down, then jumps back up
        for i, key in enumerate(keys):
            now = await a._redis.pttl(key)
            rose[i] = rose[i] or now > last[i]
            last[i] = now
        return all(rose)

    await eventually(both_refreshed, within=10.0)  # heartbeats every 0.2 s: a loaded CI box too


async def test_a_crashed_instance_s_calls_expire_by_ttl(cluster: Any) -> None:
    a = await cluster("a", ttl_s=1.0, heartbeat_s=0.25)
    b = await cluster("b")
    await a.announce("CA7", {})
    assert [c["call_sid"] for c in await b.list_calls()] == ["CA7"]

    await a.stop(withdraw_calls=False)  # as a crash would: nothing cleaned up
    # until the TTL runs out the call is still listed, but nobody answers for it
    assert await b.request("CA7", "end") is False

    async def gone() -> bool:
        return await b.list_calls() == []

    await eventually(gone, within=1.0 + 10.0)  # the TTL, and slack for a loaded CI box
    assert a.instance_id not in {i["instance"] for i in await b.list_instances()}


async def test_a_graceful_stop_withdraws_at_once(cluster: Any) -> None:
    a = await cluster("a")
    b = await cluster("b")
    await a.announce("CA8", {})
    await a.stop()
    assert await b.list_calls() == []


async def test_local_registry_has_the_same_interface() -> None:
    handler = Handler()
    reg = create_cluster(None, "solo", on_control=handler)
    assert isinstance(reg, LocalRegistry)
    await reg.start()
    await reg.announce("CA9", {"profile": "support"})
    assert await reg.list_calls() == [
        {
            "profile": "support",
            "call_sid": "CA9",
            "instance": "solo",
            "announced_at": (await reg.list_calls())[0]["announced_at"],
        }
    ]
    assert await reg.locate("CA9") == "solo"
    assert await reg.request("CA9", "end", reason="api") is True
    assert handler.calls == [("CA9", "end", {"reason": "api"})]
    await reg.withdraw("CA9")
    assert await reg.request("CA9", "end") is False
    await reg.stop()
    assert isinstance(create_cluster("redis://127.0.0.1:1"), ClusterRegistry)


# ---------------------------------------------------------------- Redis outage and restart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that it may stop and start again."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir = binary, port, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis(binary, _free_port(), tmp_path)
    yield server
    server.stop()


async def test_redis_down_then_restarted_never_touches_local_calls(
    private_redis: PrivateRedis,
) -> None:
    on_a = Handler()
    opts: dict[str, Any] = {
        "ttl_s": 2.0,
        "heartbeat_s": 0.2,
        "op_timeout_s": 0.5,
        "max_backoff_s": 0.4,
        "prefix": "outage",
    }
    a = ClusterRegistry(private_redis.url, "a", on_control=on_a, **opts)
    b = ClusterRegistry(private_redis.url, "b", **opts)
    try:
        # Redis is not there: nothing raises, local calls work, remote ones are unknown
        async with asyncio.timeout(3):
            await a.start()
            await a.announce("CA1", {"n": 1})
        assert not a.connected
        assert [c["call_sid"] for c in await a.list_calls()] == ["CA1"]  # local only
        assert await a.request("CA1", "end", reason="api") is True  # handled here
        assert await a.request("CA-elsewhere", "end") is False

        # Redis comes up: a's heartbeat writes its calls, its subscriber reconnects
        private_redis.start()
        await eventually(lambda: redis_reachable(private_redis.url), within=5.0)
        await b.start()

        async def b_sees_ca1() -> bool:
            return [c["call_sid"] for c in await b.list_calls()] == ["CA1"]

        async def b_can_end_ca1() -> bool:
            return await b.request("CA1", "end", ack_timeout=0.5)

        await eventually(b_sees_ca1, within=5.0)
        await eventually(b_can_end_ca1, within=5.0)
        assert a.connected

        # Redis restarts empty: everything is written back and control works again
        private_redis.stop()
        private_redis.start()
        await eventually(lambda: redis_reachable(private_redis.url), within=5.0)
        await eventually(b_sees_ca1, within=5.0)
        on_a.calls.clear()
        await eventually(b_can_end_ca1, within=5.0)
        assert on_a.calls[0] == ("CA1", "end", {})
    finally:
        await a.stop()
        await b.stop()
