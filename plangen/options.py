"""The options of `plangen analyze`, stated once.

Every field of `Options` that is an option carries its flag, help text, argument
group and argparse keywords in its metadata (`option(...)`); `add_arguments`
generates the parser from the fields in their order, and `Options.from_args`
builds the options from what it parsed, so a new option is one field here. What
several options decide together (the strategy `--ratio` or `--drop` implies, the
reconstruction mode, the layer-cut bound, the device) is worked out once, by
`Options.resolved`, or read from a property. `add_options` lends a few of them
(--offload, --no-memory-check) to `plangen reconstruct`, text and all.

No torch here: `plangen --help` builds this parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from compiler.targets import ANY, TARGETS
from executor.device import check_device, device_argument, resolve_device
from plangen.metrics import DAMP, WIDTH_METRIC_NAMES

STRATEGIES = ("auto", "depth", "uniform", "unbalanced", "global", "flap")
ALIASES = {"best": "auto"}  # the name issue 11's default had
OPTION = "plangen.option"  # the metadata key of an option's `Flag`
NOT_AN_OPTION = "plangen.not_an_option"  # ... of a field no flag sets (why, in words)

SIZE = (
    "how much to remove (one of; default --target-params 0.75, on a mixture-of-experts "
    "model --drop-experts 0.25)"
)
STRATEGY = "strategy"
CALIBRATION = "calibration"
OUTPUT = "output"


class OptionError(ValueError):
    """An option value refused before any work; the message names the option."""


def fraction(text: str) -> float:
    """A fraction strictly between 0 and 1 (argparse `type=`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction such as 0.75, got {text!r}"
        ) from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def split_fraction(text: str) -> float:
    """`--split half`, `ratio R` or `R`: bundle B's share of the dropped layers."""
    if text == "half":
        return 0.5
    if text.startswith("ratio"):
        text = text.removeprefix("ratio").strip() or "0.5"
    return fraction(text)


@dataclass(frozen=True)
class Flag:
    """How one field is given on the command line: its names (none for a positional),
    help, argument group (None: the parser's own), whether it is one of the mutually
    exclusive size options, and the rest of `add_argument`'s keywords."""

    names: tuple[str, ...]
    help: str | None
    group: str | None = None
    one_of: bool = False
    keywords: Mapping[str, object] = field(default_factory=dict)


def option(
    *names: str,
    help: str | None,
    group: str | None = None,
    one_of: bool = False,
    default: object = dataclasses.MISSING,
    **argparse_keywords: object,
):
    """A dataclass field that is a command-line option (`names` empty: a positional)."""
    flag = Flag(names, help, group, one_of, argparse_keywords)
    return field(default=default, metadata={OPTION: flag})


