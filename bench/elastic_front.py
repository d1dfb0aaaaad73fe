"""One elastic ATP run against one dedicated run per sparsity: the front each makes, per CPU-hour.

    python -m bench.elastic_front [--sparsities 0.2 0.3 0.4 0.5 0.6] [--draws sandwich cycle] [--keep DIR]
    python -m bench.elastic_front --quick      # a tiny model, two budgets, few steps (for tests)
    python -m bench.elastic_front --keep DIR --elastic atp.nested=false   # a variant, reusing DIR's dedicated runs

Every run starts from configs/embedded.yaml with the same data, seed and step count. The
dedicated runs train one ATP run per sparsity; each elastic run trains one run with
``atp.sparsity`` set to all of them, one per ``atp.budget_draw`` asked (``--draws``). Each budget's model is compressed (as a user would ship
it) and scored by the evaluation recipe: held-out perplexity on the run's own held-out
split (domain-ppl) and the HPO term and ICD-10 chapter quizzes. A side's cost is the CPU
time of its training runs (setup, training, save: every thread of the process, so that a
machine shared with other work inflates it far less than wall time), on the same threads;
compressing and scoring cost the same per model on both sides and are left out.

Each side's front is its non-dominated (perplexity, parameters) points; its hypervolume is
taken at one reference point for all sides, (REFERENCE_PERPLEXITY or past the run's worst
model, the dense model's parameters), and divided by the side's CPU-hours. A quiz difference is flagged
when it exceeds two standard errors of the difference (n questions each).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atp_ray.compression.compress import compress_run
from atp_ray.config import apply_overrides
from atp_ray.runtime.run_folder import budget_key
from atp_ray.search.front import hypervolume, pareto_mask
from bench._runs import base_config, finished_in, kept_or_scored, score, timed_run, with_overrides

# The fronts' hypervolume is measured from one perplexity for all sides: this, worse than any model
# on the embedded default (60% dedicated ATP: about 174-190), or past the worst model of the run.
REFERENCE_PERPLEXITY = 1000.0

Points = dict[float, dict[str, float]]  # budget -> scores of its compressed model
# In each run folder the bench trained: its training cost, so that a rerun with the same --keep
# folder reuses finished runs of the same config and their scores (model-*.scores.json), e.g.
# the dedicated runs when only an elastic variant is new. Delete a folder to run it again.
COST_FILE = "bench-cost.json"


@dataclass
class Side:
    """One way of making the front: its models' scores and what training them cost."""

    points: Points = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of every thread of this process while training

    def train(self, raw: dict[str, Any], out: Path) -> None:
        """Train ``raw`` into ``out`` and add its cost; a run a kept folder already finished is reused."""
        cost_file = out / COST_FILE
        if cost_file.is_file() and finished_in(raw, out):
            cost = json.loads(cost_file.read_text())
            print(f"{out.name}: reused (finished, {cost['cpu_s']:.0f} CPU s)", flush=True)
        else:
            cpu = time.process_time()
            _, wall = timed_run(raw, out)
            cost = {"wall_s": wall, "cpu_s": time.process_time() - cpu}
            cost_file.write_text(json.dumps(cost))
        self.cpu_s += cost["cpu_s"]
        self.wall_s += cost["wall_s"]


def compress_and_score(run_dir: Path, budget: float | None, out: Path, max_samples: int | None) -> dict[str, float]:
    """Compress a finished run's model (an elastic run's at ``budget``) into ``out`` and score it (or reuse both)."""

    def compressed_and_scored() -> dict[str, float]:
        record = compress_run(run_dir, out, sparsity=budget)
        return {
            **score(out, max_samples),
            "params": float(record.params),
            "dense_params": float(record.dense_params),
            "sparsity": record.sparsity,
        }

    return kept_or_scored(out.with_name(f"{out.name}.scores.json"), {"max_samples": max_samples}, compressed_and_scored)


def dedicated(raw: dict[str, Any], workdir: Path, budgets: list[float], max_samples: int | None) -> Side:
    """One ATP run per budget."""
    side = Side()
    for budget in budgets:
        run = workdir / f"dedicated-{budget_key(budget)}"
        side.train(with_overrides(raw, atp={"sparsity": budget}), run)
        side.points[budget] = compress_and_score(run, None, workdir / f"model-dedicated-{budget_key(budget)}", max_samples)
        print(f"dedicated {budget}: {side.points[budget]} (so far {side.cpu_s:.0f} CPU s)", flush=True)
    return side


def elastic(
    raw: dict[str, Any], workdir: Path, budgets: list[float], draw: str, max_samples: int | None, tag: str = ""
) -> Side:
    """One elastic run over every budget, drawing budgets by ``draw``; ``tag`` ends its folders' names."""
    side = Side()
    run = workdir / f"elastic-{draw}{tag}"
    side.train(with_overrides(raw, atp={"sparsity": budgets, "budget_draw": draw}), run)
    for budget in budgets:
        side.points[budget] = compress_and_score(run, budget, workdir / f"model-{draw}{tag}-{budget_key(budget)}", max_samples)
        print(f"elastic ({draw}) {budget}: {side.points[budget]}", flush=True)
    print(f"elastic ({draw}) run: {side.cpu_s:.0f} CPU s", flush=True)
    return side


