"""A small search-shaped Ray program that stands in for ``atp-ray search`` in the cluster tests.

It takes the same subcommands and arguments (search/resume/report/export), runs each trial
as a real Ray task spread over the cluster's nodes, writes each finished trial to
EXPERIMENT/trials/ at once (so a stopped job keeps what it finished) and a resumed one runs
only the trials still missing. Overrides: ``sleep_s=SECONDS`` per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import ray


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def trial(index: int, sleep_s: float) -> dict:
    time.sleep(sleep_s)
    return {
        "trial": index,
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "loss": 1.0 / (index + 1),
    }


def run_trials(out: Path) -> None:
    """Run every trial of the experiment that has no result yet."""
    spec = json.loads((out / "spec.json").read_text())
    ray.init()
    driver_node = ray.get_runtime_context().get_node_id()
    alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    job = ray.get_runtime_context().get_job_id()
    driver = {"driver_node": driver_node, "nodes": alive, "hf_token": os.environ.get("HF_TOKEN")}
    _write(out / "drivers" / f"{job}.json", driver)
    todo = [i for i in range(spec["trials"]) if not (out / "trials" / f"trial_{i}.json").exists()]
    pending = [trial.remote(i, spec["sleep_s"]) for i in todo]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        _write(out / "trials" / f"trial_{result['trial']}.json", {**result, "job": job})


def main() -> None:
    parser = argparse.ArgumentParser(prog="cluster_job")
    verbs = parser.add_subparsers(dest="verb", required=True)
    search = verbs.add_parser("search")
    search.add_argument("--space", required=True)
    search.add_argument("--out", required=True)
    search.add_argument("--trials", type=int, default=4)
    search.add_argument("overrides", nargs="*")
    resume = verbs.add_parser("resume")
    resume.add_argument("experiment")
    resume.add_argument("--retry-failed", action="store_true")
    report = verbs.add_parser("report")
    report.add_argument("experiment")
    export = verbs.add_parser("export")
    export.add_argument("experiment")
    export.add_argument("--trial", required=True)
    export.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.verb == "search":
        out = Path(args.out)
        overrides = dict(o.split("=", 1) for o in args.overrides)
        space = Path(args.space).read_text()  # read from the uploaded working dir, as the search does
        _write(
            out / "spec.json", {"space": space, "trials": args.trials, "sleep_s": float(overrides.get("sleep_s", 1))}
        )
        run_trials(out)
    elif args.verb == "resume":
        run_trials(Path(args.experiment))
    elif args.verb == "report":
        out = Path(args.experiment)
        rows = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("trial_*.json"))]
        _write(out / "report" / "report.json", {"trials": rows})
    elif args.verb == "export":
        result = json.loads((Path(args.experiment) / "trials" / f"trial_{args.trial}.json").read_text())
        _write(Path(args.out) / "model.json", result)


if __name__ == "__main__":
    main()
