"""One ATP run sharded over Ray Train workers (TorchTrainer, Train V2): the only Ray layer of a run.

Each worker runs the unchanged recipe (``atp_ray.training.atp.run_atp``) inside the process group
Ray Train set up (gloo on CPU workers, NCCL on GPUs), with

* the strategy the config names (``distributed.strategy``, one of ``atp_ray.runtime.strategies``;
  DeepSpeed is imported inside the worker only);
* :class:`RayCheckpoints`: resumable state goes through ``ray.train.report(checkpoint=...)``
  into the run's storage (a folder, NFS, ``s3://`` or ``gs://``), the last K kept, and a
  restarted worker group reads it back from ``ray.train.get_checkpoint()``: never from a
  node's local disk, which differs between nodes;
* rank 0 writing the run folder (config, metrics, mask, adapter, generator, summary), in
  the layout ``atp-ray compress`` and ``atp-ray eval`` read. Its final outputs also go into
  the last Ray checkpoint, so the driver gets them even when rank 0 ran on another node.

Problems a user can fix (deepspeed missing, workers that no node type of the cluster could
hold, a finished or different run in the folder) are raised on the driver before any worker
starts; workers that fit node types the autoscaler has yet to start wait for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from ray.train import UserCallback

from atp_ray.cluster.capacity import NodeType, cluster_node_types, fit_problem, node_cpus
from atp_ray.config import RunConfig
from atp_ray.errors import ATPRayError
from atp_ray.pruning.structures import Masks
from atp_ray.runtime.process import ProcessContext, Restored, ShardWriter
from atp_ray.runtime.run_folder import RunFolder, atomic_write_bytes
from atp_ray.runtime.strategies import STRATEGIES

log = logging.getLogger(__name__)

# Every restore from a Ray checkpoint appends a line here (rank 0): the step it resumed at.
RESUMES_FILE = "resumes.jsonl"
# Per-rank mask digests, one line per step, when DebugHooks.trace_masks is set.
MASK_TRACE_DIR = "mask-trace"
# How often Ray Train's controller polls its workers (its default is 2 s). A finished run waits
# for the next polls before fit() returns: 4.8 s of a 3-step run at 2 s, 1.4 s at 0.5 s
# (docs/distributed.md). A missed poll is not a failure (a worker is
# declared dead only after Ray's 10-minute health-check timeout), so polling faster is safe.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.5"


class DistributedRunError(ATPRayError):
    """A distributed run cannot start as asked, or its workers failed beyond max_failures."""


class InjectedFailure(RuntimeError):
    """Raised once by :class:`DebugHooks` to prove that a worker failure is survived."""


@dataclass(frozen=True)
class DebugHooks:
    """Test seams, passed to the workers explicitly (no config field, no environment variable).

    ``fail_once_at_step``: rank ``fail_rank`` raises right after that step, once per run
    folder. ``trace_masks``: every rank appends the digest of each step's mask to
    ``<run>/mask-trace/rank<r>.jsonl``.
    """

    fail_once_at_step: int | None = None
    fail_rank: int = 1
    trace_masks: bool = False


def default_run_name(run_dir: Path) -> str:
    """A Ray Train run name that is the same every time for one run folder (so a rerun resumes)."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"atp-{run_dir.name}-{digest}"


