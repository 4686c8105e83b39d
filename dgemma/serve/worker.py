"""The engine thread: one `Engine` driven step after step in a background thread, fed by async callers.

The server's event loop never computes. `submit` hands a request to the thread and waits until the
engine accepted (or refused) it; the request's events then arrive on its own asyncio queue. `cancel`
(a client that went away) frees the request's cache row at the next engine step. If a step fails, the
engine is dead: every waiting caller gets `EngineDeadError` and `/health` says so.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace

from dgemma.engine.generate import Engine, Request
from dgemma.errors import DgemmaError, EngineDeadError
from dgemma.outputs import GenerationOutput

logger = logging.getLogger(__name__)


LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds


@dataclass
class Stats:
    """Counters for /metrics (written by the engine thread only)."""

    requests: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_steps: int = 0
    canvases_denoised: int = 0  # sum over steps of the canvases in the step
    committed_canvases: int = 0
    denoise_steps: int = 0  # over committed canvases
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))  # cumulative
    latency_sum: float = 0.0
    latency_count: int = 0


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = Stats()
        self.dead: str | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._subscribers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.active)

    async def submit(self, request: Request) -> tuple[int, asyncio.Queue]:
        """Queue a request (its index is replaced by a server-wide id); returns (id, event queue).
        Raises what the engine raises on submit (RequestError, CapacityError, QueueFullError)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        events: asyncio.Queue = asyncio.Queue()
        request = replace(request, index=next(self._ids))
        self._inbox.put(("submit", request, loop, events, accepted))
        try:
            await accepted
        except asyncio.CancelledError:  # the caller went away before the engine took it
            self.cancel(request.index)
            raise
        return request.index, events

    def cancel(self, index: int) -> None:
        self._inbox.put(("cancel", index))

    # -- the thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.busy)
            if not self.engine.busy:
                continue
            try:
                active = len(self.engine.active) + min(len(self.engine.waiting), len(self.engine.free))
                events = self.engine.step()
            except Exception as exc:  # a broken engine must not hang its callers
                logger.exception("engine step failed")
                self.dead = f"{type(exc).__name__}: {exc}"
                for loop, events_queue in self._subscribers.values():
                    loop.call_soon_threadsafe(events_queue.put_nowait, EngineDeadError(self.dead))
                self._subscribers.clear()
                return
            self.stats.engine_steps += 1
            self.stats.canvases_denoised += active
            for event in events:
                target = self._subscribers.get(event.index)
                if isinstance(event, GenerationOutput):
                    self._count(event)
                    self._subscribers.pop(event.index, None)
                if target is not None:
                    loop, events_queue = target
                    loop.call_soon_threadsafe(events_queue.put_nowait, event)

    def _drain(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        if item[0] == "submit":
            _, request, loop, events_queue, accepted = item
            try:
                self.engine.submit(request)
            except DgemmaError as exc:
                loop.call_soon_threadsafe(_settle, accepted, exc)
                return
            self.stats.requests += 1
            self.stats.prompt_tokens += len(request.prompt_ids)
            self._subscribers[request.index] = (loop, events_queue)
            loop.call_soon_threadsafe(_settle, accepted, None)
        elif item[0] == "cancel" and self._subscribers.pop(item[1], None) is not None:
            self.engine.cancel(item[1])
            self.stats.finished["cancelled"] = self.stats.finished.get("cancelled", 0) + 1

    def _count(self, output: GenerationOutput) -> None:
        s = self.stats
        s.finished[output.finish_reason] = s.finished.get(output.finish_reason, 0) + 1
        s.completion_tokens += output.stats.completion_tokens
        s.committed_canvases += len(output.stats.steps_per_canvas)
        s.denoise_steps += output.stats.denoise_steps
        for i, bound in enumerate(LATENCY_BUCKETS):
            s.latency_buckets[i] += output.stats.seconds <= bound
        s.latency_sum += output.stats.seconds
        s.latency_count += 1


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(time.perf_counter())
    else:
        future.set_exception(error)
