"""Staged recovery: A, then A with bundle B's layers back, then with C's, one adapter each.

Stage A trains on the pruned model A and merges. Stage B starts from the
restore machinery's `restore --upto B` (A's layers, unhealed, with B's
original layers back at their original positions), puts the healed weights of
every layer the previous stage had back in, trains a new adapter on the whole
and merges; C likewise. The result is one network usable at three depths.

Each stage is written as `HEALED/STAGE`: the unhealed counterpart's files
(config.json and its `plancc` block, tokenizer, layers map) with its weight
files rewritten tensor for tensor, so it loads the way the unhealed model does
(stock `from_pretrained` or `executor.load`); its adapter in peft's own format
in `adapter/`, its loss curve (`loss.json`, `loss.png`) and `heal.json`. The
stage's base (what `PeftModel.from_pretrained` takes) is `OUT/A` for stage A;
for a later stage it is the previous healed stage with the bundle's layers put
back, which `stage_base` rebuilds.

`HEALED/` appears only when every stage is done (a staging directory beside
it, `executor.outdir`); finished stages and resumable training state wait in
`HEALED.work/` meanwhile (marked and locked: `heal.workdir`), which
`--resume` picks up and success removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.checkpoint import architecture_of, read_config, tensor_index
from executor.family_config import model_config
from executor.layout import LAYERS_MAP, MANIFEST, PRUNE_LOG
from heal.data import TrainingText, training_windows
from heal.lora import merged, trainable
from heal.options import (
    HealError,
    HealOptions,
    depth_bundles,
    extras_installed,
    stages_ok,
)
from heal.report import report_tables
from heal.train import TrainLog, read_state, state_fingerprint, train
from heal.workdir import (
    HeldWorkDir,
    check_work_dir,
    finish,
    held_work_dir,
    original_model,
    work_dir,
)

HEAL_MANIFEST = "heal.json"
ADAPTER_DIR = "adapter"
APPLY_METADATA = (MANIFEST, PRUNE_LOG)  # an apply output's records, not a model's files


@dataclass(frozen=True)
class StageResult:
    name: str
    path: Path  # where it is installed: HEALED/NAME
    unhealed: Path  # its unhealed counterpart
    layers: tuple[int, ...]  # original index of each of its layers
    log: TrainLog


@dataclass(frozen=True)
class HealResult:
    dest: Path
    stages: tuple[StageResult, ...]
    seconds: float
    report: str | None  # the markdown table (None: --eval-limit 0)


def unhealed_stage(root: Path, stage: str, work: Path) -> tuple[Path, tuple[int, ...]]:
    """The stage's unhealed model directory and the original index of each layer."""
    if stage == "A":
        layers = json.loads((root / "A" / LAYERS_MAP).read_text(encoding="utf-8"))
        return root / "A", tuple(layers["new_to_original"])
    from executor.restore import restore

    where = work / f"unhealed-{stage}"
    record = work / f"unhealed-{stage}.layers.json"
    if not (where / "config.json").is_file() or not record.is_file():
        result = restore(root, stage, where, force=True)
        record.write_text(json.dumps(list(result.layers)), encoding="utf-8")
    return where, tuple(json.loads(record.read_text(encoding="utf-8")))


def carry_over(
    model: Any,
    arch: Any,
    layers: tuple[int, ...],
    previous: dict[str, Any],
    previous_layers: tuple[int, ...],
) -> None:
    """Load the previous stage's weights into `model`: every non-layer tensor, and every
    layer the previous stage had, found by its original index."""
    import torch

    where = {orig: j for j, orig in enumerate(layers)}
    renamed: dict[str, torch.Tensor] = {}
    prefixes = [(arch.layer_prefix.format(i=j), j) for j in range(len(previous_layers))]
    for name, value in previous.items():
        for prefix, j in prefixes:
            if name.startswith(prefix):
                new = arch.layer_prefix.format(i=where[previous_layers[j]])
                renamed[new + name[len(prefix) :]] = value
                break
        else:
            renamed[name] = value
    own = model.state_dict()
    missing = [n for n in renamed if n not in own or own[n].shape != renamed[n].shape]
    if missing:
        raise HealError(f"the previous stage's weights do not fit this stage: {missing[:3]}")
    model.load_state_dict(renamed, strict=False)


