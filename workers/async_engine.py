"""Asyncio front of the engine for serving: requests come in from coroutines, the engine steps in
one background thread, deltas flow back through per-request asyncio queues.

Owns: `AsyncEngine` (add/generate/abort, health, stats), the step thread and its lifecycle.
The torch forward releases the GIL, so the event loop (HTTP, Ray handle calls) stays responsive
while a step runs. A consumer that stops iterating (client disconnect, cancellation) aborts its
request, which frees its KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import traceback
from collections.abc import AsyncIterator

from workers.config import EngineConfig
from workers.engine import LLMEngine, LoadedModel
from workers.outputs import RequestOutput
from workers.sampling_params import SamplingParams
from workers.stats import EngineStats, Observations

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


def _deliver(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item: object) -> bool:
    """Hands `item` to a waiter on its event loop; False when that loop is closed (its caller ran
    `asyncio.run` to its end with the request still open): the step thread must not die of it."""
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
        return True
    except RuntimeError:
        return False


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, loaded: LoadedModel | None = None, start: bool = True, drafter=None) -> None:
        self.config = config
        self.engine = LLMEngine(config, loaded=loaded, drafter=drafter)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self._lock = threading.Lock()  # guards engine mutations between the step thread and callers
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="idlm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def check_health(self) -> None:
        if not self.is_healthy():
            raise EngineDeadError(f"engine step loop is not running: {self._error!r}")

    # -- tokenization helpers ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    # -- requests ----------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.check_health()
        rid = request_id or f"areq-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._queues:
                raise ValueError(f"request_id: {rid!r} is already running")
            self.engine.add_request(prompt_token_ids, params, rid, cache_salt=cache_salt)  # ValueError on bad input
            self._queues[rid] = (loop, queue)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True
                    # a constraint the replica could not compile is the request's fault (a 400)
                    raise (ValueError if item.error.startswith("structured_outputs") else RuntimeError)(item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            entry = self._queues.pop(request_id, None)
            out = self.engine.abort(request_id)
        if entry is not None and out is not None:
            _deliver(*entry, out)

    def reset_prefix_cache(self) -> int:
        with self._lock:
            return self.engine.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return self.engine.stats.snapshot()

    def drain_observations(self) -> Observations:
        return self.engine.stats.drain()

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self.engine.requests)

    # -- step thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    busy = self.engine.has_unfinished()
                    outputs = self.engine.step() if busy else []
                    targets = []
                    for out in outputs:
                        entry = self._queues.get(out.request_id)
                        if entry is None:
                            continue
                        if out.finished:
                            self._queues.pop(out.request_id, None)
                        targets.append((entry, out))
                for (loop, q), out in targets:
                    if not _deliver(loop, q, out) and not out.finished:
                        self.abort(out.request_id)  # its caller's event loop is gone: nobody reads it
                if not busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # the engine is broken: fail every waiter, report unhealthy
            log.error("engine step loop died: %s", traceback.format_exc())
            self._error = e
            with self._lock:
                entries = list(self._queues.values())
                self._queues.clear()
            for loop, q in entries:
                _deliver(loop, q, EngineDeadError(f"engine failed: {e!r}"))
