"""Per-row state keyed by the teacher batch's row index, following vLLM's batch updates.

vLLM reports a persistent batch's changes as rows added, removed, moved one way (``src → dst``)
and swapped (``a ↔ b``); an add or a one-way move onto an occupied row replaces its occupant
(vLLM's ``process_dict_updates`` has the same semantics). Every structure that keeps per-row state
(the proxy KV cache, the protection table) keeps it in a ``RowMap``, so those semantics are written
once, and whatever a row's state holds (KV blocks, an engine row) is released through ``on_drop``
whenever the state leaves the map for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class RowMap(Mapping[int, T], Generic[T]):
    """Row index → state; read like a dict, changed only by ``add``/``remove``/``move``/``swap``.

    ``on_drop(index, state)`` runs for each state that is removed or overwritten (never for one
    that only changes index), before anything takes its place.
    """

    def __init__(self, on_drop: Callable[[int, T], None] | None = None) -> None:
        self._rows: dict[int, T] = {}
        self._on_drop = on_drop

    def __getitem__(self, index: int) -> T:
        return self._rows[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, index: int, state: T) -> None:
        """``state`` occupies ``index``; a previous occupant is dropped first."""
        self.remove(index)
        self._rows[index] = state

    def remove(self, index: int) -> None:
        """Drop the state at ``index``, if any."""
        state = self._rows.pop(index, None)
        if state is not None and self._on_drop is not None:
            self._on_drop(index, state)

    def move(self, src: int, dst: int) -> None:
        """One-way move: the state at ``src`` now lives at ``dst``; whatever was at ``dst`` is dropped
        (even when ``src`` is empty)."""
        state = self._rows.pop(src, None)
        self.remove(dst)
        if state is not None:
            self._rows[dst] = state

    def swap(self, a: int, b: int) -> None:
        """Exchange the states at ``a`` and ``b`` (either may be empty); nothing is dropped."""
        sa, sb = self._rows.pop(a, None), self._rows.pop(b, None)
        if sa is not None:
            self._rows[b] = sa
        if sb is not None:
            self._rows[a] = sb
