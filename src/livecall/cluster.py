"""Live calls across instances: which process holds which call, and how to reach it there.

A call lives in exactly one process (its WebSocket is there), but the API or dashboard that
wants to list, end or transfer it may be served by any instance. Each process is one instance
(`ClusterRegistry`) that keeps its calls in Redis:

- `{prefix}:call:{sid}` hash (call_sid, instance, announced_at, info JSON) with a TTL that the
  heartbeat refreshes for every local call, plus `{prefix}:calls`, a sorted-set index of them;
- `{prefix}:instance:{id}` (JSON, TTL) and the `{prefix}:instances` index;
- control requests are published on `{prefix}:control:{instance}`; the holder runs its
  `on_control(call_sid, action, args)` and answers on the requester's `{prefix}:ack:{instance}`.

An instance that dies stops heartbeating, so its calls vanish from listings after `ttl_s`.
Redis going away never touches the calls themselves: operations log and return, the heartbeat
writes everything back once Redis answers again (a restarted Redis holds nothing), and the
subscriber reconnects with exponential backoff. Control requests sent during an outage are
lost (Redis pub/sub keeps nothing), so `request()` answers False and the caller may retry.

Anyone who can write to this Redis can end calls: it must be private to the deployment.
With no Redis (`create_cluster(None)`), `LocalRegistry` gives the same interface in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

__all__ = [
    "ACTIONS",
    "ClusterRegistry",
    "ControlHandler",
    "LiveCalls",
    "LocalRegistry",
    "create_cluster",
    "default_instance_id",
]

log = structlog.get_logger("livecall.cluster")

#: What another instance may ask the holder of a call to do.
ACTIONS = frozenset({"end", "transfer"})

#: `on_control(call_sid, action, args)`: True/None = done, False = not done (call gone, refused).
ControlHandler = Callable[[str, str, dict[str, Any]], Awaitable[bool | None] | bool | None]

LIVE_QUEUE = 1000  # live-feed messages waiting for Redis, at most
_REFRESH_CHUNK = 200  # calls per heartbeat script run: keeps each Redis step short

# KEYS: calls index, then one hash key per call. ARGV: instance, ttl_ms, now, then per call
# (sid, announced_at, info). Re-creates a hash that has expired or was lost (a restarted Redis),
# refreshes it if this instance owns it, and leaves it alone if another instance took the call.
_REFRESH_LUA = """
local id, ttl, now = ARGV[1], ARGV[2], ARGV[3]
local lost = 0
for j = 2, #KEYS do
  local a = 4 + 3 * (j - 2)
  local owner = redis.call('HGET', KEYS[j], 'instance')
  if not owner then
    redis.call('HSET', KEYS[j], 'call_sid', ARGV[a], 'instance', id,
               'announced_at', ARGV[a + 1], 'info', ARGV[a + 2])
    owner = id
  end
  if owner == id then
    redis.call('PEXPIRE', KEYS[j], ttl)
    redis.call('ZADD', KEYS[1], now, ARGV[a])
  else
    lost = lost + 1
  end
