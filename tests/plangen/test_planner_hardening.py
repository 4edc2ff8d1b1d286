"""The planner's promises under hostile input (issue 33): sidecars bound to the weights
they were measured on, inputs and the output checked before any work, Ctrl-C as one
line and exit 130, and every refusal exit 2 with the fix and nothing left on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.check import check_file
from compiler.checkpoint import load_checkpoint_facts, weights_digest
from executor.cli import main as plancc
from plangen.cli import main as plangen
from tests.helpers.models import add_char_tokenizer, make_tiny_model

SMALL = ["--nsamples", "3", "--seqlen", "24", "--heldout", "2", "--batch-size", "2", "--quiet"]
DEPTH = ["--strategy", "depth", "--drop", "1"]
RECONSTRUCTED = ["--strategy", "uniform", "--ratio", "0.4", "--reconstruct"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights-digest memo lives in a cache of each test's own."""
    monkeypatch.setenv("PLANCC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`a` and `b`: one shape, other weights; `short`: `a`'s family with 2 layers."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, layers, seed in (("a", 4, 0), ("b", 4, 1), ("short", 2, 0)):
        (root / name).mkdir()
        out[name] = add_char_tokenizer(
            make_tiny_model(root / name, "llama", num_hidden_layers=layers, seed=seed)
        )
    return out


@pytest.fixture(scope="module")
def analyzed(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reconstructed plan of model `a` (read-only for the tests: they copy it)."""
    plan = tmp_path_factory.mktemp("plan") / "plan.prn"
    args = ["analyze", str(models["a"]), "-o", str(plan), *SMALL, *RECONSTRUCTED]
    assert plangen(args) == 0
    return plan


def _copy_plan(plan: Path, dest: Path) -> Path:
    """The plan and its sidecar in `dest`, with the plan's source made absolute."""
    dest.mkdir(exist_ok=True)
    shutil.copy(plan.with_name("plan.scores.safetensors"), dest)
    text = plan.read_text()
    source = next(ln for ln in text.splitlines() if ln.startswith("source "))
    real = (plan.parent / source.split('"')[1]).resolve()
    (dest / "plan.prn").write_text(text.replace(source, f'source "{real}"'))
    return dest / "plan.prn"


def _refused(run, args: list[str], capsys: pytest.CaptureFixture[str], *texts: str) -> str:
    assert run(args) == 2
    err = capsys.readouterr().err
    for t in texts:
        assert t in err, err
    assert "Traceback" not in err
    return err


def _left(directory: Path) -> list[str]:
    """What a test directory holds besides the digest cache."""
    return sorted(p.name for p in directory.iterdir() if p.name != "cache")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _analyze(model: Path, plan: Path, *extra: str) -> list[str]:
    return ["analyze", str(model), "-o", str(plan), *SMALL, *extra]


def _one_interrupted_line(err: str) -> None:
    """Ctrl-C says one line (transformers' own progress bars aside)."""
    ours = [ln for ln in err.splitlines() if ln.startswith("plangen")]
    assert ours == ["plangen: interrupted; nothing was written"], err
    assert "Traceback" not in err


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- case 4: sidecars are bound to their model's weights ---------------------------------


def test_weights_digest_is_sha256_of_the_data_bytes_in_name_order(models, tmp_path) -> None:
    import hashlib

    model = shutil.copytree(models["a"], tmp_path / "m")
    ck = load_checkpoint_facts(model)
    raw = (model / "model.safetensors").read_bytes()
    h = hashlib.sha256()
    for name in sorted(ck.index):
        begin, end = ck.index[name].byte_range
        h.update(raw[begin:end])
    assert weights_digest(model, ck.index) == "sha256:" + h.hexdigest()
    assert (tmp_path / "cache" / "weights-digests.json").is_file()  # memoized
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    (model / "model.safetensors").write_bytes(bytes(flipped))  # same shapes, one bit
    ck2 = load_checkpoint_facts(model)
    assert ck2.facts["fingerprint"] == ck.facts["fingerprint"]
    assert weights_digest(model, ck2.index) != weights_digest(models["a"], ck.index)


def test_the_plan_and_the_sidecar_record_the_weights(analyzed: Path, models) -> None:
    from compiler.sidecar import read_sidecar_tables

    ck = load_checkpoint_facts(models["a"])
    digest = weights_digest(models["a"], ck.index)
    assert f'  weights "{digest}"\n' in analyzed.read_text()
    header = read_sidecar_tables(analyzed.with_name("plan.scores.safetensors"))
    assert header.weights() == digest


def test_reconstruct_refuses_a_checkpoint_with_other_weights(
    analyzed: Path, models, tmp_path, capsys
) -> None:
    plan = _copy_plan(analyzed, tmp_path / "p")
    before = _snapshot(plan.parent)
    args = ["reconstruct", str(plan), "--model", str(models["b"]), "--quiet"]
    _refused(plangen, args, capsys, "has other weights", "pass --model with the checkpoint")
    assert _snapshot(plan.parent) == before


def test_reconstruct_refuses_a_sidecar_of_other_weights_without_the_plan_line(
    analyzed: Path, models, tmp_path, capsys
) -> None:
    plan = _copy_plan(analyzed, tmp_path / "p")
    text = plan.read_text()
    plan.write_text("".join(ln for ln in text.splitlines(True) if "  weights " not in ln))
    before = _snapshot(plan.parent)
    args = ["reconstruct", str(plan), "--model", str(models["b"]), "--quiet"]
    _refused(plangen, args, capsys, "than the sidecar records")
    assert _snapshot(plan.parent) == before


def test_apply_refuses_a_source_with_other_weights(
    analyzed: Path, models, tmp_path, capsys
) -> None:
    plan = _copy_plan(analyzed, tmp_path / "p")
    out = tmp_path / "out"
    args = ["apply", str(plan), "--model", str(models["b"]), "-o", str(out)]
    _refused(
        plancc, args, capsys, "are not the ones the plan was measured on", "nothing was written"
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_check_refuses_a_sidecar_measured_on_other_weights(
    analyzed: Path, models, tmp_path
) -> None:
    """P127: the plan states the weights of `a`, the sidecar was measured on `b`."""
    from compiler.hashing import sha256_file

    other = tmp_path / "other" / "plan.prn"
    assert plangen(_analyze(models["b"], other, *RECONSTRUCTED)) == 0
    plan = _copy_plan(analyzed, tmp_path / "p")
    sidecar = plan.with_name("plan.scores.safetensors")
    old_sha = sha256_file(sidecar)
    shutil.copy(other.with_name("plan.scores.safetensors"), sidecar)
    plan.write_text(plan.read_text().replace(old_sha, sha256_file(sidecar)))
    codes = [d.code for d in check_file(plan).errors]
    assert "P127" in codes, codes
    p127 = next(d for d in check_file(plan).errors if d.code == "P127")
    assert "measured on weights" in p127.message and "plangen analyze" in (p127.help or "")


def test_check_with_model_refuses_a_checkpoint_of_other_weights(
    analyzed: Path, models, capsys
) -> None:
    """P132: `check --model` hashes the checkpoint's weights when the plan states them."""
    from executor.cli import main as plancc

    assert plancc(["check", str(analyzed), "--model", str(models["a"]), "--no-cost"]) == 0
    capsys.readouterr()
    assert plancc(["check", str(analyzed), "--model", str(models["b"]), "--no-cost"]) == 1
    err = "".join(capsys.readouterr())
    assert "error[P132]" in err and "same structure, other weights" in err
    assert "pass --model the checkpoint the plan was analyzed on" in err


def test_analyze_scores_refuses_a_sidecar_of_another_model(
    analyzed: Path, models, tmp_path, capsys
) -> None:
    sidecar = str(analyzed.with_name("plan.scores.safetensors"))
    plan = tmp_path / "q.prn"
    args = _analyze(models["short"], plan, "--scores", sidecar)
    _refused(plangen, args, capsys, "was measured on another model", "re-run without --scores")
    args = _analyze(models["b"], plan, "--scores", sidecar)
    _refused(plangen, args, capsys, "was measured on other weights", "re-run without --scores")
    assert _left(tmp_path) == []


def test_analyze_scores_writes_the_sidecars_calibration(analyzed: Path, models, tmp_path) -> None:
    """The calibration line is the sidecar's (3 windows of 24 tokens), not the options'."""
    sidecar = str(analyzed.with_name("plan.scores.safetensors"))
    plan = tmp_path / "q.prn"
    args = ["analyze", str(models["a"]), "-o", str(plan), "--scores", sidecar, "--quiet"]
    # --seqlen's default, 512, is past this model's 64 positions: the sidecar's 24 is used
    assert plangen([*args, "--strategy", "uniform", "--nsamples", "5", "--heldout", "2"]) == 0
    assert "\ncalibration builtin samples 3 seqlen 24 seed 0\n" in plan.read_text()
    assert check_file(plan).ok


# ---- case 6: no traceback on any input --------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda raw: raw[:100], "truncated"),
        (lambda raw: b"hello, not safetensors\n", "not a safetensors file"),
    ],
    ids=["truncated", "not-safetensors"],
)
def test_a_damaged_scores_file_is_refused(
    content, message, analyzed: Path, models, tmp_path, capsys
) -> None:
    bad = tmp_path / "bad.scores.safetensors"
    bad.write_bytes(content(analyzed.with_name("plan.scores.safetensors").read_bytes()))
    plan = tmp_path / "q.prn"
    err = _refused(
        plangen,
        _analyze(models["a"], plan, "--scores", str(bad)),
        capsys,
        message,
        "plangen analyze",
    )
    assert "re-save the checkpoint" not in err
    assert not plan.exists() and not plan.with_name("q.scores.safetensors").exists()


def test_a_depth_only_sidecar_with_a_width_strategy_is_refused(models, tmp_path, capsys) -> None:
    depth = tmp_path / "depth.prn"
    assert plangen(_analyze(models["a"], depth, *DEPTH)) == 0
    plan = tmp_path / "g.prn"
    sidecar = str(tmp_path / "depth.scores.safetensors")
    args = _analyze(models["a"], plan, "--scores", sidecar, "--strategy", "global")
    _refused(plangen, args, capsys, "no `taylor` tables", "re-run without --scores")
    assert not plan.exists()


def test_an_unwritable_output_is_refused_before_any_work(models, capsys) -> None:
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    args = _analyze(models["a"], Path("/proc/x.prn"))
    _refused(plangen, args, capsys, "cannot create files in /proc", "choose a writable -o")


def test_ctrl_c_in_analyze_exits_130_and_leaves_nothing(
    models, tmp_path, monkeypatch, capsys
) -> None:
    """Interrupted while the plan is checked: the sidecar is already written to its
    temporary name, and that is removed too."""
    from plangen import pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "check_text", interrupt)
    plan = tmp_path / "out" / "p.prn"
    assert plangen(_analyze(models["a"], plan, *DEPTH)) == 130
    _one_interrupted_line(capsys.readouterr().err)
    assert _left(tmp_path) == []  # not even out/


