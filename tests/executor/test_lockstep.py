"""`executor.lockstep.in_step`: calls run in step at the stops, one at a time in index
order, the stop's work done once between; failures and interrupts unwind every call."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from executor.lockstep import Stop, in_step


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _inputs(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2 + k, 6, generator=g) for k in range(n)]


def test_each_stop_waits_for_every_call_and_its_work_changes_what_follows() -> None:
    """Stops at the 2nd and 3rd linear: every call reaches a stop (in index order)
    before its work runs; the work rescales the module's weight in place, and every
    call goes on with the rescaled weight: the outputs are the rescaled model's."""
    model, xs = _model(), _inputs(5)
    order: list[tuple[str, int]] = []
    me = threading.local()

    def seen(name: str):
        return lambda _m, _a: order.append((name, me.k))

    model[2].register_forward_pre_hook(seen("second"))
    model[4].register_forward_pre_hook(seen("third"))
    want = _model()
    with torch.no_grad():
        want[2].weight.mul_(2.0)
        want[4].weight.mul_(-0.5)
        expected = [want(x) for x in xs]

    def then(module: nn.Linear, factor: float, name: str):
        def work() -> None:
            order.append((f"work {name}", -1))
            with torch.no_grad():
                module.weight.mul_(factor)

        return work

    def run(k: int) -> torch.Tensor:
        me.k = k
        with torch.no_grad():
            return model(xs[k])

    stops = [
        Stop(model[2], then(model[2], 2.0, "second")),
        Stop(model[4], then(model[4], -0.5, "third")),
    ]
    out = in_step(len(xs), run, stops)
    assert order == (
        [("second", k) for k in range(5)]
        + [("work second", -1)]
        + [("third", k) for k in range(5)]
        + [("work third", -1)]
    )
    for got, ref in zip(out, expected, strict=True):
        assert torch.equal(got, ref)
    assert len(model[2]._forward_pre_hooks) == 1  # the park hook removed, `seen` left


def test_no_stop_reached_is_plain_calls() -> None:
    model, xs = _model(), _inputs(3)
    out = in_step(3, lambda k: model(xs[k]).detach(), [])
    assert all(torch.equal(o, model(x).detach()) for o, x in zip(out, xs, strict=True))


def _threads() -> int:
    return threading.active_count()


def test_a_failing_call_unwinds_the_others_and_raises_its_error() -> None:
    model, xs = _model(), _inputs(4)
    before = _threads()
    worked: list[int] = []

    def run(k: int) -> torch.Tensor:
        if k == 2:
            raise ValueError("batch 2 is bad")
        return model(xs[k])

    with pytest.raises(ValueError, match="batch 2 is bad"):
        in_step(4, run, [Stop(model[2], lambda: worked.append(1))])
    assert worked == []  # the stop's work never ran
    assert _threads() == before
    assert len(model[2]._forward_pre_hooks) == 0


def test_a_failing_stop_work_or_an_interrupt_unwinds_every_parked_call() -> None:
    model, xs = _model(), _inputs(4)
    before = _threads()
    finished: list[int] = []

    def run(k: int) -> torch.Tensor:
        out = model(xs[k])
        finished.append(k)
        return out

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        in_step(4, run, [Stop(model[2], interrupted)])
    assert finished == [] and _threads() == before
    with pytest.raises(RuntimeError, match="solve failed"):
        in_step(
            4, run, [Stop(model[4], lambda: (_ for _ in ()).throw(RuntimeError("solve failed")))]
        )
    assert finished == [] and _threads() == before


def test_calls_that_take_different_paths_are_refused() -> None:
    """A call that skips a stop another waits at: an error, not a hang."""
    model, xs = _model(), _inputs(3)
    before = _threads()

    def run(k: int) -> torch.Tensor:
        return model[:2](xs[k]) if k == 1 else model(xs[k])  # call 1 never reaches model[2]

    with pytest.raises(RuntimeError, match="reached different stops"):
        in_step(3, run, [Stop(model[2], lambda: None)])
    assert _threads() == before


def test_a_crew_keeps_its_threads_from_call_to_call_and_ends_them() -> None:
    """The same threads serve every `in_step` of a crew (a thread's first torch calls
    are slow), also after a failed run; `close` ends them."""
    from executor.lockstep import Crew

    model, xs = _model(), _inputs(4)
    before = _threads()
    idents: list[set[int]] = []

    def run(k: int) -> torch.Tensor:
        idents[-1].add(threading.get_ident())
        return model(xs[k]).detach()

    with Crew() as crew:
        for _ in range(2):
            idents.append(set())
            crew.in_step(4, run, [Stop(model[2], lambda: None)])
        with pytest.raises(RuntimeError, match="no"):
            crew.in_step(
                4, run, [Stop(model[2], lambda: (_ for _ in ()).throw(RuntimeError("no")))]
            )
        idents.append(set())
        out = crew.in_step(3, run, [])
        assert _threads() == before + 4
    assert idents[0] == idents[1] and len(idents[0]) == 4 and idents[2] < idents[0]
    assert all(torch.equal(o, model(x).detach()) for o, x in zip(out, xs, strict=False))
    assert _threads() == before
