"""ATP's own cost: wall time of ATP runs over a plain LoRA fine-tune of the same steps, with quality.

    python -m bench.atp_cost [--repeats 1] [--threads 2]     # configs/embedded.yaml as shipped
    python -m bench.atp_cost --variant every-4=atp.generator_every=4 \
                             --variant cal-1=train.calibration_batch_size=1
    python -m bench.atp_cost --quick                         # a tiny model, seconds (for tests)

Every run uses the same config (model, data, batch, LoRA, steps, learning rates, seed).
The reference is ``method=lora``: the same recipe with a mask that keeps every unit from
step 0, so no generator step, no control phase and no lasso, i.e. a plain peft LoRA
fine-tune. ``atp`` is the config as given; each ``--variant NAME=KEY=VALUE[,KEY=VALUE]``
is one more ATP run with those overrides (the options for making control cheaper).
Runs alternate (LoRA, ATP, variants, LoRA, ...) so background load hits all alike. The
table gives the median over repeats of the whole run (setup, training, final
evaluation, save) and of the training loop alone (``elapsed_s`` of the last metrics
row), their ratios to LoRA, and what the run made: the sparsity of its frozen mask, its
step of freezing, and its held-out perplexity (summary.json), so a cheaper option shows
what it costs in quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from atp_ray.config import apply_overrides
from bench._runs import base_config, timed_run, with_overrides

REFERENCE = "lora"


def train_seconds(run_dir: Path) -> float:
    """Seconds of the training loop, as the run logged them (last metrics row)."""
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(rows[-1])["elapsed_s"])


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` -> (NAME, [KEY=VALUE, ...])."""
    name, sep, overrides = text.partition("=")
    if not name or not sep or "=" not in overrides:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE[,KEY=VALUE], got {text!r}")
    return name, overrides.split(",")


def runs(raw: dict[str, Any], variants: list[tuple[str, list[str]]]) -> dict[str, dict[str, Any]]:
    """Every compared run's raw config, by name: the LoRA reference, ATP as given, then the variants."""
    configs = {REFERENCE: with_overrides(raw, method="lora"), "atp": with_overrides(raw, method="atp")}
    for name, overrides in variants:
        configs[name] = apply_overrides(with_overrides(configs["atp"]), overrides)  # a copy: overrides set in place
    return configs


def measure(configs: dict[str, dict[str, Any]], workdir: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and training seconds, frozen sparsity, freeze step and held-out perplexity per run, round by round."""
    results: dict[str, dict[str, list[float]]] = {}
    for round_ in range(repeats):
        for name, raw in configs.items():
            out = workdir / f"{name}-{round_}"
            summary, wall = timed_run(raw, out)
            figures = {
                "wall": wall,
                "train": train_seconds(out),
                "sparsity": summary["sparsity"],
                "freeze_step": summary["freeze_step"],
                "perplexity": summary["eval_perplexity"],
            }
            for key, value in figures.items():
                results.setdefault(name, {}).setdefault(key, []).append(value)
    return results


def markdown(results: dict[str, dict[str, list[float]]], steps: int) -> str:
    median = {name: {k: statistics.median(v) for k, v in figures.items()} for name, figures in results.items()}
    reference = median[REFERENCE]
    lines = [
        "| run | wall s | train s | train s/step | wall / LoRA | train / LoRA | sparsity | frozen at | held-out ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in median.items():
        lines.append(
            f"| {name} | {m['wall']:.1f} | {m['train']:.1f} | {m['train'] / steps:.2f} "
            f"| **{m['wall'] / reference['wall']:.2f}x** | **{m['train'] / reference['train']:.2f}x** "
            f"| {m['sparsity']:.3f} | {m['freeze_step']:.0f} | {m['perplexity']:.2f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: checks the script runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--variant", type=parse_variant, action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="one more ATP run with these overrides (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", help="run-config overrides for every run, e.g. train.steps=100")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        raw = apply_overrides(base_config(args.quick, Path(tmp)), args.overrides)
        results = measure(runs(raw, args.variant), Path(tmp), args.repeats)
    steps = raw["train"]["steps"]
    print(
        f"{raw['model']['path']}, {steps} steps, batch {raw['train']['batch_size']}, seq_len {raw['data']['seq_len']}, "
        f"{args.threads} threads, median of {args.repeats} run(s) per method"
    )
    print(markdown(results, steps))


if __name__ == "__main__":
    main()
