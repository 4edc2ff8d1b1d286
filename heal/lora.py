"""What is trained: LoRA adapters through peft on the architecture table's projections,
or every weight (`--method full`).

The target modules come from the architecture table (`compiler.architectures`),
not from a list of names per family: `attn` is every 2-D weight of the
attention rows (q/k/v/o), `mlp` every 2-D weight of the dense MLP rows
(gate/up/down, and a MoE model's shared expert, whose modules carry the same
names). Routed experts that transformers 5 fuses into 3-D parameters are not
`nn.Linear` modules, so LoRA leaves them alone, and so does this.
"""

from __future__ import annotations

from typing import Any

from compiler.architectures import Architecture
from heal.options import HealError, HealOptions


def target_modules(arch: Architecture, parts: tuple[str, ...]) -> list[str]:
    """Module names (the last component, as peft matches them) of the parts' weights."""
    specs = []
    if "attn" in parts:
        specs += arch.attention
    if "mlp" in parts:
        specs += arch.dense_mlp
    names = []
    for spec in specs:
        if len(spec.dims) != 2 or not spec.name.endswith(".weight") or spec.per_expert:
            continue
        module = spec.name[: -len(".weight")].rsplit(".", 1)[-1]
        if module not in names:
            names.append(module)
    return names


def trainable(model: Any, arch: Architecture, opts: HealOptions) -> Any:
    """The model to train: a peft LoRA model, or `model` with every weight trainable."""
    if opts.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    names = target_modules(arch, opts.targets)
    present = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    names = [n for n in names if n in present]
    if not names:
        raise HealError(
            f"--targets {','.join(opts.targets)}: no linear module of this model matches; "
            "use --targets attn,mlp or --method full"
        )
    config = LoraConfig(
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=names,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merged(model: Any, opts: HealOptions) -> Any:
    """The trained model as plain weights (peft's `merge_and_unload` for LoRA)."""
    if opts.method == "full":
        return model
    return model.merge_and_unload()
