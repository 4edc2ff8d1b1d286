"""`plancc apply`: the files it writes, what they say, and what it refuses."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler.checkpoint import read_safetensors_header, tensor_index
from compiler.geometry import top_channels
from executor.apply import apply_plan
from executor.cli import main
from executor.safetensors_io import OutEntry, copy_range, header_bytes
from tests.helpers.models import make_tiny_model
from tests.helpers.outputs import read_json, tensor_hashes
from tests.helpers.paths import EXAMPLES
from tests.helpers.plans import write_plan

DEPTH = "drop layers 1, 3..4\nbundle B layers 1\nbundle C layers 3..4\n"


@pytest.fixture(scope="module")
def llama6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer tiny Llama, shared (read-only) by the tests of this module."""
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def depth_out(llama6: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("depth")
    plan = write_plan(tmp, llama6, DEPTH)
    assert main(["apply", str(plan), "-o", str(tmp / "out")]) == 0
    return tmp / "out"


def test_depth_layout(depth_out: Path, llama6: Path) -> None:
    a = depth_out / "A"
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "manifest.json",
        "prune_log.json",
        "layers_map.json",
        "original_config/config.json",
    ):
        assert (a / name).is_file(), name
    assert read_json(a / "layers_map.json")["new_to_original"] == [0, 2, 5]
    assert sorted(os.listdir(depth_out / "bundles")) == ["B", "C"]
    assert sorted(os.listdir(depth_out / "bundles" / "C")) == [
        "bundle_meta.json",
        "layer_003.safetensors",
        "layer_004.safetensors",
    ]
    meta = read_json(depth_out / "bundles" / "C" / "bundle_meta.json")
    assert meta["layers"] == [3, 4]
    assert meta["source_fingerprint"].startswith("sha256:")
    assert (a / "original_config" / "config.json").read_bytes() == (
        llama6 / "config.json"
    ).read_bytes()


def test_depth_tensors_renumbered_and_bytes_untouched(depth_out: Path, llama6: Path) -> None:
    src = tensor_hashes(llama6)
    out = tensor_hashes(depth_out / "A")
    renames = {0: 0, 2: 1, 5: 2}
    for name, digest in src.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if i in renames:
                new = name.replace(f"model.layers.{i}.", f"model.layers.{renames[i]}.")
                assert out.pop(new) == digest, name
        else:
            assert out.pop(name) == digest, name
    assert out == {}
    bundle = tensor_hashes(depth_out / "bundles" / "B" / "layer_001.safetensors")
    assert bundle == {n: d for n, d in src.items() if n.startswith("model.layers.1.")}


def test_depth_config_and_manifest(depth_out: Path, llama6: Path) -> None:
    cfg = read_json(depth_out / "A" / "config.json")
    orig = read_json(llama6 / "config.json")
    assert cfg["num_hidden_layers"] == 3
    assert {k: v for k, v in cfg.items() if k != "num_hidden_layers"} == {
        k: v for k, v in orig.items() if k != "num_hidden_layers"
    }
    m = read_json(depth_out / "A" / "manifest.json")
    assert m["uniform"] and m["stock_loadable"]
    per_layer = m["removed"]["bundles"]["B"]["params"]
    assert m["removed"]["bundles"]["C"]["params"] == 2 * per_layer
    assert m["removed_total"] == 3 * per_layer
    assert m["params"]["before"] - m["params"]["after"] == 3 * per_layer
    log = read_json(depth_out / "A" / "prune_log.json")["tensors"]
    assert len(log) == len(tensor_index(llama6))
    by = {e["source"]: e for e in log}
    assert by["model.layers.5.mlp.up_proj.weight"]["output"]["name"] == (
        "model.layers.2.mlp.up_proj.weight"
    )
    assert by["model.layers.3.mlp.up_proj.weight"]["bundle"] == "C"