end
return lost
"""

# KEYS: call hash, calls index. ARGV: instance, sid. Only the owner removes a call.
_WITHDRAW_LUA = """
if redis.call('HGET', KEYS[1], 'instance') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def default_instance_id() -> str:
    """Host (the pod's name on Kubernetes), pid (one instance per worker) and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LiveCalls(Protocol):
    """What the server needs from a live-call registry, with or without Redis."""

    instance_id: str
    on_control: ControlHandler | None

    @property
    def connected(self) -> bool:
        """False while the shared store is unreachable (only this instance's calls are seen)."""
        ...

    async def start(self) -> None: ...
    async def stop(self, *, withdraw_calls: bool = True) -> None: ...
    async def announce(self, call_sid: str, info: dict[str, Any]) -> None: ...
    async def withdraw(self, call_sid: str) -> None: ...
    async def list_calls(self) -> list[dict[str, Any]]: ...
    async def locate(self, call_sid: str) -> str | None: ...
    async def request(
        self, call_sid: str, action: str, *, ack_timeout: float | None = 2.0, **args: Any
    ) -> bool: ...
    async def stash(self, key: str, value: str, ttl_s: float) -> bool: ...
    async def take(self, key: str) -> str | None: ...


@dataclass(slots=True)
class _Local:
    info: dict[str, Any]
    announced_at: str
    info_json: str


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _row(call_sid: str, call: _Local, instance_id: str) -> dict[str, Any]:
    return {
        **call.info,
        "call_sid": call_sid,
        "instance": instance_id,
        "announced_at": call.announced_at,
    }


def _check_action(action: str) -> None:
    if action not in ACTIONS:
        raise ValueError(f"unknown control action {action!r}; expected one of {sorted(ACTIONS)}")


async def _run_handler(
    handler: ControlHandler | None, call_sid: str, action: str, args: dict[str, Any]
) -> bool:
    """Runs the local handler; a failure is logged and reported as not done."""
    if handler is None:
        log.warning("cluster.no_control_handler", call_sid=call_sid, action=action)
        return False
    try:
        result = handler(call_sid, action, args)
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        log.exception("cluster.control_failed", call_sid=call_sid, action=action)
        return False
    return result is not False


class LocalRegistry:
    """The same interface for a single instance without Redis: calls are this process's."""

    def __init__(
        self, instance_id: str | None = None, *, on_control: ControlHandler | None = None
    ) -> None:
        self.instance_id = instance_id or default_instance_id()
        self.on_control = on_control
        self._calls: dict[str, _Local] = {}

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self, *, withdraw_calls: bool = True) -> None:
        self._calls.clear()

    async def announce(self, call_sid: str, info: dict[str, Any]) -> None:
        self._calls[call_sid] = _Local(dict(info), _now_iso(), "")

    async def withdraw(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)

    async def list_calls(self) -> list[dict[str, Any]]:
        return [_row(sid, c, self.instance_id) for sid, c in self._calls.items()]

    async def locate(self, call_sid: str) -> str | None:
        return self.instance_id if call_sid in self._calls else None

    async def request(
        self, call_sid: str, action: str, *, ack_timeout: float | None = 2.0, **args: Any
    ) -> bool:
        _check_action(action)
        if call_sid not in self._calls:
            return False
        return await _run_handler(self.on_control, call_sid, action, args)

    async def stash(self, key: str, value: str, ttl_s: float) -> bool:
        """No shared store without Redis: nothing is kept (the caller keeps its own copy)."""
        return False

    async def take(self, key: str) -> str | None:
        raise LookupError("no shared store without Redis")


