"""The admission policies: weighted fair queueing shares capacity between tenants by weight and
cost, keeps each tenant's own order, and gives no tenant a way to starve another."""

from __future__ import annotations

from collections import Counter

from aiaas.scheduling.fair import FifoPolicy, Ticket, WeightedFairPolicy


def _push(policy: WeightedFairPolicy[str], tenant: str, n: int, cost: float = 1.0, w: float = 1.0):
    items = [f"{tenant}{i}" for i in range(n)]
    for item in items:
        policy.push(Ticket(item=item, tenant=tenant, weight=w, cost=cost))
    return items


def _drain(policy: WeightedFairPolicy[str] | FifoPolicy[str], n: int | None = None) -> list[str]:
    out = []
    while len(policy) and (n is None or len(out) < n):
        peeked = policy.peek()
        popped = policy.pop()
        assert peeked is popped
        out.append(popped.item)
    return out


def test_a_newcomer_goes_next_however_long_the_floods_queue() -> None:
    policy: WeightedFairPolicy[str] = WeightedFairPolicy()
    _push(policy, "flood", 1000)
    assert _drain(policy, 10) == [f"flood{i}" for i in range(10)]
    _push(policy, "quiet", 1)
    assert _drain(policy, 1) == ["quiet0"]


def test_backlogged_tenants_share_in_proportion_to_their_weights() -> None:
    policy: WeightedFairPolicy[str] = WeightedFairPolicy()
    _push(policy, "a", 200, w=3.0)
    _push(policy, "b", 200, w=1.0)
    served = Counter(item[0] for item in _drain(policy, 80))
    assert abs(served["a"] - 60) <= 1 and abs(served["b"] - 20) <= 1


def test_costly_items_count_for_more() -> None:
    policy: WeightedFairPolicy[str] = WeightedFairPolicy()
    _push(policy, "big", 50, cost=10.0)
    _push(policy, "small", 500, cost=1.0)
    served = Counter(item.rstrip("0123456789") for item in _drain(policy, 110))
    # Equal weights, equal work: ten small items for each big one.
    assert abs(served["small"] - 100) <= 2 and abs(served["big"] - 10) <= 1


def test_an_idle_tenant_earns_no_credit_to_burst_later() -> None:
    policy: WeightedFairPolicy[str] = WeightedFairPolicy()
    _push(policy, "a", 50)
    _drain(policy, 50)  # a was alone: no one else waited
    _push(policy, "a", 20)
    _push(policy, "b", 20)
    order = [item[0] for item in _drain(policy, 20)]
    # Interleaved from the start, not twenty of b's first.
    assert Counter(order) == {"a": 10, "b": 10}
    assert all(order[i] != order[i + 1] for i in range(len(order) - 1))


def test_each_tenant_keeps_its_own_order() -> None:
    policy: WeightedFairPolicy[str] = WeightedFairPolicy()
    a = _push(policy, "a", 30, w=2.0)
    b = _push(policy, "b", 30, cost=3.0)
    out = _drain(policy)
    assert [x for x in out if x.startswith("a")] == a
    assert [x for x in out if x.startswith("b")] == b


def test_one_tenant_alone_is_first_come_first_served() -> None:
    fair: WeightedFairPolicy[str] = WeightedFairPolicy()
    fifo: FifoPolicy[str] = FifoPolicy()
    for i, cost in enumerate([5.0, 1.0, 30.0, 2.0, 2.0]):
        for policy in (fair, fifo):
            policy.push(Ticket(item=f"x{i}", tenant="t", weight=1.0, cost=cost))
    assert _drain(fair) == _drain(fifo)


def test_removed_items_never_come_out() -> None:
    policy: WeightedFairPolicy[str] = WeightedFairPolicy()
    a = _push(policy, "a", 3)
    b = _push(policy, "b", 2)
    assert policy.remove(b[0]) and policy.remove(b[1])
    assert not policy.remove("nope")
    assert len(policy) == 3
    assert _drain(policy) == a
    assert policy.peek() is None and len(policy) == 0


def test_priority_policy_serves_interactive_work_first_and_counts_each_line() -> None:
    from aiaas.scheduling.fair import PriorityPolicy, Ticket, make_policy

    policy = make_policy("fair")
    assert isinstance(policy, PriorityPolicy)
    for i in range(3):
        policy.push(Ticket(item=f"b{i}", tenant="org#batch", weight=1.0, cost=1.0, background=True))
    policy.push(Ticket(item="i0", tenant="a", weight=1.0, cost=1.0))
    policy.push(Ticket(item="i1", tenant="b", weight=1.0, cost=1.0))
    assert (policy.waiting(background=True), policy.waiting(background=False)) == (3, 2)
    assert policy.first(lambda t: t.tenant == "b").item == "i1"
    assert policy.first(lambda t: t.background).item == "b0"
    assert [policy.pop().item for _ in range(5)] == ["i0", "i1", "b0", "b1", "b2"]
    policy.push(Ticket(item="b3", tenant="org#batch", weight=1.0, cost=1.0, background=True))
    assert policy.remove("b3") and not policy.remove("b3") and len(policy) == 0
