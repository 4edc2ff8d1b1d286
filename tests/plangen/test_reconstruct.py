"""Reconstruction equals a direct damped least-squares solve, layer after layer."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler.checkpoint import load_checkpoint_facts
from executor.layerwise import LayerWalk
from plangen.analyze import model_facts
from plangen.candidate import Candidate
from plangen.metrics import DAMP  # what sequential() uses by default
from plangen.reconstruct import Settings, sequential, solve
from plangen.scores import ScoreTables

L = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from tests.helpers.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("r"), "qwen2", num_hidden_layers=L)
    ck = load_checkpoint_facts(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    windows = torch.randint(3, 128, (6, 10), generator=g).tolist()
    return model, ck, model_facts(ck), windows


def _scores(facts, seed: int = 0) -> ScoreTables:
    rng = np.random.default_rng(seed)
    tables = {}
    for i in range(facts.layers):
        tables[f"s.{i}.mlp"] = rng.random(facts.ffn)
        tables[f"s.{i}.attn"] = rng.random(facts.kv_heads)
    return ScoreTables(tables, {})


def _direct(
    x: torch.Tensor, w: torch.Tensor, kept: np.ndarray, target: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin ||X_K W'^T - T||^2 + lam ||W' - W_K||^2 as one stacked least-squares problem,
    T = X W^T (the projection's own output) unless given."""
    x, w = x.double(), w.double()
    k = torch.from_numpy(kept)
    xk = x[:, k]
    lam = DAMP * float((xk * xk).sum(0).mean())
    t = x @ w.T if target is None else target.double()
    a = torch.cat([xk, lam**0.5 * torch.eye(len(k), dtype=torch.float64)])
    b = torch.cat([t, lam**0.5 * w[:, k].T])
    return torch.linalg.lstsq(a, b).solution.T


def _inputs(model, windows, module_name: str) -> torch.Tensor:
    rows = []
    h = model.get_submodule(module_name).register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(input_ids=torch.tensor(windows[i : i + 4]), use_cache=False)
    h.remove()
    return torch.cat(rows)


def test_solve_equals_the_stacked_least_squares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    kept = np.array([0, 3, 4, 8, 11])
    got = solve(w, x.T @ x, torch.from_numpy(kept), DAMP)
    # float64 inside, rounded to float32 on the way out (the sidecar's precision)
    torch.testing.assert_close(got, _direct(x, w, kept), rtol=1e-6, atol=1e-7)


