"""Mixture-of-experts plans applied: expert drops and expert / shared-expert width.

The reference for a dropped expert is the original model with that expert's
router logit set to -inf, so the family's own routing (softmax over the
experts, top-k, renormalization or not) decides what the survivors get; the
reference for a narrowed expert is the original with the removed channels'
down-projection columns zeroed. Every family of the table with routed experts,
in fp32, to 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from executor.apply import apply_plan
from executor.cli import main
from executor.loader import load
from executor.restore import restore
from plangen.surgery import masked_experts
from tests.helpers.models import fused_copy, load_original, logits, make_tiny_model, tokens
from tests.helpers.outputs import read_json, tensor_hashes
from tests.helpers.plans import write_plan

MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def _moe_layers(model: Any) -> list[Any]:
    return list(model.model.layers)


def _router_weight(layer: Any, experts: int) -> Any:
    """The router's weight of one decoder layer: the (experts, hidden) `gate`."""
    found = [
        p
        for name, p in layer.named_parameters()
        if name.endswith("gate.weight") and p.shape[0] == experts
    ]
    assert len(found) == 1, [n for n, _ in layer.named_parameters()]
    return found[0]


def _fused_down(layer: Any, expert_ffn: int) -> Any:
    found = [
        p
        for name, p in layer.named_parameters()
        if name.endswith("experts.down_proj") and p.shape[-1] == expert_ffn
    ]
    assert len(found) == 1, [n for n, _ in layer.named_parameters()]
    return found[0]