def test_ctrl_c_in_reconstruct_exits_130_and_changes_nothing(
    analyzed: Path, tmp_path, monkeypatch, capsys
) -> None:
    from plangen import reconstruct

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    plan = _copy_plan(analyzed, tmp_path / "p")
    text = plan.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("attn layers 2 drop groups"))
    group = int(line.split()[5])
    plan.write_text(text.replace(line, line.replace(f"groups {group}", f"groups {1 - group}")))
    before = _snapshot(plan.parent)
    monkeypatch.setattr(reconstruct, "sequential", interrupt)
    assert plangen(["reconstruct", str(plan), "--quiet"]) == 130
    _one_interrupted_line(capsys.readouterr().err)
    assert _snapshot(plan.parent) == before


# ---- case 7: inputs and the output checked first ----------------------------------------


def test_an_output_directory_is_refused_before_calibrating(
    models, tmp_path, monkeypatch, capsys
) -> None:
    from plangen import calibrate

    def never(*args, **kwargs):
        raise AssertionError("calibrated before checking -o")

    monkeypatch.setattr(calibrate, "collect", never)
    (tmp_path / "plans").mkdir()
    args = _analyze(models["a"], tmp_path / "plans")
    _refused(plangen, args, capsys, "is a directory; -o names the plan file")
    assert list((tmp_path / "plans").iterdir()) == []
    assert _left(tmp_path) == ["plans"]


