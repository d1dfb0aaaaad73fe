"""One ATP run on Ray Train workers (gloo, CPU): DDP, ZeRO-2, ZeRO-3, worker loss, preflight errors.

The session's local Ray instance (tests/conftest.py) serves the module: its own temp dir, two
CPUs, stopped by the session (never `ray stop`, which would kill other Ray instances on the host).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config
from ray.train import UserCallback

from atp_ray.cluster.capacity import NodeType
from atp_ray.config import load_config
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp
from atp_ray.training.distributed import (
    CONTROLLER_POLL_ENV,
    CONTROLLER_POLL_S,
    MASK_TRACE_DIR,
    RESUMES_FILE,
    DebugHooks,
    DistributedRunError,
    check_cluster,
    preflight,
    run_distributed,
    worker_cpus,
)


@pytest.fixture(scope="module")
def ray_local(ray_local):
    """The session's Ray (tests/conftest.py), with this module's worker functions sent by value:
    Ray workers cannot import this module. (A Ray of its own, started and shut down here, used to
    end the session's Ray under the tests that ran after this module.)"""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_local
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _rows(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in folder.metrics.read_text().splitlines()]


def _trace(folder: RunFolder, rank: int) -> list[tuple[int, str]]:
    lines = (folder.root / MASK_TRACE_DIR / f"rank{rank}.jsonl").read_text().splitlines()
    return [(row["step"], row["mask"]) for row in map(json.loads, lines)]


# Measured on 2 shared, heavily loaded cores: ddp 280 s, zero2 420 s, zero3 150-260 s
# (DeepSpeed start-up dominates; an idle machine takes well under half of that).
STRATEGIES = [
    "ddp",
    pytest.param("zero2", marks=pytest.mark.slow),
    pytest.param("zero3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_workers_survive_a_failure_and_agree_on_every_mask(strategy, ray_local, tiny_model_dir, tmp_path):
    """Rank 1 dies after step 13, in the control phase; the group restarts from the step-10 checkpoint.

    Both ranks hold the same mask at every step (and the replayed steps draw the masks
    they drew before the failure); metrics.jsonl has every logged step once; the run
    folder compresses and evaluates like a one-process run's.
    """
    raw = tiny_run_config(
        tiny_model_dir,
        # The failure and the checkpoint it resumes from both fall in the control phase
        # (generator still training, mask not frozen): the hardest state to restore exactly.
        atp={"control_fraction": 0.75, "freeze_patience": 50},
        train={"steps": 20, "log_every": 5, "checkpoint_every": 5},
        distributed={"workers": 2, "strategy": strategy, "max_failures": 1},
    )
    config = load_config(raw)
    out = tmp_path / "run"
    summary = run_distributed(config, out, hooks=DebugHooks(fail_once_at_step=13, fail_rank=1, trace_masks=True))
    folder = RunFolder(out)
    assert folder.is_finished() and abs(summary["sparsity"] - 0.4) <= 0.03
    assert summary["steps"] == 20
    resumes = [json.loads(line)["step"] for line in (out / RESUMES_FILE).read_text().splitlines()]
    assert resumes == [10]  # restored from the last checkpoint before the failure, not from step 0
    rows = _rows(folder)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    phases = [r["phase"] for r in rows]
    assert phases[:2] == ["control", "control"] and phases[-1] == "frozen"  # step 15 may extend control

    traces = [_trace(folder, 0), _trace(folder, 1)]
    for trace in traces:
        # Before the failure: steps 1..13 (rank 0 may run on to its next checkpoint barrier);
        # after it: steps 11..20 again, drawing exactly the masks drawn before.
        restart = next(i for i in range(1, len(trace)) if trace[i][0] <= trace[i - 1][0])
        before, after = dict(trace[:restart]), trace[restart:]
        assert [s for s, _ in trace[:restart]] == list(range(1, restart + 1)) and restart >= 13
        assert [s for s, _ in after] == list(range(11, 21))
        assert all(before[s] == digest for s, digest in after if s in before)
    assert dict(traces[0]) == dict(traces[1])  # the same mask on both ranks at every step

    from atp_ray.compression.compress import compress_run
    from atp_ray.evaluation.eval_recipe import run_eval

    compress_run(out, tmp_path / "compressed")
    report = run_eval(str(tmp_path / "compressed"), ["domain-ppl"], max_samples=4)
    assert report["tasks"]["domain-ppl"]["samples"] > 0


class ControllerPollInterval(UserCallback):
    """Runs on Ray Train's controller: writes the poll interval that controller process sees."""

    def __init__(self, out: Path):
        self.out = out

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.out.write_text(os.environ.get(CONTROLLER_POLL_ENV, "unset"))


def test_one_worker_equals_one_process(ray_local, tiny_model_dir, tmp_path):
    """A 1-worker DDP run through Ray Train is the one-process run: same mask, same losses (100 s here).

    Its controller also polls at atp-ray's interval, not Ray's 2 s (which added seconds to every run's end),
    and its one worker trains on all the CPUs there are, not on Ray's default of one.
    """
    raw = tiny_run_config(tiny_model_dir, train={"steps": 12, "checkpoint_every": 5})
    local = run_atp(load_config(raw), tmp_path / "local")
    raw["distributed"] = {"workers": 1}
    poll = tmp_path / "controller-poll-interval"
    ray_run = run_distributed(load_config(raw), tmp_path / "ray", callbacks=[ControllerPollInterval(poll)])
    assert poll.read_text() == CONTROLLER_POLL_S
    assert ray_run["cpu_threads"] == 2  # the session's Ray has 2 CPUs; Ray's default of 1 CPU would give 1
    masks = [json.loads(RunFolder(tmp_path / name).mask.read_text()) for name in ("local", "ray")]
    assert masks[0] == masks[1]
    assert ray_run["eval_loss"] == pytest.approx(local["eval_loss"], rel=1e-5)
    for a, b in zip(_rows(RunFolder(tmp_path / "local")), _rows(RunFolder(tmp_path / "ray")), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def _zero3_lasso_worker(loop_config: dict) -> None:
    """Inside a ZeRO-3 worker: the recipe's model, known LoRA weights, the group lasso."""
    from atp_ray.pruning.losses import lora_group_lasso
    from atp_ray.runtime.process import ProcessContext
    from atp_ray.training.atp import ATPRecipe

    config = load_config(loop_config["raw"])
    recipe = ATPRecipe(config, Path(loop_config["out"]), ProcessContext.current("cpu"))
    recipe.setup()
    weights = torch.load(loop_config["weights"], weights_only=True)
    masks = recipe.space.masks_from_dict(loop_config["masks"])
    with recipe.strategy.whole_params(recipe.lora_params):  # as the recipe's LoRA step computes it
        whole = all(p.numel() == p.ds_numel for p in recipe.lora_params)
        with torch.no_grad():
            for name, param in recipe.model.named_parameters():
                if param.requires_grad:
                    param.copy_(weights[name])
        value = float(lora_group_lasso(recipe.model, recipe.space, masks))
    base_sharded = any(p.numel() == 0 for p in recipe.model.parameters() if not p.requires_grad)
    result = {"lasso": value, "lora_whole": whole, "base_sharded": base_sharded}
    (Path(loop_config["out"]) / f"lasso-rank{recipe.context.rank}.json").write_text(json.dumps(result))


@pytest.mark.slow  # measured: 90-200 s here (2 shared, loaded cores)
def test_zero3_group_lasso_equals_one_process(ray_local, tiny_model_dir, tmp_path):
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from atp_ray.pruning.losses import lora_group_lasso
    from atp_ray.pruning.structures import PruningSpace
    from atp_ray.runtime.process import ProcessContext
    from atp_ray.training.atp import ATPRecipe

    raw = tiny_run_config(tiny_model_dir, train={"steps": 2})
    local = ATPRecipe(load_config(raw), tmp_path / "local", ProcessContext.current("cpu"))
    local.setup()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B too, so every row and column counts
        for param in local.lora_params:
            param.copy_(torch.randn(param.shape, generator=gen))
    weights = {n: p.detach().clone() for n, p in local.model.named_parameters() if p.requires_grad}
    torch.save(weights, tmp_path / "weights.pt")
    space: PruningSpace = local.space
    masks = {g: (torch.rand(g.size, generator=gen) < 0.5).float() for g in space.groups}
    expected = float(lora_group_lasso(local.model, space, masks))

    raw["distributed"] = {"workers": 2, "strategy": "zero3"}
    trainer = TorchTrainer(
        _zero3_lasso_worker,
        train_loop_config={
            "raw": raw,
            "out": str(tmp_path / "zero3"),
            "weights": str(tmp_path / "weights.pt"),
            "masks": space.masks_to_dict(masks),
        },
        scaling_config=ScalingConfig(num_workers=2),
        run_config=TrainRunConfig(name="lasso", storage_path=str(tmp_path / "storage")),
    )
    trainer.fit()
    for rank in range(2):
        result = json.loads((tmp_path / "zero3" / f"lasso-rank{rank}.json").read_text())
        assert result["base_sharded"] and result["lora_whole"]
        assert result["lasso"] == pytest.approx(expected, rel=1e-6)


def _zero3_scores_worker(loop_config: dict) -> None:
    """Inside a ZeRO-3 worker: the recipe's setup scores units (prior and two-step mask) on sharded weights."""
    from atp_ray.runtime.process import ProcessContext
    from atp_ray.training.atp import ATPRecipe

    out = Path(loop_config["out"])
    for name, overrides in loop_config["runs"].items():
        recipe = ATPRecipe(load_config(loop_config["raw"], overrides), out / name, ProcessContext.current("cpu"))
        recipe.setup()
        sharded = any(p.numel() == 0 for p in recipe.model.parameters() if not p.requires_grad)
        source = recipe.source
        if source.frozen is not None:
            scored = recipe.space.masks_to_dict(source.frozen)
        else:
            scored = {k: v.tolist() for k, v in source.generator.state_dict().items() if k.startswith("prior_")}
        result = {"sharded": sharded, "scored": scored}
        torch.save(source.bench.calibration_batches(), out / f"{name}-batches-rank{recipe.context.rank}.pt")
        (out / f"{name}-rank{recipe.context.rank}.json").write_text(json.dumps(result))


@pytest.mark.slow  # measured: 200-300 s here (2 shared, loaded cores)
def test_zero3_importance_scores_equal_one_process(ray_local, tiny_model_dir, tmp_path):
    """Two-step's Taylor mask and ATP's importance prior under ZeRO-3 (base weights sharded,
    read one gathered layer at a time) equal those one process computes from rank 0's batches."""
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from peft import LoraConfig, get_peft_model

    from atp_ray.pruning.generator import PruningGenerator
    from atp_ray.pruning.importance import IMPORTANCE, importance_masks, importance_prior
    from atp_ray.pruning.structures import PruningSpace
    from atp_ray.runtime.modeling import load_model

    raw = tiny_run_config(tiny_model_dir, train={"steps": 2}, baseline={"importance": "taylor", "calibration_batches": 2})
    raw["distributed"] = {"workers": 2, "strategy": "zero3"}
    runs = {"two-step": ["method=two-step"], "prior": ["atp.importance_prior=3"]}
    trainer = TorchTrainer(
        _zero3_scores_worker,
        train_loop_config={"raw": raw, "out": str(tmp_path), "runs": runs},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=TrainRunConfig(name="scores", storage_path=str(tmp_path / "storage")),
    )
    trainer.fit()

    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    space = PruningSpace.from_config(model.config)
    batches = torch.load(tmp_path / "two-step-batches-rank0.pt", weights_only=True)
    mask = space.masks_to_dict(importance_masks(model, space, 0.4, IMPORTANCE["taylor"], batches))
    prior_batches = torch.load(tmp_path / "prior-batches-rank0.pt", weights_only=True)
    prior = importance_prior(space, IMPORTANCE["taylor"].score(model, space, prior_batches), 3.0)
    generator = PruningGenerator(space, prior=prior)
    expected_prior = {k: v for k, v in generator.state_dict().items() if k.startswith("prior_")}
    for rank in range(2):
        two_step = json.loads((tmp_path / f"two-step-rank{rank}.json").read_text())
        assert two_step["sharded"] and two_step["scored"] == mask
        with_prior = json.loads((tmp_path / f"prior-rank{rank}.json").read_text())
        assert with_prior["sharded"] and set(with_prior["scored"]) == set(expected_prior)
        for key, values in expected_prior.items():
            torch.testing.assert_close(torch.tensor(with_prior["scored"][key]), values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("distributed", "node_cpus", "expected"),
    [
        ({"workers": 1}, [2.0], 2.0),  # a laptop: the one worker trains on both cores
        ({"workers": 2}, [2.0], 1.0),
        ({"workers": 3}, [2.0], 1.0),  # more workers than CPUs: the cluster check reports it
        ({"workers": 3}, [8.0, 8.0], 4.0),  # 16 // 3 = 5 would fit one worker per node
        ({"workers": 4}, [2.0, 16.0, 16.0], 8.0),  # a small head node holds none
        ({"workers": 2, "use_gpu": True}, [16.0], 1.0),  # GPU workers compute on the GPU
        ({"workers": 1, "cpus_per_worker": 0.5}, [16.0], 0.5),  # the user's value wins
    ],
)
def test_worker_cpus_default_uses_the_cluster(tiny_model_dir, distributed, node_cpus, expected):
    config = load_config(tiny_run_config(tiny_model_dir, distributed=distributed))
    assert worker_cpus(config, node_cpus) == expected


def test_preflight_refuses_before_any_worker_starts(tiny_model_dir, tmp_path, monkeypatch):
    raw = tiny_run_config(tiny_model_dir, distributed={"workers": 2, "strategy": "zero3"})
    config = load_config(raw)
    laptop = [NodeType("laptop", {"CPU": 16.0}, 1)]
    with pytest.raises(DistributedRunError, match="a worker asks for 1 CPU, 1 GPU and no node type"):
        check_cluster(load_config({**raw, "distributed": {"workers": 2, "use_gpu": True}}), laptop, 1.0)
    with pytest.raises(DistributedRunError, match="need 2 worker slots; the cluster holds 1"):
        check_cluster(load_config({**raw, "distributed": {"workers": 2}}), [NodeType("a", {"CPU": 2.0}, 1)], 2.0)
    import atp_ray.training.distributed as distributed

    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistributedRunError, match="'zero3' needs deepspeed"):
        preflight(config, tmp_path / "run")


def test_cli_bad_distributed_input_exits_2(tiny_model_dir, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir)))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "atp_ray.cli", "train", "--config", str(config_file)),
            *("--workers", "0", "--out", str(tmp_path / "run"), "atp.sparsity", "train.steps=-3"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for problem in ("distributed.workers: input should be greater than 0", "override 'atp.sparsity'", "train.steps"):
        assert problem in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_workers_run_starts_its_own_ray_and_finishes_quietly(tiny_model_dir, tmp_path):
    """`atp-ray train --workers 1` with no cluster: a local Ray for the run, a finished run folder, and no
    warning every few seconds from Ray Train's placement-group cleaner (which needs the dashboard's State API)."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, train={"steps": 12, "checkpoint_every": 4})))
    result = subprocess.run(
        [sys.executable, "-m", "atp_ray.cli", "train", "--config", str(config_file), "--out", str(tmp_path / "run")]
        + ["--workers", "1"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="atpt-", dir="/tmp")},  # short: Ray's socket paths
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run finished" in result.stdout and RunFolder(tmp_path / "run").is_finished()
    assert "Failed to query Ray Train Controller" not in result.stderr


def test_ray_started_by_atp_ray_runs_its_workers_at_normal_priority(ray_local):
    """The session's Ray comes from init_ray: its workers must not sit at Ray's default nice 15."""
    nice = ray_local.get(ray_local.remote(lambda: os.nice(0)).remote())
    assert nice == 0
