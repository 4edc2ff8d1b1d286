"""`plangen analyze`'s options stated once (`plangen.options`) and the one pipeline
table (`plangen.analyze.KINDS`): no model is loaded here."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from plangen.candidate import Candidate
from plangen.options import NOT_AN_OPTION, OPTION, OptionError, Options, add_arguments
from tests.helpers.paths import ROOT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plangen analyze")
    add_arguments(parser)
    return parser


def _opts(*argv: str) -> Options:
    args = _parser().parse_args(["m", "-o", "p.prn", *argv])
    return Options.from_args(args, command=["analyze", *argv])


def test_every_field_is_an_option_or_says_why_not() -> None:
    for f in dataclasses.fields(Options):
        assert (OPTION in f.metadata) != (NOT_AN_OPTION in f.metadata), f.name
    assert [f.name for f in dataclasses.fields(Options) if NOT_AN_OPTION in f.metadata] == [
        "command"
    ]


def test_the_parser_has_exactly_the_flags_of_the_fields() -> None:
    options = [f for f in dataclasses.fields(Options) if OPTION in f.metadata]
    actions = [a for a in _parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert [a.dest for a in actions] == [f.name for f in options]  # in field order
    for f, action in zip(options, actions, strict=True):
        flag = f.metadata[OPTION]
        names = list(flag.names)
        if isinstance(action, argparse.BooleanOptionalAction):  # --x and --no-x
            names += [n.replace("--", "--no-", 1) for n in flag.names]
        assert action.option_strings == names, f.name
        assert action.help == flag.help, f.name
        if f.default is not dataclasses.MISSING:
            assert action.default == f.default, f.name
    assert len({a.dest for a in actions}) == len(actions) == 46  # with --shard-layers


def test_the_size_options_stay_mutually_exclusive() -> None:
    (group,) = _parser()._mutually_exclusive_groups
    assert [a.dest for a in group._group_actions] == [
        "target_params",
        "drop",
        "drop_experts",
        "drop_frac",
        "ratio",
    ]
    with pytest.raises(SystemExit):
        _parser().parse_args(["m", "-o", "p", "--drop", "2", "--ratio", "0.3"])


def test_options_are_frozen_and_replaced_not_mutated() -> None:
    from plangen.analyze import adopt_calibration
    from plangen.scores import ScoreTables, metadata_json

    opts = _opts()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.strategy = "depth"  # type: ignore[misc]
    cal = {"data": "ptb", "samples": 8, "seqlen": 128, "seed": 3}
    scores = ScoreTables({}, metadata_json({"calibration": cal}))
    adopted = adopt_calibration(opts, scores)
    assert (adopted.calib, adopted.nsamples, adopted.seqlen, adopted.seed) == ("ptb", 8, 128, 3)
    assert (opts.calib, opts.nsamples, opts.seqlen, opts.seed) == ("builtin", 32, 512, 0)


def test_defaults_resolve_as_before() -> None:
    opts = _opts()
    assert opts == Options(Path("m"), Path("p.prn"), device="cpu", command=("analyze",))
    assert (opts.strategy, opts.device, opts.progress, opts.trust, opts.layer_cut) == (
        "auto",
        "cpu",
        True,
        True,
        None,
    )
    assert not opts.one_shot and not opts.residual
    assert opts.resolved() == opts  # resolving twice changes nothing


@pytest.mark.parametrize(
    ("argv", "strategy"),
    [
        (["--ratio", "0.3"], "uniform"),
        (["--ratio", "0.3", "--strategy", "best"], "uniform"),
        (["--drop", "2"], "depth"),
        (["--drop-frac", "0.25"], "depth"),
        (["--strategy", "best"], "auto"),
        (["--ratio", "0.3", "--strategy", "global"], "global"),
    ],
)
def test_the_strategy_the_size_implies(argv: list[str], strategy: str) -> None:
    assert _opts(*argv).strategy == strategy


def test_derived_values() -> None:
    assert _opts("--reconstruct-mode", "one-shot").one_shot
    assert _opts("--reconstruct-mode", "residual").residual
    assert (_opts("--max-layer-cut", "none").layer_cut, _opts("--max-layer-cut", "none").trust) == (
        None,
        False,
    )
    assert _opts("--max-layer-cut", "0.3").layer_cut == 0.3
    assert not _opts("--quiet").progress and not _opts("--json").progress


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nsamples", "0"], "--nsamples must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-layer-cut", "2"], "--max-layer-cut: expected a fraction between 0 and 1"),
        (["--compensate", "--reconstruct"], "--compensate and --reconstruct"),
    ],
)
def test_refused_values_say_which_option(argv: list[str], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        _opts(*argv)


def test_distinct_keeps_the_candidates_each_row_kept() -> None:
    """One `distinct` for both rows: dense candidates differ by the table that picks
    their channels; MoE ones that drop the same experts are one, whatever the router
    score that picked them (both as the two copies of it decided before)."""
    from plangen.pipeline import distinct

    a = Candidate("uniform", "a", mlp_width={0: 4}, metric="taylor")
    b = Candidate("uniform", "b", mlp_width={0: 4}, metric="wanda")
    assert distinct([a, b, dataclasses.replace(a, label="a again")]) == [a, b]
    x = Candidate("experts", "x", metric="frequency", experts_dropped={1: (0, 1)})
    y = dataclasses.replace(x, label="y", metric="routing_weight")
    z = dataclasses.replace(x, label="z", experts_rescale=True)
    groups = {0: (1,)}
    g1 = dataclasses.replace(x, groups_dropped=groups, width_metric="wanda")
    g2 = dataclasses.replace(y, groups_dropped=groups, width_metric="wanda")
    assert distinct([x, y, z, g1, g2]) == [x, z, g1]


def test_the_table_has_a_row_for_each_kind_of_model() -> None:
    from plangen.analyze import KINDS, kind_of

    assert [k.name for k in KINDS] == ["moe", "dense"]

    class Facts:
        is_moe = True

    assert kind_of(Facts()).name == "moe"  # type: ignore[arg-type]
    Facts.is_moe = False
    assert kind_of(Facts()).name == "dense"  # type: ignore[arg-type]


OWNED = [
    "plangen/analyze.py",
    "plangen/analyze_dense.py",
    "plangen/analyze_moe.py",
    "plangen/pipeline.py",
    "plangen/options.py",
    "plangen/cli.py",
    "executor/device.py",
]


@pytest.mark.parametrize("path", OWNED)
def test_no_function_of_the_pipeline_is_over_80_lines(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long


def test_help_imports_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from plangen.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['analyze', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
