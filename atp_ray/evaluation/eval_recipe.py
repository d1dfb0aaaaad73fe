"""The evaluation recipe behind ``atp-ray eval``, top to bottom.

resolve task specs (bad names fail before a model loads) -> load the model, run or
compressed folder -> prepare every task's data (bad data fails before any scoring) ->
score each task under the model's mask -> a report (JSON-ready dict) and its table.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import ValidationError

from atp_ray.config import DataConfig
from atp_ray.errors import ConfigError
from atp_ray.evaluation.targets import load_target
from atp_ray.evaluation.tasks import TaskContext, resolve_tasks


def domain_data(domain: str | None) -> DataConfig | None:
    """The data config of a ``--domain`` source (plain text in its ``text`` column), if one is given."""
    if domain is None:
        return None
    try:
        return DataConfig(source=domain)
    except ValidationError as err:
        raise ConfigError([f"--domain: {e['msg']} (got {domain!r})" for e in err.errors()]) from None


def run_eval(
    model_path: str,
    task_specs: list[str],
    max_samples: int | None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    domain: str | None = None,
    sparsity: float | None = None,
) -> dict[str, Any]:
    """Score a model, run folder or compressed folder on some tasks; returns the report.

    ``sparsity`` picks the budget of an elastic run folder.
    """
    builders = resolve_tasks(task_specs)
    domain_config = domain_data(domain)
    target = load_target(model_path, dtype, sparsity).to(torch.device(device))
    context = TaskContext(
        tokenizer=target.tokenizer,
        max_length=target.model.config.max_position_embeddings,  # every supported architecture declares it
        max_samples=max_samples,
        batch_size=batch_size,
        data=domain_config or target.data,
        seed=target.seed,
    )
    tasks = [build(context) for build in builders]
    results = {}
    with target.active() as model:
        for task in tasks:
            start = time.perf_counter()
            score = task.score(model)
            results[task.name] = {
                "metric": task.metric,
                "values": score.values,
                "samples": score.samples,
                "seconds": round(time.perf_counter() - start, 2),
            }
    return {
        "model": model_path,
        "kind": target.kind,
        "parameters": target.parameters,
        "disk_bytes": target.disk_bytes,
        "settings": {"max_samples": max_samples, "dtype": dtype, "device": device, "seed": target.seed},
        "tasks": results,
    }


def _size(n_bytes: int | None) -> str:
    return "unknown" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """A readable table of a report: one row per metric value."""
    lines = [
        f"model: {report['model']} ({report['kind']})",
        f"parameters: {report['parameters']:,}   size on disk: {_size(report['disk_bytes'])}",
        f"{'task':<18}{'metric':<16}{'value':>12}{'samples':>9}{'seconds':>9}",
    ]
    for name, result in report["tasks"].items():
        for metric, value in result["values"].items():
            shown = f"{value:>12,}" if isinstance(value, int) else f"{value:>12.4f}"
            lines.append(f"{name:<18}{metric:<16}{shown}{result['samples']:>9}{result['seconds']:>9.1f}")
    return "\n".join(lines)