def _restored_exactly(out: Path, model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "restored"
    restore(out, "all", dest)
    assert tensor_hashes(dest) == tensor_hashes(model)
    for f in sorted(model.glob("*.safetensors")):
        assert (dest / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_dropped_experts_equal_masked_routing(family: str, tmp_path: Path) -> None:
    """Different experts per layer, the same count: stock transformers loads A, and its
    logits are the original's with those experts masked out of the router."""
    import torch

    model = make_tiny_model(tmp_path, family)  # 4 experts, top-2, 2 layers
    plan = write_plan(tmp_path, model, "moe layers 0 drop experts 2\nmoe layers 1 drop experts 0")
    out = tmp_path / "out"
    apply_plan(plan, out)
    manifest = read_json(out / "A" / "manifest.json")
    assert manifest["stock_loadable"] and manifest["uniform"]
    pruned = load_original(out / "A")
    assert pruned.config.num_experts_per_tok == 2
    experts_key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(pruned.config, experts_key) == 3
    ids = tokens()
    ref = load_original(model)
    with masked_experts(_moe_layers(ref), {0: [2], 1: [0]}, 4):
        want = logits(ref, ids)
    torch.testing.assert_close(logits(pruned, ids), want, atol=1e-5, rtol=0)
    # the survivors are renumbered and their router rows kept in order
    orig_router = _router_weight(_moe_layers(ref)[0], 4).detach()
    new_router = _router_weight(_moe_layers(pruned)[0], 3).detach()
    torch.testing.assert_close(new_router, orig_router[[0, 1, 3]], atol=0, rtol=0)
    log = {e["source"]: e for e in read_json(out / "A" / "prune_log.json")["tensors"]}
    gone = [e for e in log.values() if e["action"] == "removed"]
    assert gone and all(".experts.2." in e["source"] or ".experts.0." in e["source"] for e in gone)
    assert all(e["removed"]["whole"] for e in gone)
    _restored_exactly(out, model, tmp_path)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_width_equals_zeroed_channels(family: str, tmp_path: Path) -> None:
    """`experts width N`: every expert keeps its own N channels; the same as zeroing the
    others' down-projection columns in the original."""
    import torch

    model = make_tiny_model(tmp_path, family)
    expert_ffn = 32 if family in ("qwen2_moe", "qwen3_moe") else 96  # mixtral, olmoe: ffn
    keep = expert_ffn // 2
    apply_plan(write_plan(tmp_path, model, f"moe layers 0..1 experts width {keep}"), tmp_path / "o")
    out = tmp_path / "o"
    sel = read_json(out / "bundles" / "_width" / "width_meta.json")["selections"]
    assert {k for k in sel if ".expert_ffn." in k} == {
        f"{i}.expert_ffn.{e}" for i in (0, 1) for e in range(4)
    }
    # experts choose their channels independently (by their own magnitudes)
    assert len({tuple(sel[f"0.expert_ffn.{e}"]) for e in range(4)}) > 1
    ref = load_original(model)
    with torch.no_grad():
        for i, layer in enumerate(_moe_layers(ref)):
            down = _fused_down(layer, expert_ffn)
            for e in range(4):
                gone = sorted(set(range(expert_ffn)) - set(sel[f"{i}.expert_ffn.{e}"]))
                down[e][:, gone] = 0.0
    ids = tokens()
    torch.testing.assert_close(
        logits(load_original(out / "A"), ids), logits(ref, ids), atol=1e-5, rtol=0
    )
    _restored_exactly(out, model, tmp_path)


def test_shared_expert_width_equals_zeroed_channels(tmp_path: Path) -> None:
    import torch

    model = make_tiny_model(tmp_path, "qwen2_moe")  # shared expert of 48 channels
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model, "moe layers 0..1 shared width 24"), out)
    assert load_original(out / "A").config.shared_expert_intermediate_size == 24
    sel = read_json(out / "bundles" / "_width" / "width_meta.json")["selections"]
    ref = load_original(model)
    with torch.no_grad():
        for i, layer in enumerate(_moe_layers(ref)):
            gone = sorted(set(range(48)) - set(sel[f"{i}.shared_ffn"]))
            layer.mlp.shared_expert.down_proj.weight[:, gone] = 0.0
    ids = tokens()
    torch.testing.assert_close(
        logits(load_original(out / "A"), ids), logits(ref, ids), atol=1e-5, rtol=0
    )
    _restored_exactly(out, model, tmp_path)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_layers_with_different_experts_load_with_executor_load(family: str, tmp_path: Path) -> None:
    """Layer 0 keeps 3 experts of 16 channels, layer 1 all 4 at full width: not one config,
    so `executor.load` builds each layer at its own size (transformers fuses experts)."""
    import torch

    model = make_tiny_model(tmp_path, family, num_hidden_layers=3)
    expert_ffn = 32 if family == "qwen2_moe" else 96
    body = (
        f"moe layers 0 drop experts 1\nmoe layers 0 experts width {expert_ffn // 2}\ndrop layers 2"
    )
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model, body), out)
    manifest = read_json(out / "A" / "manifest.json")
    assert not manifest["stock_loadable"] and manifest["loader"] == "executor.load"
    sel = read_json(out / "bundles" / "_width" / "width_meta.json")["selections"]
    ref = load_original(model)
    with torch.no_grad():
        down = _fused_down(_moe_layers(ref)[0], expert_ffn)
        for e in (0, 2, 3):
            gone = sorted(set(range(expert_ffn)) - set(sel[f"0.expert_ffn.{e}"]))
            down[e][:, gone] = 0.0
    from tests.helpers.models import hooked

    ids = tokens()
    with masked_experts(_moe_layers(ref), {0: [1]}, 4), hooked(ref, identity=(2,)) as h:
        want = logits(h, ids)
    pruned = load(out / "A")
    torch.testing.assert_close(logits(pruned, ids), want, atol=1e-5, rtol=0)
    with torch.no_grad():
        gen = pruned.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)
    _restored_exactly(out, model, tmp_path)
    # the dropped layer back, the dropped expert still out: executor.load again
    partial = tmp_path / "partial"
    assert main(["restore", str(out), "--upto", "B", "-o", str(partial)]) == 0
    back = load(partial)
    assert len(back.model.layers) == 3


