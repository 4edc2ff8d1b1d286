"""The pruned model computes what the original computes with the removed parts silenced.

fp32 tiny random models, logits compared at atol 1e-5:
  * dropping layers      = the original with those layers made identity;
  * dropping KV group g  = the original with g's query heads' outputs zeroed
                           before o_proj (their K/V heads then feed nothing);
  * narrowing an MLP     = the original with the removed channels zeroed at
                           the input of down_proj;
  * `compensate`         = the removed channels replaced by their mean_in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compiler.checkpoint import load_checkpoint_facts
from executor.apply import apply_plan
from executor.loader import load
from tests.helpers.models import hooked, load_original, logits, make_tiny_model, tokens
from tests.helpers.outputs import read_json
from tests.helpers.plans import write_plan

ATOL = 1e-5
DENSE = ("llama", "qwen2", "qwen3", "mistral", "phi3")
# Gemma-3 small sizes have one KV head: depth and MLP plans only.
DEPTH_AND_MLP = (*DENSE, "gemma3_text")


def removed_channels(out: Path, layer: int, ffn: int) -> np.ndarray:
    kept = read_json(out / "bundles" / "_width" / "width_meta.json")["layers"][str(layer)]["ffn"]
    return np.setdiff1d(np.arange(ffn), kept)


@pytest.mark.parametrize("arch", DEPTH_AND_MLP)
def test_depth(arch: str, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=5)
    apply_plan(write_plan(tmp_path, model_dir, "drop layers 1, 3"), tmp_path / "out")
    ids = tokens()
    with hooked(load_original(model_dir), identity=(1, 3)) as ref:
        want = logits(ref, ids)
    got = logits(load(tmp_path / "out" / "A"), ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", DENSE)
def test_attention_groups(arch: str, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=3)
    apply_plan(write_plan(tmp_path, model_dir, "attn layers 0..2 drop groups 1"), tmp_path / "out")
    facts = load_checkpoint_facts(model_dir).facts
    r = facts["heads"] // facts["kv_heads"]
    gone = list(range(r, 2 * r))  # group 1: query heads r .. 2r-1
    ids = tokens()
    with hooked(load_original(model_dir), zero_heads=dict.fromkeys(range(3), gone)) as ref:
        want = logits(ref, ids)
    m = read_json(tmp_path / "out" / "A" / "manifest.json")
    assert m["uniform"]
    pruned = load(tmp_path / "out" / "A")
    assert pruned.config.num_key_value_heads == 1
    torch.testing.assert_close(logits(pruned, ids), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", DEPTH_AND_MLP)
def test_mlp_width_by_magnitude(arch: str, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=2)
    apply_plan(write_plan(tmp_path, model_dir, "mlp layers 0..1 width 40"), tmp_path / "out")
    ref = load_original(model_dir)
    ffn = ref.config.intermediate_size
    removed = {i: (removed_channels(tmp_path / "out", i, ffn), None) for i in range(2)}
    ids = tokens()
    with hooked(ref, set_channels=removed) as r:
        want = logits(r, ids)
    pruned = load(tmp_path / "out" / "A")
    assert pruned.config.intermediate_size == 40
    torch.testing.assert_close(logits(pruned, ids), want, atol=ATOL, rtol=0)


def _magnitude(mlp: Any, ffn: int) -> torch.Tensor:
    """The documented metric, computed independently from the loaded modules."""
    if hasattr(mlp, "gate_up_proj"):
        gu = mlp.gate_up_proj.weight.double().square().sum(1)
        rows = gu[:ffn] + gu[ffn:]
    else:
        rows = mlp.gate_proj.weight.double().square().sum(
            1
        ) + mlp.up_proj.weight.double().square().sum(1)
    return (rows + mlp.down_proj.weight.double().square().sum(0)).sqrt()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_magnitude_picks_the_largest_channels(arch: str, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=1)
    apply_plan(write_plan(tmp_path, model_dir, "mlp layers 0 width 24"), tmp_path / "out")
    ref = load_original(model_dir)
    scores = _magnitude(ref.model.layers[0].mlp, ref.config.intermediate_size)
    want = sorted(torch.argsort(-scores, stable=True)[:24].tolist())
    kept = read_json(tmp_path / "out" / "bundles" / "_width" / "width_meta.json")["layers"]["0"]
    assert kept["ffn"] == want


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_heterogeneous_loads_with_executor_load(arch: str, tmp_path: Path) -> None:
    """Different widths per layer (and a dropped layer): only executor.load can build it."""
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=4)
    body = "drop layers 2\nattn layers 0 drop groups 0\nmlp layers 1, 3 width 48\n"
    apply_plan(write_plan(tmp_path, model_dir, body), tmp_path / "out")
    a = tmp_path / "out" / "A"
    m = read_json(a / "manifest.json")
    assert not m["uniform"] and not m["stock_loadable"] and m["loader"] == "executor.load"
    cfg = read_json(a / "config.json")
    assert [entry["original"] for entry in cfg["plancc"]["layers"]] == [0, 1, 3]
    ref = load_original(model_dir)
    facts = load_checkpoint_facts(model_dir).facts
    r = facts["heads"] // facts["kv_heads"]
    ffn = ref.config.intermediate_size
    channels = {i: (removed_channels(tmp_path / "out", i, ffn), None) for i in (1, 3)}
    ids = tokens()
    with hooked(ref, identity=(2,), zero_heads={0: list(range(r))}, set_channels=channels) as h:
        want = logits(h, ids)
    pruned = load(a)
    torch.testing.assert_close(logits(pruned, ids), want, atol=ATOL, rtol=0)
    out = pruned.generate(input_ids=ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    with pytest.raises(Exception):  # noqa: B017 - stock transformers refuses, loudly
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(a)


def _sidecar(tmp_path: Path, tables: dict[str, torch.Tensor]) -> tuple[str, str]:
    import hashlib

    from safetensors.torch import save_file

    path = tmp_path / "scores.safetensors"
    save_file({k: v.contiguous() for k, v in tables.items()}, str(path))
    return path.name, hashlib.sha256(path.read_bytes()).hexdigest()


def test_mlp_by_sidecar_metric_and_compensate(tmp_path: Path) -> None:
    """`by taylor` keeps the sidecar's best channels; `compensate` adds their mean as a bias."""
    model_dir = make_tiny_model(tmp_path, "llama", num_hidden_layers=2)
    ffn = 96
    g = torch.Generator().manual_seed(1)
    taylor = torch.rand(ffn, generator=g)
    mean = torch.randn(ffn, generator=g)
    name, sha = _sidecar(
        tmp_path, {"taylor.1.mlp": taylor, "mean_in.1.mlp": mean, "taylor.0.mlp": taylor.clone()}
    )
    body = f'scores "{name}" sha256 "{sha}"\nmlp layers 1 width 64 by taylor compensate\n'
    apply_plan(write_plan(tmp_path, model_dir, body), tmp_path / "out")
    a = tmp_path / "out" / "A"
    kept = read_json(tmp_path / "out" / "bundles" / "_width" / "width_meta.json")["layers"]["1"]
    assert kept["ffn"] == sorted(torch.argsort(-taylor, stable=True)[:64].tolist())
    m = read_json(a / "manifest.json")
    assert m["loader"] == "executor.load" and m["added"][0]["name"].endswith("down_proj.bias")
    removed = np.setdiff1d(np.arange(ffn), kept["ffn"])
    ids = tokens()
    with hooked(load_original(model_dir), set_channels={1: (removed, mean)}) as ref:
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load(a), ids), want, atol=ATOL, rtol=0)


