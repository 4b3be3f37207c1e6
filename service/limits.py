"""Per-owner concurrency limits inside one API process (event streams, report rendering)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import QuotaExceeded


class OwnerSlots:
    """At most `per_owner` concurrent holders per owner; the next one gets QuotaExceeded (429).

    `what` names the resource in the error ("event streams", "report renders").
    """

    def __init__(self, per_owner: int, what: str) -> None:
        if per_owner < 1:
            raise ValueError(f"per_owner must be >= 1, got {per_owner}")
        self.per_owner = per_owner
        self.what = what
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, owner: str) -> None:
        with self._lock:
            held = self._held.get(owner, 0)
            if held >= self.per_owner:
                raise QuotaExceeded(f"{owner} already has {held} {self.what} open "
                                    f"(at most {self.per_owner} at once); try again shortly")
            self._held[owner] = held + 1

    def release(self, owner: str) -> None:
        with self._lock:
            left = self._held.get(owner, 0) - 1
            if left > 0:
                self._held[owner] = left
            else:
                self._held.pop(owner, None)

    def held(self, owner: str) -> int:
        with self._lock:
            return self._held.get(owner, 0)

    @contextmanager
    def slot(self, owner: str) -> Iterator[None]:
        self.acquire(owner)
        try:
            yield
        finally:
            self.release(owner)
