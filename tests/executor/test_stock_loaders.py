"""No output of `plancc apply` loads wrongly in a stock loader.

For every plan in examples/ (applied to a tiny model of its family) and a
heterogeneous one, in every format apply writes, stock
`AutoModelForCausalLM.from_pretrained(A)` (with and without
`trust_remote_code`) must either raise or build a model whose tensors are
exactly the files' (checked by saving the loaded model and comparing every
tensor by name). transformers 5.25 would otherwise "Reinit due to size
mismatch" a heterogeneous result into random MLPs; plancc's own layout is
therefore refused by name (`executor.configs.seal`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from executor.cli import main as plancc
from tests.helpers.models import make_tiny_model
from tests.helpers.outputs import read_json
from tests.helpers.paths import EXAMPLES
from tests.helpers.plans import write_plan

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only; never the hub

SMOL = {
    "num_hidden_layers": 30,
    "hidden_size": 72,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 8,
    "intermediate_size": 1536,
    "tie_word_embeddings": True,
}
# Each example's family at tiny width, with the counts its statements name.
TINY = {
    "smollm2-attention.prn": ("llama", SMOL),
    "smollm2-depth.prn": ("llama", SMOL),
    "smollm2-mixed.prn": ("llama", SMOL),
    "smollm2-mlp.prn": ("llama", SMOL),
    "qwen2-tiny-gqa7.prn": (
        "qwen2",
        {"num_hidden_layers": 4, "hidden_size": 112, "intermediate_size": 256},
    ),
    "qwen2moe-tiny.prn": (
        "qwen2_moe",
        {
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "head_dim": 8,
            "num_experts": 16,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 256,
            "tie_word_embeddings": True,
        },
    ),
    "mixtral-8x7b.prn": (
        "mixtral",
        {
            "num_hidden_layers": 32,
            "hidden_size": 32,
            "num_local_experts": 8,
            "intermediate_size": 16,
        },
    ),
    "olmoe-1b-7b.prn": (
        "olmoe",
        {
            "num_hidden_layers": 16,
            "hidden_size": 32,
            "num_key_value_heads": 4,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "intermediate_size": 16,
        },
    ),
}
# Its statements need 48 layers of 128 experts at least 513 wide: no tiny model.
TOO_BIG = {"qwen3-30b-a3b.prn"}
HETERO = ("llama", {"num_hidden_layers": 4}, "drop layers 2\nmlp layers 0 width 48\n")


def statements(path: Path) -> str:
    """An example's statements, without its header (model block, source, calibration)."""
    text = path.read_text(encoding="utf-8")
    body = text[text.index("}") + 1 :]
    skip = re.compile(r"\s*(source|calibration|scores|weights)\b")
    return "\n".join(line for line in body.splitlines() if not skip.match(line)) + "\n"


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.prn")} == set(TINY) | TOO_BIG


# The calls a user makes; the last is what transformers 5.25 does by default on a size
# mismatch (reinitialise the parameter and warn), so the pinned 5.23 shows it too.
LOADER_CALLS = (
    {"trust_remote_code": False},
    {"trust_remote_code": True},
    {"ignore_mismatched_sizes": True},
)


def assert_stock_loads_right_or_refuses(a: Path, tmp_path: Path) -> str:
    """Per loader call, 'refused' or 'loaded' (then every tensor equals the files')."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from compiler.checkpoint import tensor_index

    verdicts = []
    for k, kwargs in enumerate(LOADER_CALLS):
        try:
            model = AutoModelForCausalLM.from_pretrained(a, **kwargs)
        except Exception:  # any refusal is fine; a wrong model is not
            verdicts.append("refused")
            continue
        saved = tmp_path / f"saved-{k}"
        model.save_pretrained(saved)
        got: dict[str, Any] = {}
        for f in sorted({i.file for i in tensor_index(saved).values()}):
            got |= load_file(str(saved / f))
        want: dict[str, Any] = {}
        for f in sorted({i.file for i in tensor_index(a).values()}):
            want |= load_file(str(a / f))
        assert got.keys() == want.keys(), a
        assert all(torch.equal(got[n], want[n]) for n in want), a
        verdicts.append("loaded")
    return "/".join(verdicts)


def _apply(tmp_path: Path, model: Path, body: str, name: str, *flags: str) -> Path | None:
    out = tmp_path / name
    code = plancc(
        ["apply", str(write_plan(tmp_path, model, body, f"{name}.prn")), "-o", str(out), *flags]
    )
    assert code in (0, 2)
    return out / "A" if code == 0 else None


def outputs(tmp_path: Path, family: str, config: dict[str, Any], body: str) -> dict[str, Path]:
    """The result in every format apply writes for it: {format: A}."""
    model = make_tiny_model(tmp_path, family, dtype="bfloat16", **config)
    out = {}
    for fmt in ("default", "hf", "nemotron-nas"):
        flags = () if fmt == "default" else ("--format", fmt)
        a = _apply(tmp_path, model, body, fmt, *flags)
        if a is not None:
            out[read_json(a / "manifest.json")["model_format"] if fmt == "default" else fmt] = a
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_results_never_load_wrongly(tmp_path: Path, name: str) -> None:
    family, config = TINY[name]
    results = outputs(tmp_path, family, config, statements(EXAMPLES / name))
    assert "hf" in results
    for fmt, a in results.items():
        manifest = read_json(a / "manifest.json")
        verdict = assert_stock_loads_right_or_refuses(a, tmp_path / fmt)
        if fmt == "nemotron-nas":
            assert verdict == "refused/loaded/refused"  # only with the shipped code, trusted
        elif manifest["stock_loadable"]:
            assert verdict == "loaded/loaded/loaded"
        else:
            assert verdict == "refused/refused/refused"


def test_heterogeneous_result_never_loads_wrongly(tmp_path: Path) -> None:
    family, config, body = HETERO
    results = outputs(tmp_path, family, config, body)
    assert set(results) == {"hf", "nemotron-nas"}
    config_hf = read_json(results["hf"] / "config.json")
    assert config_hf["model_type"] == "plancc-llama"
    assert config_hf["architectures"] == ["PlanccLlamaForCausalLM"]
    assert config_hf["plancc"]["hf"] == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
    }
    verdict = assert_stock_loads_right_or_refuses(results["hf"], tmp_path / "hf")
    assert verdict == "refused/refused/refused"
    nas = assert_stock_loads_right_or_refuses(results["nemotron-nas"], tmp_path / "nas")
    assert nas == "refused/loaded/refused"
