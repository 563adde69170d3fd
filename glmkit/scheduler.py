"""Who runs: the engine's waiting queue and its KV-cache slots (rows of the static cache).

Requests wait in arrival order; at every engine step the scheduler hands the first waiting ones the lowest
free slots (so a fast decoder steps rows ``0..k-1`` with ``k`` as small as possible), gives a finished or
cancelled request's slot back, and picks which prompts prefill this step, one chunk at a time, within a token
budget. With ``continuous=False`` (the static batching of the plain path) new requests are admitted only once the
whole previous batch has finished. Introduced in ``notebooks/07_openai_server.ipynb``.

>>> from glmkit.request import GenerationRequest
>>> s = Scheduler(slots=2)
>>> for n in (3, 5, 4):
...     s.add(GenerationRequest(list(range(n))))
>>> [r.slot for r in s.admit()], len(s.waiting)
([0, 1], 1)
>>> [(r.slot, n) for r, n in s.prefill_plan(budget=6)]
[(0, 3), (1, 3)]
"""

from __future__ import annotations

import heapq
import threading
from collections import deque

from glmkit.request import GenerationRequest


class Scheduler:
    """The waiting queue (filled from any thread) and the running requests by slot (engine thread only)."""

    def __init__(self, slots: int, continuous: bool = True) -> None:
        self.slots, self.continuous = slots, continuous
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[int, GenerationRequest] = {}
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._lock = threading.Lock()

    def add(self, req: GenerationRequest) -> None:
        with self._lock:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[GenerationRequest]:
        """Move waiting requests into free slots (all at once, and only when nothing runs, if not continuous)."""
        if not self.continuous and self.running:
            return []
        admitted = []
        with self._lock:
            while self.waiting and self._free:
                req = self.waiting.popleft()
                req.slot = heapq.heappop(self._free)
                self.running[req.slot] = req
                admitted.append(req)
        return admitted

    def drop_waiting(self, predicate) -> list[GenerationRequest]:  # noqa: ANN001 - a callable on a request
        """Remove and return the waiting requests for which ``predicate(req)`` holds (cancelled ones)."""
        with self._lock:
            out = [r for r in self.waiting if predicate(r)]
            if out:
                self.waiting = deque(r for r in self.waiting if not predicate(r))
        return out

    def release(self, req: GenerationRequest) -> None:
        """Give a running request's slot back."""
        if req.slot is not None and self.running.get(req.slot) is req:
            del self.running[req.slot]
            heapq.heappush(self._free, req.slot)

    def prefilling(self) -> list[GenerationRequest]:
        """Running requests whose prompt is not all in the cache yet, oldest first."""
        return sorted((r for r in self.running.values() if r.prefilled < len(r.prompt_ids)),
                      key=lambda r: r.submitted_at)

    def decoding(self) -> list[GenerationRequest]:
        """Running requests with a generated token to feed back (prompt prefilled, first token picked: read on the
        host, or still in flight on the device), by slot."""
        return [r for _, r in sorted(self.running.items())
                if r.prefilled == len(r.prompt_ids) and (r.tokens or r.inflight)]

    def prefill_plan(self, budget: int, skip: set[GenerationRequest] = frozenset()) -> list[tuple[GenerationRequest, int]]:
        """(request, tokens) to prefill this step: the oldest prompts first (but those in ``skip``), ``budget`` tokens
        in all."""
        plan = []
        for r in self.prefilling():
            if r in skip:
                continue
            if budget <= 0:
                break
            n = min(budget, len(r.prompt_ids) - r.prefilled)
            plan.append((r, n))
            budget -= n
        return plan