def test_an_existing_plan_is_replaced_only_with_force(models, tmp_path, capsys) -> None:
    plan = tmp_path / "p.prn"
    plan.write_text("# my notes\n")
    _refused(plangen, _analyze(models["a"], plan), capsys, "already exists; pass --force")
    assert plan.read_text() == "# my notes\n"
    assert not plan.with_name("p.scores.safetensors").exists()
    assert (
        plangen(_analyze(models["a"], plan, "--strategy", "depth", "--drop", "1", "--force")) == 0
    )
    assert check_file(plan).ok


def test_a_killed_runs_temporary_files_are_removed_by_the_next(models, tmp_path) -> None:
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f".p.prn.tmp-{dead}", tmp_path / f".p.scores.safetensors.tmp-{dead}"]
    kept = [
        tmp_path / f".p.prn.tmp-{alive}",  # a live process's
        tmp_path / ".p.prn.tmp-notapid",  # not plangen's naming
        tmp_path / f".other.prn.tmp-{dead}",  # another destination's
    ]
    for p in stale + kept:
        p.write_bytes(b"partial")
    assert plangen(_analyze(models["a"], tmp_path / "p.prn", *DEPTH)) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop", "0"], "--drop 0: the model has 4 layers; drop between 1 and 3"),
        (["--drop", "99"], "--drop 99: the model has 4 layers; drop between 1 and 3"),
        (["--drop-frac", "0.1"], "--drop-frac 0.1 of 4 layers is 0 layers"),
        (["--seqlen", "100000"], "--seqlen 100000: the model's positions go up to 64"),
        (["--drop-experts", "0.25"], "is a dense model (no routed experts)"),
        (["--shrink-experts", "0.25"], "is a dense model (no routed experts)"),
    ],
    ids=["drop-0", "drop-99", "drop-frac-0", "seqlen", "drop-experts", "shrink-experts"],
)
def test_option_values_the_model_cannot_take_are_refused_first(
    args, message, models, tmp_path, monkeypatch, capsys
) -> None:
    from executor import loader

    def never(*a, **k):
        raise AssertionError("loaded the model before checking the options")

    monkeypatch.setattr(loader, "load", never)
    plan = tmp_path / "p.prn"
    small = [a for a in SMALL if a not in ("--seqlen", "24")] if "--seqlen" in args else SMALL
    _refused(
        plangen, ["analyze", str(models["a"]), "-o", str(plan), *small, *args], capsys, message
    )
    assert _left(tmp_path) == []


