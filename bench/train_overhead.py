"""What Ray Train adds to one ATP run: the same run directly and on one Ray Train worker, side by side.

    python -m bench.train_overhead [--quick] [--steps 50] [--repeats 1] [--cli] [--model PATH]

Both runs use the embedded SmolLM2-135M (or ``--model``) on HPO text with the same config
and seed (so they do the same work and end with the same mask); each writes its own run
folder in a temporary directory. The Ray side is timed twice: ``run_distributed`` on an
already started local Ray instance (Train controller and worker start-up, the run, the
checkpoints through Ray storage), and the same plus ``ray.init`` and ``ray.shutdown``.
In this process the direct run has its imports paid already; ``--cli`` adds what a user
waits for: ``atp-ray train`` and ``atp-ray train --workers 1`` as new processes, each
paying its own imports (and the second starting and stopping its own Ray, with the default
CPUs per worker). Rounds alternate direct and Ray so background load hits both alike.
``--quick`` is a smoke run of 3 short steps. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from atp_ray.config import RunConfig, load_config
from atp_ray.models.embedded import EMBEDDED_MODEL
from atp_ray.training.atp import run_atp
from atp_ray.training.distributed import init_ray, run_distributed


def bench_config(steps: int, quick: bool, model: str = EMBEDDED_MODEL) -> dict:
    """The run both sides do: the embedded model, HPO text, checkpoints as a real run takes them."""
    return {
        "model": {"path": model},
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


def time_cli(config_file: Path, out: Path, workers: int | None) -> float:
    """``atp-ray train`` as a new process, as a user runs it; its local Ray (if any) under a temp dir of its own."""
    command = [sys.executable, "-m", "atp_ray.cli", "train", "--config", str(config_file), "--out", str(out)]
    command += ["--workers", str(workers)] if workers else []
    with tempfile.TemporaryDirectory(prefix="atpb-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        start = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 short steps: a smoke run of the bench")
    parser.add_argument("--steps", type=int, default=50, help="ATP steps of the full run (about 2 minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (direct, Ray)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--cli", action="store_true", help="also time atp-ray train with and without --workers 1")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model path (default: the embedded SmolLM2-135M)")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    raw = bench_config(steps, args.quick, args.model)
    direct_config = load_config(raw)
    ray_config = load_config({**raw, "distributed": {"workers": 1, "cpus_per_worker": args.cpus}})

    direct, whole, fit, cli_direct, cli_ray = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="atp-overhead-") as tmp:
        root = Path(tmp)
        config_file = root / "run.yaml"
        config_file.write_text(yaml.safe_dump(raw))
        for index in range(args.repeats):
            direct.append(time_direct(direct_config, root, index))
            ray_whole, ray_fit = time_ray(ray_config, root, index, args.cpus)
            whole.append(ray_whole)
            fit.append(ray_fit)
            if args.cli:
                cli_direct.append(time_cli(config_file, root / f"cli-direct-{index}", workers=None))
                cli_ray.append(time_cli(config_file, root / f"cli-ray-{index}", workers=1))

    model = "embedded SmolLM2-135M" if args.model == EMBEDDED_MODEL else args.model
    print(f"\nATP run of {steps} steps, {model}, CPU, median of {args.repeats} round(s)\n")
    print("| path | wall s | vs its direct run |")
    print("|---|---:|---:|")
    rows = [
        ("direct (one process, imports paid)", direct, direct),
        ("Ray Train, 1 worker: run_distributed on a started Ray", fit, direct),
        ("Ray Train, 1 worker: with ray.init and shutdown", whole, direct),
    ]
    if args.cli:
        rows += [("`atp-ray train` (a new process)", cli_direct, cli_direct)]
        rows += [("`atp-ray train --workers 1` (a new process)", cli_ray, cli_direct)]
    for label, times, reference in rows:
        wall = statistics.median(times)
        print(f"| {label} | {wall:.1f} | {wall / statistics.median(reference):.2f} |")


if __name__ == "__main__":
    main()