def stage_base(healed: Path, root: Path, stage: str, device: str = "cpu", dtype: Any = None) -> Any:
    """The model a stage's adapter was trained on (`PeftModel.from_pretrained` takes it):
    OUT/A for stage A; otherwise the previous healed stage with this stage's bundle back.

    The unhealed stage is rebuilt in a temporary directory beside HEALED, removed
    once loaded: never in HEALED.work, which belongs to `plancc heal` runs.
    """
    from executor.loader import load

    if stage == "A":
        return load(root / "A", device, dtype)
    stages = ("A", *depth_bundles(_bundles(root)))
    previous = stages[stages.index(stage) - 1]
    with tempfile.TemporaryDirectory(prefix=f".{healed.name}.base-", dir=healed.parent) as tmp:
        where, layers = unhealed_stage(root, stage, Path(tmp))
        model = load(where, device, dtype)
        arch = architecture_of(model_config(read_config(where)), str(where / "config.json"))
    before = load(healed / previous, device, dtype)
    prev_layers = tuple(json.loads((healed / previous / HEAL_MANIFEST).read_text())["layers"])
    carry_over(model, arch, layers, before.state_dict(), prev_layers)
    return model


def write_stage(model: Any, unhealed: Path, dest: Path) -> None:
    """`unhealed`'s files with every weight tensor taken from `model` (same names and
    shapes, the file's dtype); tensors the model does not hold by that name (tied, or
    fused in memory) are copied. Refuses a trained weight that would not be written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    weights = {info.file for info in tensor_index(unhealed).values()}
    for item in unhealed.iterdir():
        if item.is_file() and item.name not in weights and item.name not in APPLY_METADATA:
            shutil.copyfile(item, dest / item.name)
    state = model.state_dict()
    written: set[str] = set()
    for file in sorted(weights):
        tensors = {}
        with safe_open(str(unhealed / file), framework="pt") as fh:
            meta = fh.metadata() or {}
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                old = fh.get_tensor(name)
                new = state.get(name)
                if new is not None and tuple(new.shape) == tuple(old.shape):
                    tensors[name] = new.detach().to("cpu", old.dtype).contiguous()
                    written.add(name)
                else:
                    tensors[name] = old
        save_file(tensors, str(dest / file), metadata={"format": "pt", **meta})
    lost = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n not in written and not _tied(model, n)
    ]
    if lost:
        raise HealError(
            f"trained weights with no tensor of that name on disk: {lost[:3]} (fused "
            "experts?); use --method lora, which leaves routed experts alone"
        )


def _tied(model: Any, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (
        name.endswith("lm_head.weight")
        and out is not None
        and inp is not None
        and out.weight is inp.weight
    )


def _bundles(root: Path) -> tuple[str, ...]:
    from executor.restore import Applied

    return Applied.read(root).bundle_names


def _stage_manifest(
    opts: HealOptions,
    stage: str,
    base: str,
    layers: tuple[int, ...],
    text: TrainingText,
    log: TrainLog,
) -> dict[str, Any]:
    return {
        "tool": "plancc heal",
        "stage": stage,
        "base": base,
        "adapter": ADAPTER_DIR if opts.method == "lora" else None,
        "layers": list(layers),
        "method": opts.method,
        "teacher": opts.teacher,
        "data": {
            "name": text.name,
            "text_sha256": text.text_sha256,
            "windows": len(text.windows),
            "windows_sha256": data_hash(text.windows),
        },
        "steps": log.steps,
        "batches": log.batches,
        "tokens": log.tokens,
        "seconds": round(log.seconds, 3),
        "tokens_per_second": round(log.tokens_per_second, 1),
        "resumed_at_batch": log.resumed_at,
        "options": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(opts).items()
            if k not in ("out", "dest", "progress", "force", "resume")
        },
        "loss_curve": "loss.json",
    }


def _write_curve(log: TrainLog, dest: Path, title: str) -> None:
    (dest / "loss.json").write_text(json.dumps(log.curve, indent=1) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [c["step"] for c in log.curve]
    ax.plot(steps, [c["loss"] for c in log.curve], label="training loss")
    if any(c["loss"] != c["lm_loss"] for c in log.curve):
        ax.plot(steps, [c["lm_loss"] for c in log.curve], label="LM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest / "loss.png", dpi=100)
    plt.close(fig)


def heal(opts: HealOptions) -> HealResult:
    """Run every stage; install HEALED/ when all are done.

    Everything that can be checked is checked before any model is loaded or
    trained, and before a dead run's work directory is discarded: the options,
    the apply output (metadata, and the sha256 of every file the run reads),
    -o, the work directory (`workdir`) and the training text. Interrupted
    (Ctrl-C, a crash, kill -9), the run leaves HEALED.work/ marked and unlocked
    with its finished stages and training state, and no staging directory
    beside HEALED: `--resume` continues it.
    """
    from executor.outdir import OutputError, check_destination

    started = time.perf_counter()
    opts.validate_values()  # before the apply output is even read
    extras_installed(opts.method)
    applied = _applied(opts.out)
    stages_ok(opts.stages, applied.bundle_names)
    try:
        check_destination(opts.dest, opts.force, [opts.out])
    except OutputError as exc:
        raise HealError(str(exc)) from None
    work = work_dir(opts.dest)
    check_work_dir(work, [opts.out], opts.resume)
    _verify_inputs(applied, opts)
    from executor.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(opts.out / "A")
    text = training_windows(opts.data, tokenizer, opts.seqlen, opts.data_files, opts.max_windows)
    with held_work_dir(work, [opts.out], opts.resume, _note) as held:
        results = _run_stages(opts, held.path, text)
        report = None
        if opts.eval_limit:
            report = report_tables(opts, results, held.path)
        _install(opts, held, results, report)
        finish(held, _note)
    return HealResult(
        opts.dest, tuple(results), time.perf_counter() - started, report[0] if report else None
    )


def _note(text: str) -> None:
    print(f"plancc heal: {text}", file=sys.stderr)


def _applied(root: Path) -> Any:
    """The apply output's metadata, read and validated (RestoreError → HealError)."""
    from executor.restore import Applied, RestoreError

    try:
        return Applied.read(root)
    except RestoreError as exc:
        raise HealError(str(exc)) from None


