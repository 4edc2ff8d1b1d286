"""`plancc heal`: argparse wiring (the work is `heal.stages.heal`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compiler.cli import EXIT_OK, UsageError
from compiler.corpus import DATA_CHOICES
from executor.device import add_device_argument, resolve_device
from heal.options import METHODS, TEACHERS, HealError, HealOptions, parse_list


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def cmd_heal(args: argparse.Namespace) -> int:
    from heal.stages import heal

    device = resolve_device(args.device)
    opts = HealOptions(
        out=args.out_dir,
        dest=args.output,
        stages=parse_list(args.stages),
        data=args.data,
        data_files=tuple(args.data_files or ()),
        method=args.method,
        teacher=args.teacher,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=parse_list(args.targets),
        lr=args.lr,
        epochs=args.epochs,
        seqlen=args.seqlen,
        batch=args.batch,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        warmup=args.warmup,
        seed=args.seed,
        device=device,
        temperature=args.temperature,
        kd_weight=args.kd_weight,
        teacher_topk=args.teacher_topk,
        max_windows=args.max_windows,
        checkpointing=args.checkpointing,
        save_every=args.save_every,
        resume=args.resume,
        force=args.force,
        eval_limit=args.eval_limit,
        progress=not args.quiet,
    )
    try:
        res = heal(opts)
    except HealError as exc:
        raise UsageError(str(exc)) from None
    for s in res.stages:
        first, last = s.log.curve[0]["loss"], s.log.curve[-1]["loss"]
        print(
            f"stage {s.name}: {len(s.layers)} layers, {s.log.steps} steps, {s.log.tokens:,} "
            f"tokens, loss {first:.3f} → {last:.3f}, {s.log.tokens_per_second:,.0f} tokens/s"
        )
    if res.report:
        print(res.report)
    print(f"wrote {res.dest} ({res.seconds:.0f} s)", file=sys.stderr)
    return EXIT_OK


def _add_inputs(p: argparse.ArgumentParser) -> None:
    """What to heal and on what: the apply output, the stages, the text and the method
    (added first, so they lead the options in `--help` as before)."""
    p.add_argument("out_dir", type=Path, metavar="OUT", help="the -o directory of `plancc apply`")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="HEALED")
    p.add_argument(
        "--stages",
        default="A",
        help="A, or A followed by depth bundles in restore order, e.g. A,B,C (default A)",
    )
    p.add_argument(
        "--data",
        default="builtin",
        help=f"training text: {', '.join(DATA_CHOICES)} or a text file; its calibration pool "
        "(the first 60%%) is trained on (default builtin)",
    )
    p.add_argument("--data-files", nargs="+", metavar="FILE", help="local files for wikitext2/ptb")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument(
        "--teacher",
        choices=TEACHERS,
        default="none",
        help="original: distill from the original model rebuilt from A and the bundles",
    )


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    """The LoRA adapter's shape: its own group, so `--help` lists it apart."""
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    lora.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    lora.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    lora.add_argument(
        "--targets", default="attn,mlp", help="attn, mlp or attn,mlp (default attn,mlp)"
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """The optimizer, schedule, checkpointing and device: the `training` group."""
    tr = p.add_argument_group("training")
    tr.add_argument(
        "--lr",
        type=float,
        default=HealOptions.lr,
        help="AdamW learning rate (default %(default)g; the peers use 2e-4)",
    )
    tr.add_argument("--epochs", type=float, default=2.0, help="passes over the windows (default 2)")
    tr.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    tr.add_argument("--batch", type=int, default=1, help="windows per batch (default 1)")
    tr.add_argument("--grad-accum", type=int, default=8, help="batches per step (default 8)")
    tr.add_argument("--max-grad-norm", type=float, default=1.0, help="clip (default 1)")
    tr.add_argument("--warmup", type=int, default=3, help="warm-up steps (default 3)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--max-windows", type=int, metavar="N", help="train on the first N windows only"
    )
    tr.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    tr.add_argument(
        "--save-every", type=_positive_int, default=25, help="steps between resumable checkpoints"
    )
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped run (Ctrl-C, crash, kill) from HEALED.work/",
    )
    add_device_argument(tr, "where the model trains (bf16 autocast on cuda)")


def _add_distillation_options(p: argparse.ArgumentParser) -> None:
    """The knowledge-distillation knobs, used only with --teacher original."""
    kd = p.add_argument_group("distillation (--teacher original)")
    kd.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature (default 1)"
    )
    kd.add_argument(
        "--kd-weight",
        type=float,
        default=HealOptions.kd_weight,
        help="loss = w·KL + (1 − w)·LM loss (default %(default)g; 1: distillation only)",
    )
    kd.add_argument(
        "--teacher-topk", type=_positive_int, default=0, help="KL over the teacher's top k tokens"
    )


def add_heal(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heal",
        help="recover quality after pruning: LoRA or full fine-tuning, staged A → A+B → A+B+C",
        description="Train the pruned model A of a `plancc apply` output on the calibration "
        "pool of a corpus (never its evaluation pool): a LoRA adapter through peft (merged "
        "into the weights) or every weight, on the LM loss or distilled from the original "
        "(rebuilt from A and the bundles). With --stages A,B,C, bundle B's layers are then put "
        "back into the healed A at their original positions and a new adapter trained, then "
        "C's. Each stage is written as HEALED/STAGE (a model that loads like its unhealed "
        "counterpart, its adapter in adapter/, loss.json/.png, heal.json); report.md/.json "
        "compare perplexity, parameters and tokens/s. The bundles are never modified.",
        epilog="example: plancc heal out -o healed --stages A --epochs 2 "
        "(r 8, alpha 16, dropout 0.05, batch 1 x 8 as the peers; lr 1e-3, "
        "measured better than their 2e-4)",
    )
    _add_inputs(p)
    _add_lora_options(p)
    _add_training_options(p)
    _add_distillation_options(p)
    p.add_argument(
        "--eval-limit",
        type=_positive_int,
        default=24,
        help="evaluation windows of the report (default 24; 0: no report)",
    )
    p.add_argument("--force", action="store_true", help="replace HEALED if plancc wrote it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_heal)