def test_apply_cli_reports_expert_drops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_model(tmp_path, "qwen2_moe")
    plan = write_plan(tmp_path, model, "moe layers 0..1 drop experts 3")
    assert main(["apply", str(plan), "-o", str(tmp_path / "out")]) == 0
    m = read_json(tmp_path / "out" / "A" / "manifest.json")
    assert m["removed"]["width"]["tensors"] > 0
    assert all(s["experts"] == 3 for s in m["layers"])


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_rescale_scales_the_kept_experts(family: str, tmp_path: Path) -> None:
    """`drop experts ... rescale`: the kept experts' down projections times 1 - the
    dropped experts' mean router probability (from the sidecar), the rest as a drop."""
    import numpy as np
    import torch

    from plangen.scores import ScoreTables, write_sidecar

    model = make_tiny_model(tmp_path, family)
    prob = {0: np.array([0.1, 0.2, 0.3, 0.4]), 1: np.array([0.25, 0.25, 0.25, 0.25])}
    sidecar = tmp_path / "plan.scores.safetensors"
    sha = write_sidecar(
        sidecar, ScoreTables({f"router_prob.{i}.experts": p for i, p in prob.items()}, {})
    )
    body = (
        f'scores "{sidecar.name}" sha256 "{sha}"\n'
        "moe layers 0 drop experts 1, 2 rescale\nmoe layers 1 drop experts 0, 3 rescale"
    )
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model, body), out)
    ref = load_original(model)
    alpha = {0: 1 - 0.5, 1: 1 - 0.5}
    with torch.no_grad():
        for i, layer in enumerate(_moe_layers(ref)):
            _fused_down(layer, 32 if family == "qwen2_moe" else 96).mul_(alpha[i])
    ids = tokens()
    with masked_experts(_moe_layers(ref), {0: [1, 2], 1: [0, 3]}, 4):
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load_original(out / "A"), ids), want, atol=1e-5, rtol=0)
    log = read_json(out / "A" / "prune_log.json")["tensors"]
    modified = {e["source"] for e in log if e["action"] == "modified"}
    assert modified and all("down" in n for n in modified)
    _restored_exactly(out, model, tmp_path)


# ---- the fused on-disk form -------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_fused_experts_drop_narrow_and_rescale(family: str, tmp_path: Path) -> None:
    """Both on-disk forms are one plan: on fused tensors, experts are cut along axis 0
    and each kept expert keeps its own channels; logits equal the masked, zeroed,
    rescaled original; restore gives the fused files back bit for bit."""
    import numpy as np
    import torch

    from compiler.checkpoint import load_checkpoint_facts
    from plangen.scores import ScoreTables, write_sidecar

    model = fused_copy(make_tiny_model(tmp_path, family), tmp_path)
    ck = load_checkpoint_facts(model)
    assert any(s.name == "mlp.experts.gate_up_proj" for s in ck.arch.moe_mlp)
    expert_ffn = 32 if family == "qwen2_moe" else 96
    prob = np.array([0.1, 0.2, 0.3, 0.4])
    sidecar = tmp_path / "plan.scores.safetensors"
    sha = write_sidecar(
        sidecar, ScoreTables({f"router_prob.{i}.experts": prob.copy() for i in (0, 1)}, {})
    )
    body = (
        f'scores "{sidecar.name}" sha256 "{sha}"\n'
        "moe layers 0..1 drop experts 1 rescale\n"
        f"moe layers 0..1 experts width {expert_ffn // 2}"
    )
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model, body), out)
    sel = read_json(out / "bundles" / "_width" / "width_meta.json")["selections"]
    ref = load_original(model)
    with torch.no_grad():
        for i, layer in enumerate(_moe_layers(ref)):
            down = _fused_down(layer, expert_ffn)
            down.mul_(1 - 0.2)
            for e in (0, 2, 3):
                gone = sorted(set(range(expert_ffn)) - set(sel[f"{i}.expert_ffn.{e}"]))
                down[e][:, gone] = 0.0
    ids = tokens()
    with masked_experts(_moe_layers(ref), {0: [1], 1: [1]}, 4):
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load_original(out / "A"), ids), want, atol=1e-5, rtol=0)
    # channels were chosen by each expert's own magnitude, read from the fused slices
    assert len({tuple(sel[f"0.expert_ffn.{e}"]) for e in (0, 2, 3)}) > 1
    _restored_exactly(out, model, tmp_path)


