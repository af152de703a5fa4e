"""Admission order: which waiting piece of work goes next when capacity frees up.

Engines and batchers hold their waiting work in an `AdmissionPolicy` and ask it for the next
item; they never reorder work themselves. Every item carries its tenant and the tenant's weight,
so a fair policy can interleave tenants. `FifoPolicy` is the default: first come, first served.
Callers serialise access (the engine holds its lock around every call).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ticket(Generic[T]):
    item: T
    tenant: str
    weight: float
    cost: float  # expected work, e.g. prompt plus max new tokens


class AdmissionPolicy(Protocol[T]):
    def push(self, ticket: Ticket[T]) -> None:
        """Queue an item."""

    def peek(self) -> Ticket[T] | None:
        """The item that would go next, without removing it."""

    def pop(self) -> Ticket[T]:
        """Remove and return the item `peek` named."""

    def remove(self, item: T) -> bool:
        """Drop a waiting item (its client left); False if it was not waiting."""

    def __len__(self) -> int: ...


class FifoPolicy(Generic[T]):
    def __init__(self) -> None:
        self._queue: deque[Ticket[T]] = deque()

    def push(self, ticket: Ticket[T]) -> None:
        self._queue.append(ticket)

    def peek(self) -> Ticket[T] | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Ticket[T]:
        return self._queue.popleft()

    def remove(self, item: T) -> bool:
        for ticket in self._queue:
            if ticket.item is item:
                self._queue.remove(ticket)
                return True
        return False

    def __len__(self) -> int:
        return len(self._queue)
