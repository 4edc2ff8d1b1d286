"""Serving targets (`compiler/targets.py`): one located error per rule, the verdicts
the cost report lists, and the facts writers and the planner read from the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.check import check_text
from compiler.resolve import ResolvedPlan
from compiler.targets import (
    TARGETS,
    loadability,
    nearest_widths,
    round_width,
    verdict,
    verdicts,
)
from executor.cli import main as plancc
from tests.helpers.plans import FIRST_BODY_LINE as B
from tests.helpers.plans import FIRST_MOE_LINE as M
from tests.helpers.plans import MOE_HEADER, SMOL_HEADER

# A tiny Llama whose config class refuses 6 heads on hidden 64 (statements on line 8).
TINY_HEADER = """\
plan 1
model "tiny" {
  arch llama
  layers 2  hidden 64  ffn 128  vocab 256  tied false
  heads 8  kv_heads 4  head_dim 8
  fingerprint "sha256:0000"
}
"""
QWEN3_HEADER = SMOL_HEADER.replace("arch llama", "arch qwen3")
QWEN2_HEADER = SMOL_HEADER.replace("arch llama", "arch qwen2").replace(
    "  fingerprint", "  qkv_bias true\n  fingerprint"
)  # statements start on line 9


def resolved_of(text: str, base_dir: Path | None = None) -> tuple[ResolvedPlan, object]:
    result = check_text(text, base_dir=base_dir)
    assert result.ok and result.resolved is not None, result.diagnostics
    return result.resolved, result.plan


def errors(text: str, target: str, base_dir: Path | None = None) -> list[tuple[str, int, int]]:
    result = check_text(text, base_dir=base_dir, target=target)
    return [(d.code, d.span.line, d.span.col) for d in result.errors]


def compensate_plan(tmp_path: Path, body: str, header: str = SMOL_HEADER) -> str:
    """`header` + a scores sidecar holding the mean inputs `compensate` needs + `body`."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    tables = {
        f"mean_in.{i}.{part}": torch.zeros(n)
        for i in range(30)
        for part, n in (("mlp", 1536), ("attn", 576))
    }
    path = tmp_path / "s.safetensors"
    save_file(tables, str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return header + f'scores "s.safetensors" sha256 "{sha}"\n' + body


# ---- one located error per rule ---------------------------------------------------------


def test_p140_layers_of_different_shapes_for_stock() -> None:
    text = SMOL_HEADER + "mlp layers 4..6 width 1024\n"
    assert errors(text, "stock") == [("P140", B, 12)]
    [d] = check_text(text, target="stock").errors
    assert d.message == (
        "the MLP width differs across layers (width 1536 in layers 0..3, 7..29; width 1024 "
        "in layers 4..6): stock transformers `AutoModelForCausalLM.from_pretrained` needs one "
        "shape for every layer"
    )
    assert "executor.load" in (d.help or "")
    # the layers off the common shape are located, even when a statement covers the rest
    split = SMOL_HEADER + "mlp layers 0..25 width 1024\nmlp layers 26..29 width 512\n"
    assert errors(split, "stock") == [("P140", B + 1, 12)]
    # llama.cpp writes per-layer shapes (`deci`): nothing to report there
    assert errors(text, "llamacpp") == []


def test_p141_compensate_adds_a_bias(tmp_path: Path) -> None:
    text = compensate_plan(tmp_path, "mlp layers 0..29 width 1024 compensate\n")
    for target in ("stock", "vllm"):
        assert errors(text, target, tmp_path) == [("P141", B + 1, 29)], target
    # llama.cpp adds optional o_proj/down_proj biases in its graphs, and the GGUF
    # writer writes them (tests/executor/test_gguf.py runs them in llama.cpp)
    assert errors(text, "llamacpp", tmp_path) == []
    [d] = check_text(text, base_dir=tmp_path, target="vllm").errors
    assert "down_proj bias in layers 0..29" in d.message and "silently skips" in d.message
    assert d.help == "remove `compensate` (or use `reconstruct`, which needs no bias)"
    attn = compensate_plan(tmp_path, "attn layers 0..29 drop groups 2 compensate\n")
    assert errors(attn, "stock", tmp_path) == [("P141", B + 1, 33)]
    # a family that has the bias already only changes it: stock loads that
    biased = SMOL_HEADER.replace("  fingerprint", "  mlp_bias true\n  fingerprint")
    same = compensate_plan(tmp_path, "mlp layers 0..29 width 1024 compensate\n", biased)
    assert errors(same, "stock", tmp_path) == []
    resolved, _ = resolved_of(same, tmp_path)
    assert loadability(resolved).stock


def test_p142_config_class_refuses_the_shapes() -> None:
    text = TINY_HEADER + "attn layers 0..1 drop groups 3\n"
    assert errors(text, "stock") == [("P142", B, 13)]
    [d] = check_text(text, target="stock").errors
    assert d.message.startswith("LlamaConfig refuses it:")
    assert "multiple of the heads left" in (d.help or "")
    resolved, _ = resolved_of(text)
    assert not loadability(resolved).stock
    # Nemotron-NAS has no such check: vLLM runs it (all 8 -> 6 heads in every layer)
    assert verdict(resolved, "vllm").runs is False  # ffn 128 is not a multiple of 256
    assert verdict(resolved, "vllm", format_only=True).runs


def test_p143_family_the_target_does_not_run() -> None:
    text = QWEN3_HEADER + "mlp layers 4..6 width 1024\n"
    assert errors(text, "vllm") == [("P143", 3, 8)]
    assert errors(text, "llamacpp") == [("P143", 3, 8)]
    [d] = check_text(text, target="vllm").errors
    assert (
        "cannot take `qwen3` results: `--format nemotron-nas` writes llama, mistral, qwen2 only"
        in d.message
    )


def test_p144_mixture_of_experts() -> None:
    text = MOE_HEADER + "drop layers 1\nmoe layers 2..4 experts width 64\n"
    assert errors(text, "vllm") == [("P144", M + 1, 12)]
    assert errors(text, "llamacpp") == [("P144", M + 1, 12)]
    depth_only = MOE_HEADER + "drop layers 3\n"
    assert errors(depth_only, "llamacpp") == [("P144", 3, 8)]  # no MoE statement: the arch
    # a uniform MoE result loads in stock transformers, so vLLM runs it as it is
    uniform = MOE_HEADER + "moe layers 0..4 experts width 64\n"
    assert errors(uniform, "stock") == errors(uniform, "vllm") == []
    resolved, _ = resolved_of(uniform)
    assert verdict(resolved, "vllm").format == "hf"
    assert verdict(resolved, "vllm", format_only=True).codes == ("P144",)


def test_p145_query_heads_differ_across_layers() -> None:
    text = SMOL_HEADER + "attn layers 3 drop groups 1\n"
    assert errors(text, "vllm") == [("P145", B, 13)]
    [d] = check_text(text, target="vllm").errors
    assert (
        "(9 heads (3 KV groups) in layers 0..2, 4..29; 6 heads (2 KV groups) in layer 3)"
        in d.message
    )
    assert d.help is not None and d.help.endswith("or target llamacpp")
    assert errors(text, "llamacpp") == []  # per-layer head counts: GGUF arrays
    uniform = SMOL_HEADER + "attn layers 0..29 drop groups 1\nmlp layers 3 width 1024\n"
    assert errors(uniform, "vllm") == []


def test_p146_width_not_a_multiple_of_256() -> None:
    text = SMOL_HEADER + "mlp layers 4..6 width 1000\nmlp layers 9 width 512\n"
    assert errors(text, "vllm") == [("P146", B, 23)]
    [d] = check_text(text, target="vllm").errors
    assert d.message.startswith("width 1000 in layers 4..6 is not a multiple of 256")
    assert d.help == "use width 768 or 1024"
    assert "intermediate_size" in d.notes[0]
    assert errors(text, "llamacpp") == []
    # the writer's question skips the portability rule: nemotron-nas can write 1000
    resolved, _ = resolved_of(text)
    assert verdict(resolved, "vllm", format_only=True).runs
    # a model width left as it is is located at the `ffn` fact
    tiny = TINY_HEADER + "mlp layers 0 width 64\n"
    assert errors(tiny, "vllm") == [("P146", 4, 28), ("P146", B, 20)]


def test_rules_and_codes_agree_with_the_diagnostics_table() -> None:
    from compiler.diagnostics import CODES

    codes = {r.code for t in TARGETS.values() for r in t.rules}
    assert codes == {f"P14{i}" for i in range(7)}
    assert all(r.summary == CODES[r.code] for t in TARGETS.values() for r in t.rules)


# ---- verdicts and the report ------------------------------------------------------------


def test_verdicts_of_a_heterogeneous_plan() -> None:
    resolved, plan = resolved_of(SMOL_HEADER + "mlp layers 0..14 width 1024\n")
    v = verdicts(resolved, plan)  # type: ignore[arg-type]
    assert list(v) == ["stock", "vllm", "llamacpp"]
    assert (v["stock"].runs, v["stock"].codes) == (False, ("P140",))
    assert (v["vllm"].runs, v["vllm"].format, v["vllm"].arch) == (
        True,
        "nemotron-nas",
        "DeciLMForCausalLM",
    )
    assert v["vllm"].reason == (
        "as `DeciLMForCausalLM` (`--format nemotron-nas`, --trust-remote-code)"
    )
    assert (v["llamacpp"].format, v["llamacpp"].arch) == ("gguf", "deci")


def test_a_stock_loadable_result_runs_in_vllm_as_hf() -> None:
    resolved, _ = resolved_of(SMOL_HEADER + "mlp layers 0..29 width 1000\n")
    v = verdicts(resolved)
    assert v["stock"].runs and v["vllm"].runs
    assert (v["vllm"].format, v["vllm"].arch) == ("hf", "llama")
    # as Nemotron-NAS it would break nothing the format cannot write
    assert verdict(resolved, "vllm", format_only=True).format == "nemotron-nas"
    assert (v["llamacpp"].arch, TARGETS["llamacpp"].layout(resolved)) == ("llama", "llama")


def test_qwen2_runs_as_nemotron_nas_not_yet_as_gguf() -> None:
    text = QWEN2_HEADER + "mlp layers 0..3 width 1024\nattn layers 5 drop groups 1\n"
    resolved, plan = resolved_of(text)
    assert verdict(resolved, "vllm", format_only=True).codes == ("P145",)
    [d] = verdict(resolved, "vllm", plan).diagnostics  # type: ignore[arg-type]
    assert d.help == (
        "keep attention uniform across layers (drop the same number of KV groups in every "
        "kept layer)"
    )  # llama.cpp does not run qwen2 results, so it is not offered
    assert verdict(resolved, "llamacpp").codes == ("P143",)
    mixed, _ = resolved_of(QWEN2_HEADER + "mlp layers 0..3 width 1024\n")
    assert verdict(mixed, "vllm").arch == "DeciLMForCausalLM"


def test_cli_check_target_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan = tmp_path / "p.prn"
    plan.write_text(SMOL_HEADER + "mlp layers 4..6 width 1000\n", encoding="utf-8")
    assert plancc(["check", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "result: loads with executor.load (stock transformers cannot: see `stock`)" in out
    assert "targets (plancc check --target NAME):" in out
    assert "  stock     does not run [P140]: the MLP width differs across layers" in out
    assert "  vllm      does not run [P146]: width 1000 in layers 4..6" in out
    assert "  llamacpp  runs: as `deci` (`--format gguf`)" in out
    assert plancc(["check", str(plan), "--target", "llamacpp", "--no-cost"]) == 0
    capsys.readouterr()
    assert plancc(["check", str(plan), "--target", "vllm", "--no-cost"]) == 1
    out = capsys.readouterr().out
    assert f"{plan}:{B}:23: error[P146]: width 1000" in out
    assert "  = help: use width 768 or 1024" in out
    assert plancc(["check", str(plan), "--target", "vllm", "--format", "json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["code"] for r in rows[:-1]] == ["W002", "P146"]
    report = rows[-1]["report"]
    assert report["stock_loadable"] is False
    assert report["targets"]["vllm"] == {
        "runs": False,
        "reason": rows[1]["message"],
        "format": None,
        "arch": None,
        "codes": ["P146"],
    }
    assert report["targets"]["llamacpp"]["arch"] == "deci"
    with pytest.raises(SystemExit) as exc:
        plancc(["check", str(plan), "--target", "tpu"])
    assert exc.value.code == 2


# ---- widths the planner aims at --------------------------------------------------------


def test_unknown_target_is_named() -> None:
    resolved, _ = resolved_of(SMOL_HEADER)
    with pytest.raises(ValueError, match="unknown serving target 'tpu': one of stock, vllm"):
        verdict(resolved, "tpu")


def test_nearest_widths() -> None:
    assert nearest_widths("vllm", 1000, 1536) == (768, 1024)
    assert nearest_widths("vllm", 1024, 1536) == (1024, 1024)
    assert nearest_widths("vllm", 100, 1536) == (None, 256)
    assert nearest_widths("vllm", 1500, 1536) == (1280, 1536)
    assert nearest_widths("vllm", 1500, 1500) == (1280, None)
    assert nearest_widths("vllm", 64, 128) == (None, None)
    assert nearest_widths("llamacpp", 1001, 1536) == (1001, 1001)
    assert round_width("vllm", 1000, 1536) == 1024
    assert round_width("vllm", 890, 1536) == 768
    assert round_width("vllm", 896, 1536) == 1024  # a tie keeps more
    assert round_width("vllm", 1500, 1500) == 1280
    assert round_width("vllm", 64, 128) is None


def test_table_facts_writers_read() -> None:
    vllm, lcpp, stock = TARGETS["vllm"], TARGETS["llamacpp"], TARGETS["stock"]
    assert (vllm.format, vllm.ffn_multiple, vllm.per_layer_heads) == ("nemotron-nas", 256, False)
    assert (lcpp.format, lcpp.ffn_multiple, lcpp.per_layer_heads) == ("gguf", 1, True)
    assert {f: (x.uniform, x.heterogeneous) for f, x in lcpp.families.items()} == {
        "llama": ("llama", "deci"),
        "mistral": ("llama", "deci"),
    }
    assert set(vllm.families) == {"llama", "mistral", "qwen2"}
    assert not (stock.output_biases or vllm.output_biases)
    assert lcpp.output_biases
    assert stock.format == "hf" and all(x.heterogeneous is None for x in stock.families.values())


def test_stock_verdict_agrees_with_what_apply_writes(tmp_path: Path) -> None:
    """`compensate` on a family that has the o_proj bias already changes that bias: the
    stock target says it loads, apply writes a stock-loadable result, and stock
    `from_pretrained` gives the logits `executor.load` gives. Without the bias the
    target refuses it (P141) and apply needs the plancc loader."""
    import hashlib

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from compiler.check import check_file
    from executor.apply import apply_plan
    from executor.loader import load
    from tests.helpers.models import logits, make_tiny_model, tokens
    from tests.helpers.outputs import read_json
    from tests.helpers.plans import write_plan

    for bias in (True, False):
        model_dir = make_tiny_model(
            tmp_path, "llama", name=f"bias{bias}", num_hidden_layers=1, attention_bias=bias
        )
        sidecar = tmp_path / f"s{bias}.safetensors"
        save_file({"mean_in.0.attn": torch.randn(64)}, str(sidecar))
        sha = hashlib.sha256(sidecar.read_bytes()).hexdigest()
        body = f'scores "{sidecar.name}" sha256 "{sha}"\nattn layers 0 drop groups 0 compensate\n'
        plan = write_plan(tmp_path, model_dir, body, name=f"p{bias}.prn")
        result = check_file(plan, target="stock")
        assert result.resolved is not None
        assert [d.code for d in result.errors] == ([] if bias else ["P141"])
        out = tmp_path / f"out{bias}"
        apply_plan(plan, out)
        assert read_json(out / "A" / "manifest.json")["stock_loadable"] is bias
        if bias:
            ids = tokens()
            stock = AutoModelForCausalLM.from_pretrained(out / "A").eval()
            torch.testing.assert_close(logits(stock, ids), logits(load(out / "A"), ids))
