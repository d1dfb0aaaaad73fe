"""How much the search's choices save: a multi-objective sampler vs random search, early stopping on vs off.

    python -m bench.search_efficiency [--quick] [--out DIR]

1. Samplers (Optuna, no Ray): NSGA-II after K trials against random search after K and 2K
   trials on the same space; the figure is the hypervolume of each study's completed trials
   (quality = held-out perplexity, params = compressed parameter count; both minimised;
   one fixed reference point for all studies, so the numbers compare).
2. Early stopping (the real search, Ray Tune): the same seeded random search of N trials with
   the Pareto-aware early-stopping scheduler on and off; the figures are the training steps
   spent over all trials, the wall time, and the hypervolume of the completed trials.

Every trial is a real ATP trial (atp_ray.search.trial.run_trial: train, compress, evaluate), but on
a tiny random Llama (2 layers, hidden 32) built here, trained a few steps on HPO text: a full
trial on the embedded model costs minutes, and the comparison needs dozens. On a random
model, perplexity differences are small and noisy, so the front is driven mostly by size;
the bench measures the machinery's efficiency, not what ATP achieves on a real model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@dataclass(frozen=True)
class Settings:
    k: int  # NSGA-II trials; random gets k and 2k
    es_trials: int  # trials of each early-stopping search
    steps: int  # ATP steps per trial
    seeds: tuple[int, ...]


QUICK = Settings(k=4, es_trials=4, steps=6, seeds=(0,))
FULL = Settings(k=12, es_trials=8, steps=12, seeds=(0, 1, 2))
KNOBS = {"atp.sparsity": {"uniform": [0.1, 0.8]}, "atp.lasso_weight": {"loguniform": [0.001, 0.3]}}


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama (GQA) with a character tokenizer, saved locally (nothing downloaded)."""
    from tests.conftest import make_tiny_model, make_tiny_tokenizer

    make_tiny_model("llama-gqa").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def base_config(model: Path, steps: int) -> dict[str, Any]:
    from tests.conftest import tiny_run_config

    every = max(1, steps // 3)
    raw = tiny_run_config(
        model, train={"steps": steps, "log_every": every, "eval_every": every, "checkpoint_every": every, "device": "cpu"}
    )
    raw["data"]["max_documents"] = 200
    return raw


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of ``points`` (both objectives minimised) up to ``reference``."""
    from atp_ray.search.front import hypervolume as front_hypervolume

    return front_hypervolume(points, ["min", "min"], reference) if len(points) else 0.0


# -- 1. samplers -------------------------------------------------------------------------------


def sampler_study(name: str, trials: int, seed: int, base: dict[str, Any], work: Path) -> np.ndarray:
    """Objective vectors of ``trials`` real trials proposed by one sampler."""
    import optuna

    from atp_ray.search.space import SearchSpace
    from atp_ray.search.trial import run_trial

    space = SearchSpace.model_validate(
        {"base": base, "knobs": KNOBS, "objectives": [{"name": "quality"}, {"name": "params"}],
         "sampler": {"name": name, "seed": seed}, "trials": trials}
    )
    distributions = {k: v.optuna_distribution() for k, v in space.searched.items()}
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=space.sampler_factory()())
    for number in range(trials):
        trial = study.ask(distributions)
        values = run_trial(space.run_config(trial.params, base), work / f"{name}-{seed}-{number}")
        study.tell(trial, [values["quality"], values["params"]])
    return np.array([t.values for t in study.trials])


def compare_samplers(settings: Settings, base: dict[str, Any], work: Path) -> dict[str, Any]:
    runs = {}
    for seed in settings.seeds:
        runs[("nsga2", seed)] = sampler_study("nsga2", settings.k, seed, base, work)
        runs[("random", seed)] = sampler_study("random", 2 * settings.k, seed, base, work)
    reference = np.max(np.concatenate(list(runs.values())), axis=0) * 1.01
    hv = {
        f"nsga2@{settings.k}": [hypervolume(runs["nsga2", s], reference) for s in settings.seeds],
        f"random@{settings.k}": [hypervolume(runs["random", s][: settings.k], reference) for s in settings.seeds],
        f"random@{2 * settings.k}": [hypervolume(runs["random", s], reference) for s in settings.seeds],
    }
    return {"reference": reference.tolist(), "hypervolume": {k: float(np.mean(v)) for k, v in hv.items()}, "per_seed": hv}


# -- 2. early stopping -------------------------------------------------------------------------


def early_stopping_search(enabled: bool, settings: Settings, base: dict[str, Any], work: Path) -> dict[str, Any]:
    """A real search (Ray Tune) with the early-stopping scheduler on or off; what it spent and found."""
    import pandas as pd

    from atp_ray.search.experiment import new_experiment
    from atp_ray.search.space import load_space
    from atp_ray.search.table import trial_table
    from atp_ray.search.tuner import run_search

    raw = {
        "base": base, "knobs": KNOBS, "objectives": [{"name": "quality"}, {"name": "params"}],
        "sampler": {"name": "random", "seed": settings.seeds[0]}, "trials": settings.es_trials,
        "concurrency": 2, "resources": {"cpus_per_worker": 1},
        "early_stopping": {"enabled": enabled, "grace": 1, "eta": 2},
    }
    space, resolved = load_space(raw)
    experiment = new_experiment(work / f"es-{'on' if enabled else 'off'}", space, resolved)
    start = time.monotonic()
    run_search(experiment)
    wall = time.monotonic() - start
    table = trial_table(experiment)
    table = table[table.status != "DENSE"]  # the dense reference row: no run of its own
    steps = 0
    for run_dir in table.run_dir:
        metrics = Path(run_dir) / "metrics.jsonl"
        rows = pd.read_json(metrics, lines=True) if metrics.is_file() and metrics.stat().st_size else None
        steps += int(rows["step"].max()) if rows is not None else 0
    done = table[table.status == "COMPLETED"][["obj.quality", "obj.params"]].to_numpy(dtype=float)
    return {"steps_spent": steps, "wall_s": round(wall, 1), "completed": len(done),
            "stopped": int((table.status == "STOPPED").sum()), "points": done}


def compare_early_stopping(settings: Settings, base: dict[str, Any], work: Path) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = {name: early_stopping_search(name == "on", settings, base, work) for name in ("off", "on")}
    reference = np.max(np.concatenate([r["points"] for r in runs.values() if len(r["points"])]), axis=0) * 1.01
    for run in runs.values():
        run["hypervolume"] = hypervolume(run.pop("points"), reference) if len(run["points"]) else 0.0
    return {"reference": reference.tolist(), **runs}


# -- main --------------------------------------------------------------------------------------


def format_results(results: dict[str, Any]) -> str:
    samplers, es = results["samplers"], results["early_stopping"]
    lines = ["| sampler | trials | hypervolume |", "|---|---:|---:|"]
    for key, value in samplers["hypervolume"].items():
        name, trials = key.split("@")
        lines.append(f"| {name} | {trials} | {value:.4g} |")
    lines += ["", "| early stopping | trials completed / stopped | steps spent | wall s | hypervolume |", "|---|---:|---:|---:|---:|"]
    for name in ("off", "on"):
        run = es[name]
        lines.append(f"| {name} | {run['completed']} / {run['stopped']} | {run['steps_spent']} | {run['wall_s']} | {run['hypervolume']:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small run: {QUICK}")
    parser.add_argument("--out", help="write results.json here (default: a temporary folder)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="atp-bench-") as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = base_config(tiny_model(work / "tiny-model"), settings.steps)
        results = {
            "settings": settings.__dict__,
            "samplers": compare_samplers(settings, base, work),
            "early_stopping": compare_early_stopping(settings, base, work),
        }
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(yaml.safe_dump(results["settings"], default_flow_style=True).strip())
    print(format_results(results))
    return results


if __name__ == "__main__":
    main()