def test_depth_result_loads_with_stock_transformers(depth_out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(depth_out / "A")
    assert len(model.model.layers) == 3
    out = model.generate(
        input_ids=__import__("torch").tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False
    )
    assert out.shape == (1, 6)


def test_default_bundles_and_layer_types(tmp_path: Path) -> None:
    """No bundle statement: B gets the first half. qwen2's per-layer lists follow the drop."""
    model = make_tiny_model(
        tmp_path,
        "qwen2",
        num_hidden_layers=5,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        layer_types=None,
    )
    orig = read_json(model / "config.json")
    plan = write_plan(tmp_path, model, "drop layers 0, 2, 3")
    apply_plan(plan, tmp_path / "out")
    m = read_json(tmp_path / "out" / "A" / "manifest.json")
    assert {k: v["layers"] for k, v in m["removed"]["bundles"].items()} == {
        "B": [0, 2],
        "C": [3],
    }
    cfg = read_json(tmp_path / "out" / "A" / "config.json")
    assert cfg["layer_types"] == [orig["layer_types"][1], orig["layer_types"][4]]
    assert cfg["max_window_layers"] == 1  # of the kept layers 1 and 4, only 1 was below 2


def test_sharded_output_and_index(llama6: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path, llama6, DEPTH)
    apply_plan(plan, tmp_path / "out", max_shard_bytes=60_000)
    a = tmp_path / "out" / "A"
    index = read_json(a / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (a / "model.safetensors").exists()
    assert set(tensor_index(a)) == set(index["weight_map"])
    assert main(["restore", str(tmp_path / "out"), "-o", str(tmp_path / "back")]) == 0
    assert tensor_hashes(tmp_path / "back") == tensor_hashes(llama6)


def test_magnitude_metric_definition() -> None:
    """Ties go to the lower index; the kept channels come back in original order."""
    assert top_channels(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 2) == (1, 2)
    assert top_channels(np.array([5.0, 1.0, 4.0]), 2) == (0, 2)
    assert top_channels(np.array([0.0, 0.0, 0.0]), 1) == (0,)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_magnitude_numpy_and_torch_paths_agree(dtype: str) -> None:
    """The CPU metric (numpy, bf16 widened by bit shifting) equals the torch one."""
    import torch

    from executor.safetensors_io import encode
    from executor.slicing import _torch_square_sums, axis_square_sums

    t = torch.randn(257, 96, generator=torch.Generator().manual_seed(0)).to(
        {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    )
    raw = np.frombuffer(bytearray(encode(t, dtype)), dtype=np.uint8).reshape(257, 96, -1)
    for axis in (0, 1):
        want = t.double().square().sum(1 - axis).numpy()
        np.testing.assert_allclose(axis_square_sums(raw, dtype, axis), want, rtol=1e-12)
        np.testing.assert_allclose(_torch_square_sums(raw, dtype, axis, "cpu"), want, rtol=1e-12)


def test_safetensors_writer_roundtrip(tmp_path: Path) -> None:
    """A written header is valid safetensors (the library reads it) and 8-byte padded."""
    from safetensors.numpy import load_file

    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    e = OutEntry("x", "F32", (2, 3), produce=lambda: data.view(np.uint8))
    head = header_bytes([e], {"format": "pt"})
    assert (len(head) - 8) % 8 == 0
    (tmp_path / "t.safetensors").write_bytes(head + data.tobytes())
    assert np.array_equal(load_file(tmp_path / "t.safetensors")["x"], data)
    assert read_safetensors_header(tmp_path / "t.safetensors")["__metadata__"] == {"format": "pt"}


def test_copy_range_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where copy_file_range and sendfile fail (another filesystem), bytes still arrive."""
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(bytes(range(256)) * 10)

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(os, "sendfile", refuse)
    with open(src, "rb") as s, open(dst, "wb", buffering=0) as d:
        copy_range(s.fileno(), d.fileno(), 100, 1000, "test")
    assert dst.read_bytes() == src.read_bytes()[100:1100]


def test_depth_plan_never_decodes_a_tensor(
    llama6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Untouched tensors move as byte ranges: nothing is read into memory or decoded."""
    import executor.execute
    import executor.planning

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a depth plan must not read tensor data")

    for stage in (executor.planning, executor.execute):
        monkeypatch.setattr(stage, "read_raw", forbidden)
    monkeypatch.setattr(executor.planning, "decode", forbidden)
    apply_plan(write_plan(tmp_path, llama6, DEPTH), tmp_path / "out")
    assert (tmp_path / "out" / "A" / "model.safetensors").is_file()


# ---- refusals: exit 2, nothing written ------------------------------------------------


def _refuses(args: list[str], capsys: pytest.CaptureFixture[str], out: Path, text: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert text in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_refuses_fingerprint_mismatch(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_tiny_model(tmp_path, "llama", num_hidden_layers=6, intermediate_size=64)
    plan = write_plan(tmp_path, llama6, DEPTH)
    out = tmp_path / "out"
    _refuses(["apply", str(plan), "--model", str(other), "-o", str(out)], capsys, out, "P131")


def test_refuses_existing_out_without_force(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, llama6, DEPTH)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["apply", str(plan), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    # --force replaces only a previous plancc output: this directory is the user's.
    assert main(["apply", str(plan), "-o", str(out), "--force"]) == 2
    assert "is not a plancc output" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    mine = tmp_path / "mine"
    assert main(["apply", str(plan), "-o", str(mine)]) == 0
    (mine / "A" / "stale.txt").write_text("from the previous run")
    assert main(["apply", str(plan), "-o", str(mine), "--force"]) == 0
    assert sorted(os.listdir(mine)) == [".plancc-output.json", "A", "bundles"]
    assert not (mine / "A" / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["mine", "out", "plan.prn"]  # nothing left beside


def test_refuses_truncated_checkpoint(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama6, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    plan = write_plan(tmp_path, llama6, DEPTH)
    out = tmp_path / "out"
    _refuses(["apply", str(plan), "--model", str(broken), "-o", str(out)], capsys, out, "trunc")


def test_refuses_corrupt_header(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama6, broken)
    st = broken / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[8:12] = b"!!!!"
    st.write_bytes(bytes(raw))
    plan = write_plan(tmp_path, llama6, DEPTH)
    out = tmp_path / "out"
    _refuses(["apply", str(plan), "--model", str(broken), "-o", str(out)], capsys, out, "corrupt")


def test_refuses_missing_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    small = make_tiny_model(tmp_path, "llama", num_hidden_layers=3)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(small).save_pretrained(sharded, max_shard_size="100KB")
    plan = write_plan(tmp_path, sharded, "drop layers 1")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    out = tmp_path / "out"
    _refuses(["apply", str(plan), "-o", str(out)], capsys, out, "not found")


def test_refuses_pickle_checkpoint(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(llama6 / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    plan = write_plan(tmp_path, llama6, DEPTH)
    out = tmp_path / "out"
    args = ["apply", str(plan), "--model", str(pickled), "-o", str(out)]
    _refuses(args, capsys, out, "pickle")
    # With the flag it is read by torch's weights_only loader, which rejects this file.
    _refuses([*args, "--allow-pickle"], capsys, out, "torch.load(weights_only=True)")


def test_refuses_plan_errors(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path, llama6, "drop layers 9")
    out = tmp_path / "out"
    _refuses(["apply", str(plan), "-o", str(out)], capsys, out, "P104")


def test_refuses_output_overlapping_the_model(
    llama6: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m"
    shutil.copytree(llama6, model)
    plan = write_plan(tmp_path, model, DEPTH)
    before = sorted(os.listdir(model))
    assert main(["apply", str(plan), "-o", str(model), "--force"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert sorted(os.listdir(model)) == before


def test_source_is_relative_to_the_plan(llama6: Path, tmp_path: Path) -> None:
    (tmp_path / "plans").mkdir()
    shutil.copytree(llama6, tmp_path / "ckpt")
    plan = write_plan(tmp_path / "plans", tmp_path / "ckpt", DEPTH)
    text = plan.read_text().replace(f'source "{tmp_path / "ckpt"}"', 'source "../ckpt"')
    plan.write_text(text)
    apply_plan(plan, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "A" / "layers_map.json").read_text())[
        "new_to_original"
    ] == [0, 2, 5]


def test_same_inputs_give_identical_outputs(llama6: Path, tmp_path: Path) -> None:
    from tests.helpers.outputs import file_hashes

    plan = write_plan(
        tmp_path, llama6, DEPTH + "mlp layers 0 width 50\nattn layers 2 drop groups 0"
    )
    apply_plan(plan, tmp_path / "one")
    apply_plan(plan, tmp_path / "two")
    assert file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")


def test_interrupted_run_leaves_nothing(
    llama6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure halfway through writing leaves neither OUT nor the temporary directory."""
    import executor.execute as execute_mod

    calls = []

    def failing(path: Path, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, *args, **kwargs)

    real = execute_mod.write_file
    monkeypatch.setattr(execute_mod, "write_file", failing)
    plan = write_plan(tmp_path, llama6, DEPTH)
    from executor.outdir import OutputError

    with pytest.raises(OutputError, match="No space left on device"):
        apply_plan(plan, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.prn"]


def test_moe_depth_keeps_dense_layers_dense(tmp_path: Path) -> None:
    """Qwen2-MoE's `decoder_sparse_step` rule does not survive renumbering: the new
    config lists the dense layers explicitly."""
    from executor.loader import load
    from tests.helpers.models import hooked, load_original, logits, tokens

    model = make_tiny_model(
        tmp_path, "qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[]
    )
    apply_plan(write_plan(tmp_path, model, "drop layers 0"), tmp_path / "out")
    cfg = read_json(tmp_path / "out" / "A" / "config.json")
    # original: layers 1, 3 sparse; 0, 2 dense. kept 1, 2, 3 → new 0 sparse, 1 dense, 2 sparse
    assert cfg["mlp_only_layers"] == [1] and cfg["decoder_sparse_step"] == 1
    ids = tokens()
    with hooked(load_original(model), identity=(0,)) as ref:
        want = logits(ref, ids)
    import torch

    torch.testing.assert_close(logits(load(tmp_path / "out" / "A"), ids), want, atol=1e-5, rtol=0)


# ---- the demo model, end to end -------------------------------------------------------


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("example", ["smollm2-depth.prn", "smollm2-mlp.prn"])
def test_smollm2_examples_apply_generate_restore(
    example: str, smollm2_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = EXAMPLES / example
    out = tmp_path / "out"
    assert main(["apply", str(plan), "--model", str(smollm2_dir), "-o", str(out)]) == 0
    m = read_json(out / "A" / "manifest.json")
    assert m["stock_loadable"] and m["uniform"]
    model = AutoModelForCausalLM.from_pretrained(out / "A")
    tok = AutoTokenizer.from_pretrained(out / "A")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 8
    assert tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    dest = tmp_path / "restored"
    assert main(["restore", str(out), "--upto", "all", "-o", str(dest)]) == 0
    assert tensor_hashes(dest) == tensor_hashes(smollm2_dir)
    assert (dest / "model.safetensors").read_bytes() == (
        smollm2_dir / "model.safetensors"
    ).read_bytes()
    if m["removed"]["bundles"]:
        partial = tmp_path / "b"
        assert main(["restore", str(out), "--upto", "B", "-o", str(partial)]) == 0
        assert AutoModelForCausalLM.from_pretrained(partial).config.num_hidden_layers == 27


def test_json_lists_stay_on_one_line_and_values_unchanged() -> None:
    from executor.layout import dumps

    data = {"a": [1, 2, 3], "s": "[\n1,  2]", "n": [[1], ["x, y", None, True, 1.5e-06]]}
    text = dumps(data)
    assert '"a": [1, 2, 3]' in text
    assert json.loads(text) == data
