"""--allow-pickle: pickle checkpoints (`pytorch_model.bin`, or sharded with an index).

`plangen header` and `plancc check --model` read their tensor names, shapes and
dtypes with torch (weights_only), giving the fingerprint of the same weights
saved as safetensors; `plancc apply` converts them to safetensors in a
temporary directory and applies from there, so the output is byte-identical to
applying the plan to the safetensors copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from compiler.checkpoint import CheckpointError, load_checkpoint_facts, tensor_index
from executor.cli import main as plancc
from plangen.cli import main as plangen
from tests.helpers.models import make_tiny_model
from tests.helpers.plans import write_plan

SIDE_FILES = ("config.json", "generation_config.json")


def _state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _side_files(src: Path, dest: Path) -> None:
    dest.mkdir()
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def _share_storage(state: dict) -> dict:
    """gate_proj and up_proj of layer 0 as views of one tensor (shared storage)."""
    import torch

    g, u = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    fused = torch.cat([state[g], state[u]])
    state[g], state[u] = fused.chunk(2)
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """safetensors original, one-file pickle copy, two-shard pickle copy."""
    import torch

    root = tmp_path_factory.mktemp("pickle")
    safe = make_tiny_model(root, "llama", name="safe", num_hidden_layers=4)
    state = _state(safe)

    single = root / "single"
    _side_files(safe, single)
    torch.save(_share_storage(dict(state)), single / "pytorch_model.bin")

    sharded = root / "sharded"
    _side_files(safe, sharded)
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for k, part in enumerate(halves):
        file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return {"safe": safe, "single": single, "sharded": sharded}


def _header(capsys: pytest.CaptureFixture[str], model: Path, *flags: str) -> tuple[int, str, str]:
    code = plangen(["header", str(model), *flags])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_header_needs_the_flag_and_matches_safetensors(
    models: dict[str, Path], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _header(capsys, models[kind])
    assert code == 2 and out == "" and "pickle" in err and "--allow-pickle" in err
    code, out, err = _header(capsys, models[kind], "--allow-pickle")
    assert code == 0, err
    _, safe_out, _ = _header(capsys, models["safe"])
    # Same block except the name line (the directory's name).
    assert out.splitlines()[1:] == safe_out.splitlines()[1:]
    assert "fingerprint" in out
    with pytest.raises(CheckpointError, match="pickle"):
        tensor_index(models[kind])
    pickled = tensor_index(models[kind], allow_pickle=True)
    real = tensor_index(models["safe"])
    assert {n: (i.shape, i.dtype) for n, i in pickled.items()} == {
        n: (i.shape, i.dtype) for n, i in real.items()
    }


def test_header_dtype_names_follow_safetensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    safe = make_tiny_model(tmp_path, "llama", name="safe", dtype="bfloat16")
    pick = tmp_path / "pick"
    _side_files(safe, pick)
    torch.save(_state(safe), pick / "pytorch_model.bin")
    a = load_checkpoint_facts(pick, allow_pickle=True)
    b = load_checkpoint_facts(safe)
    assert {i.dtype for i in a.index.values()} == {"BF16"}
    assert a.facts["fingerprint"] == b.facts["fingerprint"]


def test_check_model_allow_pickle(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, models["safe"], "drop layers 2")
    args = ["check", str(plan), "--model", str(models["sharded"]), "--no-cost"]
    assert plancc(args) == 2
    assert "pickle" in capsys.readouterr().err
    assert plancc([*args, "--allow-pickle"]) == 0, capsys.readouterr()


def _tensors(a_dir: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(a_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = fh.get_tensor(name)
                out[name] = (
                    str(t.dtype),
                    tuple(t.shape),
                    t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes(),
                )
    return out


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("body", ["drop layers 1, 2", "mlp layers 0..3 width 64 by magnitude"])
def test_apply_pickle_equals_apply_safetensors(
    models: dict[str, Path],
    kind: str,
    body: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = write_plan(tmp_path, models["safe"], body)
    out = tmp_path / "out"
    args = ["apply", str(plan), "--model", str(models[kind]), "-o", str(out)]
    assert plancc(args) == 2
    assert "pickle" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [plan]  # nothing written

    assert plancc([*args, "--allow-pickle"]) == 0, capsys.readouterr().err
    ref = tmp_path / "ref"
    assert plancc(["apply", str(plan), "--model", str(models["safe"]), "-o", str(ref)]) == 0
    got, want = _tensors(out / "A"), _tensors(ref / "A")
    assert got.keys() == want.keys() and got == want
    for sub in ("bundles/B", "bundles/_width"):
        if (ref / sub).is_dir():
            assert _tensors(out / sub) == _tensors(ref / sub)
    m_out = json.loads((out / "A" / "manifest.json").read_text())
    m_ref = json.loads((ref / "A" / "manifest.json").read_text())
    assert m_out["source"]["fingerprint"] == m_ref["source"]["fingerprint"]
    assert m_out["source"]["dir"] == str(models[kind])
    assert m_out["source"]["pickle_files"] == sorted(p.name for p in models[kind].glob("*.bin"))
    # The temporary conversion is gone, and the source is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plan.prn", "ref"]
    # Restoring everything gives the safetensors copy's tensors back.
    assert plancc(["restore", str(out), "--upto", "all", "-o", str(tmp_path / "r")]) == 0
    assert _tensors(tmp_path / "r") == _tensors(models["safe"])
    assert not list(models[kind].glob("*.safetensors"))


def test_apply_pickle_cleans_up_on_failure(
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import executor.apply as apply_mod

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(apply_mod, "_apply_checked", boom)
    plan = write_plan(tmp_path, models["safe"], "drop layers 1")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        apply_mod.apply_plan(plan, out, model=models["single"], allow_pickle=True)
    assert list(tmp_path.iterdir()) == [plan]
