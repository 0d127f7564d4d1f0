"""A FIFO of audio bounded by bytes, not by items: frames may come in any size.

Counting frames would let a hostile or buggy carrier that sends 64 KiB frames turn "15 s of
caller audio" into hundreds of megabytes; counting bytes keeps the promise in seconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

__all__ = ["ByteBoundedQueue"]

T = TypeVar("T")


class ByteBoundedQueue(Generic[T]):
    """Oldest items are dropped once the total size passes `max_bytes`."""

    def __init__(self, max_bytes: int, size: Callable[[T], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._items: deque[T] = deque()
        self.bytes = 0
        self.dropped = 0

    def append(self, item: T) -> None:
        self._items.append(item)
        self.bytes += self._size(item)
        while self.bytes > self.max_bytes and len(self._items) > 1:
            self.bytes -= self._size(self._items.popleft())
            self.dropped += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def popleft(self) -> T:
        item = self._items.popleft()
        self.bytes -= self._size(item)
        return item

    def peek(self) -> T:
        return self._items[0]

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)
