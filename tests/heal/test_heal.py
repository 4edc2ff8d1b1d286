"""`plancc heal` on tiny models: training lowers the loss, adapters load with peft and equal
the merged model, stages have the right layers, distillation, refusals, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from executor.cli import main as plancc
from heal.options import HealError, HealOptions
from tests.helpers.heal import QUICK
from tests.helpers.models import add_char_tokenizer, make_tiny_model
from tests.helpers.plans import write_plan


def _opts(out: Path, dest: Path, **kw) -> HealOptions:
    base = {"seqlen": 32, "max_windows": 8, "epochs": 1.0, "grad_accum": 2, "progress": False}
    return HealOptions(out, dest, eval_limit=0, **(base | kw))


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from executor.loader import load

    with torch.no_grad():
        return load(path, "cpu", torch.float32)(input_ids=ids).logits


def _windows(out: Path, n: int = 8) -> list[list[int]]:
    from transformers import AutoTokenizer

    from heal.data import training_windows

    return training_windows("builtin", AutoTokenizer.from_pretrained(out / "A"), 32, (), n).windows


def _loss(path: Path, windows: list[list[int]]) -> float:
    from executor.loader import load
    from heal.loss import lm_loss

    model = load(path, "cpu", torch.float32)
    with torch.no_grad():
        ids = torch.tensor(windows)
        return float(lm_loss(model(input_ids=ids).logits, ids))


@pytest.mark.train
def test_lora_lowers_the_loss_and_its_adapter_equals_the_merged_model(
    out: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    from executor.loader import load
    from heal.stages import heal

    dest = tmp_path / "healed"
    heal(_opts(out, dest, lr=5e-3, epochs=3.0))
    windows = _windows(out)
    assert _loss(dest / "A", windows) < _loss(out / "A", windows) - 0.05
    ids = torch.tensor(windows[:2])
    base = load(out / "A", "cpu", torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(dest / "A" / "adapter")).eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=ids).logits
    torch.testing.assert_close(via_peft, _logits(dest / "A", ids), atol=1e-5, rtol=1e-5)
    record = json.loads((dest / "A" / "heal.json").read_text())
    assert record["steps"] == 12 and record["tokens"] == 24 * 32  # 3 epochs of 8 windows
    assert record["data"]["name"] == "builtin" and len(record["data"]["windows_sha256"]) == 64
    curve = json.loads((dest / "A" / "loss.json").read_text())
    assert [c["step"] for c in curve] == list(range(1, 13))
    assert (dest / "A" / "loss.png").stat().st_size > 0


@pytest.mark.train
def test_stages_put_the_bundles_layers_back_and_leave_the_output_intact(
    out: Path, tmp_path: Path, capsys
) -> None:
    from executor.restore import verify

    dest = tmp_path / "healed"
    argv = ["heal", str(out), "-o", str(dest), "--stages", "A,B,C", *QUICK, "--eval-limit", "2"]
    assert plancc(argv) == 0
    screen = capsys.readouterr().out
    assert "stage C: 6 layers" in screen and "C (healed)" in screen
    layers = {s: json.loads((dest / s / "heal.json").read_text())["layers"] for s in "ABC"}
    assert layers == {"A": [0, 2, 5], "B": [0, 1, 2, 5], "C": [0, 1, 2, 3, 4, 5]}
    from executor.loader import load

    for stage, want in layers.items():
        assert len(load(dest / stage).model.layers) == len(want)
    report = json.loads((dest / "report.json").read_text())["results"]
    assert [r["model"] for r in report] == [
        "original",
        "A (pruned)",
        "A (healed)",
        "B (pruned)",
        "B (healed)",
        "C (pruned)",
        "C (healed)",
    ]
    assert verify(out).files > 0  # the bundles are read, never written
    assert not (tmp_path / "healed.work").exists()


@pytest.mark.train
def test_stage_base_rebuilds_what_the_later_adapter_was_trained_on(
    out: Path, tmp_path: Path
) -> None:
    """Stage B's adapter on `stage_base` (healed A with bundle B back) equals HEALED/B."""
    from peft import PeftModel

    from heal.stages import heal, stage_base

    dest = tmp_path / "healed"
    heal(_opts(out, dest, stages=("A", "B"), lr=5e-3))
    ids = torch.tensor(_windows(out, 2))
    base = stage_base(dest, out, "B", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(dest / "B" / "adapter")).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, _logits(dest / "B", ids), atol=1e-5, rtol=1e-5)


