"""Several calls of one function run in step: each parks at the same points until all
have reached them, and something runs once in between.

Why: sequential reconstruction (`plangen.reconstruct`) solves a decoder layer's
o_proj on the inputs it gets over every calibration batch, writes the solved
weight in, and only then may any batch go past o_proj; the same again at
down_proj. Run batch by batch, that takes a pass to each projection (stopped
there) and a last pass through the whole layer: about two layer-forwards. Run
in step, every batch's forward waits at the projection's input until the last
batch is there, the solve runs once, and every forward goes on with the solved
weight: one layer-forward, and the same arithmetic, because:

- the calls take turns, in index order, one at a time (a thread each, passing
  a baton): what runs in call k between two stops is what the batch-by-batch
  pass ran, and a sum that hooks add to in call order (the Gram of
  `plangen.reconstruct.GramHook`) is added to in the same order;
- the stop's `then` runs in the coordinating (calling) thread while every
  call is parked.

Each call runs in a copy of the caller's context (`contextvars`: what
`executor.distributed` keeps there is seen by the calls). Thread-local torch
state (grad mode) is the callee's to set: `LayerWalk.forward_batch` enters
`no_grad` itself. The price is memory: every call's live tensors at the stop
exist at once (the caller decides whether they fit).

A `Crew` keeps the threads from one layer to the next (fresh threads made a
layer's forwards 40% slower). An exception in a call, or an interrupt of the
caller, unwinds every parked call (a hook raises `Abandoned` in it) before it
propagates; the crew's threads end with it.
"""

from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

DONE = -1  # what a call reports once it has returned (a stop's index otherwise)


class Abandoned(BaseException):
    """Raised in a parked call when the run is given up (another call failed, or the
    caller was interrupted): it unwinds the call's forward. A BaseException, so that
    no `except Exception` in model code swallows it."""


@dataclass(frozen=True)
class Stop:
    """Where the calls wait (at `module`'s input: a forward pre-hook, registered after
    any other hook already on it, so those see the input first) and what runs once
    when all are there."""

    module: nn.Module
    then: Callable[[], None]


@dataclass
class _Baton:
    """Whose turn it is (a call's index, or `n`: the coordinator's) and where each
    call got to."""

    n: int
    turn: int = 0
    reached: list[int | None] = field(default_factory=list)
    abandon: bool = False
    finished: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def pass_on(self, me: int, where: int) -> None:
        with self.cond:
            self.reached[me] = where
            self.turn = me + 1
            self.cond.notify_all()

    def wait(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me or self.abandon)
            if self.abandon and me < self.n:
                raise Abandoned

    def finish(self) -> None:
        """A call is over (returned, failed or abandoned)."""
        with self.cond:
            self.finished += 1
            self.cond.notify_all()

    def abandon_all(self) -> None:
        """Unwind every parked call and wait until every call is over."""
        with self.cond:
            self.abandon = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.finished == self.n)


class Crew:
    """The threads that make the calls, kept from one `in_step` to the next (a walk's
    layers): a thread's first torch calls are slow (its allocator arena and the BLAS's
    buffers are new; fresh threads per layer made a SmolLM2 layer 40% slower than
    the same forwards run in one thread), a kept thread's are not. `close` (or the
    end of a `with` block) ends them."""

    def __init__(self) -> None:
        self._queues: list[queue.SimpleQueue[Callable[[], None] | None]] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Crew:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
        self._queues, self._threads = [], []

    def _grow(self, n: int) -> None:
        while len(self._threads) < n:
            q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
            t = threading.Thread(target=_serve, args=(q,), daemon=True, name="plancc-in-step")
            self._queues.append(q)
            self._threads.append(t)
            t.start()

    def in_step(self, calls: int, run: Callable[[int], Any], stops: Sequence[Stop]) -> list[Any]:
        """`run(k)` for k in range(calls), in step at `stops` (in the order the calls
        reach them): the results, by k. Every call must reach every stop, in the same
        order."""
        self._grow(calls)
        baton = _Baton(calls, turn=calls, reached=[None] * calls)
        results: list[Any] = [None] * calls
        errors: list[BaseException] = []
        local = threading.local()
        modules = [s.module for s in stops]

        def park(module: nn.Module, _args: tuple[Any, ...]) -> None:
            me = getattr(local, "me", None)
            if me is None:  # the module called outside the run (another thread)
                return
            baton.pass_on(me, modules.index(module))
            baton.wait(me)

        def call(k: int) -> None:
            local.me = k
            try:
                baton.wait(k)
                results[k] = run(k)
            except Abandoned:
                pass
            except BaseException as exc:  # handed to the coordinator, raised there
                errors.append(exc)
                baton.pass_on(k, DONE)
            else:
                baton.pass_on(k, DONE)
            finally:
                local.me = None
                baton.finish()

        handles = [m.register_forward_pre_hook(park) for m in modules]
        try:
            for k in range(calls):  # each call in a copy of the caller's context
                ctx = contextvars.copy_context()
                self._queues[k].put(functools.partial(ctx.run, call, k))
            for at in range(len(stops) + 1):
                with baton.cond:  # every call takes its turn, in order, up to its next stop
                    baton.turn = 0
                    baton.cond.notify_all()
                baton.wait(calls)
                if errors:
                    raise errors[0]
                where = set(baton.reached)
                if at == len(stops) or where == {DONE}:
                    if where != {DONE}:
                        raise RuntimeError(f"the calls went past every stop: reached {where}")
                    break
                if where != {at}:
                    raise RuntimeError(
                        f"the calls reached different stops ({sorted(where)}), not stop {at}: "
                        "they must all pass the same modules in the same order"
                    )
                stops[at].then()
        finally:
            baton.abandon_all()
            for h in handles:
                h.remove()
        return results


def _serve(q: queue.SimpleQueue[Callable[[], None] | None]) -> None:
    """A crew thread: the calls handed to it, in turn, until None."""
    while (job := q.get()) is not None:
        job()


def in_step(calls: int, run: Callable[[int], Any], stops: Sequence[Stop]) -> list[Any]:
    """`Crew.in_step` on a crew of its own (ended after)."""
    with Crew() as crew:
        return crew.in_step(calls, run, stops)
