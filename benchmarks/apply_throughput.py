"""Apply throughput and peak memory on a synthetic multi-GB checkpoint.

Builds (once) a random Llama-shaped bf16 checkpoint in shards, then times:
  * `cp -r` of the checkpoint (the reference: throughput 1.0),
  * `plancc apply` of a depth plan (25% of layers dropped: tensors are copied
    as byte ranges, never decoded),
  * `plancc apply` of a width plan (every MLP narrowed: gate/up/down decoded
    and sliced, the rest copied),
  * the same width plan stating the source's `weights` digest (what `plangen
    analyze` writes), with plancc's cache emptied before each run so apply
    hashes every weight before writing (a later apply finds the digest
    memoized and costs what the plain row does), and the digest alone,
and prints throughput as a ratio to `cp` (same bytes in, best of --runs) and
peak RSS (from the kernel's accounting of each child process) as a ratio to
the largest tensor. Everything runs on one machine in one go, files in the
page cache, so the ratios compare like with like.

Usage: python benchmarks/apply_throughput.py [--dir /tmp/plancc-bench] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# ~1.3 B parameters, 2.6 GB in bf16: hidden 2048, 24 layers, ffn 5632, vocab 32000.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def build_checkpoint(directory: Path) -> None:
    """Write the checkpoint shard by shard (a layer group at a time) to bound memory."""
    import torch
    from safetensors.torch import save_file

    if (directory / "model.safetensors.index.json").exists():
        return
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    c = CONFIG
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    groups: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(v, h)},
    ]
    per_shard = 4
    for start in range(0, c["num_hidden_layers"], per_shard):
        shard: dict[str, torch.Tensor] = {}
        for i in range(start, min(start + per_shard, c["num_hidden_layers"])):
            p = f"model.layers.{i}."
            shard[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            shard[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            shard[p + "self_attn.q_proj.weight"] = rand(q, h)
            shard[p + "self_attn.k_proj.weight"] = rand(kv, h)
            shard[p + "self_attn.v_proj.weight"] = rand(kv, h)
            shard[p + "self_attn.o_proj.weight"] = rand(h, q)
            shard[p + "mlp.gate_proj.weight"] = rand(f, h)
            shard[p + "mlp.up_proj.weight"] = rand(f, h)
            shard[p + "mlp.down_proj.weight"] = rand(h, f)
        groups.append(shard)
    groups.append(
        {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(v, h)}
    )
    weight_map, total = {}, 0
    n = len(groups)
    for k, tensors in enumerate(groups, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for t_name, t in tensors.items():
            weight_map[t_name] = name
            total += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    os.replace(tmp, directory)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of the child process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(after, before) * 1024  # ru_maxrss is in KiB on Linux


def peak_rss(cmd: list[str]) -> int:
    """Peak RSS of one command, measured alone with GNU time (max RSS in KiB)."""
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], check=True, capture_output=True, text=True
    )
    return int(out.stderr.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/plancc-bench"))
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    src = args.dir / "llama-1.3b"
    print(f"building {src} (once) ...", file=sys.stderr)
    build_checkpoint(src)
    from compiler.checkpoint import tensor_index

    index = tensor_index(src)
    total = sum(t.byte_range[1] - t.byte_range[0] for t in index.values())
    largest = max(t.byte_range[1] - t.byte_range[0] for t in index.values())
    header = subprocess.run(
        [Path(sys.executable).parent / "plangen", "header", str(src)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    from compiler.checkpoint import _hash_weights

    t0 = time.perf_counter()
    digest = _hash_weights(src, index, sorted({t.file for t in index.values()}))
    digest_seconds = time.perf_counter() - t0
    pinned = header.replace("\n}", f'\n  weights "{digest}"\n}}', 1)
    width = "mlp layers 0..23 width 4096\n"
    plans = {
        "depth (drop 6 of 24 layers)": (header, "drop layers 16..21\n"),
        "width (mlp 5632 → 4096, all layers)": (header, width),
        "width + weights check (digest not memoized)": (pinned, width),
    }
    fresh_cache = args.dir / "cache"
    env = {**os.environ, "PLANCC_CACHE": str(fresh_cache)}
    plancc = str(Path(sys.executable).parent / "plancc")
    rows = []
    out = args.dir / "out"
    copy = args.dir / "copy"
    cp_times = []
    for _ in range(args.runs):
        shutil.rmtree(copy, ignore_errors=True)
        cp_times.append(timed(["cp", "-r", str(src), str(copy)])[0])
    shutil.rmtree(copy, ignore_errors=True)
    cp_best = min(cp_times)
    rows.append(("cp -r", cp_best, 1.0, None))
    rows.append(("sha256 of the weights alone (weights_digest)", digest_seconds, 0.0, None))
    for name, (block, body) in plans.items():
        plan = args.dir / "plan.prn"
        plan.write_text("plan 1\n" + block + body)
        times = []
        for _ in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(fresh_cache, ignore_errors=True)
            cmd = [plancc, "apply", str(plan), "--model", str(src), "-o", str(out)]
            times.append(timed(cmd, env)[0])
        shutil.rmtree(out, ignore_errors=True)
        rss = peak_rss([plancc, "apply", str(plan), "--model", str(src), "-o", str(out)])
        shutil.rmtree(out, ignore_errors=True)
        best = min(times)
        rows.append((f"plancc apply, {name}", best, cp_best / best, rss))
    # The constant part of apply's memory: the bare interpreter.
    base = peak_rss([sys.executable, "-c", "pass"])
    print(
        f"checkpoint: {total / 1e9:.2f} GB of tensors in {len(index)} tensors, "
        f"largest tensor {largest / 1e6:.0f} MB; best of {args.runs} runs, files in page cache"
    )
    print(f"bare python: peak RSS {base / 1e6:.0f} MB (in parentheses: apply's RSS above it)")
    print(f"{'what':<48}{'seconds':>9}{'GB/s':>7}{'vs cp':>7}{'peak RSS':>10}{'/largest':>14}")
    for what, secs, ratio, rss in rows:
        rss_text = f"{rss / 1e6:.0f} MB" if rss else ""
        rss_ratio = f"{rss / largest:.1f}" if rss else ""
        if rss:
            rss_ratio += f" ({(rss - base) / largest:.1f})"
        print(
            f"{what:<48}{secs:>9.2f}{total / secs / 1e9:>7.2f}{ratio or cp_best / secs:>7.2f}"
            f"{rss_text:>10}{rss_ratio:>14}"
        )


if __name__ == "__main__":
    main()
