"""The ``atp-ray`` command. Each subcommand is a ``_cmd_*`` function registered in ``main``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from atp_ray.cli_cluster import add_cluster_parser
from atp_ray.errors import ATPRayError, ClusterError
from atp_ray.packaged import resolve

log = logging.getLogger("atp_ray")


def _distributed_overrides(args: argparse.Namespace) -> list[str]:
    """The train flags as config overrides, so the config check reports them with everything else."""
    flags = []
    if args.workers is not None:
        flags.append(f"distributed.workers={args.workers}")
    if args.strategy is not None:
        flags.append(f"distributed.strategy={args.strategy}")
    if args.gpus_per_worker is not None:
        flags += ["distributed.use_gpu=true", f"distributed.gpus_per_worker={args.gpus_per_worker}"]
    return flags


def _cmd_train(args: argparse.Namespace) -> None:
    from atp_ray.config import load_config

    config = load_config(resolve(args.config, "configs"), args.overrides + _distributed_overrides(args))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if config.distributed.use_gpu:
        from atp_ray.training.memory_plan import check_run_plan

        print(check_run_plan(config).table())  # refuses a plan that cannot fit distributed.gpu_memory_gib
    if config.distributed.workers is None:
        from atp_ray.runtime.modeling import check_model_reachable
        from atp_ray.training.atp import run_atp

        check_model_reachable(config.model.path)  # before the run folder is made
        summary = run_atp(config, out)
    else:
        from atp_ray.training.distributed import run_distributed

        check_ray_address(args.address or os.environ.get("RAY_ADDRESS"))
        summary = run_distributed(config, out, address=args.address)
    for key, outcome in summary.get("budgets", {"": summary}).items():
        budget = f"  budget={key}" if key else ""
        print(f"run finished: {out}{budget}  sparsity={outcome['sparsity']:.4f}  eval_loss={outcome['eval_loss']:.4f}")


def _cmd_distill_cache(args: argparse.Namespace) -> None:
    from atp_ray.config import load_config
    from atp_ray.runtime.modeling import check_model_reachable
    from atp_ray.training.atp import build_teacher_cache

    config = load_config(resolve(args.config, "configs"), args.overrides)
    check_model_reachable(config.model.path)
    out = Path(args.out)
    count = build_teacher_cache(config, out)
    print(
        f"teacher cache written: {out} (the top {config.distill.top_k} logits of the {config.distill.teacher} "
        f"teacher on {count} training blocks); runs with this config read it with distill.cache={out.resolve()}"
    )


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from atp_ray.evaluation.eval_recipe import format_report, run_eval
    from atp_ray.runtime.run_folder import atomic_write_json

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = run_eval(
        args.model,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=device,
        domain=args.domain,
        sparsity=args.sparsity,
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


def _sparsity_list(value: str | None) -> list[float] | None:
    """``--sparsity``: None for 'all' or no flag, else the comma-separated numbers."""
    from atp_ray.errors import CompressionError

    if value is None or value.strip() == "all":
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise CompressionError(
            f"--sparsity: expected sparsities separated by commas (e.g. 0.2,0.5) or 'all', got {value!r}"
        ) from None


def _cmd_compress(args: argparse.Namespace) -> None:
    from atp_ray.compression.compress import budget_folder, compress_budgets, compress_run, is_elastic_run
    from atp_ray.errors import CompressionError

    sparsities = _sparsity_list(args.sparsity)
    if is_elastic_run(args.run_dir):  # one model folder per budget, under --out
        records = compress_budgets(args.run_dir, args.out, sparsities)
        written = {budget_folder(args.out, budget): record for budget, record in records.items()}
    else:
        if sparsities is not None and len(sparsities) != 1:
            raise CompressionError(f"{args.run_dir} is a single run with one mask; --sparsity takes one value for it")
        sparsity = None if sparsities is None else sparsities[0]
        written = {Path(args.out): compress_run(args.run_dir, args.out, sparsity=sparsity)}
    for folder, record in written.items():
        print(
            f"compressed model: {folder}  params={record.params:,} (dense {record.dense_params:,})  "
            f"sparsity={record.sparsity:.4f}"
        )


# -- the search: search / resume / report / export -----------------------------------------


def _cmd_search(args: argparse.Namespace) -> None:
    from atp_ray.search.space import load_space

    # every problem of the space is reported here, before Ray starts
    space, base = load_space(resolve(args.space, "search_spaces"), args.overrides, args.trials)
    from atp_ray.search.space import gpu_memory_plan

    plan = gpu_memory_plan(space, base)
    if plan is not None and plan[0] is not None:
        print(f"heaviest trial's {plan[0].table()}")
    out = Path(args.out) if args.out else Path("experiments") / Path(args.space).stem
    from atp_ray.search.experiment import new_experiment
    from atp_ray.search.tuner import run_search

    check_ray_address(os.environ.get("RAY_ADDRESS"))  # before search.json is written
    experiment = new_experiment(out, space, base)
    with _driver(experiment.root):
        run_search(experiment)
    _report(experiment.root, show_front=True)


def _cmd_resume(args: argparse.Namespace) -> None:
    from atp_ray.search.tuner import open_to_resume, resume_search

    workdir = Path.cwd().resolve()  # before _driver moves to the experiment folder
    experiment = open_to_resume(args.experiment)  # its state is checked before Ray starts
    check_ray_address(os.environ.get("RAY_ADDRESS"))
    with _driver(experiment.root):
        resume_search(experiment, retry_failed=args.retry_failed, workdir=workdir)
    _report(experiment.root, show_front=True)


def _cmd_report(args: argparse.Namespace) -> None:
    _report(Path(args.experiment), show_front=False)


def _cmd_export(args: argparse.Namespace) -> None:
    from atp_ray.search.export import export_trial

    out = export_trial(args.experiment, args.trial, args.out, sparsity=args.sparsity)
    which = f" at sparsity {args.sparsity:g}" if args.sparsity is not None else ""
    print(f"exported trial {args.trial}{which}: {out} (load with atp_ray.load_compressed)")


DRIVER_FILE = "driver.pid"  # in an experiment folder while a search or resume runs: {"host", "pid"}
# From another host a driver's pid cannot be checked: its search counts as stopped once the
# experiment's state has not changed for this long (Tune saves its state every 10 s or so).
STALE_DRIVER_S = 600.0
RAY_CONNECT_TIMEOUT_S = 5.0  # for the one TCP connect that tells whether a Ray address answers


def check_ray_address(address: str | None) -> None:
    """Fail within seconds (ClusterError) when a Ray address names a port where nothing listens.

    ``ray.init`` keeps retrying such an address for many minutes, silent for most of them;
    one TCP connect to its host:port tells at once. No address, "auto" and "local" need no
    check: Ray finds or starts a local instance, and says so quickly when it cannot.
    """
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: ray.init rejects a malformed address at once, in its own words
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ClusterError(
            f"Ray address {address!r}: no Ray cluster answers at {host}:{port} ({reason}); start the cluster "
            "(ray start --head, or atp-ray cluster), fix the address (--address or RAY_ADDRESS), or leave "
            "RAY_ADDRESS unset to run on a local Ray instance"
        ) from None


@contextlib.contextmanager
def _driver(root: Path) -> Iterator[None]:
    """Start (or join, via RAY_ADDRESS) Ray, and mark the experiment as running meanwhile.

    Meanwhile the driver works in the experiment folder ``root`` (the paths it was given are
    resolved by then). A Ray job's driver starts in the job's upload of the checkout, which Ray
    may replace under it: a node that first sees the job unpacks the upload again, removing the
    folder there, and the nodes of a local cluster share that folder. A driver left in it has no
    working dir, yet Tune needs one (``os.getcwd``) to restore an experiment and to read its
    results; without it a resume's restore failed and Tune started the search afresh instead.
    """
    import ray

    from atp_ray.training.distributed import init_ray

    try:
        started_in: str | None = os.getcwd()
    except FileNotFoundError:
        started_in = None
    started = not ray.is_initialized()
    if started:
        try:
            init_ray()  # from the working dir it started in: Ray gives it to the workers' sys.path
        except ConnectionError as err:  # e.g. RAY_ADDRESS=auto with no cluster running
            raise ClusterError(f"cannot join the Ray cluster: {err}") from None
    os.chdir(root)
    (root / DRIVER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield
    finally:
        (root / DRIVER_FILE).unlink(missing_ok=True)
        if started:
            ray.shutdown()
        if started_in is not None:
            with contextlib.suppress(OSError):  # a job's upload being unpacked again: stay
                os.chdir(started_in)


def _search_running(root: Path) -> tuple[bool, str | None]:
    """Whether a search or resume drives the experiment in ``root`` now, and a note on who does.

    ``driver.pid`` names the driver's host and pid. On that host, the pid answers. From another
    host (the folder is on shared storage; the driver may have died with its head), a pid says
    nothing, so the search counts as running while the experiment's state (Tune's experiment
    state, the study journal, or else driver.pid itself) changed within ``STALE_DRIVER_S``; the
    note names the holder either way. A bare pid (written before hosts were kept) is this host's.
    """
    pid_file = root / DRIVER_FILE
    if not pid_file.is_file():
        return False, None
    text = pid_file.read_text().strip()
    try:
        holder = json.loads(text) if text.startswith("{") else {"host": socket.gethostname(), "pid": int(text)}
        host, pid = str(holder["host"]), int(holder["pid"])
    except (ValueError, KeyError, TypeError):
        return False, f"{pid_file}: unreadable ({text[:40]!r}); taken as no running search"
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, None
        except PermissionError:  # alive, another user's
            pass
        return True, None
    from atp_ray.search.experiment import STUDY_FILE, TUNE_NAME

    beats = [pid_file, root / STUDY_FILE, *(root / TUNE_NAME).glob("experiment_state-*.json")]
    idle_s = time.time() - max(p.stat().st_mtime for p in beats if p.exists())
    running = idle_s < STALE_DRIVER_S
    verdict = "taken as running" if running else f"no change for {STALE_DRIVER_S / 60:.0f} min: taken as stopped"
    note = f"{DRIVER_FILE}: held by pid {pid} on host {host}, not this one; its state changed {idle_s:.0f} s ago"
    return running, f"{note}, {verdict}"


def _report(experiment_dir: Path, show_front: bool) -> None:
    """Write EXPERIMENT_DIR/report/ from the trial table and print its summary."""
    from atp_ray.search.experiment import Experiment
    from atp_ray.search.report import write_report
    from atp_ray.search.table import trial_curves, trial_table

    experiment = Experiment.open(experiment_dir)
    running, holder = _search_running(experiment.root)
    if holder:
        print(holder)
    table = trial_table(experiment, running=running)
    objectives = {o.name: o.mode for o in experiment.space.objective_list()}
    out = experiment.report
    summary = write_report(table, objectives, trial_curves(experiment, table), out, running=running)
    print(summary.text())
    if show_front and (out / "front.csv").is_file():
        import pandas as pd

        print("Pareto front:")
        print(pd.read_csv(out / "front.csv").to_string(index=False))


def _add_search_commands(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser("search", help="search ATP knobs with Ray Tune + Optuna for a Pareto front")
    search.add_argument(
        "--space", required=True, help="search space YAML, or a shipped one's name (demo; see search_spaces/)"
    )
    search.add_argument("--out", help="experiment folder (default experiments/<space name>)")
    search.add_argument("--trials", type=_positive_int, help="number of trials (default: the space's)")
    search.add_argument("overrides", nargs="*", help="dotted.key=value overrides of every trial's base run config")
    search.set_defaults(handler=_cmd_search)

    resume = commands.add_parser("resume", help="continue a search whose driver stopped")
    resume.add_argument("experiment", help="experiment folder of the search")
    resume.add_argument("--retry-failed", action="store_true", help="run errored trials again from their checkpoints")
    resume.set_defaults(handler=_cmd_resume)

    report = commands.add_parser("report", help="write EXPERIMENT_DIR/report/: trial table, Pareto front, plots")
    report.add_argument("experiment", help="experiment folder (a running search works too)")
    report.set_defaults(handler=_cmd_report)

    export = commands.add_parser("export", help="copy one trial's compressed model to a folder")
    export.add_argument("experiment", help="experiment folder")
    export.add_argument("--trial", required=True, help="trial id (see report/trials.csv)")
    export.add_argument("--out", required=True, help="new folder (must not exist or be empty)")
    export.add_argument(
        "--sparsity", type=float, help="an elastic trial's budget to export (required for one; see trials.csv's budget)"
    )
    export.set_defaults(handler=_cmd_export)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atp-ray", description="All-in-One Tuning and structural Pruning of LLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run ATP once: joint LoRA tuning and structural pruning")
    train.add_argument(
        "--config", required=True, help="run config YAML, or a shipped one's name (embedded; see configs/)"
    )
    train.add_argument("--out", help="run folder (default runs/<config name>); an unfinished one is resumed")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. atp.sparsity=0.4")
    train.add_argument(
        "--workers", type=int, help="run on N Ray Train workers (distributed.workers); without it: one process"
    )
    train.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per worker (sets distributed.use_gpu and gpus_per_worker)"
    )
    # No choices here: the run config checks the name against the registry (atp_ray.runtime.strategies),
    # which imports torch, and `atp-ray --help` should not wait for it.
    train.add_argument("--strategy", help="distributed.strategy (an unknown name is refused, with the known ones)")
    train.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray instance)")
    train.set_defaults(handler=_cmd_train)

    cache = commands.add_parser(
        "distill-cache", help="compute a fixed distillation teacher's top-k logits once, for every run on the same data"
    )
    cache.add_argument("--config", required=True, help="the run config the cache is for (its data, steps, teacher)")
    cache.add_argument("--out", required=True, help="the cache file to write; runs read it as distill.cache")
    cache.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. distill.top_k=64")
    cache.set_defaults(handler=_cmd_distill_cache)

    compress = commands.add_parser("compress", help="merge a finished run's LoRA and cut its pruned units out")
    compress.add_argument("run_dir", help="a finished run folder (holds mask.json and adapter/)")
    compress.add_argument(
        "--out",
        required=True,
        help="new model folder (must not exist or be empty); for an elastic run, the folder of its "
        "sparsity-{budget}/ model folders",
    )
    compress.add_argument(
        "--sparsity",
        help="budgets to compress, comma-separated (e.g. 0.2,0.5), or 'all' (default): an elastic run's budgets; "
        "a single run takes only its own target",
    )
    compress.set_defaults(handler=_cmd_compress)

    from atp_ray.evaluation.tasks import BUILTIN_TASKS, DEFAULT_TASKS

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
    evaluate.add_argument("--sparsity", type=float, help="an elastic run folder: the budget whose mask is scored")
    evaluate.add_argument("--out", help="write the report as JSON here")
    evaluate.set_defaults(handler=_cmd_eval)
    _add_search_commands(commands)
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
