"""Admission order: which waiting piece of work goes next when capacity frees up.

Engines and batchers hold their waiting work in an `AdmissionPolicy` and ask it for the next
item; they never reorder work themselves. Every item carries its tenant and the tenant's weight,
so a fair policy can interleave tenants. `FifoPolicy` is first come, first served;
`WeightedFairPolicy` shares capacity between tenants in proportion to their weights.
Callers serialise access (the engine holds its lock around every call).

Work comes in two classes: interactive (a client waits on it) and background (a line of a
batch). `make_policy` gives a `PriorityPolicy`: background items go only when no interactive
item waits, and each class is fair between tenants on its own.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ticket(Generic[T]):
    item: T
    tenant: str
    weight: float
    cost: float  # expected work, e.g. prompt plus max new tokens
    background: bool = False  # a batch line: runs only when no interactive item waits


class AdmissionPolicy(Protocol[T]):
    def push(self, ticket: Ticket[T]) -> None:
        """Queue an item."""

    def peek(self) -> Ticket[T] | None:
        """The item that would go next, without removing it."""

    def pop(self) -> Ticket[T]:
        """Remove and return the item `peek` named."""

    def first(self, accept: Callable[[Ticket[T]], bool]) -> Ticket[T] | None:
        """The item that would go first among those `accept` takes (a tenant's items keep their
        order: only the head of each tenant's line is a candidate)."""

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

    def first(self, accept: Callable[[Ticket[T]], bool]) -> Ticket[T] | None:
        seen: set[str] = set()
        for ticket in self._queue:
            if ticket.tenant not in seen and accept(ticket):
                return ticket
            seen.add(ticket.tenant)
        return None

    def remove(self, item: T) -> bool:
        for ticket in self._queue:
            if ticket.item is item:
                self._queue.remove(ticket)
                return True
        return False

    def __len__(self) -> int:
        return len(self._queue)


class WeightedFairPolicy(Generic[T]):
    """Start-time fair queueing across tenants (Goyal et al., 1996), by virtual time.

    Each tenant has its own FIFO queue. An arriving item gets a start tag
    `S = max(V, F_prev)` (V: the virtual time, F_prev: the finish tag of the tenant's previous
    item) and a finish tag `F = S + cost / weight`; the item with the smallest start tag among the
    queue heads goes next, and V becomes its start tag. So:

    - a tenant that floods the queue only delays itself: its items' tags grow by cost/weight each,
      while a newcomer's first item starts at V, and goes out after at most one item of every
      other waiting tenant;
    - over a busy period each tenant is served work in proportion to its weight;
    - an idle tenant earns no credit for later (its tags restart at V), so it cannot burst.

    Ties go to the earlier arrival. Removing a waiting item keeps the tags of the tenant's later
    items (it may then wait a little longer than needed, never less fairly toward others).
    """

    def __init__(self) -> None:
        self._queues: dict[str, deque[tuple[float, float, int, Ticket[T]]]] = {}
        self._finish: dict[str, float] = {}  # tenant -> finish tag of its last item
        self._virtual = 0.0
        self._arrivals = itertools.count()
        self._size = 0

    def push(self, ticket: Ticket[T]) -> None:
        weight = ticket.weight if ticket.weight > 0 else 1.0
        start = max(self._virtual, self._finish.get(ticket.tenant, 0.0))
        finish = start + max(ticket.cost, 1e-9) / weight
        self._finish[ticket.tenant] = finish
        queue = self._queues.setdefault(ticket.tenant, deque())
        queue.append((start, finish, next(self._arrivals), ticket))
        self._size += 1

    def _head(self) -> tuple[str, tuple[float, float, int, Ticket[T]]] | None:
        best: tuple[str, tuple[float, float, int, Ticket[T]]] | None = None
        for tenant, queue in self._queues.items():
            head = queue[0]
            if best is None or (head[0], head[2]) < (best[1][0], best[1][2]):
                best = (tenant, head)
        return best

    def peek(self) -> Ticket[T] | None:
        found = self._head()
        return found[1][3] if found else None

    def pop(self) -> Ticket[T]:
        found = self._head()
        if found is None:
            raise IndexError("pop from an empty policy")
        tenant, (start, _finish, _seq, ticket) = found
        queue = self._queues[tenant]
        queue.popleft()
        if not queue:
            del self._queues[tenant]
        self._virtual = max(self._virtual, start)
        self._size -= 1
        return ticket

    def first(self, accept: Callable[[Ticket[T]], bool]) -> Ticket[T] | None:
        heads = sorted(
            (queue[0] for queue in self._queues.values()), key=lambda entry: (entry[0], entry[2])
        )
        return next((entry[3] for entry in heads if accept(entry[3])), None)

    def remove(self, item: T) -> bool:
        for tenant, queue in self._queues.items():
            for entry in queue:
                if entry[3].item is item:
                    queue.remove(entry)
                    if not queue:
                        del self._queues[tenant]
                    self._size -= 1
                    return True
        return False

    def __len__(self) -> int:
        return self._size


class PriorityPolicy(Generic[T]):
    """Interactive items strictly before background ones; each class in its own policy.

    `first(accept)` looks at the interactive line first, so an engine keeping a slot for a
    quiet tenant finds that tenant's interactive request before any batch line.
    """

    def __init__(self, interactive: AdmissionPolicy[T], background: AdmissionPolicy[T]) -> None:
        self._interactive = interactive
        self._background = background

    def _line(self, ticket: Ticket[T]) -> AdmissionPolicy[T]:
        return self._background if ticket.background else self._interactive

    def push(self, ticket: Ticket[T]) -> None:
        self._line(ticket).push(ticket)

    def peek(self) -> Ticket[T] | None:
        ticket = self._interactive.peek()
        return ticket if ticket is not None else self._background.peek()

    def pop(self) -> Ticket[T]:
        return self._interactive.pop() if len(self._interactive) else self._background.pop()

    def first(self, accept: Callable[[Ticket[T]], bool]) -> Ticket[T] | None:
        found = self._interactive.first(accept)
        return found if found is not None else self._background.first(accept)

    def remove(self, item: T) -> bool:
        return self._interactive.remove(item) or self._background.remove(item)

    def waiting(self, *, background: bool) -> int:
        return len(self._background if background else self._interactive)

    def __len__(self) -> int:
        return len(self._interactive) + len(self._background)


SchedulingMode = Literal["fair", "fifo"]


def make_policy(mode: SchedulingMode) -> AdmissionPolicy[T]:
    """A fresh policy: interactive before background work, and within each class weighted
    fair between tenants, or first come, first served."""

    def line() -> AdmissionPolicy[T]:
        return WeightedFairPolicy() if mode == "fair" else FifoPolicy()

    return PriorityPolicy(line(), line())