@pytest.mark.train
def test_distillation_from_an_equal_model_is_zero_and_from_the_original_trains(
    out: Path, tmp_path: Path
) -> None:
    from heal.loss import kd_loss
    from heal.stages import heal

    logits = torch.randn(2, 5, 11)
    assert float(kd_loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits.clone(), 1.0, topk=3)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, torch.randn(2, 5, 11), 2.0)) > 0.01
    dest = tmp_path / "distilled"
    heal(_opts(out, dest, teacher="original", kd_weight=1.0, lr=5e-3, epochs=2.0))
    curve = json.loads((dest / "A" / "loss.json").read_text())
    assert curve[-1]["loss"] < curve[0]["loss"]  # the KL to the original falls
    assert json.loads((dest / "A" / "heal.json").read_text())["teacher"] == "original"


def test_the_objective_mixes_kl_and_lm_loss_by_the_kd_weight() -> None:
    from heal.loss import kd_loss, lm_loss, objective

    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 6))
    student_logits, teacher_logits = torch.randn(2, 6, 11), torch.randn(2, 6, 11)

    class Fixed:  # a model whose forward returns given logits
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

        def __call__(self, **_: object) -> Fixed:
            return self

    student, teacher = Fixed(student_logits), Fixed(teacher_logits)
    lm = lm_loss(student_logits, ids)
    kd = kd_loss(student_logits, teacher_logits, 2.0)
    loss, lm_part = objective(student, ids, teacher, 0.25, 2.0)
    assert float(loss) == pytest.approx(float(0.25 * kd + 0.75 * lm), rel=1e-6)
    assert lm_part == pytest.approx(float(lm), rel=1e-6)
    assert float(objective(student, ids, teacher, 0.0, 2.0)[0]) == pytest.approx(float(lm))
    assert float(objective(student, ids, None, 0.25, 2.0)[0]) == pytest.approx(float(lm))


@pytest.mark.train
def test_a_poisoned_learning_rate_stops_with_the_fix_and_writes_nothing(
    out: Path, tmp_path: Path
) -> None:
    from heal.stages import heal

    dest = tmp_path / "healed"
    with pytest.raises(HealError, match=r"became (nan|inf).*Try a lower --lr"):
        heal(_opts(out, dest, lr=1e12, max_grad_norm=1e30, method="full", epochs=3.0))
    assert not dest.exists()


def test_bad_stages_are_refused_before_any_work(out: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "healed"
    assert plancc(["heal", str(out), "-o", str(dest), "--stages", "A,C", *QUICK]) == 2
    assert "stages start at A and follow the bundles in order" in capsys.readouterr().err
    assert not dest.exists() and not (tmp_path / "healed.work").exists()


@pytest.mark.train
def test_resume_after_a_kill_gives_the_uninterrupted_result(
    out: Path, tmp_path: Path, monkeypatch
) -> None:
    """A run killed after its third optimizer step, resumed, writes the same weights as a
    run never stopped (and two runs with one seed are equal)."""
    import heal.train as train_mod
    from heal.stages import heal

    full = tmp_path / "full"
    heal(_opts(out, full, save_every=1, epochs=2.0))
    again = tmp_path / "again"
    heal(_opts(out, again, save_every=1, epochs=2.0))
    files = ("A/model.safetensors",)
    for f in files:
        assert (full / f).read_bytes() == (again / f).read_bytes()

    real, calls = train_mod.objective, {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # inside the fourth step (2 batches a step)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    dest = tmp_path / "resumed"
    monkeypatch.setattr(train_mod, "objective", killed)
    with pytest.raises(KeyboardInterrupt):
        heal(_opts(out, dest, save_every=1, epochs=2.0))
    assert not dest.exists() and (tmp_path / "resumed.work" / "train-A.json").is_file()
    monkeypatch.setattr(train_mod, "objective", real)
    result = heal(_opts(out, dest, save_every=1, epochs=2.0, resume=True))
    assert result.stages[0].log.resumed_at == 6
    for f in files:
        assert (dest / f).read_bytes() == (full / f).read_bytes()


@pytest.mark.train
def test_lora_on_a_heterogeneous_moe_result_trains_attention_and_shared_expert(
    tmp_path: Path,
) -> None:
    """Layers with different expert counts (the plancc loader): LoRA reaches attention and
    the shared expert; the fused routed experts are left as they were, and are written."""
    from safetensors.torch import load_file

    from executor.apply import apply_plan
    from heal.stages import heal

    model = add_char_tokenizer(make_tiny_model(tmp_path, "qwen2_moe"))
    plan = "moe layers 0 drop experts 1\nmoe layers 1 drop experts 0, 2\n"
    apply_plan(write_plan(tmp_path, model, plan), tmp_path / "out")
    heal(_opts(tmp_path / "out", tmp_path / "healed", lr=5e-3))
    before = load_file(tmp_path / "out" / "A" / "model.safetensors")
    after = load_file(tmp_path / "healed" / "A" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "model.layers.1.self_attn.q_proj.weight" in changed
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in changed
    assert not any(".experts." in n for n in changed)
    ids = torch.tensor(_windows(tmp_path / "out", 2))
    assert _logits(tmp_path / "healed" / "A", ids).shape[-1] == 128
