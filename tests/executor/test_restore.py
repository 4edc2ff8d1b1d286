"""`plancc restore`: A + all bundles is the original, file for file; A + B is loadable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from executor.apply import apply_plan
from executor.cli import main
from executor.loader import load
from tests.helpers.models import hooked, load_original, logits, make_tiny_model, tokens
from tests.helpers.outputs import file_hashes, read_json, tensor_hashes
from tests.helpers.plans import write_plan

ATOL = 1e-5


def _apply(tmp_path: Path, model_dir: Path, body: str) -> Path:
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model_dir, body), out)
    return out


def _restore_all_is_original(tmp_path: Path, model_dir: Path, out: Path) -> None:
    dest = tmp_path / "restored"
    assert main(["restore", str(out), "--upto", "all", "-o", str(dest)]) == 0
    assert tensor_hashes(dest) == tensor_hashes(model_dir)
    assert file_hashes(dest) == file_hashes(model_dir)


@pytest.mark.parametrize(
    ("arch", "body"),
    [
        ("llama", "drop layers 1, 3\n"),
        ("qwen2", "drop layers 2\nattn layers 0 drop groups 1\nmlp layers 1, 3 width 40\n"),
        ("qwen3", "attn layers 1 drop groups 0\nmlp layers 0..3 width 64\n"),
        ("phi3", "drop layers 0\nattn layers 1..2 drop groups 1\nmlp layers 3 width 33\n"),
        ("gemma3_text", "drop layers 1\nmlp layers 0, 2 width 40\n"),
    ],
)
def test_restore_all_is_bit_identical(arch: str, body: str, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=4)
    out = _apply(tmp_path, model_dir, body)
    _restore_all_is_original(tmp_path, model_dir, out)


def test_restore_bf16_sharded_checkpoint(tmp_path: Path) -> None:
    """Byte-level slicing is dtype-blind; shard names, index and headers come back."""
    from transformers import AutoModelForCausalLM

    small = make_tiny_model(tmp_path, "mistral", num_hidden_layers=3, dtype="bfloat16")
    model_dir = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(small, dtype=torch.bfloat16).save_pretrained(
        model_dir, max_shard_size="60KB"
    )
    assert (model_dir / "model.safetensors.index.json").is_file()
    out = _apply(tmp_path, model_dir, "drop layers 1\nmlp layers 0, 2 width 72\n")
    _restore_all_is_original(tmp_path, model_dir, out)


def test_restore_after_compensate_with_existing_bias(tmp_path: Path) -> None:
    """A modified o_proj bias is kept whole in _width; an added down_proj bias is dropped."""
    from safetensors.torch import save_file

    model_dir = make_tiny_model(tmp_path, "llama", num_hidden_layers=2, attention_bias=True)
    tables = {"mean_in.0.attn": torch.randn(64), "mean_in.1.mlp": torch.randn(96)}
    save_file(tables, str(tmp_path / "s.safetensors"))
    import hashlib

    sha = hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()
    body = (
        f'scores "s.safetensors" sha256 "{sha}"\n'
        "attn layers 0 drop groups 1 compensate\nmlp layers 1 width 50 compensate\n"
    )
    out = _apply(tmp_path, model_dir, body)
    log = {e["source"]: e for e in read_json(out / "A" / "prune_log.json")["tensors"]}
    assert log["model.layers.0.self_attn.o_proj.bias"]["action"] == "modified"
    _restore_all_is_original(tmp_path, model_dir, out)


def test_partial_restore_depth(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "llama", num_hidden_layers=6)
    out = _apply(
        tmp_path, model_dir, "drop layers 1..4\nbundle B layers 1, 4\nbundle C layers 2..3"
    )
    dest = tmp_path / "b"
    assert main(["restore", str(out), "--upto", "B", "-o", str(dest)]) == 0
    assert read_json(dest / "layers_map.json")["new_to_original"] == [0, 1, 4, 5]
    cfg = read_json(dest / "config.json")
    assert cfg["num_hidden_layers"] == 4 and "plancc" not in cfg
    hashes = tensor_hashes(dest)
    orig = tensor_hashes(model_dir)
    assert hashes["model.layers.2.mlp.up_proj.weight"] == orig["model.layers.4.mlp.up_proj.weight"]
    ids = tokens()
    with hooked(load_original(model_dir), identity=(2, 3)) as ref:
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load(dest), ids), want, atol=ATOL, rtol=0)
    # --upto C: every layer back; a depth-only plan then gives the original tensors.
    dest_c = tmp_path / "c"
    assert main(["restore", str(out), "--upto", "C", "-o", str(dest_c)]) == 0
    assert tensor_hashes(dest_c) == orig


def test_partial_restore_of_a_narrowed_model_is_heterogeneous(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, "qwen2", num_hidden_layers=4)
    out = _apply(tmp_path, model_dir, "drop layers 1, 2\nmlp layers 0, 3 width 48\n")
    dest = tmp_path / "b"
    assert main(["restore", str(out), "--upto", "B", "-o", str(dest)]) == 0
    m = read_json(dest / "manifest.json")
    assert m["bundles_still_out"] == ["C"] and m["loader"] == "executor.load"
    ffn = 96
    kept = read_json(out / "bundles" / "_width" / "width_meta.json")["layers"]
    removed = {i: (np.setdiff1d(np.arange(ffn), kept[str(i)]["ffn"]), None) for i in (0, 3)}
    ids = tokens()
    with hooked(load_original(model_dir), identity=(2,), set_channels=removed) as ref:
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load(dest), ids), want, atol=ATOL, rtol=0)


def test_restore_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = make_tiny_model(tmp_path, "llama", num_hidden_layers=3)
    out = _apply(tmp_path, model_dir, "drop layers 1\n")
    dest = tmp_path / "r"
    assert main(["restore", str(out), "--upto", "Z", "-o", str(dest)]) == 2
    assert "no such bundle" in capsys.readouterr().err
    dest.mkdir()
    assert main(["restore", str(out), "-o", str(dest)]) == 2
    assert "--force" in capsys.readouterr().err
    meta_path = out / "bundles" / "B" / "bundle_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["source_fingerprint"] = "sha256:other"
    meta_path.write_text(json.dumps(meta))
    assert main(["restore", str(out), "-o", str(dest), "--force"]) == 2
    assert "another checkpoint" in capsys.readouterr().err
    assert list(dest.iterdir()) == []
    assert main(["restore", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    assert "A/" in capsys.readouterr().err
