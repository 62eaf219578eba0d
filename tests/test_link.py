"""The bounded memories of chatprobe.protocols.link (the link itself is exercised through the
adapters' tests, over real sockets)."""

from __future__ import annotations

from chatprobe.protocols.link import RecentMap, SeenIds


def test_a_recent_map_keeps_its_newest_entries_and_forgets_the_oldest_first() -> None:
    memory: RecentMap[str, int] = RecentMap(3)
    for number in range(1, 6):
        memory.remember(f"m{number}", number)
    assert list(memory.items()) == [("m3", 3), ("m4", 4), ("m5", 5)]
    assert memory.get("m2") is None and memory.get("m4") == 4
    memory.remember("m4", 40)  # a message seen again keeps its place, with its new value
    memory.remember("m6", 6)
    assert list(memory.items()) == [("m4", 40), ("m5", 5), ("m6", 6)]


def test_a_recent_map_past_its_bound_keeps_exactly_its_limit() -> None:
    memory: RecentMap[int, int] = RecentMap(1000)
    for number in range(250_000):  # well past the bound, through several resizes
        memory.remember(number, number)
    assert len(memory) == 1000
    assert next(iter(memory)) == 249_000 and memory[249_999] == 249_999


def test_seen_ids_say_first_time_once_and_forget_the_oldest() -> None:
    seen = SeenIds(limit=2)
    assert seen.first_time("a") and not seen.first_time("a")
    assert seen.first_time("b") and seen.first_time("c")  # "a" is forgotten now
    assert seen.first_time("a") and not seen.first_time("c")