def run_distributed(
    config: RunConfig,
    run_dir: str | Path,
    *,
    run_name: str | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[Any] | None = None,
    address: str | None = None,
    hooks: DebugHooks | None = None,
) -> dict[str, Any]:
    """Run ATP on ``config.distributed.workers`` Ray Train workers into ``run_dir``; returns the summary.

    Joins the Ray cluster at ``address`` (or ``RAY_ADDRESS``), uses the one already
    initialised in this process (a Tune trial, a test), or starts a local one.
    ``run_name`` names the Train run in storage (default from the run folder: a rerun
    with the same name resumes from its last checkpoint). ``report(metrics)`` is called
    on Ray Train's controller after each report of rank 0; ``callbacks`` are extra
    ``ray.train.UserCallback`` objects (e.g. Tune's ``TuneReportCallback``).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = config.distributed
    if dist.workers is None:
        raise DistributedRunError("distributed.workers: required for a Ray Train run (got None)")
    run_dir = Path(run_dir).resolve()
    preflight(config, run_dir)
    # Ray Train hands this variable from the driver's environment to its controller actor.
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    started_ray = _connect(address)
    try:
        node_types = cluster_node_types()
        cpus = worker_cpus(config, node_cpus(node_types))
        check_cluster(config, node_types, cpus)
        run_dir.mkdir(parents=True, exist_ok=True)
        user_callbacks = list(callbacks or []) + ([_ReportCallback(report)] if report else [])
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "config": config.to_dict(),
                "run_dir": str(run_dir),
                "hooks": asdict(hooks or DebugHooks()),
            },
            torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
            scaling_config=scaling_config(config, cpus),
            run_config=ray.train.RunConfig(
                name=run_name or default_run_name(run_dir),
                storage_path=dist.storage_path or str(run_dir / "ray"),
                failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=dist.checkpoints_to_keep),
                callbacks=user_callbacks,
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise DistributedRunError(f"the Ray Train run failed beyond distributed.max_failures: {err}") from err
        _fetch_outputs(result.checkpoint, run_dir)
    finally:
        if started_ray:
            ray.shutdown()
    return json.loads(RunFolder(run_dir).summary.read_text())


def worker_cpus(config: RunConfig, node_cpus: list[float]) -> float:
    """CPUs each worker reserves: ``distributed.cpus_per_worker``, else a default that uses the CPUs there are.

    Ray sets a worker's OMP_NUM_THREADS, and so torch's thread count, to the CPUs it
    reserves. At Ray Train's default of one, a one-worker run on a 2-core laptop trains on
    one thread. So CPU workers share the cluster's CPUs: the most whole CPUs each such that
    every worker still fits on one node. GPU workers compute on their GPU and take one.
    """
    dist = config.distributed
    if dist.cpus_per_worker is not None:
        return dist.cpus_per_worker
    if dist.use_gpu:
        return 1.0
    per_worker = max(1, int(sum(node_cpus) // dist.workers))
    while per_worker > 1 and sum(int(cpus // per_worker) for cpus in node_cpus) < dist.workers:
        per_worker -= 1
    return float(per_worker)


def scaling_config(config: RunConfig, cpus_per_worker: float) -> Any:
    """Ray Train's ScalingConfig from the ``distributed`` section and the CPUs each worker reserves."""
    from ray.train import ScalingConfig

    dist = config.distributed
    return ScalingConfig(
        num_workers=dist.workers,
        use_gpu=dist.use_gpu,
        resources_per_worker=worker_bundle(config, cpus_per_worker),
        placement_strategy=dist.placement_strategy,
    )


def preflight(config: RunConfig, run_dir: Path) -> None:
    """Checks that need no cluster: the strategy's library, the model, the run folder."""
    from atp_ray.runtime.modeling import check_model_reachable

    name = config.distributed.strategy
    needs = STRATEGIES[name].requires
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise DistributedRunError(
            f"distributed.strategy: {name!r} needs {needs}, which is not importable here "
            f"(pip install {needs}, or use strategy ddp)"
        )
    check_model_reachable(config.model.path)
    RunFolder(run_dir).check_can_run(config.to_dict())


def stage_on_a_worker_node(config: RunConfig) -> Callable[..., Any]:
    """A runner for one trial's model-sized stages (dense reference, compression, final objectives):
    each runs as a Ray task holding one worker's resources, so on a node of the kind the workers
    train on (a GPU node for a GPU run), never on the driver's GPU-less head. Each task is named
    ``atp-ray:<stage>`` in Ray's state API."""
    import ray

    bundle = worker_bundle(config, worker_cpus(config, node_cpus(cluster_node_types())))

    def run(stage: Callable[..., Any], *args: Any) -> Any:
        task = ray.remote(stage).options(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            name=f"atp-ray:{stage.__name__}",
            max_retries=0,
            scheduling_strategy="DEFAULT",  # not the trial driver's placement group, which Tune's tasks inherit
        )
        return ray.get(task.remote(*args))

    return run


def worker_bundle(config: RunConfig, cpus_per_worker: float) -> dict[str, float]:
    """What one Ray Train worker reserves."""
    dist = config.distributed
    return {"CPU": cpus_per_worker, **({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})}


def check_cluster(config: RunConfig, node_types: list[NodeType], cpus_per_worker: float) -> None:
    """The workers must fit the cluster at its largest (its node types), or Ray would wait forever.

    Fewer nodes up now is fine: the placement group waits and the autoscaler adds nodes.
    """
    problem = fit_problem(node_types, worker_bundle(config, cpus_per_worker), config.distributed.workers)
    if problem:
        raise DistributedRunError(f"distributed: {problem}")


def _connect(address: str | None) -> bool:
    """Join a cluster (address or RAY_ADDRESS), keep the current one, or start a local one; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    # A local instance gets Ray's dashboard (on 127.0.0.1) as `atp-ray search` does: it serves the
    # State API that Ray Train's placement-group cleaner polls, which without it logs a warning
    # every few seconds; and it shows the run (http://127.0.0.1:8265).
    init_ray(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    return True


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``; a local instance it starts runs its workers at normal priority.

    Ray runs workers at nice 15 so that its own daemons stay responsive. Here the workers
    are the job: at nice 15 every wake-up of a daemon preempts one of a worker's compute
    threads and the others wait for it (one 50-step run on 2 cores: 1.56x the direct run's
    time at nice 15, 1.17x at 0). A user's own ``RAY_worker_niceness`` wins; joining a
    running cluster keeps that cluster's setting.
    """
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(**kwargs)