def test_solve_keeps_a_projection_whose_kept_inputs_explain_everything():
    """Removed columns that only ever see zeros: the kept weights are already optimal."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x[:, [1, 4]] = 0
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(solve(w, x.T @ x, kept, DAMP), w[:, kept])


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text", "phi3"])
def test_the_walk_reproduces_the_models_layers(tmp_path, model_type):
    """Layer by layer over cached states equals the model's own forward, also where
    layers differ in their masks (Gemma-3's sliding-window layers)."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.models import make_tiny_model

    path = make_tiny_model(tmp_path, model_type, num_hidden_layers=4, max_position_embeddings=64)
    ck = load_checkpoint_facts(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if model_type == "gemma3_text":
        model.config.sliding_window = 4  # shorter than the windows, so the masks differ
    g = torch.Generator().manual_seed(2)
    windows = torch.randint(3, 128, (6, 12), generator=g).tolist()
    batches = [torch.tensor(windows[i : i + 4]) for i in range(0, len(windows), 4)]
    walk = LayerWalk.over(model, ck.arch, batch_size=4)  # batches of 4 and 2
    states = walk.inputs(windows)
    with torch.no_grad():
        full = [model.base_model(input_ids=b, use_cache=False) for b in batches]
    for k in range(4):
        states = walk.forward_layer(k, states, inplace=True)
    final_norm = model.base_model.norm
    for b, out in enumerate(full):
        torch.testing.assert_close(final_norm(states.get(b)), out.last_hidden_state)


def test_sequential_equals_direct_solves_layer_by_layer(tiny):
    model, ck, facts, windows = tiny
    scores = _scores(facts)
    cand = Candidate(
        "uniform",
        "test",
        groups_dropped={0: (1,), 2: (0,)},
        mlp_width={0: 40, 1: 64, 2: 50},
        metric="s",
        reconstruct=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    solved = sequential(model, ck.arch, facts, cand, scores, windows, progress=False)
    for n, p in model.named_parameters():  # the model is left as it was
        assert torch.equal(p, before[n]), n
    assert [(s.layer, s.part) for s in solved] == [
        (0, "attn"),
        (0, "mlp"),
        (1, "mlp"),
        (2, "attn"),
        (2, "mlp"),
    ]
    # The reference: prune and re-solve one projection at a time on the full model.
    with _installing(model) as install:
        for s in solved:
            name = f"model.layers.{s.layer}." + (
                "self_attn.o_proj" if s.part == "attn" else "mlp.down_proj"
            )
            module = model.get_submodule(name)
            x = _inputs(model, windows, name)
            expected = _direct(x, module.weight.detach(), s.kept)
            torch.testing.assert_close(s.weight.double(), expected, rtol=1e-4, atol=1e-6)
            install(name, s)


@contextmanager
def _installing(model):
    """Yield install(name, solved): the projection keeps only the solved columns (the
    rest zero), as the sequential solver's later layers see it; every weight is put
    back on exit."""
    saved: dict[str, torch.Tensor] = {}

    def install(name: str, solved) -> None:
        module = model.get_submodule(name)
        saved.setdefault(name, module.weight.detach().clone())
        with torch.no_grad():
            module.weight.zero_()
            module.weight[:, torch.from_numpy(solved.kept)] = solved.weight

    try:
        yield install
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


# ---- end to end: analyze --reconstruct, check, apply, load, restore ------------------------

SMALL = ["--nsamples", "3", "--seqlen", "24", "--heldout", "2", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory):
    from plangen.cli import main as plangen
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    root = tmp_path_factory.mktemp("e2e")
    model_dir = add_char_tokenizer(make_tiny_model(root, "qwen2", num_hidden_layers=4))
    plan = root / "plan.prn"
    args = ["--strategy", "uniform", "--ratio", "0.4", "--reconstruct"]
    assert plangen(["analyze", str(model_dir), "-o", str(plan), *SMALL, *args]) == 0
    return model_dir, plan


def test_a_reconstructed_plan_checks_applies_loads_and_restores(analyzed, tmp_path):
    from compiler.check import check_file
    from executor.loader import load
    from plangen.scores import read_sidecar
    from plangen.surgery import Solved, applied
    from tests.helpers.outputs import apply_and_restore

    model_dir, plan = analyzed
    text = plan.read_text()
    assert "reconstruct" in text and "compensate" not in text
    result = check_file(plan)
    assert result.ok, result.errors
    out = apply_and_restore(plan, model_dir, tmp_path)

    # The applied model is the in-memory one with the sidecar's solved columns.
    from plangen.analyze_dense import candidates
    from plangen.options import Options

    ck = load_checkpoint_facts(model_dir)
    facts = model_facts(ck)
    scores = read_sidecar(plan.with_name("plan.scores.safetensors"))
    opts = Options(model_dir, plan, strategy="uniform", ratio=0.4, reconstruct=True)
    (cand,) = candidates(opts, facts, scores.without_reconstruction())
    solved = []
    for name, table in scores.tables.items():
        if name.startswith("reconstruct."):
            _, layer, part = name.split(".")
            space = "q" if part == "attn" else "ffn"
            kept = cand.kept_inputs(int(layer), space, facts, scores)
            solved.append(Solved(int(layer), part, kept, torch.from_numpy(table)))
    assert {(s.layer, s.part) for s in solved} == {
        (i, p) for i in range(4) for p in ("attn", "mlp")
    }
    model = load(model_dir, "cpu", torch.float32)
    pruned = load(out / "A", "cpu", torch.float32)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(model, ck.arch, facts, cand, scores, solved):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def _check_text(text: str, base):
    from compiler.check import check_text

    return check_text(text, base_dir=base)


def test_editing_a_reconstructed_plan_makes_its_weights_stale(analyzed):
    _model_dir, plan = analyzed
    text = plan.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("attn layers 2 drop groups"))
    group = int(line.split()[5])
    edited = text.replace(line, line.replace(f"groups {group}", f"groups {1 - group}"))
    result = _check_text(edited, plan.parent)
    # Layer 2 changed: its attention, layer 3's and the MLP statement of 0..3 (which
    # reconstructs layers 2 and 3 on top of it) are stale; layers 0 and 1 are not.
    assert [d.code for d in result.errors] == ["P124"] * 3, result.errors
    assert [d.span.line for d in result.errors] == [
        edited.splitlines().index(ln) + 1
        for ln in edited.splitlines()
        if ln.startswith(("attn layers 2", "attn layers 3", "mlp layers"))
    ]
    first = result.errors[0]
    assert first.message.startswith("the reconstructed weights of layers 2 were solved for ")
    assert f"layer 2 was groups {group} dropped" in first.message
    assert f"this plan has it groups {1 - group} dropped" in first.message
    assert "layers 2..3" in result.errors[2].message
    assert "plangen reconstruct" in (first.help or "")


def test_reconstruct_and_compensate_together_are_refused(analyzed):
    _model_dir, plan = analyzed
    edited = plan.read_text().replace(
        "58 by taylor reconstruct", "58 by taylor compensate reconstruct"
    )
    result = _check_text(edited, plan.parent)
    assert "P125" in [d.code for d in result.errors], result.errors


def test_plangen_reconstruct_re_solves_an_edited_plan(analyzed, tmp_path, capsys):
    import shutil

    from compiler.check import check_file
    from executor.apply import apply_plan
    from plangen.cli import main as plangen
    from plangen.scores import read_sidecar

    _model_dir, original = analyzed
    plan = tmp_path / "plan.prn"
    shutil.copy(original, plan)
    shutil.copy(original.with_name("plan.scores.safetensors"), tmp_path)
    text = plan.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("attn layers 2 drop groups"))
    group = int(line.split()[5])
    edited = text.replace(line, line.replace(f"groups {group}", f"groups {1 - group}"))
    plan.write_text(edited)
    assert [d.code for d in check_file(plan).errors] == ["P124"] * 3
    before = read_sidecar(tmp_path / "plan.scores.safetensors")

    assert plangen(["reconstruct", str(plan), "--quiet"]) == 0
    assert "8 projections re-solved" in capsys.readouterr().out
    result = check_file(plan)
    assert result.ok, result.errors
    after = read_sidecar(tmp_path / "plan.scores.safetensors")
    # Only the pin changed in the plan; the measurements are untouched; layers 0 and 1
    # come out as before (nothing before them changed), layer 2's attention does not.
    old_pin = next(ln for ln in edited.splitlines() if ln.startswith("scores "))
    new_pin = next(ln for ln in plan.read_text().splitlines() if ln.startswith("scores "))
    assert plan.read_text() == edited.replace(old_pin, new_pin) and old_pin != new_pin
    for name, table in before.tables.items():
        if not name.startswith("reconstruct."):
            np.testing.assert_array_equal(after.tables[name], table)
    for name in ("reconstruct.0.attn", "reconstruct.1.mlp"):
        np.testing.assert_allclose(after.tables[name], before.tables[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after.tables["reconstruct.2.attn"], before.tables["reconstruct.2.attn"])
    apply_plan(plan, tmp_path / "out")


def test_plangen_reconstruct_refuses_a_plan_without_reconstruct(analyzed, tmp_path, capsys):
    import shutil

    from plangen.cli import main as plangen

    _model_dir, original = analyzed
    plan = tmp_path / "plan.prn"
    shutil.copy(original.with_name("plan.scores.safetensors"), tmp_path)
    plan.write_text(original.read_text().replace(" reconstruct  #", "  #"))
    before = plan.read_text()
    assert plangen(["reconstruct", str(plan), "--quiet"]) == 2
    assert "has no `reconstruct` statement" in capsys.readouterr().err
    assert plan.read_text() == before


def _stale_copy(original, directory):
    """The analyzed plan and its sidecar copied to `directory`, layer 2's KV group
    swapped: layers 2 and 3's reconstruction stale (P124)."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    plan = directory / "plan.prn"
    shutil.copy(original.with_name("plan.scores.safetensors"), directory)
    text = original.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("attn layers 2 drop groups"))
    group = int(line.split()[5])
    plan.write_text(text.replace(line, line.replace(f"groups {group}", f"groups {1 - group}")))
    return plan


def test_plangen_reconstruct_offload_writes_the_in_memory_sidecar(analyzed, tmp_path):
    """--offload (states in memory) and --offload DIR (on disk, removed after): the
    model is walked one layer at a time from the checkpoint; the plan and sidecar are
    byte for byte the in-memory re-solve's."""
    from plangen.cli import main as plangen

    _model_dir, original = analyzed
    states = tmp_path / "states"
    runs = {"memory": [], "offload": ["--offload"], "disk": ["--offload", str(states)]}
    for name, extra in runs.items():
        plan = _stale_copy(original, tmp_path / name)
        assert plangen(["reconstruct", str(plan), "--quiet", *extra]) == 0, name
    memory = tmp_path / "memory"
    for name in ("offload", "disk"):
        for file in ("plan.prn", "plan.scores.safetensors"):
            assert (tmp_path / name / file).read_bytes() == (memory / file).read_bytes()
    assert states.is_dir() and not any(states.iterdir())


def _headroom(monkeypatch, model_dir, fits: bool) -> None:
    """This process under a memory limit (`ulimit -d`, as `process_headroom` reads
    RLIMIT_DATA) that the tiny model does not fit whole: with `fits`, what the walk one
    layer at a time needs does (the runtime's base share left out: a tiny model is
    smaller than it); else nothing fits. A real limit that low would stop python."""
    from plangen import memory

    monkeypatch.setattr(memory, "RUNTIME_BASE", 0)
    monkeypatch.delenv(memory.MEMORY_CHECK_ENV, raising=False)
    footprint = memory.Footprint.of(load_checkpoint_facts(model_dir))
    walk, whole = footprint.layerwise(4, 3 * 24, False, False), footprint.in_memory(4, False)
    assert walk < whole
    monkeypatch.setattr(memory, "process_headroom", lambda: (walk + whole) // 2 if fits else 0)


def test_plangen_reconstruct_walks_a_model_larger_than_the_limit_layer_by_layer(
    analyzed, tmp_path, capsys, monkeypatch
):
    from plangen.cli import main as plangen

    model_dir, original = analyzed
    memory = _stale_copy(original, tmp_path / "memory")
    assert plangen(["reconstruct", str(memory), "--quiet"]) == 0
    assert "decoder layer" not in capsys.readouterr().err  # fits: in memory, nothing said
    _headroom(monkeypatch, model_dir, fits=True)
    plan = _stale_copy(original, tmp_path / "limited")
    assert plangen(["reconstruct", str(plan), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "re-solving it one decoder layer at a time (--offload" in err
    assert "ulimit" in err
    for file in ("plan.prn", "plan.scores.safetensors"):
        assert (plan.parent / file).read_bytes() == (memory.parent / file).read_bytes()


def test_plangen_reconstruct_says_what_would_fit_when_nothing_does(
    analyzed, tmp_path, capsys, monkeypatch
):
    from plangen.cli import main as plangen

    model_dir, original = analyzed
    _headroom(monkeypatch, model_dir, fits=False)
    plan = _stale_copy(original, tmp_path)
    before = plan.read_text(), (tmp_path / "plan.scores.safetensors").read_bytes()
    assert plangen(["reconstruct", str(plan), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "even one decoder layer at a time" in err
    assert "--no-memory-check" in err and "--nsamples" not in err
    assert (plan.read_text(), (tmp_path / "plan.scores.safetensors").read_bytes()) == before
    assert plangen(["reconstruct", str(plan), "--quiet", "--no-memory-check"]) == 0


def test_plangen_reconstruct_interrupted_in_its_walk_leaves_no_state_cache(
    analyzed, tmp_path, capsys, monkeypatch
):
    """Ctrl-C while the walk holds states on disk: exit 130, the cache directory
    removed, the plan and its sidecar as they were; a stale cache of a killed run
    (`plancc-walk-PID-...` of a dead pid) is removed by the next run."""
    from executor.layerwise import CACHE_PREFIX
    from plangen.cli import main as plangen

    _model_dir, original = analyzed
    plan, states = _stale_copy(original, tmp_path / "p"), tmp_path / "states"
    (states / f"{CACHE_PREFIX}999999999-x").mkdir(parents=True)  # no such process

    held = []  # the cache alive past the walk: only `close` removes its directory

    def interrupted(*args, walk, **kwargs):
        held.append(walk.new_cache())
        assert held[0].directory is not None and held[0].directory.parent == states
        raise KeyboardInterrupt

    monkeypatch.setattr("plangen.reconstruct.sequential", interrupted)
    before = plan.read_bytes(), (plan.parent / "plan.scores.safetensors").read_bytes()
    assert plangen(["reconstruct", str(plan), "--quiet", "--offload", str(states)]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not any(states.iterdir())
    assert (plan.read_bytes(), (plan.parent / "plan.scores.safetensors").read_bytes()) == before


def test_plangen_reconstruct_help_has_analyzes_offload(capsys):
    from plangen.cli import main as plangen
    from plangen.options import Options

    with pytest.raises(SystemExit):
        plangen(["reconstruct", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    help_text = Options.__dataclass_fields__["offload"].metadata["plangen.option"].help
    assert "--offload [DIR]" in out and "--no-memory-check" in out
    assert " ".join(help_text.split()) in out


def _greedy_reference(w: torch.Tensor, h: torch.Tensor) -> list[int]:
    """Columns in the order exact greedy removal takes them: at each step the column
    whose removal (with the others re-fitted) raises tr((V - W) H (V - W)^T) least."""
    n = h.shape[0]
    alive = list(range(n))
    order = []
    base = float(torch.trace(w @ h @ w.T))
    while len(alive) > 1:
        best, best_err = None, None
        for j in alive:
            keep = [c for c in alive if c != j]
            hk = h[:, keep]
            fit = torch.trace(w @ hk @ torch.linalg.solve(h[keep][:, keep], hk.T) @ w.T)
            err = base - float(fit)
            if best_err is None or err < best_err - 1e-12:
                best, best_err = j, err
        order.append(best)
        alive.remove(best)
    return order + alive


def test_obs_ranking_is_the_exact_greedy_order_one_column_at_a_time():
    from plangen.reconstruct import obs_ranking

    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    x[:, 5] = 0.9 * x[:, 2] + 0.1 * x[:, 5]  # a correlated pair: greedy must see it
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)
    gram = x.T @ x
    damp = 1e-3
    ranking = obs_ranking(w, gram, damp, blocks=8)  # one column per round
    lam = damp * float(torch.diagonal(gram).mean())
    expected = _greedy_reference(w, gram + lam * torch.eye(8, dtype=torch.float64))
    assert list(np.argsort(ranking)) == expected


@pytest.mark.parametrize("n", [1, 5, 8, 96])
def test_the_gram_by_bands_is_the_float64_product(n):
    """GramHook multiplies only the bands on and above the diagonal and mirrors them:
    within float64 rounding of X^T X over every call, and exactly symmetric."""
    from plangen.reconstruct import GramHook

    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(n, 3, bias=False)
    xs = [torch.randn(2, 37, n, generator=g) ** 3 for _ in range(3)]
    hook = GramHook(lin, stop=False)
    with torch.no_grad():
        for x in xs:
            lin(x)
    gram = hook.remove()
    x64 = torch.cat([x.reshape(-1, n) for x in xs]).double()
    exact = x64.T @ x64
    assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, exact, rtol=1e-13, atol=1e-13 * float(exact.abs().max()))


def _obs_full_matrix(weight, gram, damp, blocks):
    """obs_ranking as it was first written: every round rewrites the full n x n H^-1,
    to the last column (the reference for the factored rounds and the early stop)."""
    import math

    w = weight.detach().to(torch.float64).clone()
    g = gram.to(torch.float64)
    n = g.shape[0]
    lam = damp * float(torch.diagonal(g).mean()) or 1e-8
    hinv = torch.linalg.inv(g + lam * torch.eye(n, dtype=torch.float64))
    alive = torch.ones(n, dtype=torch.bool)
    score = torch.empty(n, dtype=torch.float64)
    step = max(1, math.ceil(n / blocks))
    order = 0
    while bool(alive.any()):
        cost = (w * w).sum(0) / torch.diagonal(hinv).clamp_min(1e-30)
        cost[~alive] = math.inf
        take = min(step, int(alive.sum()))
        gone = torch.topk(cost, take, largest=False).indices
        gone = gone[torch.argsort(cost[gone], stable=True)]
        score[gone] = torch.arange(order, order + take, dtype=torch.float64)
        order += take
        alive[gone] = False
        if not bool(alive.any()):
            break
        solve_b = torch.linalg.solve(hinv[gone][:, gone], hinv[gone])
        w -= w[:, gone] @ solve_b
        hinv -= hinv[:, gone] @ solve_b
        w[:, gone] = 0.0
    return score.numpy()


def _obs_case(seed: int, n: int, out: int = 5):
    """W and G = X^T X with a correlated pair of inputs and a dead one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    x[:, 1] = 0.9 * x[:, 0] + 0.1 * x[:, 1]
    x[:, n // 2] = 0.0
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    return w, x.T @ x


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 40),
    blocks=st.sampled_from([1, 3, 8, 64]),
    damp=st.sampled_from([1e-3, 1e-2]),
)
def test_obs_ranking_factored_rounds_equal_the_full_matrix_rounds(seed, n, blocks, damp):
    """H^-1 kept as itself less the removals' factors: the full ranking is the
    full-matrix one, score for score."""
    from plangen.reconstruct import obs_ranking

    w, gram = _obs_case(seed, n)
    got = obs_ranking(w, gram, damp, blocks=blocks)
    np.testing.assert_array_equal(got, _obs_full_matrix(w, gram, damp, blocks))


def test_obs_ranking_without_cholesky_clamps_the_blocks_eigenvalues(monkeypatch):
    """Where rounding leaves a removed block of H^-1 not positive definite, the round
    factors it by its eigenvalues instead: on blocks that are (Cholesky made to fail
    here), the same ranking as the full-matrix rounds."""
    import plangen.reconstruct as reconstruct

    w, gram = _obs_case(7, 24)
    expected = _obs_full_matrix(w, gram, DAMP, blocks=6)

    def failing(block):
        return torch.zeros_like(block), torch.ones((), dtype=torch.int32)

    monkeypatch.setattr(reconstruct.torch.linalg, "cholesky_ex", failing)
    np.testing.assert_array_equal(reconstruct.obs_ranking(w, gram, DAMP, blocks=6), expected)


@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 40),
    blocks=st.sampled_from([1, 3, 8, 64]),
    data=st.data(),
)
def test_obs_ranking_stopped_at_a_width_keeps_the_full_rankings_channels(seed, n, blocks, data):
    """With the width given, the rounds stop once the kept set is decided: top_channels
    at that width is the full ranking's, and the scores are still a ranking."""
    from compiler.geometry import top_channels
    from plangen.reconstruct import obs_ranking

    width = data.draw(st.integers(1, n), label="width")
    w, gram = _obs_case(seed, n)
    full = obs_ranking(w, gram, DAMP, blocks=blocks)
    early = obs_ranking(w, gram, DAMP, blocks=blocks, width=width)
    assert top_channels(early, width) == top_channels(full, width)
    assert sorted(early) == list(range(n))  # every column a distinct rank


def test_one_shot_solves_every_layer_on_the_unpruned_models_inputs(tiny):
    model, ck, facts, windows = tiny
    cand = Candidate(
        "uniform", "test", mlp_width={0: 40, 1: 64, 2: 50}, metric="s", reconstruct=True
    )
    solved = sequential(
        model, ck.arch, facts, cand, _scores(facts), windows, one_shot=True, progress=False
    )
    for s in solved:
        name = f"model.layers.{s.layer}.mlp.down_proj"
        x = _inputs(model, windows, name)
        expected = _direct(x, model.get_submodule(name).weight.detach(), s.kept)
        torch.testing.assert_close(s.weight.double(), expected, rtol=1e-4, atol=1e-6)


def _recorded(model, windows, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and outputs of the named modules over the windows, flattened to rows."""
    seen: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {n: ([], []) for n in names}

    def hook(name):
        def record(_m, args, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[name][0].append(args[0].reshape(-1, args[0].shape[-1]))
            seen[name][1].append(out.reshape(-1, out.shape[-1]))

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(input_ids=torch.tensor(windows[i : i + 4]), use_cache=False)
    for h in handles:
        h.remove()
    return {n: (torch.cat(x), torch.cat(y)) for n, (x, y) in seen.items()}


def test_residual_solves_toward_the_original_models_layer_outputs(tiny):
    """Residual mode: down_proj of layer l is fitted to T = H_orig(l) - (layer output -
    down_proj output) on the model with layers < l pruned, so the MLP also absorbs
    the error pruned before it. Layer 0 (nothing pruned before) equals the local fit."""
    model, ck, facts, windows = tiny
    scores = _scores(facts)
    cand = Candidate(
        "uniform", "test", mlp_width={0: 40, 1: 64, 2: 50}, metric="s", reconstruct=True
    )
    kw = dict(progress=False)
    solved = sequential(model, ck.arch, facts, cand, scores, windows, residual=True, **kw)
    local = sequential(model, ck.arch, facts, cand, scores, windows, **kw)
    torch.testing.assert_close(solved[0].weight, local[0].weight, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(solved[2].weight, local[2].weight, atol=1e-3)
    layers = [f"model.layers.{k}" for k in range(L)]
    original = _recorded(model, windows, layers)
    with _installing(model) as install:
        for s in solved:
            name = f"model.layers.{s.layer}.mlp.down_proj"
            module = model.get_submodule(name)
            now = _recorded(model, windows, [name, layers[s.layer]])
            (x, y), layer_out = now[name], now[layers[s.layer]][1]
            target = original[layers[s.layer]][1] - layer_out + y
            expected = _direct(x, module.weight.detach(), s.kept, target)
            torch.testing.assert_close(s.weight.double(), expected, rtol=1e-4, atol=1e-6)
            install(name, s)


@pytest.mark.model
@pytest.mark.slow
def test_reconstruction_on_smollm2_checks_applies_and_beats_plain_slicing(
    smollm2_dir, tmp_path, capsys
):
    """The CLIs end to end on the real model: Wanda MLP-only at -10% with sequential
    reconstruction checks against the checkpoint, applies, and evaluates better than
    the same cut without it (re-planned from the same sidecar)."""
    import json

    from executor.cli import main as plancc
    from plangen.cli import main as plangen

    rebuilt, plain = tmp_path / "rebuilt.prn", tmp_path / "plain.prn"
    shape = ["--strategy", "uniform", "--parts", "mlp", "--metric", "wanda"]
    shape += ["--target-params", "0.9", "--nsamples", "16", "--seqlen", "256"]
    small = ["--heldout", "2", "--quiet"]
    assert (
        plangen(["analyze", str(smollm2_dir), "-o", str(rebuilt), *shape, *small, "--reconstruct"])
        == 0
    )
    sidecar = tmp_path / "rebuilt.scores.safetensors"
    assert (
        plangen(
            [
                "analyze",
                str(smollm2_dir),
                "-o",
                str(plain),
                *shape,
                *small,
                "--scores",
                str(sidecar),
            ]
        )
        == 0
    )
    assert " by wanda reconstruct" in rebuilt.read_text()
    assert "reconstruct" not in plain.read_text().split("calibration ")[-1]
    for plan in (rebuilt, plain):
        assert plancc(["check", str(plan), "--model", str(smollm2_dir)]) == 0
        assert plancc(["apply", str(plan), "-o", str(tmp_path / plan.stem)]) == 0
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "rebuilt"), str(tmp_path / "plain"), "--limit", "2"]
    assert plancc([*argv, "--new-tokens", "4", "--json"]) == 0
    with_it, without = json.loads(capsys.readouterr().out)["results"]
    assert with_it["params"] == without["params"]
    assert with_it["perplexity"] < without["perplexity"]


def test_auto_judges_on_shared_one_shot_solves_and_re_solves_the_winner(
    tmp_path, monkeypatch, capsys
):
    """auto's reconstructed candidates are judged on one-shot solves that share their
    statistics (one call for all, on the calibration's Grams), and the winner alone is
    solved in the mode asked (sequential), the sidecar holding what `plangen
    reconstruct` gives for the plan as written, and its held-out loss measured again."""
    import json
    import math
    import shutil

    import plangen.analyze as analyze
    import plangen.reconstruct as rec
    from plangen.cli import main as plangen
    from plangen.scores import read_sidecar
    from tests.helpers.models import add_char_tokenizer, make_tiny_model

    model_dir = add_char_tokenizer(make_tiny_model(tmp_path, "qwen2", num_hidden_layers=4))
    calls: list[tuple[Settings, int, bool]] = []
    real = rec.solve_all

    def spy(walk, arch, facts, jobs, scores, windows, settings, progress, grams=None, **kw):
        calls.append((settings, len(jobs), grams is not None))
        return real(walk, arch, facts, jobs, scores, windows, settings, progress, grams, **kw)

    def rebuilt_wins(_r, measured):  # whatever wins on a random tiny model
        return next(m for m in measured if m.candidate.reconstruct), "the test's choice"

    monkeypatch.setattr(rec, "solve_all", spy)
    monkeypatch.setattr(analyze, "_choice", rebuilt_wins)
    plan = tmp_path / "plan.prn"
    args = ["analyze", str(model_dir), "-o", str(plan), *SMALL, "--json"]
    assert plangen(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "reconstructed" in out["label"] and math.isfinite(out["heldout_loss_after"])
    assert out["why"].endswith("judged on one-shot solves, the chosen one re-solved (sequential)")
    judged, *final = calls
    assert judged[0].one_shot and judged[1] >= 2 and judged[2]  # all, shared, no walk
    assert final == [(Settings(), 1, False)]  # the winner alone, sequential
    sidecar = read_sidecar(plan.with_name("plan.scores.safetensors"))
    assert json.loads(sidecar.metadata["plancc"])["reconstruction"]["mode"] == "sequential"
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(plan, copy / "plan.prn")
    shutil.copy(plan.with_name("plan.scores.safetensors"), copy)
    monkeypatch.setattr(rec, "solve_all", real)
    assert plangen(["reconstruct", str(copy / "plan.prn"), "--quiet"]) == 0
    again = read_sidecar(copy / "plan.scores.safetensors")
    names = [n for n in sidecar.tables if n.startswith("reconstruct.")]
    assert names
    for name in names:
        np.testing.assert_array_equal(again.tables[name], sidecar.tables[name])
