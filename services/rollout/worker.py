"""The engine thread: one thread owns the engine, the asyncio loop only talks to it.

An engine (`engine/base.py`) is driven from one thread and its `step()` is compute-bound, so it
cannot run on the event loop (heartbeats and gRPC would stall). One dedicated thread loops `step()` while
there is work and sleeps on an event otherwise. The loop hands it commands through a queue
(add a request, abort, load weights); the thread answers through futures resolved with
`loop.call_soon_threadsafe`. New weights are applied by the same thread, between two decode
steps, which is what makes the swap atomic for the engine.

The thread also keeps the time it spent with nothing to do (`idle_seconds`): heartbeats carry
it, and the coordinator reports the rollout idle fraction from it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from slipstream.services.rollout.engine import Engine, Request, Result

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` where the OS shows it (`top -H`, /proc/<pid>/task/*/comm,
    py-spy), so the engine's CPU is told apart from the event loop's. Linux; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _resolve(fut: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    if fut.done():  # the waiter went away (cancelled RPC, dropped stream)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class EngineWorker:
    """Runs `engine` in its own thread; every public method is called from the loop."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.num_generated_tokens = 0
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._waiters: dict[str, asyncio.Future[Result]] = {}  # rid -> future of its Result
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None
        self.died = asyncio.Event()  # set (on the loop) if the engine thread fails
        self._started = time.monotonic()
        self._idle_total = 0.0  # finished idle periods
        self._idle_since: float | None = None  # start of the current idle period (engine thread)

    # ---- loop side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    @property
    def num_running(self) -> int:
        return len(self._waiters)

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self._started

    @property
    def idle_seconds(self) -> float:
        """Seconds the engine had no work, the current idle period included."""
        since = self._idle_since
        return self._idle_total + (time.monotonic() - since if since is not None else 0.0)

    def submit(self, request: Request) -> asyncio.Future[Result]:
        """Queue a request; the future resolves to its engine `Result`."""
        if request.rid in self._waiters:
            raise ValueError(f"request id {request.rid!r} is already running")
        # Sent first: if the thread is dead this raises before a waiter is left behind. The result
        # cannot overtake the registration below: it is delivered through this same loop.
        self._send(lambda: self._add(request))
        fut = self.loop.create_future()
        self._waiters[request.rid] = fut
        fut.add_done_callback(lambda _f, rid=request.rid: self._waiters.pop(rid, None))
        return fut

    def abort(self, rids: list[str]) -> None:
        """Stop these requests; their futures resolve with an "abort" result."""

        def run() -> None:
            self._deliver(*(r for r in map(self.engine.abort, rids) if r is not None))

        self._send(run)

    def abort_all(self) -> None:
        def run() -> None:
            self._deliver(*self.engine.abort_all())

        self._send(run)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> asyncio.Future[None]:
        """Apply weights between two decode steps; resolves once the engine serves `version`."""
        fut = self.loop.create_future()

        def run() -> None:
            try:
                self.engine.load_weights(state_dict, version)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine
                self.loop.call_soon_threadsafe(_resolve, fut, None, e)
            else:
                self.loop.call_soon_threadsafe(_resolve, fut, None)

        self._send(run)
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _send(self, command: Callable[[], None]) -> None:
        if self.error is not None:
            raise RuntimeError(f"the engine thread died: {self.error}")
        self._commands.put(command)
        if not self._wake.is_set():  # set and not yet cleared: the thread drains the queue after clearing
            self._wake.set()

    # ---- engine thread -----------------------------------------------------------------
    def _add(self, request: Request) -> None:
        try:
            self.engine.add_request(request)
        except ValueError as e:  # this request is refused; the engine and the others go on
            self.loop.call_soon_threadsafe(self._on_error, request.rid, e)

    def _on_error(self, rid: str, error: BaseException) -> None:
        fut = self._waiters.get(rid)
        if fut is not None:
            _resolve(fut, None, error)

    def _deliver(self, *results: Result) -> None:
        """Hand results to their waiters: a step's all at once, one wake-up of the loop."""
        if not results:
            return
        self.num_generated_tokens += sum(len(r.tokens) for r in results)
        # The waiter table belongs to the loop thread: look the futures up there.
        self.loop.call_soon_threadsafe(self._on_results, results)

    def _on_results(self, results: tuple[Result, ...]) -> None:
        for result in results:
            fut = self._waiters.get(result.rid)
            if fut is not None:
                _resolve(fut, result)

    def _fail_all(self, error: BaseException) -> None:
        for fut in list(self._waiters.values()):
            _resolve(fut, None, error)
        self.died.set()

    def _run(self) -> None:
        _name_os_thread("engine")
        try:
            while not self._stopping:
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()
                if self.engine.has_work():
                    self._deliver(*self.engine.step())
                else:
                    self._idle_since = time.monotonic()
                    self._wake.wait()
                    self._wake.clear()
                    self._idle_total += time.monotonic() - self._idle_since
                    self._idle_since = None
        except BaseException as e:  # noqa: BLE001 - surfaced to every waiter, then to the service
            self.error = e
            log.exception("engine thread failed")
            self.loop.call_soon_threadsafe(self._fail_all, RuntimeError(f"engine failed: {e}"))