def test_attention_compensate_with_o_bias(tmp_path: Path) -> None:
    """A family with an o_proj bias keeps it, plus the removed heads' mean contribution."""
    model_dir = make_tiny_model(tmp_path, "llama", num_hidden_layers=1, attention_bias=True)
    q = 4 * 16
    mean = torch.randn(q, generator=torch.Generator().manual_seed(2))
    name, sha = _sidecar(tmp_path, {"mean_in.0.attn": mean})
    body = f'scores "{name}" sha256 "{sha}"\nattn layers 0 drop groups 0 compensate\n'
    apply_plan(write_plan(tmp_path, model_dir, body), tmp_path / "out")
    ref = load_original(model_dir)
    gone = np.arange(0, 2 * 16)  # group 0 = query heads 0, 1

    def setq(module: Any, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., gone] = mean[gone]
        return (x,)

    handle = ref.model.layers[0].self_attn.o_proj.register_forward_pre_hook(setq)
    ids = tokens()
    want = logits(ref, ids)
    handle.remove()
    torch.testing.assert_close(logits(load(tmp_path / "out" / "A"), ids), want, atol=ATOL, rtol=0)


def test_uniform_but_refused_by_the_config_class(tmp_path: Path) -> None:
    """LlamaConfig refuses hidden 64 with 6 heads: the result is uniform, yet only
    executor.load can build it (the config keeps widths the class accepts)."""
    from compiler.check import check_file
    from compiler.targets import loadability

    model_dir = make_tiny_model(
        tmp_path, "llama", num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4
    )
    plan = write_plan(tmp_path, model_dir, "attn layers 0..1 drop groups 3")
    resolved = check_file(plan).resolved
    assert resolved is not None and not loadability(resolved).stock
    apply_plan(plan, tmp_path / "out", model_format="hf")  # the default would be nemotron-nas
    a = tmp_path / "out" / "A"
    m = read_json(a / "manifest.json")
    assert m["uniform"] and not m["stock_loadable"] and "refuses" in m["loadability"]
    cfg = read_json(a / "config.json")
    assert cfg["num_attention_heads"] == 8
    assert cfg["plancc"]["layers"][0]["config"]["num_attention_heads"] == 6
    ids = tokens()
    with hooked(load_original(model_dir), zero_heads={i: [6, 7] for i in range(2)}) as ref:
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load(a), ids), want, atol=ATOL, rtol=0)


def test_gemma3_depth_renumbers_layer_types_and_single_kv_group_is_kept(
    tmp_path: Path,
) -> None:
    """Sliding/full attention follows each kept layer; the one KV group cannot go."""
    from compiler.check import check_text

    model_dir = make_tiny_model(tmp_path, "gemma3_text", num_hidden_layers=5)
    original = read_json(model_dir / "config.json")["layer_types"]
    assert original == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    apply_plan(write_plan(tmp_path, model_dir, "drop layers 1, 2"), tmp_path / "out")
    config = read_json(tmp_path / "out" / "A" / "config.json")
    assert config["layer_types"] == [original[i] for i in (0, 3, 4)]
    assert read_json(tmp_path / "out" / "A" / "manifest.json")["stock_loadable"]
    plan = write_plan(tmp_path, model_dir, "attn layers 0 drop groups 0", name="attn.prn")
    result = check_text(plan.read_text(encoding="utf-8"))
    assert [d.code for d in result.errors] == ["P109"]
