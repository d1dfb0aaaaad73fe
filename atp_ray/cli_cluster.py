"""``atp-ray cluster VERB``: the command line of :mod:`atp_ray.cluster`, registered by ``atp-ray``'s own."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from atp_ray.cluster.clusters import DEFAULT_LOCAL_ROOT, open_cluster
from atp_ray.cluster.local import MAX_LOCAL_ROOT_CHARS, local_down, local_up
from atp_ray.cluster.verbs import cloud_down, cloud_up, export_model, fetch_report, resume_search, submit_search


def _holds_resumable_search(out: Path) -> bool:
    # Imported here: the search brings torch and Ray, which `atp-ray --help` should not wait for.
    from atp_ray.search.tuner import holds_resumable_search

    return holds_resumable_search(out)


# One handler per verb; ``atp-ray``'s main calls ``args.handler(args)``.
_HANDLERS = {
    "up": lambda a: cloud_up(a.cluster, yes=a.yes),
    "down": lambda a: cloud_down(a.cluster, yes=a.yes),
    "local-up": lambda a: local_up(
        a.root, cpus_per_node=a.cpus_per_node, worker_gpus=a.worker_gpus, max_workers=a.max_workers
    ),
    "local-down": lambda a: local_down(a.root),
    "submit": lambda a: submit_search(
        open_cluster(a.cluster),
        a.space,
        out=a.out,
        trials=a.trials,
        overrides=a.overrides,
        wait=a.wait,
        resumable=_holds_resumable_search,
    ),
    "resume": lambda a: resume_search(open_cluster(a.cluster), a.experiment, retry_failed=a.retry_failed, wait=a.wait),
    "report": lambda a: fetch_report(open_cluster(a.cluster), a.experiment, Path(a.to) if a.to else None),
    "export": lambda a: export_model(open_cluster(a.cluster), a.experiment, a.trial, Path(a.out)),
}


def add_cluster_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``atp-ray cluster VERB ...`` with the main command."""
    parser = commands.add_parser("cluster", help="run searches on a Ray cluster (cloud or this machine)")
    parser.set_defaults(handler=lambda args: _HANDLERS[args.verb](args))
    verbs = parser.add_subparsers(dest="verb", required=True)
    target = dict(
        default="cluster.yaml", help="cluster YAML (default cluster.yaml), or local[:ROOT] for the local cluster"
    )

    for verb, text in (("up", "start the cloud cluster (ray up)"), ("down", "tear the cloud cluster down (ray down)")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument(
            "--cluster", default="cluster.yaml", help="cluster YAML (default cluster.yaml; GCP: launch/gcp.yaml)"
        )
        p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    p = verbs.add_parser("submit", help="submit a search as a Ray job and print how to follow it")
    p.add_argument("--cluster", **target)
    p.add_argument(
        "--space", required=True, help="search space YAML inside this checkout (e.g. search_spaces/demo.yaml)"
    )
    p.add_argument("--out", help="experiment dir (default: <storage>/experiments/<space>-<time>)")
    p.add_argument("--trials", type=int, help="number of trials")
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides passed to atp-ray search")

    p = verbs.add_parser("resume", help="continue a stopped or crashed search as a new job")
    p.add_argument("experiment", help="experiment dir/URI, or its name under <storage>/experiments")
    p.add_argument("--cluster", **target)
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    p.add_argument("--wait", action="store_true", help="block until the job ends")

    p = verbs.add_parser("report", help="build a search's report on the cluster and copy it here")
    p.add_argument("experiment", help="experiment dir/URI, or its name under <storage>/experiments")
    p.add_argument("--cluster", **target)
    p.add_argument("--to", help="local folder (default runs/reports/<experiment name>)")

    p = verbs.add_parser("export", help="export one trial's compressed model and copy it here")
    p.add_argument("experiment", help="experiment dir/URI, or its name under <storage>/experiments")
    p.add_argument("--cluster", **target)
    p.add_argument("--trial", required=True, help="trial id (from the report)")
    p.add_argument("--out", required=True, help="local folder for the model")

    root_help = (
        f"state and temp dir of the local cluster, at most {MAX_LOCAL_ROOT_CHARS} characters "
        f"(default {DEFAULT_LOCAL_ROOT})"
    )
    p = verbs.add_parser("local-up", help="start an autoscaling Ray cluster on this machine")
    p.add_argument("--root", default=os.environ.get("ATP_RAY_LOCAL_CLUSTER", DEFAULT_LOCAL_ROOT), help=root_help)
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each worker node offers (default 2)")
    p.add_argument(
        "--worker-gpus", type=int, default=0, help="GPUs each worker node offers (default 0; the head has none)"
    )
    p.add_argument("--max-workers", type=int, default=2, help="worker nodes the autoscaler may start (default 2)")
    p = verbs.add_parser("local-down", help="stop the local cluster's nodes by their pids")
    p.add_argument("--root", default=os.environ.get("ATP_RAY_LOCAL_CLUSTER", DEFAULT_LOCAL_ROOT), help=root_help)
