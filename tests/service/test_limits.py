"""service/limits.py: per-owner concurrency slots."""

from __future__ import annotations

import pytest

from service.errors import QuotaExceeded
from service.limits import OwnerSlots


def test_slots_bound_each_owner_alone():
    slots = OwnerSlots(2, "report renders")
    slots.acquire("a")
    with slots.slot("a"):
        with pytest.raises(QuotaExceeded, match="2 report renders"):
            slots.acquire("a")
        slots.acquire("b")  # another owner is not held back
    assert slots.held("a") == 1
    slots.acquire("a")
    assert slots.held("a") == 2


def test_a_slot_comes_back_when_its_holder_fails():
    slots = OwnerSlots(1, "event streams")
    with pytest.raises(RuntimeError), slots.slot("a"):
        raise RuntimeError("render failed")
    assert slots.held("a") == 0
    with slots.slot("a"):
        assert slots.held("a") == 1


def test_the_bound_is_validated():
    with pytest.raises(ValueError, match="per_owner"):
        OwnerSlots(0, "x")