def _verify_inputs(applied: Any, opts: HealOptions) -> None:
    """Hash every file of the apply output this run will read, before any training.

    The stages read A and their bundles; the teacher and the report's first row
    (the original) read everything.
    """
    from executor.restore import RestoreError

    everything = opts.teacher == "original" or opts.eval_limit > 0
    try:
        applied.verify(None if everything else tuple(opts.stages[1:]))
    except RestoreError as exc:
        raise HealError(str(exc)) from None


def _check_resumable(opts: HealOptions, work: Path, n_windows: int) -> None:
    """With --resume: every finished stage and training state readable, before training."""
    if not opts.resume:
        return
    for stage in opts.stages:
        finished = work / f"stage-{stage}"
        if (finished / HEAL_MANIFEST).is_file():
            _finished_log(finished)
        elif (work / f"train-{stage}.json").is_file():
            read_state(work / f"train-{stage}.json", state_fingerprint(opts, n_windows))


def _finished_log(finished: Path) -> TrainLog:
    """The training log of a stage a previous run finished (HealError if unreadable)."""
    try:
        record = json.loads((finished / HEAL_MANIFEST).read_text(encoding="utf-8"))
        log = TrainLog(record["steps"], record["batches"], record["tokens"], record["seconds"])
        log.curve = json.loads((finished / "loss.json").read_text(encoding="utf-8"))
        if not isinstance(log.curve, list) or not log.curve:
            raise ValueError("loss.json holds no curve")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise HealError(
            f"--resume: the finished stage {finished} is damaged ({exc}); run without "
            f"--resume to start over (that removes {finished.parent})"
        ) from None
    return log


