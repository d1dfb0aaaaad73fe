"""ATP's own cost: wall time of an ATP run over a plain LoRA fine-tune of the same steps.

    python -m bench.atp_cost [--repeats 1] [--threads 2]     # configs/embedded.yaml as shipped
    python -m bench.atp_cost --quick                         # a tiny model, seconds (for tests)

Both runs use the same config (model, data, batch, LoRA, steps, learning rates, seed);
the LoRA run is ``method=lora``: the same recipe with a mask that keeps every unit from
step 0, so no generator step, no control phase and no lasso, i.e. a plain peft LoRA
fine-tune. Runs alternate (ATP, LoRA, ATP, ...) so background load hits both alike. The
table gives the median over repeats of the whole run (setup, training, final
evaluation, save) and of the training loop alone (``elapsed_s`` of the last metrics row),
and their ATP / LoRA ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from atp_ray.config import apply_overrides
from bench._runs import base_config, timed_run, with_overrides

METHODS = ("atp", "lora")


def train_seconds(run_dir: Path) -> float:
    """Seconds of the training loop, as the run logged them (last metrics row)."""
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(rows[-1])["elapsed_s"])


def measure(raw: dict, workdir: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and training seconds per method, alternating methods round by round."""
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "train": []} for m in METHODS}
    for round_ in range(repeats):
        for method in METHODS:
            out = workdir / f"{method}-{round_}"
            _, wall = timed_run(with_overrides(raw, method=method), out)
            times[method]["wall"].append(wall)
            times[method]["train"].append(train_seconds(out))
    return times


def markdown(times: dict[str, dict[str, list[float]]], steps: int) -> str:
    median = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    lines = ["| run | wall s | train s | train s/step |", "|---|---:|---:|---:|"]
    for method in METHODS:
        wall, train = median[method]["wall"], median[method]["train"]
        lines.append(f"| {method} | {wall:.1f} | {train:.1f} | {train / steps:.2f} |")
    wall_x = median["atp"]["wall"] / median["lora"]["wall"]
    train_x = median["atp"]["train"] / median["lora"]["train"]
    lines.append(f"| **ATP / LoRA** | **{wall_x:.2f}x** | **{train_x:.2f}x** | |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: checks the script runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("overrides", nargs="*", help="run-config overrides for both runs, e.g. train.steps=100")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        raw = apply_overrides(base_config(args.quick, Path(tmp)), args.overrides)
        times = measure(raw, Path(tmp), args.repeats)
    steps = raw["train"]["steps"]
    print(
        f"{raw['model']['path']}, {steps} steps, batch {raw['train']['batch_size']}, seq_len {raw['data']['seq_len']}, "
        f"{args.threads} threads, median of {args.repeats} run(s) per method"
    )
    print(markdown(times, steps))


if __name__ == "__main__":
    main()
