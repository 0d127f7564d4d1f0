"""The caller's socket as the call sees it, apart from any web framework (one per carrier route).

Its own module so every part of the call (the caller pump, the agent output, the bridge) can
name it without importing the bridge.
"""

from __future__ import annotations

from typing import Protocol

from livecall.carriers.base import Frame

__all__ = ["CarrierClosed", "CarrierSocket"]


class CarrierClosed(Exception):
    """The carrier's socket is gone."""


class CarrierSocket(Protocol):
    """The caller's side of the call as the bridge sees it: text or binary frames in and out."""

    async def receive(self) -> str | bytes | None:
        """The next frame, or None once the socket has closed."""
        ...

    async def send(self, frame: Frame) -> None:
        """One frame as a text (str) or binary (bytes) message; raises `CarrierClosed`."""
        ...

    async def close(self, code: int = 1000) -> None: ...
