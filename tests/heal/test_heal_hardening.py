"""`plancc heal` under hostile input (issue 33): it deletes only its own work directory,
never unpickles, checks everything before training, and leaves a resumable state on
Ctrl-C. Each case goes through the CLI and checks exit code, message and what is on disk."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from executor.cli import main
from executor.layout import MARKER
from tests.helpers.heal import QUICK
from tests.helpers.outputs import file_hashes, flip_data_byte, nothing_beside, refused
from tests.helpers.paths import ROOT

# 4 optimizer steps of 2 batches; a state after every step; no report
RUN = [*QUICK, "--eval-limit", "0", "--save-every", "1"]


def _heal(src: Path, dest: Path, *extra: str) -> list[str]:
    return ["heal", str(src), "-o", str(dest), *RUN, *extra]


def _marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _interrupt_training(monkeypatch: pytest.MonkeyPatch, at_batch: int) -> None:
    """Ctrl-C (KeyboardInterrupt) inside the `at_batch`-th training batch."""
    import heal.train as train_mod

    real, calls = train_mod.objective, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_batch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "objective", interrupted)


def _ctrl_c(args: list[str]) -> None:
    """`main(args)` for a run that gets Ctrl-C: KeyboardInterrupt, or exit 130 once the
    top-level `main` turns it into one line."""
    try:
        rc = main(args)
    except KeyboardInterrupt:
        return
    assert rc == 130


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a training step runs."""
    import heal.train as train_mod

    def refuse(*args, **kwargs):
        raise AssertionError("trained, but should have stopped before")

    monkeypatch.setattr(train_mod, "objective", refuse)


