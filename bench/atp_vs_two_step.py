"""ATP vs prune-then-tune vs dense LoRA at equal data and steps: quality side by side.

    python -m bench.atp_vs_two_step [--sparsities 0.2 0.4 0.6] [--seeds 0 1] [--max-samples 200]
    python -m bench.atp_vs_two_step --quick       # a tiny model, one sparsity (for tests)
    python -m bench.atp_vs_two_step atp.generator_every=2 --methods atp --sparsities 0.4  # one method, a variant

Every run starts from configs/embedded.yaml and differs only in ``method`` (and
``baseline.importance``), ``atp.sparsity`` and ``train.seed``: ATP learns its mask while
tuning; two-step scores units once (magnitude, or first-order Taylor on calibration
batches), cuts them to the same kept-parameter count, then LoRA-tunes under that mask;
dense LoRA prunes nothing and is the reference. Each finished run folder is scored by
the evaluation recipe (``atp-ray eval``): held-out perplexity on the run's own held-out
split (domain-ppl) and accuracy on the HPO term quiz (hpo-term). Retention is the
pruned model's quiz accuracy over dense LoRA's, and dense LoRA's perplexity over the
pruned model's (1.0 = nothing lost), paired by seed. Cells are mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from atp_ray.config import apply_overrides
from atp_ray.eval_recipe import run_eval
from bench._runs import base_config, mean_sd, timed_run, with_overrides

DENSE = "dense lora"
# name -> what the run config sets besides sparsity and seed (dense LoRA runs once per seed)
METHODS: dict[str, dict[str, Any]] = {
    DENSE: {"method": "lora"},
    "atp": {"method": "atp"},
    "two-step magnitude": {"method": "two-step", "baseline": {"importance": "magnitude"}},
    "two-step taylor": {"method": "two-step", "baseline": {"importance": "taylor"}},
}
TASKS = ["domain-ppl", "hpo-term"]


def score(run_dir: Path, max_samples: int | None) -> dict[str, float]:
    """Held-out perplexity and quiz accuracy of a finished run folder."""
    report = run_eval(str(run_dir), TASKS, max_samples=max_samples)
    tasks = report["tasks"]
    return {"ppl": tasks["domain-ppl"]["values"]["perplexity"], "acc": tasks["hpo-term"]["values"]["accuracy"]}


def run_all(
    raw: dict[str, Any],
    workdir: Path,
    sparsities: list[float],
    seeds: list[int],
    max_samples: int | None,
    methods: list[str],
):
    """Scores keyed by (method, sparsity) -> one dict per seed; dense LoRA under sparsity 0."""
    results: dict[tuple[str, float], list[dict[str, float]]] = {}
    for seed in seeds:
        runs = [(DENSE, 0.0, METHODS[DENSE])] if DENSE in methods else []
        runs += [(name, s, METHODS[name]) for s in sparsities for name in methods if name != DENSE]
        for name, sparsity, sets in runs:
            config = with_overrides(raw, **sets, atp={"sparsity": sparsity}, train={"seed": seed})
            out = workdir / f"{name.replace(' ', '-')}-{sparsity}-{seed}"
            summary, _ = timed_run(config, out)
            scores = {**score(out, max_samples), "sparsity": summary["sparsity"]}
            results.setdefault((name, sparsity), []).append(scores)
            # One line per finished run, so a long bench stopped early still shows what it measured.
            print(f"{name}, sparsity {sparsity}, seed {seed}: {scores}", flush=True)
    return results


def markdown(results: dict[tuple[str, float], list[dict[str, float]]]) -> str:
    """The table; retention needs dense LoRA's runs of the same seeds (else its cells read n/a)."""
    dense = results.get((DENSE, 0.0))
    lines = [
        "| method | target sparsity | achieved | held-out ppl | quiz acc | acc retention | ppl retention |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, sparsity), seeds in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if dense:
            acc_kept = [s["acc"] / d["acc"] if d["acc"] else float("nan") for s, d in zip(seeds, dense)]
            retention = f"{mean_sd(acc_kept)} | {mean_sd([d['ppl'] / s['ppl'] for s, d in zip(seeds, dense)])}"
        else:
            retention = "n/a | n/a"
        lines.append(
            f"| {name} | {sparsity:.0%} | {mean_sd([s['sparsity'] for s in seeds])} | "
            f"{mean_sd([s['ppl'] for s in seeds], 2)} | {mean_sd([s['acc'] for s in seeds])} | {retention} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one sparsity, few steps: checks the script runs")
    parser.add_argument("--sparsities", type=float, nargs="+", help="default 0.2 0.4 0.6 (0.4 with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train.seed of each repeat (>= 2 for a spread)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="which runs to make (default: all)"
    )
    parser.add_argument("--max-samples", type=int, default=200, help="held-out blocks and quiz questions scored per run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("overrides", nargs="*", help="run-config overrides for every run, e.g. train.steps=100")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    sparsities = args.sparsities or ([0.4] if args.quick else [0.2, 0.4, 0.6])
    max_samples = min(args.max_samples, 8) if args.quick else args.max_samples
    with tempfile.TemporaryDirectory() as tmp:
        raw = apply_overrides(base_config(args.quick, Path(tmp)), args.overrides)
        results = run_all(raw, Path(tmp), sparsities, args.seeds, max_samples, args.methods)
    print(
        f"{raw['model']['path']}, {raw['train']['steps']} steps, batch {raw['train']['batch_size']}, "
        f"seeds {args.seeds}, {max_samples} held-out blocks / quiz questions per run"
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