def test_fused_experts_of_different_sizes_load_with_executor_load(tmp_path: Path) -> None:
    import torch

    model = fused_copy(make_tiny_model(tmp_path, "qwen2_moe"), tmp_path)
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model, "moe layers 0 drop experts 0, 3"), out)
    assert read_json(out / "A" / "manifest.json")["loader"] == "executor.load"
    ref = load_original(model)
    ids = tokens()
    with masked_experts(_moe_layers(ref), {0: [0, 3]}, 4):
        want = logits(ref, ids)
    torch.testing.assert_close(logits(load(out / "A"), ids), want, atol=1e-5, rtol=0)
    _restored_exactly(out, model, tmp_path)


# ---- DeepSeek-V3 / Kimi-K2 ------------------------------------------------------------


def _deepseek(tmp_path: Path) -> Path:
    """A tiny DeepSeek-V3 with a non-zero routing correction bias (so masking the
    router's logits alone would not exclude an expert)."""
    import torch
    from safetensors.torch import load_file, save_file

    model = make_tiny_model(tmp_path, "deepseek_v3", num_hidden_layers=3)  # conftest's shape
    state = load_file(str(model / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in state:
        if name.endswith("e_score_correction_bias"):
            state[name] = torch.rand(state[name].shape, generator=g) * 0.5
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def test_deepseek_facts_and_tensors_match_the_table(tmp_path: Path) -> None:
    from compiler.checkpoint import expected_tensors, load_checkpoint_facts, tensor_mismatches

    ck = load_checkpoint_facts(_deepseek(tmp_path))
    f = ck.facts
    assert (f["experts"], f["top_k"], f["expert_ffn"], f["shared_ffn"]) == (8, 2, 32, 32)
    assert (f["expert_groups"], f["dense_layers"]) == (2, (0,))
    assert (f["q_lora"], f["kv_lora"], f["rope_dim"], f["nope_dim"], f["v_dim"]) == (
        32,
        16,
        8,
        8,
        16,
    )
    assert tensor_mismatches(expected_tensors(ck.arch, f), ck.index) == []


def test_deepseek_drops_experts_group_by_group(tmp_path: Path) -> None:
    """One expert from each routing group: router rows and correction-bias entries
    follow the survivors; logits equal the original's with those experts excluded
    from selection; restore is bit-exact."""
    import torch

    model = _deepseek(tmp_path)
    out = tmp_path / "out"
    apply_plan(write_plan(tmp_path, model, "moe layers 1..2 drop experts 1, 6"), out)
    pruned = load_original(out / "A")
    assert pruned.config.n_routed_experts == 6 and pruned.config.n_group == 2
    ref = load_original(model)
    ids = tokens()
    with masked_experts(list(ref.model.layers), {1: [1, 6], 2: [1, 6]}, 8):
        want = logits(ref, ids)
    torch.testing.assert_close(logits(pruned, ids), want, atol=1e-5, rtol=0)
    bias = pruned.model.layers[1].mlp.gate.e_score_correction_bias
    orig = ref.model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(bias, orig[[0, 2, 3, 4, 5, 7]], atol=0, rtol=0)
    _restored_exactly(out, model, tmp_path)


def test_deepseek_plans_are_checked_for_mla_and_routing_groups(tmp_path: Path) -> None:
    from compiler.check import check_file

    model = _deepseek(tmp_path)
    attn = check_file(write_plan(tmp_path, model, "attn layers 1 drop groups 0", "a.prn"))
    assert [d.code for d in attn.errors] == ["P126"]
    assert "multi-head latent attention" in attn.errors[0].message
    groups = check_file(write_plan(tmp_path, model, "moe layers 1 drop experts 0, 1", "g.prn"))
    assert [d.code for d in groups.errors] == ["P112"]
    assert (
        "group 0 (experts 0..3) loses 2, group 1 (experts 4..7) loses 0" in groups.errors[0].message
    )
