"""The same ATP recipe on two processes (torch.distributed, gloo) and on one."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_run_config
from safetensors.torch import load_file
from torch import nn

from atp_ray.config import load_config
from atp_ray.data.batches import BatchStream, TokenBlocks
from atp_ray.runtime.process import ProcessContext
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_recording_masks(raw: dict, run_dir: str, context: ProcessContext | None = None) -> tuple[dict, list]:
    """Run ATP and record, per layer, the MLP channels cut in each forward (repeats in a row merged).

    A cut channel reaches down_proj as exactly zero (the mask scales its input), so this reads
    the mask each forward really used: in generator steps, LoRA steps and the final evaluation
    (whose batch count depends on the batch size, hence the merged repeats).
    """
    layer_of: dict[int, int] = {}
    cut: list[list[list[int]]] = []

    def record(module: nn.Module, args, output) -> None:
        if type(module) is nn.Linear and module.in_features == 48 and module.out_features == 32:  # tiny down_proj
            layer = layer_of.setdefault(id(module), len(layer_of))
            if layer == len(cut):
                cut.append([])
            channels = (~(args[0] != 0).flatten(0, -2).any(0)).nonzero().flatten().tolist()
            if not cut[layer] or cut[layer][-1] != channels:
                cut[layer].append(channels)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary = run_atp(load_config(raw), run_dir, context)
    finally:
        handle.remove()
    return summary, cut


def _worker(rank: int, world_size: int, port: int, raw: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        context = ProcessContext.current("cpu")
        summary, cut = _run_recording_masks(raw, f"{out}/run", context)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"rank": context.rank, "world": context.world_size, "summary": summary, "cut": cut}, f)
    finally:
        dist.destroy_process_group()


def test_batch_stream_shards_one_global_batch():
    """Two ranks of batch 2 see, together and in order, the batch of one process of batch 4, across epochs."""
    blocks = TokenBlocks(torch.arange(10)[:, None], torch.ones(10, 1, dtype=torch.long), torch.arange(10)[:, None])
    whole = BatchStream(blocks, 4, seed=5)
    halves = [BatchStream(blocks, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for step in range(6):  # 24 positions: the third epoch of 10 blocks included
        together = torch.cat([h.batch(step)["input_ids"] for h in halves])
        assert torch.equal(together, whole.batch(step)["input_ids"])


def _flat(summary: dict, prefix: str = "") -> dict:
    """A summary's numbers, an elastic run's per-budget ones under ``budgets/<key>/``."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}/")
        elif isinstance(value, list):
            flat |= {f"{prefix}{key}/{i}": v for i, v in enumerate(value)}
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize(
    "atp",
    [{}, {"sparsity": [0.2, 0.4]}, {"protect_loss_increase": 0.001}, {"sparsity_control": "schedule"}],
    ids=["single", "elastic", "protected", "schedule"],
)
def test_two_processes_equal_one_process_on_the_same_global_batch(tiny_model_dir, tmp_path, atp):
    """2 ranks x batch 2 against 1 rank x batch 4: every forward on both ranks uses the same mask,
    and the run ends where one process ends (same mask, same weights within float tolerance).
    An elastic run too: every rank draws the same budget each step and freezes the same masks.
    And a run with protected units: every rank keeps rank 0's (each screens its own shard). And
    a run on the schedule: every rank shifts its masks by the same offset."""
    def config(batch: int) -> dict:
        # LoRA dropout draws from the global RNG per example: one process and two would draw differently.
        return tiny_run_config(
            tiny_model_dir,
            atp=atp,
            lora={"dropout": 0.0},
            train={"steps": 12, "checkpoint_every": 5, "batch_size": batch, "calibration_batch_size": batch},
        )

    mp.spawn(_worker, args=(2, _free_port(), config(2), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["cut"] == ranks[1]["cut"]  # per forward, generator steps included
    assert len(ranks[0]["cut"]) == 2 and all(len(masks) > 5 for masks in ranks[0]["cut"])  # masks changed step to step
    assert ranks[0]["summary"] == ranks[1]["summary"]
    two = RunFolder(tmp_path / "run")
    assert two.is_finished()

    one = RunFolder(tmp_path / "one")
    summary, cut = _run_recording_masks(config(4), str(one.root))
    assert cut == ranks[0]["cut"]
    assert json.loads(one.mask.read_text()) == json.loads(two.mask.read_text())
    assert (summary.pop("world_size"), ranks[0]["summary"].pop("world_size")) == (1, 2)
    assert _flat(summary) == pytest.approx(_flat(ranks[0]["summary"]), rel=1e-5)
    # Rounding differs (two half sums vs one sum). Adam turns a gradient that is pure rounding
    # noise (the generator attention's key bias, which softmax ignores) into lr-sized steps,
    # so the generator is compared as one vector, with a looser bound than the adapter's tensors.
    mine, theirs = load_file(one.root / "adapter/adapter_model.safetensors"), load_file(two.root / "adapter/adapter_model.safetensors")
    for key, tensor in mine.items():
        assert (theirs[key] - tensor).norm() <= 1e-4 * tensor.norm(), key
    mine, theirs = load_file(one.root / "generator.safetensors"), load_file(two.root / "generator.safetensors")
    if "protect_loss_increase" in atp:  # the screen kept some units out of reach of the generator
        assert any(v.any() for k, v in theirs.items() if k.startswith("protected_"))
    flat = lambda weights: torch.cat([weights[k].flatten() for k in sorted(weights)])  # noqa: E731
    assert (flat(theirs) - flat(mine)).norm() <= 1e-2 * flat(mine).norm()