def front_hypervolume(points: Points, reference: tuple[float, float]) -> float:
    """Hypervolume of the (perplexity, parameters) front, both minimised, from ``reference``."""
    values = np.array([[p["ppl"], p["params"]] for p in points.values()])
    front = values[pareto_mask(values, ["min", "min"])]
    return hypervolume(front, ["min", "min"], list(reference))


def reference_point(sides: Sides) -> tuple[float, float]:
    """(perplexity, parameters): REFERENCE_PERPLEXITY or 1.1x the worst model's, and the dense model's size."""
    points = [p for side in sides.values() for p in side.points.values()]
    return max(REFERENCE_PERPLEXITY, 1.1 * max(p["ppl"] for p in points)), points[0]["dense_params"]


def quiz_gap(a: float, b: float, n: int) -> str:
    """``b - a`` and whether it exceeds two standard errors of a difference of two accuracies over n questions."""
    se = math.sqrt((a * (1 - a) + b * (1 - b)) / n) if n else float("inf")
    flag = " (> 2 SE)" if abs(b - a) > 2 * se else ""
    return f"{b - a:+.3f}{flag}"


Sides = dict[str, Side]  # the first is the baseline


def markdown(sides: Sides, reference: tuple[float, float], questions: int) -> str:
    """Per budget each elastic model beside the dedicated one, then each front's hypervolume per CPU-hour."""
    (base_name, base_side), *others = sides.items()
    base = base_side.points
    lines = [
        "| sparsity | side | held-out ppl | / dedicated | params | HPO quiz (gap) | ICD quiz (gap) |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    for budget, d in base.items():
        lines.append(
            f"| {budget:.0%} | {base_name} | {d['ppl']:.2f} | 1 | {d['params']:,.0f} | {d['hpo']:.3f} | {d['icd']:.3f} |"
        )
        for name, side in others:
            e = side.points[budget]
            lines.append(
                f"| {budget:.0%} | {name} | {e['ppl']:.2f} | {e['ppl'] / d['ppl']:.3f} | {e['params']:,.0f} | "
                f"{e['hpo']:.3f} ({quiz_gap(d['hpo'], e['hpo'], questions)}) | "
                f"{e['icd']:.3f} ({quiz_gap(d['icd'], e['icd'], questions)}) |"
            )
    lines += [
        "",
        "| side | training wall | training CPU-hours | hypervolume | hypervolume per CPU-hour | rate / dedicated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base_rate = front_hypervolume(base, reference) / (base_side.cpu_s / 3600)
    for name, side in sides.items():
        cpu_hours = side.cpu_s / 3600
        volume = front_hypervolume(side.points, reference)
        lines.append(
            f"| {name} | {side.wall_s / 60:.1f} min | {cpu_hours:.3f} | {volume:.4g} | {volume / cpu_hours:.4g} | "
            f"**{volume / cpu_hours / base_rate:.2f}x** |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, two budgets, few steps: checks the script runs")
    parser.add_argument("--sparsities", type=float, nargs="+", help="default 0.2 0.3 0.4 0.5 0.6 (0.2 0.4 with --quick)")
    parser.add_argument("--max-samples", type=int, default=200, help="held-out blocks and quiz questions scored per model")
    parser.add_argument(
        "--draws", nargs="+", default=["sandwich"], help="one elastic run per atp.budget_draw named (sandwich, cycle)"
    )
    parser.add_argument(
        "--elastic", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of the elastic runs only, e.g. atp.nested=false"
    )
    parser.add_argument("--keep", type=Path, help="write the run and model folders here and keep them")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("overrides", nargs="*", help="run-config overrides for every run, e.g. train.seed=1")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    budgets = sorted(args.sparsities or ([0.2, 0.4] if args.quick else [0.2, 0.3, 0.4, 0.5, 0.6]))
    max_samples = min(args.max_samples, 8) if args.quick else args.max_samples
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        raw = apply_overrides(base_config(args.quick, workdir), args.overrides)
        # The elastic runs first: the new thing fails early, if it fails.
        # A copy: apply_overrides changes the dict it is given, and the dedicated runs read raw.
        elastic_raw, tag = apply_overrides(copy.deepcopy(raw), args.elastic), "".join(f"-{o.replace('=', '-')}" for o in args.elastic)
        elastic_sides = {
            f"1 elastic run ({', '.join([d, *args.elastic])})": elastic(elastic_raw, workdir, budgets, d, max_samples, tag)
            for d in args.draws
        }
        sides = {f"{len(budgets)} dedicated runs": dedicated(raw, workdir, budgets, max_samples), **elastic_sides}
    reference = reference_point(sides)
    print(
        f"{raw['model']['path']}, {raw['train']['steps']} steps, batch {raw['train']['batch_size']}, seed "
        f"{raw['train']['seed']}, {args.threads} threads, {max_samples} held-out blocks / quiz questions per model; "
        f"hypervolume reference (perplexity {reference[0]:.4g}, dense parameters {reference[1]:,.0f}); "
        f"bench wall {(time.perf_counter() - started) / 60:.1f} min"
    )
    print(markdown(sides, reference, max_samples))


if __name__ == "__main__":
    main()
