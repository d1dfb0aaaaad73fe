"""Does ATP reach each sparsity target gradually, with no cliff at the freeze? On the embedded default.

    python -m bench.sparsity_schedule [--quick] [--targets 0.2 0.4 0.6 0.7] [--steps 150]
                                      [--out runs/sparsity_schedule] [--set atp.key=value ...]
                                      [--config configs/embedded.yaml]

For each target, one ATP run of ``configs/embedded.yaml`` (``--set`` overrides, e.g.
``--set atp.lagrangian_lr=0 --set atp.target_anneal_fraction=0`` for the old fixed-weight
schedule) with a metrics row every step, then one table row:

- ``control end``: the generator's noise-free sparsity when control ended (before the freeze);
- ``frozen``: the sparsity of the frozen (and exported) mask;
- ``loss before`` / ``loss after``: mean training loss over the 5 steps before the freeze and
  the 5 steps after it (single batches are noisy; a cliff shows as a jump);
- ``ppl``: the run's held-out perplexity (summary.json ``eval_perplexity``).

The goal of issue 12: control end within 0.02 of the target, loss after at most 1.10 x loss
before, perplexity rising smoothly with sparsity. ``--quick`` runs only 0.6 for 30 steps (a
smoke run: about a minute on 2 cores). Prints a markdown table and writes it, with the raw
numbers, to ``OUT/table.md`` and ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from pathlib import Path
from typing import Any

from atp_ray.config import load_config
from atp_ray.training.atp import run_atp

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "embedded.yaml"
# Steps averaged on each side of the freeze.
WINDOW = 5


def freeze_losses(rows: list[dict[str, Any]], freeze_step: int) -> tuple[float, float]:
    """Mean training loss over the WINDOW steps up to the freeze, and the WINDOW steps after it."""
    before = [r["loss"] for r in rows if freeze_step - WINDOW < r["step"] <= freeze_step]
    after = [r["loss"] for r in rows if freeze_step < r["step"] <= freeze_step + WINDOW]
    return statistics.fmean(before), statistics.fmean(after) if after else float("nan")


def run_target(config_path: Path, target: float, steps: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One ATP run at ``target``; its schedule numbers."""
    run_dir = out / f"sparsity-{target:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(
        config_path,
        [f"atp.sparsity={target}", f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=100000"]
        + overrides,
    )
    summary = run_atp(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = freeze_losses(rows, summary["freeze_step"])
    return {
        "target": target,
        "freeze_step": summary["freeze_step"],
        "control_end": summary["sparsity_at_control_end"],
        "reached_target": summary["reached_target"],
        "frozen": summary["sparsity"],
        "loss_before": before,
        "loss_after": after,
        "perplexity": summary["eval_perplexity"],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| target | control end | frozen | freeze step | loss before | loss after | after/before | held-out ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['target']:.2f} | {r['control_end']:.3f} | {r['frozen']:.3f} | {r['freeze_step']} "
            f"| {r['loss_before']:.3f} | {r['loss_after']:.3f} | {r['loss_after'] / r['loss_before']:.3f} "
            f"| {r['perplexity']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one target (0.6), 30 steps: a smoke run")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.7])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("runs/sparsity_schedule"))
    parser.add_argument("--config", type=Path, default=CONFIG, help="run config (default: the embedded one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets, args.steps = [0.6], 30
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for target in args.targets:
        results.append(run_target(args.config, target, args.steps, args.out, args.overrides))
        # Rewritten after every target, so a long run that is cut short keeps what finished.
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
