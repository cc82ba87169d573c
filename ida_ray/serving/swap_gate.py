"""A gate between requests and weight swaps in one event loop.

Requests pass while the gate is open; a swap closes it, waits until the requests in flight
have finished, runs, and reopens it. So no request runs on a mix of old and new weights, and
the weight version a result reports is the one that produced it.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class SwapGate:
    def __init__(self):
        self.in_flight = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._swap_lock = asyncio.Lock()

    @property
    def swapping(self) -> bool:
        return not self._open.is_set()

    @asynccontextmanager
    async def request(self):
        while not self._open.is_set():  # a swap may close the gate again before we wake
            await self._open.wait()
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    @asynccontextmanager
    async def exclusive(self):
        async with self._swap_lock:
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._open.set()

    def close(self) -> None:
        """Close without a context (a swap driven by separate start/finish calls, as in
        vLLM's weight-transfer protocol); `drained` waits for the requests in flight."""
        self._open.clear()

    async def drained(self) -> None:
        await self._idle.wait()

    def reopen(self) -> None:
        self._open.set()