class ClusterRegistry:
    """This instance's live calls in Redis, and control of any instance's calls through it."""

    def __init__(
        self,
        redis_url: str,
        instance_id: str | None = None,
        *,
        ttl_s: float = 15.0,
        heartbeat_s: float = 5.0,
        prefix: str = "livecall",
        on_control: ControlHandler | None = None,
        op_timeout_s: float = 2.0,
        instance_info: dict[str, Any] | None = None,
        max_backoff_s: float = 5.0,
    ) -> None:
        if heartbeat_s >= ttl_s:
            raise ValueError("heartbeat_s must be shorter than ttl_s (a call would blink out)")
        self.redis_url = redis_url
        self.instance_id = instance_id or default_instance_id()
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.prefix = prefix
        self.on_control = on_control
        self.op_timeout_s = op_timeout_s
        self.instance_info = dict(instance_info or {})
        self.max_backoff_s = max_backoff_s
        self._calls: dict[str, _Local] = {}
        self._redis: Any = None
        self._pubsub_redis: Any = None
        self._refresh: Any = None
        self._withdraw: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._acks: dict[str, asyncio.Future[bool]] = {}
        self._healthy = True
        self._subscribed = asyncio.Event()
        self._first_listen = asyncio.Event()
        self._stopping = False
        self._started_at = _now_iso()
        # the live feed across instances: this process's messages out, others' in
        self.on_live: Callable[[dict[str, Any]], None] | None = None
        self._live_out: asyncio.Queue[str] = asyncio.Queue(LIVE_QUEUE)

    # ------------------------------------------------------------------ keys
    def _call_key(self, call_sid: str) -> str:
        return f"{self.prefix}:call:{call_sid}"

    @property
    def _calls_index(self) -> str:
        return f"{self.prefix}:calls"

    def _instance_key(self, instance_id: str) -> str:
        return f"{self.prefix}:instance:{instance_id}"

    @property
    def _instances_index(self) -> str:
        return f"{self.prefix}:instances"

    def control_channel(self, instance_id: str) -> str:
        return f"{self.prefix}:control:{instance_id}"

    def _ack_channel(self, instance_id: str) -> str:
        return f"{self.prefix}:ack:{instance_id}"

    @property
    def live_channel(self) -> str:
        return f"{self.prefix}:live"

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    @property
    def _index_margin_s(self) -> float:
        # The index is only a list of candidates (a hash's TTL decides); the wide margin
        # tolerates clock skew between instances.
        return max(4 * self.ttl_s, 60.0)

    # ------------------------------------------------------------------ health
    @property
    def connected(self) -> bool:
        """Whether the last Redis operation worked."""
        return self._healthy

    def _ok(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.info("cluster.redis_recovered", instance=self.instance_id)

    def _failed(self, where: str, exc: BaseException) -> None:
        if self._healthy:
            self._healthy = False
            log.warning(
                "cluster.redis_unavailable",
                instance=self.instance_id,
                where=where,
                error=repr(exc),
                hint="local calls go on; registry and remote control resume when Redis is back",
            )
        else:
            log.debug("cluster.redis_still_unavailable", where=where, error=repr(exc))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connects and starts the heartbeat and the control subscriber; never raises for an
        unreachable Redis (waits at most `op_timeout_s` for the first attempt)."""
        if self._redis is not None:
            return
        self._stopping = False
        self._first_listen.clear()
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        common: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": self.op_timeout_s,
            # one immediate retry: a pooled connection may be stale after a Redis restart
            "retry": Retry(NoBackoff(), 1),
        }
        self._redis = aioredis.from_url(self.redis_url, socket_timeout=self.op_timeout_s, **common)
        # The subscriber blocks reading; it pings when idle to notice a silent dead link.
        self._pubsub_redis = aioredis.from_url(
            self.redis_url, socket_timeout=None, health_check_interval=10, **common
        )
        self._refresh = self._redis.register_script(_REFRESH_LUA)
        self._withdraw = self._redis.register_script(_WITHDRAW_LUA)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat:{self.instance_id}"),
            asyncio.create_task(self._listen_loop(), name=f"control:{self.instance_id}"),
            asyncio.create_task(self._live_loop(), name=f"live:{self.instance_id}"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.op_timeout_s):
                await self._first_listen.wait()
        log.info("cluster.started", instance=self.instance_id, subscribed=self._subscribed.is_set())

    async def stop(self, *, withdraw_calls: bool = True) -> None:
        """Stops heartbeating and listening. `withdraw_calls=False` leaves this instance's
        calls to expire by TTL, as a crash would."""
        self._stopping = True
        tasks = [*self._tasks, *self._handlers]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a library that turned our cancellation into an error must not hang
            # shutdown (the loops also check `_stopping`).
            _, pending = await asyncio.wait(tasks, timeout=self.op_timeout_s + 1.0)
            if pending:
                log.warning("cluster.tasks_still_running", count=len(pending))
        self._tasks.clear()
        self._handlers.clear()
        for fut in self._acks.values():
            fut.cancel()
        self._acks.clear()
        redis, self._redis = self._redis, None
        if redis is None:
            return
        if withdraw_calls:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    for sid in list(self._calls):
                        await self._withdraw(
                            keys=[self._call_key(sid), self._calls_index],
                            args=[self.instance_id, sid],
                        )
                    await redis.delete(self._instance_key(self.instance_id))
                    await redis.zrem(self._instances_index, self.instance_id)
            except Exception as exc:
                self._failed("stop", exc)
        self._calls.clear()
        pubsub_redis, self._pubsub_redis = self._pubsub_redis, None
        for client in (redis, pubsub_redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.op_timeout_s):
                        await client.aclose()
        log.info("cluster.stopped", instance=self.instance_id)

    # ------------------------------------------------------------------ this instance's calls
    async def announce(self, call_sid: str, info: dict[str, Any]) -> None:
        """A call started here. Never raises, and while Redis is known to be down it does not
        even try (a call's setup must not wait on it): the heartbeat writes it when Redis
        answers again."""
        local = _Local(dict(info), _now_iso(), json.dumps(info, default=str))
        self._calls[call_sid] = local
        if self._redis is None or not self._healthy:
            return
        key = self._call_key(call_sid)
        try:
            async with asyncio.timeout(self.op_timeout_s):
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(key)
                pipe.hset(
                    key,
                    mapping={
                        "call_sid": call_sid,
                        "instance": self.instance_id,
                        "announced_at": local.announced_at,
                        "info": local.info_json,
                    },
                )
                pipe.pexpire(key, self._ttl_ms)
                pipe.zadd(self._calls_index, {call_sid: time.time()})
                await pipe.execute()
            self._ok()
        except Exception as exc:
            self._failed("announce", exc)

    async def withdraw(self, call_sid: str) -> None:
        """The call ended here. Only removes the entry if this instance still owns it; while
        Redis is down the entry is left to expire by TTL."""
        if self._calls.pop(call_sid, None) is None or self._redis is None or not self._healthy:
            return
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await self._withdraw(
                    keys=[self._call_key(call_sid), self._calls_index],
                    args=[self.instance_id, call_sid],
                )
            self._ok()
        except Exception as exc:
            self._failed("withdraw", exc)

    def local_calls(self) -> list[str]:
        return list(self._calls)

    # ------------------------------------------------------------------ one-shot values
    def _stash_key(self, key: str) -> str:
        return f"{self.prefix}:stash:{key}"

    async def stash(self, key: str, value: str, ttl_s: float) -> bool:
        """Keeps `value` for `ttl_s` where any instance can `take` it once; False when Redis
        did not take it (the caller keeps its own copy). Never raises."""
        if self._redis is None or not self._healthy:
            return False
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await self._redis.set(self._stash_key(key), value, px=max(1, int(ttl_s * 1000)))
            self._ok()
        except Exception as exc:
            self._failed("stash", exc)
            return False
        return True

    async def take(self, key: str) -> str | None:
        """The value stashed under `key`, removed in the same step (GETDEL: once, whichever
        instance asks first); None when absent. Raises LookupError when Redis cannot say."""
        if self._redis is None:
            raise LookupError("not connected to Redis")
        try:
            async with asyncio.timeout(self.op_timeout_s):
                value = await self._redis.getdel(self._stash_key(key))
            self._ok()
        except Exception as exc:
            self._failed("take", exc)
            raise LookupError("Redis did not answer") from None
        return None if value is None else str(value)

    # ------------------------------------------------------------------ every instance's calls
    async def list_calls(self) -> list[dict[str, Any]]:
        """Live calls on every instance, oldest first. Without Redis: this instance's only."""
        if self._redis is None:
            return self._local_listing()
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await self._redis.zremrangebyscore(
                    self._calls_index, "-inf", time.time() - self._index_margin_s
                )
                sids = await self._redis.zrange(self._calls_index, 0, -1)
                pipe = self._redis.pipeline(transaction=False)
                for sid in sids:
                    pipe.hgetall(self._call_key(sid))
                rows = await pipe.execute() if sids else []
            self._ok()
        except Exception as exc:
            self._failed("list_calls", exc)
            return self._local_listing()
        out = []
        for row in rows:
            if not row:  # expired: its instance stopped heartbeating
                continue
            try:
                info = json.loads(row.get("info") or "{}")
            except ValueError:
                info = {}
            out.append(
                {
                    **(info if isinstance(info, dict) else {}),
                    "call_sid": row.get("call_sid"),
                    "instance": row.get("instance"),
                    "announced_at": row.get("announced_at"),
                }
            )
        out.sort(key=lambda c: c.get("announced_at") or "")
        return out

    def _local_listing(self) -> list[dict[str, Any]]:
        return [_row(sid, c, self.instance_id) for sid, c in self._calls.items()]

    async def list_instances(self) -> list[dict[str, Any]]:
        """Instances that heartbeated within `ttl_s`, with their call counts."""
        if self._redis is None:
            return []
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await self._redis.zremrangebyscore(
                    self._instances_index, "-inf", time.time() - self._index_margin_s
                )
                ids = await self._redis.zrange(self._instances_index, 0, -1)
                values = await self._redis.mget([self._instance_key(i) for i in ids]) if ids else []
            self._ok()
        except Exception as exc:
            self._failed("list_instances", exc)
            return []
        out = []
        for value in values:
            with contextlib.suppress(ValueError, TypeError):
                out.append(json.loads(value))
        return out

    async def locate(self, call_sid: str) -> str | None:
        """The instance holding `call_sid`, or None (ended, unknown, or Redis unreachable)."""
        if call_sid in self._calls:
            return self.instance_id
        if self._redis is None:
            return None
        try:
            async with asyncio.timeout(self.op_timeout_s):
                owner = await self._redis.hget(self._call_key(call_sid), "instance")
            self._ok()
        except Exception as exc:
            self._failed("locate", exc)
            return None
        return owner

    # ------------------------------------------------------------------ control
    async def request(
        self, call_sid: str, action: str, *, ack_timeout: float | None = 2.0, **args: Any
    ) -> bool:
        """Asks whichever instance holds `call_sid` to `end` or `transfer` it.

        With `ack_timeout` (seconds): True once the holder's handler has done it, False if no
        instance holds the call, the handler said no, or no answer came in time. With
        `ack_timeout=None`: True as soon as the holder's subscriber received the request.
        A call held here is handled directly, without Redis.
        """
        _check_action(action)
        if call_sid in self._calls:
            return await _run_handler(self.on_control, call_sid, action, args)
        owner = await self.locate(call_sid)
        if owner is None or owner == self.instance_id or self._redis is None:
            return False
        request_id = uuid.uuid4().hex
        message = {
            "id": request_id,
            "call_sid": call_sid,
            "action": action,
            "args": args,
            "from": self.instance_id,
            "reply_to": self._ack_channel(self.instance_id) if ack_timeout is not None else None,
        }
        fut: asyncio.Future[bool] | None = None
        if ack_timeout is not None:
            fut = asyncio.get_running_loop().create_future()
            self._acks[request_id] = fut
        try:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    receivers = await self._redis.publish(
                        self.control_channel(owner), json.dumps(message, default=str)
                    )
                self._ok()
            except Exception as exc:
                self._failed("request", exc)
                return False
            if not receivers:
                log.info("cluster.holder_unreachable", call_sid=call_sid, instance=owner)
                return False
            if fut is None:
                return True
            try:
                async with asyncio.timeout(ack_timeout):
                    return await fut
            except TimeoutError:
                log.warning(
                    "cluster.control_no_ack", call_sid=call_sid, action=action, instance=owner
                )
                return False
        finally:
            self._acks.pop(request_id, None)

    async def _on_control_message(self, raw: str) -> None:
        try:
            msg = json.loads(raw)
            call_sid, action = str(msg["call_sid"]), str(msg["action"])
            args = msg.get("args") or {}
        except (ValueError, KeyError, TypeError):
            log.warning("cluster.bad_control_message", data=raw[:200])
            return
        if action not in ACTIONS or not isinstance(args, dict):
            ok = False
        elif call_sid not in self._calls:
            ok = False  # it ended meanwhile
        else:
            log.info("cluster.control", call_sid=call_sid, action=action, sender=msg.get("from"))
            ok = await _run_handler(self.on_control, call_sid, action, args)
        reply_to = msg.get("reply_to")
        if reply_to and self._redis is not None:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self._redis.publish(reply_to, json.dumps({"id": msg.get("id"), "ok": ok}))
            except Exception as exc:
                self._failed("ack", exc)

    def publish_live(self, message: dict[str, Any]) -> None:
        """A live-feed message for the other instances' live pages; never blocks or raises.

        Queued (bounded: with Redis slow or gone, the oldest are dropped) and sent in order by
        one task, so partial lines reach other instances as fast as Redis allows.
        """
        if self._redis is None:
            return
        raw = json.dumps({"from": self.instance_id, "message": message}, default=str)
        if self._live_out.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._live_out.get_nowait()
        self._live_out.put_nowait(raw)

    def _on_live_message(self, raw: str) -> None:
        if self.on_live is None:
            return
        try:
            msg = json.loads(raw)
            if msg.get("from") == self.instance_id:
                return
            message = msg["message"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        try:
            self.on_live(message)
        except Exception:
            log.exception("cluster.live_message_failed")

    async def _live_loop(self) -> None:
        while not self._cancelled():
            raw = await self._live_out.get()
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self._redis.publish(self.live_channel, raw)
                self._ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._cancelled():
                    raise asyncio.CancelledError from exc
                self._failed("live", exc)

    def _on_ack_message(self, raw: str) -> None:
        try:
            msg = json.loads(raw)
            fut = self._acks.get(str(msg["id"]))
        except (ValueError, KeyError, TypeError):
            return
        if fut is not None and not fut.done():
            fut.set_result(bool(msg.get("ok")))

    # ------------------------------------------------------------------ background tasks
    async def _beat(self) -> None:
        redis = self._redis
        now = time.time()
        info = {
            "instance": self.instance_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started_at,
            "calls": len(self._calls),
            **self.instance_info,
        }
        async with asyncio.timeout(self.op_timeout_s):
            pipe = redis.pipeline(transaction=False)
            pipe.set(self._instance_key(self.instance_id), json.dumps(info), px=self._ttl_ms)
            pipe.zadd(self._instances_index, {self.instance_id: now})
            # the indexes vanish too once no instance is left to refresh them
            margin_ms = int(self._index_margin_s * 1000)
            pipe.pexpire(self._instances_index, margin_ms)
            pipe.pexpire(self._calls_index, margin_ms)
            await pipe.execute()
            calls = list(self._calls.items())
            for i in range(0, len(calls), _REFRESH_CHUNK):
                chunk = calls[i : i + _REFRESH_CHUNK]
                args: list[Any] = [self.instance_id, self._ttl_ms, now]
                for sid, c in chunk:
                    args += [sid, c.announced_at, c.info_json]
                lost = await self._refresh(
                    keys=[self._calls_index, *(self._call_key(sid) for sid, _ in chunk)],
                    args=args,
                )
                if lost:
                    log.info("cluster.calls_taken_over", count=lost)

    def _cancelled(self) -> bool:
        """Stop was asked for, even if a library turned the cancellation into an error."""
        task = asyncio.current_task()
        return self._stopping or (task is not None and task.cancelling() > 0)

    async def _heartbeat_loop(self) -> None:
        while not self._cancelled():
            try:
                await self._beat()
                self._ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._cancelled():
                    raise asyncio.CancelledError from exc
                self._failed("heartbeat", exc)
            await asyncio.sleep(self.heartbeat_s)

    async def _listen_loop(self) -> None:
        control = self.control_channel(self.instance_id)
        ack = self._ack_channel(self.instance_id)
        backoff = 0.1
        while not self._cancelled():
            pubsub = self._pubsub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(control, ack, self.live_channel)
                self._subscribed.set()
                self._first_listen.set()
                backoff = 0.1
                self._ok()
                # redis-py's read timeout can swallow a cancellation that lands at the same
                # moment (it returns None): so the loop also asks whether it was cancelled.
                while not self._cancelled():
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    if msg["channel"] == ack:
                        self._on_ack_message(msg["data"])
                    elif msg["channel"] == self.live_channel:
                        self._on_live_message(msg["data"])
                    else:
                        task = asyncio.create_task(self._on_control_message(msg["data"]))
                        self._handlers.add(task)
                        task.add_done_callback(self._handlers.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._cancelled():
                    raise asyncio.CancelledError from exc
                self._subscribed.clear()
                self._first_listen.set()
                self._failed("subscribe", exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.op_timeout_s):
                        await pubsub.aclose()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.max_backoff_s)


def create_cluster(
    redis_url: str | None, instance_id: str | None = None, **kw: Any
) -> ClusterRegistry | LocalRegistry:
    """`ClusterRegistry` when a Redis URL is configured, else the in-process `LocalRegistry`."""
    if redis_url:
        return ClusterRegistry(redis_url, instance_id, **kw)
    return LocalRegistry(instance_id, on_control=kw.get("on_control"))
