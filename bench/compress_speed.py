"""Dense vs compressed: speed, memory and size of the embedded model (fp32) at several sparsities.

    python -m bench.compress_speed [--sparsities 0.2 0.4 0.6] [--threads 2] [--repeats 5]
    python -m bench.compress_speed --runs runs/a runs/b [--channel-multiple 8]

With ``--runs``, the compressed models are those finished runs make (ATP's non-uniform
masks, or a two-step baseline's), compressed as ``atp-ray compress`` does, against their
common source model; ``--channel-multiple`` then rounds each run's kept MLP widths with
``atp_ray.pruning.widths.round_mlp_channels`` (channels ranked by magnitude) and benches both the
run as trained and its rounded copy, side by side.

Masks: ``atp_ray.pruning.magnitude.uniform_magnitude_masks`` keeps the same attention shape in
every layer (the KV-group x query-slot grid closest to the target) and the
highest-magnitude heads and channels, with the MLP channel count solved so that the
space's exact parameter accounting lands on the target sparsity (within one channel).
Each compressed model is saved and loaded back with ``load_compressed``, so the bench
measures what users load. Timings are interleaved round by round (dense, then each
compressed model) so background load hits all models alike; a speedup is the median over
rounds of the same-round time ratio, printed next to its FLOP-count bound (dense FLOPs /
compressed FLOPs; for prefill every term scales with the batch, so one bound serves both
batch sizes). Peak memory is measured in fresh processes (median of --memory-probes per model): resident
memory at the peak of one batch-8 prefill and one decode, above the level before the
model loaded (weights, KV cache, activations, and the math libraries' own buffers).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import platform
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from atp_ray.compression.compress import compress_model, count_params, load_compressed, save_compressed
from atp_ray.compression.speed import (
    decode_flops,
    decode_seconds,
    interleaved_seconds,
    memory_in_use,
    peak_memory,
    prefill_flops,
    prefill_seconds,
    random_tokens,
    reset_peak_memory,
)
from atp_ray.models.embedded import EMBEDDED_MODEL
from atp_ray.pruning.magnitude import layer_scores, uniform_magnitude_masks
from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.pruning.widths import round_mlp_channels
from atp_ray.runtime.modeling import load_model, load_run_model
from atp_ray.runtime.run_folder import RunFolder

DENSE = "dense"
MiB = 2**20


@dataclass(frozen=True)
class Workload:
    """What one timing round runs."""

    seq_len: int  # prompt tokens per sequence for prefill, and the decode prompt
    big_batch: int  # the second prefill batch size (the first is 1)
    new_tokens: int  # decode steps per decode measurement


@dataclass(frozen=True)
class Candidate:
    """A model under test and where it lives on disk (None: the embedded dense model)."""

    name: str
    model: nn.Module
    path: Path | None


def build_candidates(sparsities: list[float], workdir: Path, channel_multiple: int = 1) -> list[Candidate]:
    """The dense model and, per sparsity, its compressed copy saved and loaded back."""
    dense = load_model(EMBEDDED_MODEL)
    space = PruningSpace.from_config(dense.config)
    candidates = [Candidate(DENSE, dense, None)]
    for sparsity in sparsities:
        small = copy.deepcopy(dense)
        masks = uniform_magnitude_masks(dense, space, sparsity, channel_multiple)
        record = compress_model(small, space, masks, EMBEDDED_MODEL)
        path = save_compressed(small, None, record, workdir / f"sparsity-{sparsity}")
        candidates.append(Candidate(f"{record.sparsity:.0%} sparse", load_compressed(path), path))
    return candidates


def run_candidates(run_dirs: list[Path], workdir: Path, channel_multiple: int = 1) -> tuple[str, list[Candidate]]:
    """The runs' common source model and, per run, its compressed model (and its width-rounded copy)."""
    sources = {RunFolder(run).read_config()["model"]["path"] for run in run_dirs}
    if len(sources) != 1:
        raise SystemExit(f"--runs: every run must prune the same model, got {sorted(sources)}")
    (source,) = sources
    candidates = [Candidate(DENSE, load_model(source), None)]
    for run in run_dirs:
        merged, space, masks = load_run_model(run)
        variants = {run.name: masks}
        if channel_multiple > 1:
            layers = space.layout.layers(merged)
            scores = {space.group(i, UnitKind.MLP_CHANNEL): layer_scores(layer, space)[UnitKind.MLP_CHANNEL]
                      for i, layer in enumerate(layers)}
            variants[f"{run.name} x{channel_multiple}"] = round_mlp_channels(space, masks, channel_multiple, scores)
        for name, variant in variants.items():
            small = copy.deepcopy(merged)
            record = compress_model(small, space, variant, source)
            path = save_compressed(small, None, record, workdir / name.replace(" ", "-"))
            candidates.append(Candidate(f"{name} ({record.sparsity:.0%})", load_compressed(path), path))
    return source, candidates


