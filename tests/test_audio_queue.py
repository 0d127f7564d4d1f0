"""The byte-bounded FIFO that holds caller audio while no Gemini session is usable."""

from __future__ import annotations

from livecall.call.audio_queue import ByteBoundedQueue


def test_oldest_items_go_once_the_byte_budget_is_passed() -> None:
    q: ByteBoundedQueue[bytes] = ByteBoundedQueue(1000, len)
    for i in range(5):
        q.append(bytes([i]) * 300)
    assert q.bytes == 900 and len(q) == 3 and q.dropped == 2
    assert q.peek()[0] == 2
    assert q.popleft()[0] == 2 and q.bytes == 600
    q.clear()
    assert not q and q.bytes == 0


def test_a_single_item_larger_than_the_budget_is_kept_alone() -> None:
    q: ByteBoundedQueue[bytes] = ByteBoundedQueue(100, len)
    q.append(b"x" * 10)
    q.append(b"y" * 500)
    assert list(q) == [b"y" * 500] and q.dropped == 1


def test_extend_appends_in_order_under_the_same_budget() -> None:
    q: ByteBoundedQueue[bytes] = ByteBoundedQueue(100, len)
    q.append(b"a" * 40)
    q.extend([b"b" * 40, b"c" * 40])
    assert list(q) == [b"b" * 40, b"c" * 40] and q.bytes == 80 and q.dropped == 1
