"""Helpers several test files share (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import NoReturn, TypeVar

import pytest

from livecall.sim.clips import load_clip
from livecall.sim.script import CallResult, Say

T = TypeVar("T")


def service_missing(reason: str, *, module: bool = False) -> NoReturn:
    """A test needs something this machine lacks: skip it, but fail under CI, which has it all."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: these tests must run)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def module_or_missing(name: str, reason: str) -> ModuleType:
    """Imports an optional package a test needs; missing, it goes through `service_missing`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        service_missing(reason)


async def eventually(check: Callable[[], Awaitable[T]], within: float = 10.0) -> T:
    """Polls `check()` until it returns something truthy; fails after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.05)


async def redis_reachable(url: str) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


def say(name: str) -> Say:
    """The simulated caller says one of the bundled clips (`livecall.sim.clips`)."""
    pcm, rate = load_clip(name)
    return Say(pcm, rate=rate, label=name)


def assert_clean(result: CallResult) -> None:
    """The call's webhook was answered and neither side broke a protocol rule or the script."""
    assert result.webhook_status == 200, result.protocol_errors
    assert result.protocol_errors == [], result.protocol_errors
    assert result.script_errors == [], result.script_errors