@dataclass(frozen=True)
class Options:
    """What `plangen analyze` is asked to do. Fields are in `--help` order."""

    model_dir: Path = option(  # noqa: RUF009 - `option` is a dataclasses.field
        help="checkpoint directory", type=Path, metavar="MODEL_DIR"
    )
    output: Path = option(  # noqa: RUF009 - `option` is a dataclasses.field
        "-o",
        "--output",
        help="the plan to write; PLAN.scores.safetensors is written beside it",
        type=Path,
        required=True,
        metavar="PLAN.prn",
    )
    force: bool = option(
        "--force",
        help="replace an existing plan and its sidecar (otherwise refused)",
        default=False,
        action="store_true",
    )
    # ---- how much to remove
    target_params: float | None = option(
        "--target-params",
        help="keep this fraction of all parameters, embeddings counted (on a "
        "mixture-of-experts model: spent on expert drops and expert width together, the "
        "split judged on held-out loss)",
        group=SIZE,
        one_of=True,
        default=None,
        type=fraction,
        metavar="F",
    )
    drop: int | None = option(
        "--drop",
        help="depth: drop N layers",
        group=SIZE,
        one_of=True,
        default=None,
        type=int,
        metavar="N",
    )
    drop_experts: float | None = option(
        "--drop-experts",
        help="mixture of experts: remove this fraction of the routed experts of every MoE "
        "layer (never below top_k); candidates by frequency, routing weight, router "
        "probability, REAP and NAEE, each with and without `rescale`, judged on held-out loss",
        group=SIZE,
        one_of=True,
        default=None,
        type=fraction,
        metavar="F",
    )
    shrink_experts: float | None = option(
        "--shrink-experts",
        help="mixture of experts: remove this fraction of every routed expert's channels, "
        "each expert its own, by Wanda scores of its routed activations (the sidecar also "
        "scores the shared expert's channels, `wanda.L.shared`, for hand edits); with "
        "--drop-experts, both",
        group=SIZE,
        default=None,
        type=fraction,
        metavar="F",
    )
    drop_frac: float | None = option(
        "--drop-frac",
        help="depth: drop this fraction of the layers",
        group=SIZE,
        one_of=True,
        default=None,
        type=fraction,
        metavar="F",
    )
    ratio: float | None = option(
        "--ratio",
        help="uniform: remove this fraction of KV groups and channels per layer",
        group=SIZE,
        one_of=True,
        default=None,
        type=fraction,
        metavar="R",
    )
    # ---- strategy
    strategy: str = option(
        "--strategy",
        help="auto (default): candidates of every strategy, with and without compensation "
        "and reconstruction; the one with the lowest held-out calibration loss wins "
        "(`best` is its old name)",
        group=STRATEGY,
        default="auto",
        choices=(*STRATEGIES, *ALIASES),
    )
    metric: str | None = option(
        "--metric",
        help="width: " + ", ".join(WIDTH_METRIC_NAMES) + ", obs (MLP channels picked by "
        "Optimal Brain Surgeon in the reconstruction walk; widths from taylor; implies "
        "--reconstruct); depth: block_influence, angular, removal (default: taylor; flap "
        "for --strategy flap)",
        group=STRATEGY,
        default=None,
        metavar="NAME",
    )
    parts: str = option(
        "--parts",
        help="uniform/global: what to prune (mlp = MLP-only preset, attn = attention-only)",
        group=STRATEGY,
        default="both",
        choices=("both", "mlp", "attn"),
    )
    attn_layers: str | None = option(
        "--attn-layers",
        help="layers whose attention may be pruned (default all)",
        group=STRATEGY,
        default=None,
        metavar="A..B",
    )
    mlp_layers: str | None = option(
        "--mlp-layers",
        help="layers whose MLP may be pruned (default all)",
        group=STRATEGY,
        default=None,
        metavar="A..B",
    )
    round_groups: str = option(
        "--round-groups",
        help="uniform: KV groups per layer = R * kv_heads rounded (down: LLM-Pruner's int())",
        group=STRATEGY,
        default="nearest",
        choices=("nearest", "down"),
    )
    compensate: bool = option(
        "--compensate",
        help="add FLAP's bias compensation to width cuts (loads with the plancc loader)",
        group=STRATEGY,
        default=False,
        action="store_true",
    )
    reconstruct: bool = option(
        "--reconstruct",
        help="re-solve the kept columns of o_proj / down_proj by damped least squares on "
        "the calibration inputs, layer by layer (SlimGPT-style); stock-loadable",
        group=STRATEGY,
        default=False,
        action="store_true",
    )
    damp: float = option(
        "--damp",
        help="reconstruction damping toward the kept weights, as a fraction of the mean "
        f"input energy (default {DAMP:g})",
        group=STRATEGY,
        default=DAMP,
        type=float,
        metavar="F",
    )
    reconstruct_mode: str = option(
        "--reconstruct-mode",
        help="sequential (default): each layer solved on the outputs of the pruned layers "
        "before it; one-shot: on the unpruned model's (measured 0.5-3.8%% worse, a third less "
        "time in auto); residual: down_proj fitted to the original model's layer output "
        "(better in-domain, worse on unseen text). auto judges its reconstructed candidates "
        "on shared one-shot solves and solves the winner in this mode",
        group=STRATEGY,
        default="sequential",
        choices=("sequential", "one-shot", "residual"),
    )
    keep_last_layer: bool = option(
        "--keep-last-layer",
        help="depth: never drop the last layer (default on)",
        group=STRATEGY,
        default=True,
        action=argparse.BooleanOptionalAction,
    )
    split: float | None = option(
        "--split",
        help="depth: bundle B gets this fraction of the dropped layers, C the rest",
        group=STRATEGY,
        default=None,
        type=split_fraction,
        metavar="half|ratio R",
    )
    allocation: str = option(
        "--allocation",
        help="unbalanced: per-layer share of the cut, 1/importance or equal",
        group=STRATEGY,
        default="inverse",
        choices=("inverse", "uniform"),
    )
    importance: str = option(
        "--importance",
        help="unbalanced: the layer score",
        group=STRATEGY,
        default="block_influence",
        choices=("block_influence", "angular", "removal"),
    )
    distribution: str = option(
        "--distribution",
        help="unbalanced: attention:MLP split of the removed parameters (default 0:1)",
        group=STRATEGY,
        default="0:1",
        metavar="A:M",
    )
    freeze_top: int = option(
        "--freeze-top",
        help="unbalanced: leave the N most important layers whole",
        group=STRATEGY,
        default=0,
        type=int,
        metavar="N",
    )
    rank: str = option(
        "--rank",
        help="global: order units by score per parameter (knapsack) or by score (FLAP)",
        group=STRATEGY,
        default="per-param",
        choices=("per-param", "score"),
    )
    # The text as given: a fraction, `none`, or None (unset); read through
    # `layer_cut` and `trust`, checked by `resolved`.
    max_layer_cut: str | None = option(
        "--max-layer-cut",
        help="global: no layer loses more than this fraction of its units (default: 1.25 x "
        "the average cut, a trust region for first-order scores; `none`: unbounded)",
        group=STRATEGY,
        default=None,
        metavar="F|none",
    )
    target: str = option(
        "--target",
        help="keep every candidate runnable on this serving target ("
        + "; ".join(f"{name}: {t.what}" for name, t in TARGETS.items())
        + "); widths are rounded to the target's granularity with the budget still met "
        "(`plancc check --target` lists each target's rules); default any",
        group=STRATEGY,
        default=ANY,
        choices=(*TARGETS, ANY),
    )
    remove_empty_layers: bool = option(
        "--remove-empty-layers",
        help="global: a layer left with nothing becomes a dropped layer",
        group=STRATEGY,
        default=False,
        action="store_true",
    )
    csv: Path | None = option(  # noqa: RUF009 - `option` is a dataclasses.field
        "--csv",
        help="write the per-unit score table as CSV",
        group=STRATEGY,
        default=None,
        type=Path,
        metavar="FILE",
    )
    # ---- calibration
    calib: str = option(
        "--calib",
        help="calibration text (default builtin, no network needed)",
        group=CALIBRATION,
        default="builtin",
        metavar="builtin|wikitext2|ptb|c4|FILE",
    )
    data_files: Sequence[str] | None = option(
        "--data-files",
        help="read wikitext2/ptb/c4 from these local files instead of the hub",
        group=CALIBRATION,
        default=None,
        nargs="+",
        metavar="FILE",
    )
    nsamples: int = option(
        "--nsamples",
        help="calibration windows (default 32)",
        group=CALIBRATION,
        default=32,
        type=int,
    )
    seqlen: int = option(
        "--seqlen",
        help="tokens per window (default 512)",
        group=CALIBRATION,
        default=512,
        type=int,
    )
    heldout: int = option(
        "--heldout",
        help="windows after the calibration ones that judge candidates (default 4)",
        group=CALIBRATION,
        default=4,
        type=int,
    )
    batch_size: int = option(
        "--batch-size",
        help="windows per forward pass (default 4)",
        group=CALIBRATION,
        default=4,
        type=int,
    )
    seed: int = option(
        "--seed",
        help="seed of the random baseline (default 0)",
        group=CALIBRATION,
        default=0,
        type=int,
    )
    # None: `resolved` picks cuda when torch sees a GPU, else cpu (`executor.device`).
    device: str | None = option(
        "--device",
        group=CALIBRATION,
        **device_argument("where the model is calibrated and judged"),
    )
    dtype: str = option(
        "--dtype",
        help=None,
        group=CALIBRATION,
        default="float32",
        choices=("float32", "bfloat16"),
    )
    scores: Path | None = option(  # noqa: RUF009 - `option` is a dataclasses.field
        "--scores",
        help="re-plan from an earlier PLAN.scores.safetensors without calibrating; it must "
        "have been measured on this model (structure and weights), and its calibration "
        "settings (text, samples, seqlen, seed) become the plan's",
        group=CALIBRATION,
        default=None,
        type=Path,
        metavar="FILE",
    )
    memory_check: bool = option(
        "--no-memory-check",
        help="skip the up-front estimate of whether the model fits in memory (also: "
        "PLANCC_NO_MEMORY_CHECK=1)",
        group=CALIBRATION,
        default=True,
        action="store_false",
    )
    # "": layer-wise, states in memory; a directory: states on disk under it; None:
    # layer-wise only when the model does not fit (`plangen.memory.placement`).
    offload: str | None = option(
        "--offload",
        help="run the model one decoder layer at a time, each read from the checkpoint "
        "when the walk reaches it and freed after (the model is never whole in memory; "
        "same output); with DIR the states between layers are kept on disk under DIR. "
        "Chosen automatically, and said, when the model does not fit",
        group=CALIBRATION,
        default=None,
        nargs="?",
        const="",
        metavar="DIR",
    )
    shard_layers: bool = option(
        "--shard-layers",
        help="under torchrun: the gradient pass shards each decoder layer's weights and "
        "gradients across the processes (FSDP2, one projection gathered at a time), for "
        "a layer whose backward does not fit one device; every process then runs every "
        "calibration batch in that pass (same output). Implies --offload. Chosen "
        "automatically, and said, when only this fits",
        group=CALIBRATION,
        default=False,
        action="store_true",
    )
    # ---- output
    plot: bool = option(
        "--plot",
        help="write PLAN.png: layer importance and kept fraction",
        group=OUTPUT,
        default=False,
        action="store_true",
    )
    json: bool = option(
        "--json", help="print the summary as JSON", group=OUTPUT, default=False, action="store_true"
    )
    quiet: bool = option(
        "--quiet", help="no progress bars", group=OUTPUT, default=False, action="store_true"
    )
    # ---- not options
    command: Sequence[str] = field(
        default=(), metadata={NOT_AN_OPTION: "the command line the plan's provenance quotes"}
    )

    @classmethod
    def from_args(cls, args: argparse.Namespace, command: Sequence[str] = ()) -> Options:
        """The options argparse parsed (`add_arguments`), resolved; OptionError when a
        value is refused."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if OPTION in f.metadata}
        return cls(**values, command=tuple(command)).resolved()

    def resolved(self) -> Options:
        """These options with what they imply worked out, checked (OptionError): the
        strategy `--ratio` (uniform) or `--drop` / `--drop-frac` (depth) implies under
        auto, the old name `best`, the device's default. Resolving twice changes nothing."""
        for name in ("nsamples", "seqlen", "heldout", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_layer_cut not in (None, "none"):
            try:
                fraction(self.max_layer_cut)
            except argparse.ArgumentTypeError as exc:
                raise OptionError(f"--max-layer-cut: {exc} (or `none`)") from None
        strategy = self.strategy
        if strategy in ("auto", *ALIASES):
            if self.ratio is not None:
                strategy = "uniform"
            if self.drop is not None or self.drop_frac is not None:
                strategy = "depth"
        strategy = ALIASES.get(strategy, strategy)
        if self.compensate and self.reconstruct:
            raise OptionError(
                "--compensate and --reconstruct: the reconstruction already fits what the "
                "removed channels contributed; choose one"
            )
        if strategy not in STRATEGIES:
            raise OptionError(f"unknown --strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
        device = resolve_device(self.device)
        try:
            check_device(device)
        except ValueError as exc:
            raise OptionError(f"--device {exc}") from None
        return dataclasses.replace(self, strategy=strategy, device=device)

    @property
    def one_shot(self) -> bool:
        """Reconstruction on the unpruned model's inputs (a measured variant)."""
        return self.reconstruct_mode == "one-shot"

    @property
    def residual(self) -> bool:
        """Reconstruction toward the original's residual stream."""
        return self.reconstruct_mode == "residual"

    @property
    def layer_cut(self) -> float | None:
        """`--max-layer-cut F`: the bound on one layer's cut; None: unset or `none`."""
        if self.max_layer_cut in (None, "none"):
            return None
        return float(self.max_layer_cut)

    @property
    def trust(self) -> bool:
        """Without a bound, global bounds a layer's cut at TRUST_REGION x the average
        unless `--max-layer-cut none` says unbounded."""
        return self.max_layer_cut != "none"

    @property
    def progress(self) -> bool:
        """Progress bars and lines on stderr: not with --quiet, nor with --json."""
        return not self.quiet and not self.json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one argument per option field of `Options`, in field order, to its group."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(Options):
        flag: Flag | None = f.metadata.get(OPTION)
        if flag is None:
            continue
        where: argparse._ActionsContainer = parser
        if flag.group is not None:
            if flag.group not in groups:  # groups are listed in the order first used
                groups[flag.group] = parser.add_argument_group(flag.group)
            where = groups[flag.group]
        if flag.one_of:
            assert flag.group is not None
            if flag.group not in exclusive:
                exclusive[flag.group] = where.add_mutually_exclusive_group()
            where = exclusive[flag.group]
        _add(where, f, flag)


def add_options(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add these fields' options of `Options` to another command's parser (`plangen
    reconstruct` takes --offload and --no-memory-check): one definition, one help text,
    the same dest and default, so the other command reads them by the field's name."""
    by_name = {f.name: f for f in fields(Options) if OPTION in f.metadata}
    for name in names:
        flag: Flag = by_name[name].metadata[OPTION]
        assert flag.names and not flag.one_of, f"{name}: only a plain flag is shared"
        _add(parser, by_name[name], flag)


def _add(where: argparse._ActionsContainer, f: dataclasses.Field, flag: Flag) -> None:
    """One field's argument, with its default, in `where` (a parser or a group)."""
    keywords: dict[str, object] = {**flag.keywords, "help": flag.help}
    if not flag.names:  # a positional: its dest is its name
        where.add_argument(f.name, **keywords)
        return
    if f.default is not dataclasses.MISSING:
        keywords["default"] = f.default
    where.add_argument(*flag.names, dest=f.name, **keywords)
