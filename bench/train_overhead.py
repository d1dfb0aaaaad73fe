"""What Ray Train adds to one ATP run: the same run directly and on one Ray Train worker, side by side.

    python -m bench.train_overhead [--quick] [--steps 50] [--repeats 1]

Both runs use the embedded SmolLM2-135M on HPO text with the same config and seed (so
they do the same work and end with the same mask); each writes its own run folder in a
temporary directory. The Ray side is timed twice: ``run_distributed`` on an already started
local Ray instance (Train controller and worker start-up, the run, the checkpoints through
Ray storage), and the same plus ``ray.init`` and ``ray.shutdown``. Rounds alternate direct and
Ray so background load hits both alike. ``--quick`` is a smoke run of 3 short steps.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from atp_ray.atp import run_atp
from atp_ray.config import RunConfig, load_config
from atp_ray.distributed import init_ray, run_distributed
from atp_ray.embedded import EMBEDDED_MODEL


def bench_config(steps: int, quick: bool) -> dict:
    """The run both sides do: the embedded model, HPO text, checkpoints as a real run takes them."""
    return {
        "model": {"path": EMBEDDED_MODEL},
        "data": {"source": "builtin:hpo", "seq_len": 32 if quick else 64, "max_documents": 2000},
        "lora": {"rank": 8, "alpha": 16},
        "atp": {"sparsity": 0.3, "generator_lr": 0.02, "freeze_patience": 8, "control_fraction": 0.6},
        "train": {
            "steps": steps,
            "batch_size": 1 if quick else 4,
            "calibration_batch_size": 1 if quick else 4,
            "lr": 5e-4,
            "log_every": max(1, steps // 10),
            "checkpoint_every": max(1, steps // 5),
            "device": "cpu",
        },
    }


def time_direct(config: RunConfig, root: Path, index: int) -> float:
    start = time.perf_counter()
    run_atp(config, root / f"direct-{index}")
    return time.perf_counter() - start


def time_ray(config: RunConfig, root: Path, index: int, cpus: int) -> tuple[float, float]:
    """(whole call including Ray start and stop, the TorchTrainer run alone)."""
    import ray

    start = time.perf_counter()
    init_ray(num_cpus=cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="atpb-", dir="/tmp"))
    fit_start = time.perf_counter()
    run_distributed(config, root / f"ray-{index}")
    fit = time.perf_counter() - fit_start
    ray.shutdown()
    return time.perf_counter() - start, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short steps: a smoke run of the bench")
    parser.add_argument("--steps", type=int, default=50, help="ATP steps of the full run (about 2 minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (direct, Ray)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    raw = bench_config(steps, args.quick)
    direct_config = load_config(raw)
    ray_config = load_config({**raw, "distributed": {"workers": 1, "cpus_per_worker": args.cpus}})

    direct, whole, fit = [], [], []
    with tempfile.TemporaryDirectory(prefix="atp-overhead-") as tmp:
        for index in range(args.repeats):
            direct.append(time_direct(direct_config, Path(tmp), index))
            ray_whole, ray_fit = time_ray(ray_config, Path(tmp), index, args.cpus)
            whole.append(ray_whole)
            fit.append(ray_fit)

    base = statistics.median(direct)
    print(f"\nATP run of {steps} steps, embedded SmolLM2-135M, CPU, median of {args.repeats} round(s)\n")
    print("| path | wall s | vs direct |")
    print("|---|---:|---:|")
    print(f"| direct (one process) | {base:.1f} | 1.00 |")
    for label, times in (("run_distributed on a started Ray", fit), ("with ray.init and shutdown", whole)):
        print(f"| Ray Train, 1 worker: {label} | {statistics.median(times):.1f} | {statistics.median(times) / base:.2f} |")


if __name__ == "__main__":
    main()