def _run_stages(opts: HealOptions, work: Path, text: TrainingText) -> list[StageResult]:
    """Train (or, resuming, pick up) every stage in order; each lands in work/stage-NAME."""
    import torch

    from executor.loader import load

    _check_resumable(opts, work, len(text.windows))
    teacher = None
    if opts.teacher == "original":
        # bf16 on a GPU: the teacher only runs forward, and an 8B one then takes 16 GB
        cuda = str(opts.device).startswith("cuda")
        dtype = torch.bfloat16 if cuda else torch.float32
        teacher = load(original_model(opts.out, work), opts.device, dtype)
        for p in teacher.parameters():
            p.requires_grad_(False)
    results: list[StageResult] = []
    previous: tuple[dict[str, Any], tuple[int, ...]] | None = None
    for stage in opts.stages:
        finished = work / f"stage-{stage}"
        unhealed, layers = unhealed_stage(opts.out, stage, work)
        if opts.resume and (finished / HEAL_MANIFEST).is_file():
            log = _finished_log(finished)
            done = load(finished, opts.device, torch.float32)
            previous = ({k: v.clone() for k, v in done.state_dict().items()}, layers)
            results.append(StageResult(stage, opts.dest / stage, unhealed, layers, log))
            continue
        model = load(unhealed, opts.device, torch.float32)
        arch = architecture_of(model_config(read_config(unhealed)), str(unhealed / "config.json"))
        if previous is not None:
            carry_over(model, arch, layers, previous[0], previous[1])
        if opts.checkpointing:
            _checkpointing(model)
        torch.manual_seed(opts.seed)  # LoRA's initial A matrices: one seed, one result
        model = trainable(model, arch, opts)
        state = work / f"train-{stage}.json"
        log = train(model, text.windows, opts, teacher, state, f"heal {stage}")
        if finished.exists():
            shutil.rmtree(finished)
        finished.mkdir(parents=True)
        if opts.method == "lora":
            model.save_pretrained(str(finished / ADAPTER_DIR))
            _point_adapter_at_base(finished / ADAPTER_DIR, stage, opts.out)
        model = merged(model, opts)
        write_stage(model, unhealed, finished)
        base = "OUT/A"
        if stage != "A":
            base = f"HEALED/{opts.stages[opts.stages.index(stage) - 1]} with bundle {stage} back"
        manifest = _stage_manifest(opts, stage, base, layers, text, log)
        _write_curve(log, finished, f"plancc heal: stage {stage}")
        (finished / HEAL_MANIFEST).write_text(
            json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
        )
        previous = ({k: v.detach().clone() for k, v in model.state_dict().items()}, layers)
        results.append(StageResult(stage, opts.dest / stage, unhealed, layers, log))
        del model
    return results


def _install(
    opts: HealOptions,
    held: HeldWorkDir,
    results: list[StageResult],
    report: tuple[str, str] | None,
) -> None:
    """Stage HEALED/ from the finished stages (hard links, so the work directory keeps
    them whatever happens) and rename it into place.

    Refused (the work directory replaced meanwhile, -o taken by someone else):
    nothing is installed and the finished stages stay in the work directory.
    """
    from executor.outdir import OutputError, staged_output

    if not held.still_ours():
        raise HealError(
            f"{held.path} was replaced during the run by a directory plancc did not create; "
            "it was left alone and nothing was installed; move it away and run again"
        )
    try:
        with staged_output(opts.dest, "heal", opts.force, inputs=[opts.out]) as tmp:
            for r in results:
                shutil.copytree(
                    held.path / f"stage-{r.name}", tmp / r.name, copy_function=_link_or_copy
                )
            if report is not None:
                (tmp / "report.md").write_text(report[0] + "\n", encoding="utf-8")
                (tmp / "report.json").write_text(report[1] + "\n", encoding="utf-8")
    except OutputError as exc:
        raise HealError(
            f"{exc}; the healed stages are kept in {held.path}: run again with --resume to "
            "install them without training"
        ) from None


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (instant, no space) where the filesystem allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _point_adapter_at_base(adapter: Path, stage: str, root: Path) -> None:
    """peft records the base model's path; stage A's is OUT/A."""
    config = adapter / "adapter_config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = str((root / "A").resolve()) if stage == "A" else None
    config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _checkpointing(model: Any) -> None:
    """Gradient checkpointing (transformers 5 calls it activation checkpointing)."""
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def data_hash(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()
