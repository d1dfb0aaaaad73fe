"""The ``atp-ray`` command. Each subcommand is a ``_cmd_*`` function registered in ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from atp_ray.cluster import add_cluster_parser
from atp_ray.errors import ATPRayError

log = logging.getLogger("atp_ray")


def _cmd_train(args: argparse.Namespace) -> None:
    from atp_ray.atp import run_atp
    from atp_ray.config import load_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = run_atp(config, out)
    print(f"run finished: {out}  sparsity={summary['sparsity']:.4f}  eval_loss={summary['eval_loss']:.4f}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from atp_ray.eval_recipe import format_report, run_eval
    from atp_ray.run_folder import atomic_write_json

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = run_eval(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=device,
        domain=args.domain,
    )
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), report)
        print(f"wrote {args.out}")


def _sample_cap(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return int(value)


def _cmd_compress(args: argparse.Namespace) -> None:
    from atp_ray.compress import compress_run

    record = compress_run(args.run_dir, args.out)
    print(
        f"compressed model: {args.out}  params={record.params:,} (dense {record.dense_params:,})  "
        f"sparsity={record.sparsity:.4f}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atp-ray", description="All-in-One Tuning and structural Pruning of LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run ATP once: joint LoRA tuning and structural pruning")
    train.add_argument("--config", required=True, help="run config YAML (see configs/)")
    train.add_argument("--out", help="run folder (default runs/<config name>); an unfinished one is resumed")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. atp.sparsity=0.4")
    train.set_defaults(handler=_cmd_train)

    compress = commands.add_parser("compress", help="merge a finished run's LoRA and cut its pruned units out")
    compress.add_argument("run_dir", help="a finished run folder (holds mask.json and adapter/)")
    compress.add_argument("--out", required=True, help="new model folder (must not exist or be empty)")
    compress.set_defaults(handler=_cmd_compress)

    from atp_ray.tasks import BUILTIN_TASKS, DEFAULT_TASKS

    evaluate = commands.add_parser("eval", help="score a model, an ATP run folder or a compressed folder on tasks")
    evaluate.add_argument(
        "model", help="hub id, local model folder, embedded:smollm2-135m-instruct, run folder or compressed folder"
    )
    evaluate.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated built-in tasks ({', '.join(BUILTIN_TASKS)}) or task YAML paths (default %(default)s)",
    )
    evaluate.add_argument(
        "--max-samples", type=_sample_cap, default=20, help="cap on samples per task, or 'all' (default %(default)s)"
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass of perplexity (default 8)")
    evaluate.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype (a run keeps its own)"
    )
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    evaluate.add_argument(
        "--domain", help="data.source whose held-out split domain-ppl scores (default: the run's own, else builtin:hpo)"
    )
    evaluate.add_argument("--out", help="write the report as JSON here")
    evaluate.set_defaults(handler=_cmd_eval)
    add_cluster_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.handler(args)
    except ATPRayError as err:
        print(f"atp-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
