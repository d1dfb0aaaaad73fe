"""What ``atp-ray cluster`` does: start and stop a cloud cluster, and submit a search, a resume,
a report or an export as a Ray job (the last two copy their result back here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from atp_ray.cluster.clusters import CloudCluster, Cluster, is_uri
from atp_ray.cluster.commands import JobCommands
from atp_ray.cluster.config import check_cluster_config, load_cluster_config
from atp_ray.cluster.jobs import stamp, submit_job
from atp_ray.cluster.prerequisites import project_root, ray_cli, require_cloud_credentials
from atp_ray.cluster.shell import base_env, run
from atp_ray.errors import ClusterError


def _experiment_dir(cluster: Cluster, experiment: str) -> str:
    """An experiment named by its path/URI, or by its bare name under the cluster's experiment root."""
    if is_uri(experiment) or "/" in experiment:
        return experiment
    return f"{cluster.default_experiment_root()}/{experiment}"


def submit_search(
    cluster: Cluster,
    space: str | Path,
    *,
    out: str | None = None,
    trials: int | None = None,
    overrides: Sequence[str] = (),
    commands: JobCommands = JobCommands(),
    wait: bool = False,
    resumable: Callable[[Path], bool] | None = None,
) -> tuple[str, str]:
    """Submit a search as a Ray job; returns (job id, experiment dir).

    An ``out`` that already holds a search with Tune state (one stopped, or whose head was
    lost) is resumed instead, as ``resume`` would (the space, trials and overrides given are
    not used: the experiment keeps its own), so no second search writes into its folder. That
    is checked here, by ``resumable`` (the command line passes
    :func:`atp_ray.search.tuner.holds_resumable_search`; the cluster package imports nothing of
    the search), when ``out`` is readable from this machine (the local cluster, a mounted share);
    otherwise the job's ``atp-ray search`` refuses the folder and names ``resume``.
    """
    if out is not None and not is_uri(out) and resumable is not None and resumable(Path(out)):
        print(f"{out} already holds a search: resuming it (its own space and budget) instead of starting another")
        return resume_search(cluster, out, commands=commands, wait=wait), out
    root = project_root()
    space_path = Path(space).resolve()
    if not space_path.is_file():
        raise ClusterError(f"--space: no such file: {space}")
    if not space_path.is_relative_to(root):
        raise ClusterError(f"--space: {space} must lie inside the checkout {root}, which the job uploads")
    experiment = out or f"{cluster.default_experiment_root()}/{space_path.stem}-{stamp()}"
    cluster.check_shared(experiment)
    command = commands.search(str(space_path.relative_to(root)), experiment, trials, overrides)
    job_id = submit_job(cluster, command, job_name=f"search-{Path(experiment).name}", wait=wait)
    print(f"experiment: {experiment}\n  resume it:  atp-ray cluster resume {experiment} --cluster {_spec(cluster)}")
    return job_id, experiment


def resume_search(
    cluster: Cluster,
    experiment: str,
    *,
    retry_failed: bool = False,
    commands: JobCommands = JobCommands(),
    wait: bool = False,
) -> str:
    """Continue a stopped or crashed search as a new job."""
    experiment = _experiment_dir(cluster, experiment)
    cluster.check_shared(experiment)
    return submit_job(
        cluster, commands.resume(experiment, retry_failed), job_name=f"resume-{Path(experiment).name}", wait=wait
    )


def fetch_report(
    cluster: Cluster, experiment: str, to: Path | None = None, *, commands: JobCommands = JobCommands()
) -> Path:
    """Build the report on the cluster (a job), then copy EXPERIMENT/report/ here."""
    experiment = _experiment_dir(cluster, experiment)
    cluster.check_shared(experiment)
    submit_job(cluster, commands.report(experiment), job_name=f"report-{Path(experiment).name}", wait=True)
    to = to or Path("runs") / "reports" / Path(experiment).name
    cluster.fetch(f"{experiment}/report", to)
    print(f"report: {to}")
    return to


def export_model(
    cluster: Cluster, experiment: str, trial: str, out: Path, *, commands: JobCommands = JobCommands()
) -> Path:
    """Export one trial's compressed model on the cluster (a job), then copy it to ``out`` here."""
    experiment = _experiment_dir(cluster, experiment)
    cluster.check_shared(experiment)
    staging = cluster.export_staging(f"{Path(experiment).name}-{trial}")
    submit_job(
        cluster, commands.export(experiment, trial, staging), job_name=f"export-{Path(experiment).name}", wait=True
    )
    cluster.fetch(staging, out)
    print(f"model: {out}")
    return out


def _spec(cluster: Cluster) -> str:
    return str(cluster.config_path) if isinstance(cluster, CloudCluster) else f"local:{cluster.root}"


def cloud_up(config_path: str | Path, *, yes: bool = False) -> None:
    """Check everything ``ray up`` needs, make sure a token exists, then start the head."""
    ray = ray_cli()
    config = check_cluster_config(config_path, for_launch=True)
    require_cloud_credentials(config["provider"]["type"])
    env = base_env()
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # file_mounts copies ~/.ray/auth_token to every node; the job client presents the same token.
    run([ray, "get-auth-token", "--generate"], env=env)
    run(
        [ray, "up", str(Path(config_path).resolve()), *(["-y"] if yes else [])],
        env=env,
        capture=False,
        cwd=project_root(),
    )
    print(
        f"cluster {config.get('cluster_name')} is up; search on it with\n"
        f"  atp-ray cluster submit --cluster {config_path} --space search_spaces/<space>.yaml"
    )


def cloud_down(config_path: str | Path, *, yes: bool = False) -> None:
    """Tear the cluster down; experiments in shared storage stay."""
    ray = ray_cli()
    config = load_cluster_config(config_path)
    require_cloud_credentials(config.get("provider", {}).get("type", ""))
    argv = [ray, "down", str(Path(config_path).resolve()), *(["-y"] if yes else [])]
    run(argv, env=base_env(), capture=False, cwd=project_root())
