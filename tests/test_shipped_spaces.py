"""Every shipped search space runs end to end to a report: a file that cannot start fails here.

Each space keeps its own knobs, objectives, sampler, seeded points and early stopping; only the
model, the data, the GPU fields and the length of a run are made tiny (2 trials of 4 steps on
the tiny model, on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from atp_ray.cli import main
from atp_ray.search.space import load_space

SPACES = Path(__file__).parents[1] / "search_spaces"
SHIPPED = sorted(p.stem for p in SPACES.glob("*.yaml"))


def tiny_cpu_space(name: str, model_dir: Path, out: Path) -> Path:
    """The shipped space ``name`` with the tiny CPU model, data, devices and run length."""
    space = yaml.safe_load((SPACES / f"{name}.yaml").read_text())
    base = space["base"]
    if isinstance(base, str):  # a run config file, relative to the space
        base = yaml.safe_load((SPACES / base).read_text())
    base["model"] = {"path": str(model_dir), "dtype": "float32"}
    base["data"] = {"source": "builtin:hpo", "seq_len": 32, "max_documents": 200}
    base.setdefault("train", {}).update(
        steps=4, warmup_steps=0, log_every=2, eval_every=2, checkpoint_every=2, precision="fp32", device="cpu"
    )
    base.pop("distributed", None)  # ZeRO shards over GPUs; one CPU process per trial here
    space["base"] = base
    space["overrides"] = {k: v for k, v in space.get("overrides", {}).items() if not k.startswith(("train.", "data."))}
    space["trials"] = 2
    if space.get("resources", {}).get("gpus_per_worker", 0) > 0:  # a GPU space: one CPU process per trial
        space["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}  # no GPU memory to plan
        space["concurrency"] = 2
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_the_shipped_spaces_are_the_ones_run_here():
    assert {"demo", "healthcare", "legal"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_space_runs_to_a_report(name, ray_local, tiny_model_dir, tmp_path):
    path = tiny_cpu_space(name, tiny_model_dir, tmp_path)
    shipped, _ = load_space(SPACES / f"{name}.yaml")
    tiny, _ = load_space(path)
    # what the user searches is unchanged: knobs, objectives, sampler, points, early stopping
    for field in ("knobs", "objectives", "sampler", "points_to_evaluate", "early_stopping"):
        assert getattr(tiny, field) == getattr(shipped, field), field

    out = tmp_path / "exp"
    assert main(["search", "--space", str(path), "--out", str(out)]) == 0
    table = pd.read_csv(out / "report" / "trials.csv")
    assert len(table) == 2 and set(table.status) <= {"COMPLETED", "STOPPED"}, table.failure_reason.tolist()
    assert (table.status == "COMPLETED").any()
    for objective in shipped.objective_list():  # every objective of the space was measured
        assert table.loc[table.status == "COMPLETED", f"obj.{objective.name}"].notna().all(), objective.name
    front = pd.read_csv(out / "report" / "front.csv")
    assert len(front) >= 1 and (out / "report" / "report.html").is_file()