def time_rounds(
    candidates: list[Candidate], measure: Callable[..., float], *args: object, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of ``measure(model, *args)`` per candidate, interleaved round by round."""
    return interleaved_seconds({c.name: partial(measure, c.model, *args) for c in candidates}, repeats, warmup)


def probe_memory(path: Path | None, threads: int, work: Workload, source: str = EMBEDDED_MODEL) -> int:
    """Runs in a fresh process: peak resident bytes of one model serving the workload once."""
    torch.set_num_threads(threads)
    before = memory_in_use()
    model = load_model(source) if path is None else load_compressed(path)
    reset_peak_memory()  # loading's transient copies are not what serving needs
    prefill_seconds(model, random_tokens(model, work.big_batch, work.seq_len))
    decode_seconds(model, random_tokens(model, 1, work.seq_len), work.new_tokens)
    return peak_memory() - before


def measure_memory(
    candidates: list[Candidate], threads: int, work: Workload, probes: int, source: str = EMBEDDED_MODEL
) -> dict[str, float]:
    """Median over ``probes`` fresh processes of each model's peak bytes (allocator noise is tens of MiB)."""
    spawn = multiprocessing.get_context("spawn")
    samples: dict[str, list[int]] = {c.name: [] for c in candidates}
    for _ in range(probes):
        for c in candidates:
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                samples[c.name].append(pool.submit(probe_memory, c.path, threads, work, source).result())
    return {name: statistics.median(values) for name, values in samples.items()}


def speedups(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of dense time / model time."""
    return {name: statistics.median(d / t for d, t in zip(samples[DENSE], times)) for name, times in samples.items()}


@dataclass(frozen=True)
class Metric:
    """One measured quantity of one model: a rate, its speedup over dense and the FLOP bound."""

    rate: float
    speedup: float
    bound: float

    def cells(self, digits: int) -> str:
        return f"{self.rate:.{digits}f} | {self.speedup:.2f} ({self.bound:.2f})"


def metrics(tokens: int, samples: dict[str, list[float]], flops: dict[str, int]) -> dict[str, Metric]:
    speedup = speedups(samples)
    return {
        name: Metric(tokens / statistics.median(times), speedup[name], flops[DENSE] / flops[name])
        for name, times in samples.items()
    }


def measure(candidates: list[Candidate], args: argparse.Namespace, work: Workload) -> dict[str, dict[str, Metric]]:
    """Prefill at batch 1 and ``work.big_batch``, and decode: one Metric per model each."""
    dense = candidates[0].model
    rounds = {"repeats": args.repeats, "warmup": args.warmup}
    one, big = random_tokens(dense, 1, work.seq_len), random_tokens(dense, work.big_batch, work.seq_len)
    # Every FLOP term of a prefill scales with the batch, so the batch-1 bound serves both.
    prefill_bound = {c.name: prefill_flops(c.model, 1, work.seq_len) for c in candidates}
    decode_bound = {c.name: decode_flops(c.model, 1, work.seq_len) for c in candidates}
    return {
        "prefill b1": metrics(work.seq_len, time_rounds(candidates, prefill_seconds, one, **rounds), prefill_bound),
        f"prefill b{work.big_batch}": metrics(
            work.big_batch * work.seq_len, time_rounds(candidates, prefill_seconds, big, **rounds), prefill_bound
        ),
        "decode": metrics(
            work.new_tokens, time_rounds(candidates, decode_seconds, one, work.new_tokens, **rounds), decode_bound
        ),
    }


def markdown(candidates: list[Candidate], results: dict[str, dict[str, Metric]], memory: dict[str, float]) -> str:
    header = "| model | params | " + " | ".join(f"{k} tok/s | x (bound)" for k in results) + " | peak MiB |"
    lines = [header, "|---|" + "---:|" * (2 * len(results) + 2)]
    for c in candidates:
        cells = " | ".join(results[k][c.name].cells(1 if k == "decode" else 0) for k in results)
        peak = f"{memory[c.name] / MiB:.0f}" if c.name in memory else "-"
        lines.append(f"| {c.name} | {count_params(c.model) / 1e6:.1f}M | {cells} | {peak} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per metric")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per metric")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="the larger prefill batch")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument(
        "--channel-multiple", type=int, default=1, help="keep MLP widths a multiple of this (aligned kernels)"
    )
    parser.add_argument(
        "--runs", type=Path, nargs="+", help="finished run folders to bench instead of uniform magnitude masks"
    )
    parser.add_argument("--memory-probes", type=int, default=3, help="fresh processes per model for peak memory (0: skip)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Workload(args.seq_len, args.batch, args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        if args.runs:
            source, candidates = run_candidates(args.runs, Path(tmp), args.channel_multiple)
        else:
            source, candidates = EMBEDDED_MODEL, build_candidates(args.sparsities, Path(tmp), args.channel_multiple)
        results = measure(candidates, args, work)
        memory = measure_memory(candidates, args.threads, work, args.memory_probes, source) if args.memory_probes else {}
    masks = "masks of the runs given" if args.runs else "uniform magnitude masks"
    print(
        f"{source} fp32, {masks}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, prefill {args.seq_len} tokens (logits of the last position), "
        f"decode {args.new_tokens} tokens after a {args.seq_len}-token prompt, "
        f"median of {args.repeats} interleaved rounds, MLP widths multiple of {args.channel_multiple}"
    )
    print(markdown(candidates, results, memory))


if __name__ == "__main__":
    main()
