"""The ``atp-ray`` command. Each subcommand is a ``_cmd_*`` function registered in ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from atp_ray.errors import ATPRayError

log = logging.getLogger("atp_ray")


def _cmd_train(args: argparse.Namespace) -> None:
    from atp_ray.atp import run_atp
    from atp_ray.config import load_config

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = run_atp(config, out)
    print(f"run finished: {out}  sparsity={summary['sparsity']:.4f}  eval_loss={summary['eval_loss']:.4f}")


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