# ---- case 8: messages -------------------------------------------------------------------


def test_reconstruct_shows_a_plans_errors_as_diagnostics(analyzed: Path, tmp_path, capsys) -> None:
    plan = _copy_plan(analyzed, tmp_path / "p")
    plan.write_text(plan.read_text() + "drop layers 9\n")
    err = _refused(plangen, ["reconstruct", str(plan), "--quiet"], capsys, "error[P104]")
    assert "Diagnostic(" not in err and "plancc check" in err


def test_reconstruct_in_a_directory_it_cannot_write_says_so_without_dash_o(
    analyzed: Path, tmp_path, monkeypatch, capsys
) -> None:
    from plangen import staging

    def read_only(dest: Path) -> None:
        raise PermissionError(13, "Permission denied", str(dest))

    plan = _copy_plan(analyzed, tmp_path / "p")
    monkeypatch.setattr(staging, "probe", read_only)
    err = _refused(plangen, ["reconstruct", str(plan), "--quiet"], capsys, "make ", "writable")
    assert " -o" not in err


def test_the_offline_hint_names_the_calib_option(models, tmp_path, monkeypatch, capsys) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    args = _analyze(models["a"], tmp_path / "p.prn", "--calib", "wikitext2")
    err = _refused(plangen, args, capsys, "--calib builtin")
    assert "--data builtin" not in err


def test_no_option_is_taken_as_an_abbreviation(models, tmp_path, capsys) -> None:
    from plangen.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        plangen(_analyze(models["a"], tmp_path / "p.prn", "--data", "x"))
    assert exc.value.code == 2
    assert "unrecognized arguments: --data" in capsys.readouterr().err
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    assert not parser.allow_abbrev and all(not p.allow_abbrev for p in subparsers.values())


# ---- case 12: the candidate table ---------------------------------------------------------


def test_the_candidate_table_keeps_whole_labels_and_says_which_wins() -> None:
    from plangen.analyze import render
    from plangen.candidate import Candidate
    from plangen.pipeline import Measured, Outcome

    long = "global taylor (attention and MLP): 0 KV groups and 146 channels over 4 layers, " * 2
    finalist = Measured(Candidate("global", long + "A"), 80, 4.8, 4.9)
    cut = Measured(Candidate("uniform", long + "B"), 80, 4.7, None)
    out = Outcome(Path("p.prn"), Path("p.scores"), finalist, [finalist, cut], 100, 5.0, "x", 1, 1)
    screen = render(out)
    assert long + "A" in screen and long + "B" in screen
    assert "ppl, first window" in screen
    assert "* marks the lowest of those, which wins" in screen
    assert "was cut after the first window" in screen
    rows = [ln for ln in screen.splitlines() if ln.startswith(("* ", "  global", "  uniform"))]
    assert rows[0].startswith("* ") and rows[0].endswith(f"{2.718281828459045**4.9:.2f}")
