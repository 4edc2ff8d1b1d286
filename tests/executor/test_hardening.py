"""The executor's promises under hostile input: verified restores, self-consistent
checkpoints, I/O failures as exit 2, and no user file ever lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.cli import main
from executor.layout import MARKER
from tests.helpers.models import make_tiny_model
from tests.helpers.outputs import file_hashes, flip_data_byte, nothing_beside, read_json, refused
from tests.helpers.plans import write_plan

BODY = "drop layers 1, 3\nbundle B layers 1\nbundle C layers 3\nmlp layers 0, 2 width 40\n"


@pytest.fixture(scope="module")
def llama5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama", num_hidden_layers=5)


@pytest.fixture
def applied(llama5: Path, tmp_path: Path) -> Path:
    """A fresh apply output with bundles B, C and _width (tests may damage it)."""
    out = tmp_path / "out"
    assert main(["apply", str(write_plan(tmp_path, llama5, BODY)), "-o", str(out)]) == 0
    return out


# ---- restore verifies what it rebuilds -------------------------------------------------


@pytest.mark.parametrize(
    "victim",
    [
        "bundles/B/layer_001.safetensors",
        "bundles/_width/layer_002.safetensors",
        "A/model.safetensors",
    ],
)
def test_restore_refuses_a_flipped_byte(
    applied: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], victim: str
) -> None:
    flip_data_byte(applied / victim)
    dest = tmp_path / "restored"
    refused(["restore", str(applied), "--upto", "all", "-o", str(dest)], capsys, victim, "sha256")
    nothing_beside(dest)
    refused(["verify", str(applied)], capsys, victim)


def test_partial_restore_checks_only_what_it_reads(
    applied: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_data_byte(applied / "bundles/C/layer_003.safetensors")
    assert main(["restore", str(applied), "--upto", "B", "-o", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    refused(["restore", str(applied), "--upto", "C", "-o", str(tmp_path / "c")], capsys, "C/")


def test_verify_passes_an_intact_output(applied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(applied)]) == 0
    manifest = read_json(applied / "A" / "manifest.json")
    out = capsys.readouterr().out
    assert f"{len(manifest['files'])} files" in out
    # Every file but the manifest and the marker is recorded, with its real sha256.
    hashes = file_hashes(applied)
    del hashes["A/manifest.json"]
    assert manifest["files"] == hashes


def test_verify_reports_files_apply_did_not_write(
    applied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (applied / "bundles" / "B" / "extra.safetensors").write_bytes(b"x")
    refused(["verify", str(applied)], capsys, "extra.safetensors: not written by")


@pytest.mark.parametrize(
    ("rel", "text", "why"),
    [
        ("bundles/_width/width_meta.json", "[]", "malformed: `(top)` should be an object"),
        ("A/manifest.json", "[]", "malformed"),
        ("A/manifest.json", "{", "cannot read"),
    ],
)
def test_garbled_metadata_is_a_clear_error(
    applied: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rel: str,
    text: str,
    why: str,
) -> None:
    (applied / rel).write_text(text)
    dest = tmp_path / "restored"
    refused(["restore", str(applied), "-o", str(dest)], capsys, why, "plancc apply")
    nothing_beside(dest)


def test_manifest_fields_are_validated(
    applied: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = applied / "A" / "manifest.json"
    manifest = read_json(path)
    manifest["removed"]["width"] = []
    path.write_text(json.dumps(manifest))
    refused(["verify", str(applied)], capsys, "`removed.width` should be an object")
    manifest["removed"]["width"] = {"params": 1, "tensors": 1, "dir": None}
    manifest["copied_files"] = ["../../etc/passwd"]
    path.write_text(json.dumps(manifest))
    refused(["verify", str(applied)], capsys, "not a path inside the output directory")


def test_missing_bundle_file_names_the_right_fix(
    applied: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (applied / "bundles/B/layer_001.safetensors").unlink()
    err = refused(
        ["restore", str(applied), "--upto", "B", "-o", str(tmp_path / "r")],
        capsys,
        "layer_001.safetensors: missing",
        "run `plancc apply` again",
    )
    assert "re-download" not in err


def test_hash_source_is_checked_by_full_restore(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    plan = write_plan(tmp_path, llama5, BODY)
    assert main(["apply", str(plan), "-o", str(out), "--hash-source"]) == 0
    manifest = read_json(out / "A" / "manifest.json")
    assert manifest["source"]["sha256"] == {
        "model.safetensors": file_hashes(llama5)["model.safetensors"]
    }
    dest = tmp_path / "restored"
    assert main(["restore", str(out), "-o", str(dest)]) == 0
    assert file_hashes(dest) == file_hashes(llama5)
    # A recorded source hash that the rebuilt file does not match is refused.
    manifest["source"]["sha256"]["model.safetensors"] = "0" * 64
    (out / "A" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    again = ["restore", str(out), "-o", str(tmp_path / "again")]
    refused(again, capsys, "the manifest was edited")
    # With the marker agreeing (edited too), the rebuilt file's own check still refuses.
    marker = read_json(out / MARKER)
    marker["manifest_sha256"] = file_hashes(out)["A/manifest.json"]
    (out / MARKER).write_text(json.dumps(marker))
    refused(again, capsys, "the source's was")
    nothing_beside(tmp_path / "again")


# ---- checkpoints that disagree with themselves ----------------------------------------


def _with_config(src: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(src, dest)
    config = read_json(dest / "config.json")
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(("layers", "text"), [(4, "also hold layer(s) 4"), (6, "5 have no")])
def test_layer_count_must_match_the_tensors(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], layers: int, text: str
) -> None:
    model = _with_config(llama5, tmp_path / "odd", num_hidden_layers=layers)
    refused(["check", "examples/smollm2-depth.prn", "--model", str(model)], capsys, text)
    out = tmp_path / "out"
    plan = tmp_path / "p.prn"
    plan.write_text('plan 1\nmodel "odd" {\n  arch llama\n}\ndrop layers 1\n')
    refused(["apply", str(plan), "--model", str(model), "-o", str(out)], capsys, text)
    nothing_beside(out)


@pytest.mark.parametrize(
    ("index", "text"),
    [
        ("not json", "corrupt shard index"),
        ('{"weight_map": {}}', "lists no tensors"),
        ('{"weight_map": {"lm_head.weight": "other.safetensors"}}', "one of them is stale"),
        ('{"weight_map": {"model.norm.weight": "model.safetensors"}}', "not listed"),
    ],
)
def test_shard_index_beside_a_single_file_is_checked(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], index: str, text: str
) -> None:
    model = tmp_path / "m"
    shutil.copytree(llama5, model)
    (model / "model.safetensors.index.json").write_text(index)
    refused(["check", "examples/smollm2-depth.prn", "--model", str(model)], capsys, text)


# ---- I/O failures are exit 2 with a message --------------------------------------------


def test_output_under_a_regular_file(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    (tmp_path / "afile").write_text("x")
    refused(["apply", str(plan), "-o", str(tmp_path / "afile" / "out")], capsys, "is a file")


def test_output_in_proc(llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    refused(["apply", str(plan), "-o", "/proc/plancc-x"], capsys, "cannot write the output")


def test_output_is_the_current_directory(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    refused(["apply", str(plan), "-o", ".", "--force"], capsys, "current directory")
    assert sorted(os.listdir(tmp_path)) == ["plan.prn", "work"]
    assert os.listdir(work) == []


def test_full_disk_midway(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import executor.safetensors_io as io

    real = io._write_all
    calls = []

    def full(fd: int, data: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(io, "_write_all", full)
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    refused(["apply", str(plan), "-o", str(out)], capsys, "No space left on device", "free space")
    nothing_beside(out)


@pytest.mark.parametrize("how", ["copied", "sliced"])
def test_a_read_failure_of_the_source_is_said_as_a_read_failure(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """EIO while reading the checkpoint mid-apply names the source file, not the output.

    copy_file_range fails alike for either side, so the copy retries with plain reads
    and writes, which tell them apart; preadv reads the tensors that are sliced."""
    import executor.safetensors_io as io

    source = str(llama5 / "model.safetensors")
    sources: set[int] = set()
    real_open = io.os.open

    def tracking_open(path: object, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        if str(path) == source:
            sources.add(fd)
        return fd

    def failing(real: Callable[..., Any], fd_arg: int) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if args[fd_arg] in sources:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(*args)

        return call

    monkeypatch.setattr(io.os, "open", tracking_open)
    if how == "copied":  # every way of copying a byte range fails on the source
        for name, fd_arg in (("copy_file_range", 0), ("sendfile", 1), ("pread", 0)):
            monkeypatch.setattr(io.os, name, failing(getattr(io.os, name), fd_arg))
    else:  # reading a tensor to slice it
        monkeypatch.setattr(io.os, "preadv", failing(io.os.preadv, 0))
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    err = refused(["apply", str(plan), "-o", str(out)], capsys, source, "cannot read it")
    assert "Input/output error" in err and "cannot write" not in err
    nothing_beside(out)


def test_read_only_location(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EROFS/EACCES when the staging directory is made (root ignores chmod, so simulated)."""
    import executor.outdir as outdir

    def refuse(path: object, *args: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(outdir.os, "mkdir", refuse)
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    refused(["apply", str(plan), "-o", str(out)], capsys, "Read-only file system", "read-only")
    nothing_beside(out)


def test_oserror_at_the_boundary_is_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import compiler.cli as cli

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error", "/some/file")

    monkeypatch.setattr(cli, "run_check", broken)
    assert main(["check", "x.prn"]) == 2
    assert "plancc: error: I/O error (/some/file): Input/output error" in capsys.readouterr().err


# ---- never lose a user's files ---------------------------------------------------------


def test_output_directories_have_the_normal_mode(applied: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for d in (applied, applied / "A", applied / "bundles" / "B"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d


def test_force_replaces_only_plancc_outputs(
    applied: Path, llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.prn"
    assert main(["apply", str(plan), "-o", str(applied), "--force"]) == 0
    capsys.readouterr()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    refused(["apply", str(plan), "-o", str(precious), "--force"], capsys, "not a plancc output")
    assert (precious / "thesis.tex").read_text() == "years of work"
    # Nor the checkpoint itself, nor a directory holding the plan.
    refused(["apply", str(plan), "-o", str(llama5), "--force"], capsys, "input")
    refused(["apply", str(plan), "-o", str(tmp_path), "--force"], capsys, "input")
    # A restored original is marked too, so a repeated restore --force replaces it.
    dest = tmp_path / "restored"
    assert main(["restore", str(applied), "-o", str(dest)]) == 0
    assert json.loads((dest / MARKER).read_text())["kind"] == "restore"
    assert main(["restore", str(applied), "-o", str(dest), "--force"]) == 0


_HOLD = """
import sys, time
from pathlib import Path
from executor.outdir import staging_dir
with staging_dir(Path(sys.argv[1]), "tmp", "apply") as tmp:
    (tmp / "big.bin").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def _hold_staging_dir(dest: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(dest)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_kill_9_leftovers_are_removed_by_the_next_run(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    dead, dead_tmp = _hold_staging_dir(out)
    live, live_tmp = _hold_staging_dir(out)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        assert dead_tmp.is_dir() and live_tmp.is_dir()
        user = tmp_path / ".out.tmp-notmine0"  # the right name, but no marker: not ours
        user.mkdir()
        assert main(["apply", str(plan), "-o", str(out)]) == 0
        assert not dead_tmp.exists()  # its owner is dead: removed
        assert live_tmp.is_dir()  # a live run holds its lock: left alone
        assert user.is_dir()
    finally:
        live.kill()
        live.wait()
    time.sleep(0.1)
    assert main(["apply", str(plan), "-o", str(out), "--force"]) == 0
    assert not live_tmp.exists()


def test_remote_code_is_withheld_unless_asked(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _with_config(llama5, tmp_path / "remote", auto_map={"AutoModel": "modeling_x.X"})
    (model / "modeling_x.py").write_text("import os\nos.system('echo pwned')\n")
    plan = write_plan(tmp_path, model, BODY)
    out = tmp_path / "out"
    assert main(["apply", str(plan), "-o", str(out)]) == 0
    assert not (out / "A" / "modeling_x.py").exists()
    assert "auto_map" not in read_json(out / "A" / "config.json")
    assert read_json(out / "A" / "manifest.json")["withheld_files"] == ["modeling_x.py"]
    assert main(["restore", str(out), "--upto", "B", "-o", str(tmp_path / "b")]) == 0
    assert "auto_map" not in read_json(tmp_path / "b" / "config.json")
    dest = tmp_path / "restored"
    assert main(["restore", str(out), "-o", str(dest)]) == 0
    assert file_hashes(dest) == file_hashes(model)  # the original, code included
    kept = tmp_path / "kept"
    assert main(["apply", str(plan), "-o", str(kept), "--copy-remote-code"]) == 0
    assert (kept / "A" / "modeling_x.py").is_file()
    # The result is heterogeneous: its `auto_map` is kept, sealed under `plancc.hf`, so
    # that no stock loader (the model's own code included) builds it at the wrong widths.
    config = read_json(kept / "A" / "config.json")
    assert "auto_map" not in config and config["plancc"]["hf"]["auto_map"] == {
        "AutoModel": "modeling_x.X"
    }


# ---- the destination at the final rename, and one writer per destination ----------


def _appears_mid_run(monkeypatch: pytest.MonkeyPatch, make: Callable[[], None]) -> None:
    """Run `make` while apply is writing its staging directory (after every check)."""
    import executor.apply

    real = executor.apply.execute

    def execute_then_make(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        make()
        return result

    monkeypatch.setattr(executor.apply, "execute", execute_then_make)


@pytest.mark.parametrize("force", [False, True])
def test_a_user_directory_appearing_at_o_mid_run_is_never_replaced(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    force: bool,
) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "thesis"

    def user_writes() -> None:
        out.mkdir()
        (out / "chapter1.tex").write_text("years of work")

    _appears_mid_run(monkeypatch, user_writes)
    args = ["apply", str(plan), "-o", str(out)] + (["--force"] if force else [])
    refused(args, capsys, str(out), "left untouched")
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]
    assert (out / "chapter1.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thesis.")]


def test_an_empty_directory_appearing_at_o_mid_run_is_not_replaced(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain rename(2) silently replaces an empty directory; the install must not."""
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    _appears_mid_run(monkeypatch, out.mkdir)
    refused(["apply", str(plan), "-o", str(out)], capsys, "appeared while this run")
    assert out.is_dir() and not list(out.iterdir())


def test_force_still_replaces_a_plancc_output_that_appeared_mid_run(
    llama5: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    earlier = tmp_path / "earlier"
    assert main(["apply", str(plan), "-o", str(earlier)]) == 0
    _appears_mid_run(monkeypatch, lambda: earlier.rename(out))
    assert main(["apply", str(plan), "-o", str(out), "--force"]) == 0
    assert (out / "A" / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from executor.outdir import destination_lock
with destination_lock(Path(sys.argv[1]), "apply"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_to_one_destination_is_refused_naming_the_first(
    llama5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, llama5, BODY)
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "locked"
        err = refused(["apply", str(plan), "-o", str(out)], capsys, "another plancc run")
        assert f"pid {first.pid}" in err and "plancc apply" in err
        assert not out.exists()
        os.kill(first.pid, signal.SIGKILL)  # a killed holder never blocks the next run
        first.wait()
        assert main(["apply", str(plan), "-o", str(out)]) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (tmp_path / ".out.lock").exists()  # the holder removes its lock file
    # A second apply to the same -o after the first finished: refused, not both exit 0.
    refused(["apply", str(plan), "-o", str(out)], capsys, "already exists", "--force")


@pytest.mark.parametrize("marker_records_manifest", [True, False])
def test_restore_is_not_silenced_by_removing_a_file_from_the_manifest(
    applied: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    marker_records_manifest: bool,
) -> None:
    """Dropping a bundle's entries from A/manifest.json must not exempt its files from
    the check (an older output's marker has no manifest sha256: the file rule holds)."""
    manifest_path = applied / "A" / "manifest.json"
    manifest = read_json(manifest_path)
    bundle = sorted(r for r in manifest["files"] if r.startswith("bundles/B/"))
    shard = next(r for r in bundle if r.endswith(".safetensors"))
    manifest["files"] = {r: h for r, h in manifest["files"].items() if r not in bundle}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    flip_data_byte(applied / shard)
    if not marker_records_manifest:
        marker = read_json(applied / MARKER)
        del marker["manifest_sha256"]
        (applied / MARKER).write_text(json.dumps(marker))
    dest = tmp_path / "back"
    for args in (["restore", str(applied), "-o", str(dest)], ["verify", str(applied)]):
        err = refused(args, capsys, f"{shard}: not written by `plancc apply`")
        assert ("the manifest was edited" in err) == marker_records_manifest, err
    nothing_beside(dest)


def test_the_marker_records_the_manifest_sha256(applied: Path) -> None:
    marker = read_json(applied / MARKER)
    assert marker["manifest_sha256"] == file_hashes(applied)["A/manifest.json"]


# ---- Ctrl-C and the command line ------------------------------------------------------


def test_ctrl_c_mid_apply_exits_130_with_one_line_and_leaves_nothing(
    llama5: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    _appears_mid_run(monkeypatch, interrupted)
    out = tmp_path / "out"
    assert main(["apply", str(write_plan(tmp_path, llama5, BODY)), "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "plancc: interrupted; no partial output was left"
    assert "Traceback" not in err
    nothing_beside(out)  # no staging directory, no lock file


@pytest.mark.parametrize(
    "args",
    [
        ["apply", "plan.prn", "-o", "out", "--forc"],
        ["eval", "m", "--data-f", "x"],
        ["restore", "out", "--up", "B", "-o", "back"],
        ["heal", "out", "-o", "healed", "--resu"],
    ],
)
def test_abbreviated_options_are_refused(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An abbreviation silently taken for a longer option (`--data` for `--data-files`)
    changes a command's meaning; every plancc parser refuses them."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