@pytest.fixture(scope="module")
def interrupted(out: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work directory a run left when Ctrl-C hit its fifth batch (state after step 2)."""
    dest = tmp_path_factory.mktemp("ctrl-c") / "healed"
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_training(mp, 5)
        _ctrl_c(_heal(out, dest))
    return dest.with_name("healed.work")


def _resumable_copy(interrupted: Path, tmp_path: Path) -> Path:
    """A copy of the interrupted run's work directory for -o tmp_path/healed."""
    work = tmp_path / "healed.work"
    shutil.copytree(interrupted, work)
    return work


# ---- 1. only its own work directory is ever deleted ------------------------------------


def test_a_user_directory_at_the_work_path_is_refused_and_kept(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_training(monkeypatch)
    thesis = tmp_path / "thesis.work"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    for extra in ([], ["--resume"]):
        refused(
            _heal(out, tmp_path / "thesis", *extra),
            capsys,
            "thesis.work exists and is not a plancc heal work directory",
            f"it has no {MARKER}",
            "choose another -o",
        )
        assert [p.name for p in thesis.iterdir()] == ["chapter1.tex"]
        nothing_beside(tmp_path / "thesis")


def test_an_input_at_the_work_path_is_refused_before_anything_is_deleted(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cp -a out run.work; plancc heal run.work -o run` used to delete its own input."""
    _no_training(monkeypatch)
    src = tmp_path / "run.work"
    shutil.copytree(out, src)
    before = file_hashes(src)
    refused(_heal(src, tmp_path / "run"), capsys, "holds the input", "nothing was touched")
    inside = src / "out"  # the input inside the work directory
    shutil.copytree(out, inside)
    refused(["heal", str(inside), "-o", str(tmp_path / "run"), *RUN], capsys, "holds the input")
    shutil.rmtree(inside)
    assert file_hashes(src) == before
    nothing_beside(tmp_path / "run")


def test_a_second_run_to_the_same_output_is_refused_naming_the_first(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from heal.workdir import held_work_dir

    _no_training(monkeypatch)
    work = tmp_path / "healed.work"
    with held_work_dir(work, [out], False, print) as first:  # the first run, alive
        (work / "train-A.json").write_text("{}")
        for extra in ([], ["--resume"]):
            err = refused(
                _heal(out, tmp_path / "healed", *extra),
                capsys,
                "in use by another plancc heal run",
                f"pid {os.getpid()}, started {_marker(work)['created']}",
            )
            assert "removing" not in err
        assert first.still_ours() and (work / "train-A.json").read_text() == "{}"
    assert not (tmp_path / "healed").exists()


@pytest.mark.train
def test_a_user_directory_appearing_at_the_output_mid_run_is_kept(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone makes HEALED while stage A trains: it is not replaced, the trained stage
    stays in the work directory, and --resume installs it once HEALED is gone."""
    import heal.stages as stages

    dest = tmp_path / "healed"
    real = stages.write_stage

    def and_a_user_writes(*args, **kwargs):
        real(*args, **kwargs)
        dest.mkdir(exist_ok=True)
        (dest / "notes.txt").write_text("mine")

    monkeypatch.setattr(stages, "write_stage", and_a_user_writes)
    refused(
        _heal(out, dest, "--force"),
        capsys,
        "not a plancc output",
        "the healed stages are kept in",
        "run again with --resume",
    )
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    work = tmp_path / "healed.work"
    assert (work / "stage-A" / "heal.json").is_file() and _lock_is_free(work)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".healed.")]
    shutil.rmtree(dest)
    _no_training(monkeypatch)
    assert main(_heal(out, dest, "--resume")) == 0
    assert (dest / "A" / "model.safetensors").is_file() and not work.exists()


@pytest.mark.train
def test_a_work_directory_replaced_mid_run_is_left_alone(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import heal.stages as stages

    work = tmp_path / "healed.work"
    real = stages._run_stages

    def and_a_user_replaces_the_work_dir(*args, **kwargs):
        results = real(*args, **kwargs)
        work.rename(tmp_path / "moved-away")
        work.mkdir()
        (work / "mine.txt").write_text("mine")
        return results

    monkeypatch.setattr(stages, "_run_stages", and_a_user_replaces_the_work_dir)
    refused(_heal(out, tmp_path / "healed"), capsys, "was replaced during the run", "left alone")
    assert [p.name for p in work.iterdir()] == ["mine.txt"]
    nothing_beside(tmp_path / "healed")


# ---- 3. no pickle; a damaged resume state is refused with the fix ----------------------


class _Canary:
    """Unpickling this creates a file: proof that a planted pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.train
def test_resume_reads_the_safetensors_state_and_never_a_planted_pickle(
    out: Path,
    interrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = _resumable_copy(interrupted, tmp_path)
    canary = tmp_path / "pwned"
    torch.save({"fingerprint": _Canary(canary)}, work / "train-A.pt")  # what older runs read
    try:
        assert main(_heal(out, tmp_path / "healed", "--resume")) == 0
    finally:
        assert not canary.exists(), "a planted pickle ran"
    assert not work.exists()
    heal_json = json.loads((tmp_path / "healed" / "A" / "heal.json").read_text())
    assert heal_json["resumed_at_batch"] == 4 and heal_json["steps"] == 4


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tensors(work: Path) -> Path:
    return work / json.loads((work / "train-A.json").read_text())["tensors"]


def _past_the_end(work: Path) -> None:
    """A consistent record whose batch lies past the run's last one."""
    record = json.loads((work / "train-A.json").read_text())
    _tensors(work).rename(work / "train-A-batch00000099.safetensors")
    record.update(next_batch=99, tensors="train-A-batch00000099.safetensors")
    (work / "train-A.json").write_text(json.dumps(record))


def _edit_record(**changes: object):
    def edit(work: Path) -> None:
        record = json.loads((work / "train-A.json").read_text())
        record.update(changes)
        (work / "train-A.json").write_text(json.dumps(record))

    return edit


@pytest.mark.train
@pytest.mark.parametrize(
    ("damage", "names", "why"),
    [
        (lambda w: (w / "train-A.json").write_text(""), "train-A.json", "cannot read it"),
        (lambda w: _truncate(w / "train-A.json"), "train-A.json", "cannot read it"),
        (lambda w: _truncate(_tensors(w)), "-batch00000004.safetensors", "cannot read it"),
        (lambda w: _tensors(w).write_bytes(b""), "-batch00000004.safetensors", "cannot read"),
        (lambda w: _tensors(w).unlink(), "-batch00000004.safetensors", "cannot read it"),
        (_edit_record(tensors="../../etc/passwd"), "train-A.json", "`tensors` should be"),
        (_past_the_end, "train-A.json", "past the 8 batches"),
        (_edit_record(weights=["x"]), "-batch00000004.safetensors", "tensors missing"),
        (_edit_record(format=None), "train-A.json", "not a format-1 plancc heal state"),
    ],
    ids=[
        "empty-json",
        "truncated-json",
        "truncated-tensors",
        "empty-tensors",
        "missing-tensors",
        "path-escape",
        "batch-out-of-range",
        "other-weights",
        "not-a-state",
    ],
)
def test_a_damaged_resume_state_is_refused_with_the_fix(
    out: Path,
    interrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    damage,
    names: str,
    why: str,
) -> None:
    work = _resumable_copy(interrupted, tmp_path)
    damage(work)
    _no_training(monkeypatch)
    before = file_hashes(work)
    err = refused(
        _heal(out, tmp_path / "healed", "--resume"),
        capsys,
        "--resume: the training state",
        names,
        why,
        "run without --resume to start over",
    )
    assert "Traceback" not in err
    assert {k: v for k, v in file_hashes(work).items() if k != MARKER} == {
        k: v for k, v in before.items() if k != MARKER
    }
    assert _lock_is_free(work)
    nothing_beside(tmp_path / "healed")


@pytest.mark.train
def test_resume_with_other_options_names_them(
    out: Path,
    interrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resumable_copy(interrupted, tmp_path)
    _no_training(monkeypatch)
    refused(
        _heal(out, tmp_path / "healed", "--resume", "--lr", "5e-3"),
        capsys,
        "written with other options (lr differ)",
    )


# ---- 6. no traceback: damaged inputs before training; Ctrl-C leaves a resumable state --


@pytest.mark.parametrize(
    ("victim", "stages"),
    [("bundles/C/layer_003.safetensors", "A,B,C"), ("A/model.safetensors", "A")],
)
def test_a_damaged_input_is_refused_before_any_training(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    victim: str,
    stages: str,
) -> None:
    """It used to train stage A first and then die with a traceback in restore."""
    src = tmp_path / "out"
    shutil.copytree(out, src)
    flip_data_byte(src / victim)
    _no_training(monkeypatch)
    dest = tmp_path / "healed"
    refused(_heal(src, dest, "--stages", stages), capsys, victim, "sha256", "plancc apply")
    nothing_beside(dest)
    assert not (tmp_path / "healed.work").exists()


@pytest.mark.train
def test_ctrl_c_in_training_leaves_a_resumable_work_dir_and_no_staging(
    out: Path,
    interrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The `interrupted` fixture is that run; then without --resume it starts over."""
    assert _marker(interrupted)["kind"] == "heal-work" and _lock_is_free(interrupted)
    assert (interrupted / "train-A.json").is_file()
    assert not [p for p in interrupted.iterdir() if p.name.endswith(".tmp")]
    nothing_beside(interrupted.with_name("healed"))
    work = _resumable_copy(interrupted, tmp_path)
    assert main(_heal(out, tmp_path / "healed")) == 0
    err = capsys.readouterr().err
    assert f"removing {work}: the state of an earlier run" in err
    assert "pass --resume to continue such a run instead" in err
    heal_json = json.loads((tmp_path / "healed" / "A" / "heal.json").read_text())
    assert heal_json["resumed_at_batch"] is None and not work.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".healed.")]


@pytest.mark.train
def test_a_refused_run_keeps_a_dead_runs_state(
    out: Path,
    interrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --resume a dead run's state is discarded only once the new run has passed
    every check: a run refused for its data (or a damaged input) leaves it resumable."""
    work = _resumable_copy(interrupted, tmp_path)
    before = file_hashes(work)
    _no_training(monkeypatch)
    missing = tmp_path / "no-such-text.txt"
    err = refused(_heal(out, tmp_path / "healed", "--data", str(missing)), capsys, str(missing))
    assert "removing" not in err and file_hashes(work) == before


@pytest.mark.train
def test_ctrl_c_while_installing_removes_the_staging_and_keeps_the_stages(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import heal.stages as stages

    real, calls = stages._link_or_copy, {"n": 0}

    def interrupted_copy(src: str, dst: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(stages, "_link_or_copy", interrupted_copy)
    dest = tmp_path / "healed"
    _ctrl_c(_heal(out, dest))
    nothing_beside(dest)
    work = tmp_path / "healed.work"
    assert (work / "stage-A" / "heal.json").is_file() and _lock_is_free(work)
    monkeypatch.setattr(stages, "_link_or_copy", real)
    _no_training(monkeypatch)
    assert main(_heal(out, dest, "--resume")) == 0
    assert (dest / "A" / "heal.json").is_file() and not work.exists()


# ---- 8. options are checked before anything, with the values allowed -------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--max-windows", "0"], "--max-windows must be at least 1, got 0"),
        (["--lr", "inf"], "--lr must be a positive finite number (e.g. 1e-3), got inf"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--lr=-1e-3"], "--lr must be a positive finite number"),
        (["--epochs", "inf"], "--epochs must be a positive finite number"),
        (["--alpha", "nan"], "--alpha must be a positive finite number"),
        (["--temperature", "nan"], "--temperature must be a positive finite number"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be positive (inf: no clipping)"),
        (["--warmup=-1"], "--warmup must be a whole number of at least 0"),
    ],
)
def test_bad_options_are_refused_with_the_values_allowed(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    text: str,
) -> None:
    _no_training(monkeypatch)
    dest = tmp_path / "healed"
    refused(_heal(out, dest, *args), capsys, text)
    nothing_beside(dest)
    assert not (tmp_path / "healed.work").exists()


@pytest.mark.parametrize(
    ("device", "text"),
    [
        ("banana", "argument --device: 'banana' is not a device: use cpu, cuda or cuda:N"),
        ("cuda:x", "argument --device: 'cuda:x' is not a device"),
    ],
)
def test_a_bad_device_is_refused_by_argparse_with_the_values_allowed(
    out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    text: str,
) -> None:
    """`--device` is one option of every command (`executor.device`): a usage error."""
    _no_training(monkeypatch)
    dest = tmp_path / "healed"
    with pytest.raises(SystemExit) as exc:
        main(_heal(out, dest, "--device", device))
    assert exc.value.code == 2
    assert text in capsys.readouterr().err
    nothing_beside(dest)
    assert not (tmp_path / "healed.work").exists()


@pytest.mark.train
def test_sigint_from_outside_leaves_a_resumable_work_dir(
    out: Path,
    tmp_path: Path,
) -> None:
    """A real Ctrl-C (SIGINT to the process) once the first training state is on disk."""
    dest = tmp_path / "healed"
    work = tmp_path / "healed.work"
    args = [*_heal(out, dest), "--epochs", "200"]  # long enough to be caught training
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "executor.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / "train-A.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "never started training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (130, -signal.SIGINT), err  # 130 once main turns it into one line
    assert _marker(work)["kind"] == "heal-work" and _lock_is_free(work)
    assert json.loads((work / "train-A.json").read_text())["next_batch"] > 0
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    nothing_beside(dest)


def test_heal_without_its_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from heal.options import HealError, extras_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(HealError, match=r"needs peft, .*pip install 'plancc\[heal\]'"):
        extras_installed("lora")
    extras_installed("full")  # full fine-tuning needs no peft