# -- on the workers -----------------------------------------------------------------------


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the recipe in this worker group's process group."""
    import ray.train
    import ray.train.torch

    from atp_ray.training.atp import run_atp

    config = RunConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    hooks = DebugHooks(**loop_config["hooks"])
    if config.distributed.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    context = ProcessContext.current("cuda" if config.distributed.use_gpu else "cpu")
    folder = RunFolder(run_dir)
    checkpoints = RayCheckpoints(folder, context)
    summary = run_atp(config, run_dir, context, checkpoints=checkpoints, on_step=_step_hook(hooks, context, run_dir))
    # The finished run folder, once more through storage: the driver may be on another node.
    with tempfile.TemporaryDirectory(prefix="atp-final-") as tmp:
        checkpoint = None
        if context.is_main:
            for name in RunFolder.OUTPUTS:
                source = run_dir / name
                if source.is_dir():
                    shutil.copytree(source, Path(tmp) / name)
                elif source.is_file():
                    shutil.copy2(source, Path(tmp) / name)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        metrics = {"step": summary["steps"], **_numbers(summary), "done": 1}
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="final")


@dataclass(frozen=True)
class RayCheckpoints:
    """The recipe's CheckpointStore under Ray Train: storage through report / get_checkpoint.

    A checkpoint directory holds ``state.pt`` (rank 0: generator, optimizers, RNG, step,
    and the LoRA state under DDP), ``shards/`` (each rank's DeepSpeed files under ZeRO) and
    ``metrics.jsonl`` up to that step, so a worker group restarted on other nodes continues
    the same metrics file.
    """

    folder: RunFolder
    context: ProcessContext

    def save(self, step: int, state: dict[str, Any] | None, write_shards: ShardWriter) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="atp-ckpt-") as tmp:
            directory = Path(tmp)
            write_shards(directory / "shards")
            metrics: dict[str, Any] = {"step": step}
            if state is not None:
                torch.save(state, directory / "state.pt")
                if self.folder.metrics.is_file():
                    shutil.copy2(self.folder.metrics, directory / RunFolder.METRICS)
                    metrics |= _last_row(self.folder.metrics)
            wrote = any(directory.iterdir())
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if wrote else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")

    @contextlib.contextmanager
    def restore(self) -> Iterator[Restored | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as tmp:
            directory = Path(tmp)
            state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
            if self.context.is_main:
                self.folder.root.mkdir(parents=True, exist_ok=True)
                if (directory / RunFolder.METRICS).is_file():
                    atomic_write_bytes(self.folder.metrics, (directory / RunFolder.METRICS).read_bytes())
                with open(self.folder.root / RESUMES_FILE, "a") as f:
                    f.write(json.dumps({"step": state["step"], "checkpoint": checkpoint.path}) + "\n")
            shards = directory / "shards"
            yield state, (shards if shards.is_dir() else None)


def _step_hook(hooks: DebugHooks, context: ProcessContext, run_dir: Path) -> Callable[[int, Masks, dict], None] | None:
    if hooks.fail_once_at_step is None and not hooks.trace_masks:
        return None

    def on_step(step: int, masks: Masks, metrics: dict[str, float]) -> None:
        if hooks.trace_masks:
            trace = run_dir / MASK_TRACE_DIR
            trace.mkdir(parents=True, exist_ok=True)
            with open(trace / f"rank{context.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "mask": mask_digest(masks)}) + "\n")
        if step == hooks.fail_once_at_step and context.rank == hooks.fail_rank:
            marker = run_dir / ".injected-failure"
            if not marker.exists():
                marker.touch()
                raise InjectedFailure(f"injected failure on rank {context.rank} after step {step}")

    return on_step


def mask_digest(masks: Masks) -> str:
    """A short digest of a hard mask (equal digests: equal masks), in the space's group order."""
    flat = torch.cat([m.detach().float().cpu().reshape(-1) for m in masks.values()])
    return hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:16]


def _fetch_outputs(checkpoint: Any, run_dir: Path) -> None:
    """Copy the finished run folder from the final checkpoint when rank 0 wrote it on another node."""
    if RunFolder(run_dir).is_finished():
        return
    if checkpoint is None:
        raise DistributedRunError(f"the run ended without its final outputs in {run_dir} or in storage")
    with checkpoint.as_directory() as tmp:
        for name in RunFolder.OUTPUTS:
            source, target = Path(tmp) / name, run_dir / name
            if source.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)
            elif source.is_file() and name != RunFolder.SUMMARY:
                shutil.copy2(source, target)
        shutil.copy2(Path(tmp) / RunFolder.SUMMARY, run_dir / RunFolder.SUMMARY)  # last: marks the run finished


def _last_row(path: Path) -> dict[str, Any]:
    lines = [line for line in path.read_text().splitlines() if line]
    return _numbers(json.loads(lines[-1])) if lines else {}


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _ReportCallback(UserCallback):
    """Calls ``report(metrics of rank 0)`` after every ``ray.train.report`` of the workers."""

    def __init__(self, report: Callable[[dict[str, Any]], None]):
        self.report = report

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.report(metrics[0])
