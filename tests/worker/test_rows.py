"""RowMap: vLLM's batch-update semantics (add, remove, one-way move, swap), each state released
exactly once, when it leaves the map for good."""

from __future__ import annotations

import random

import pytest
from antidistill.proxy_worker.runtime.rows import RowMap


def tracked() -> tuple[RowMap[str], list[tuple[int, str]]]:
    dropped: list[tuple[int, str]] = []
    return RowMap(on_drop=lambda index, state: dropped.append((index, state))), dropped


def test_add_onto_an_occupied_row_drops_the_occupant_first():
    rows, dropped = tracked()
    rows.add(0, "a")
    rows.add(0, "b")
    assert dict(rows) == {0: "b"} and dropped == [(0, "a")]


def test_remove_of_an_absent_row_is_a_no_op():
    rows, dropped = tracked()
    rows.add(1, "a")
    rows.remove(0)
    rows.remove(1)
    rows.remove(1)
    assert dict(rows) == {} and dropped == [(1, "a")]


def test_move_onto_an_occupied_row_drops_the_occupant():
    rows, dropped = tracked()
    rows.add(0, "a")
    rows.add(3, "b")
    rows.move(0, 3)
    assert dict(rows) == {3: "a"} and dropped == [(3, "b")]


def test_move_from_an_empty_row_still_clears_the_destination():
    """As in vLLM's process_dict_updates: a one-way move always overwrites ``dst``."""
    rows, dropped = tracked()
    rows.add(2, "b")
    rows.move(0, 2)
    assert dict(rows) == {} and dropped == [(2, "b")]


def test_move_onto_itself_keeps_the_row():
    rows, dropped = tracked()
    rows.add(1, "a")
    rows.move(1, 1)
    assert dict(rows) == {1: "a"} and dropped == []


@pytest.mark.parametrize(
    "start,expected",
    [({0: "a", 1: "b"}, {0: "b", 1: "a"}), ({0: "a"}, {1: "a"}), ({1: "b"}, {0: "b"}), ({}, {})],
    ids=["both", "only-a", "only-b", "neither"],
)
def test_swap_exchanges_and_drops_nothing(start, expected):
    rows, dropped = tracked()
    for index, state in start.items():
        rows.add(index, state)
    rows.swap(0, 1)
    assert dict(rows) == expected and dropped == []


def test_random_updates_match_a_reference_and_release_each_state_once():
    """Against a plain dict model of the semantics: the map equals the model after every update,
    and each state added ends up either held or released exactly once, from the row it was in."""
    rng = random.Random(7)
    rows, dropped = tracked()
    model: dict[int, str] = {}
    expected_drops: list[tuple[int, str]] = []
    for n in range(2000):
        op, a, b = rng.choice(["add", "remove", "move", "swap"]), rng.randrange(6), rng.randrange(6)
        if op == "add":
            rows.add(a, f"s{n}")
            if a in model:
                expected_drops.append((a, model[a]))
            model[a] = f"s{n}"
        elif op == "remove":
            rows.remove(a)
            if a in model:
                expected_drops.append((a, model.pop(a)))
        elif op == "move":
            rows.move(a, b)
            state = model.pop(a, None)
            if b in model:
                expected_drops.append((b, model.pop(b)))
            if state is not None:
                model[b] = state
        else:
            rows.swap(a, b)
            sa, sb = model.pop(a, None), model.pop(b, None)
            model |= {k: v for k, v in ((b, sa), (a, sb)) if v is not None}
        assert dict(rows) == model
    assert dropped == expected_drops
    released = [s for _, s in dropped]
    assert len(set(released)) == len(released) and not set(released) & set(model.values())
