"""GPU paths: CUDA, NCCL, bf16 and DeepSpeed ZeRO on a real GPU; skipped where torch sees none.

Run on a machine with one or more GPUs, one strategy per process (DeepSpeed keeps its view of
the first process group): ``scripts/test.sh -m gpu -k "not nccl"``, then ``-k "nccl and ddp"``,
``-k zero2`` and ``-k zero3``. Each strategy test builds a one-process NCCL group with the
environment a launcher sets (what a Ray Train worker holds), runs the ATP recipe through the
strategy the config names, then compresses the run folder.
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_run_config

from atp_ray.compression.compress import compress_run, load_compressed
from atp_ray.config import load_config
from atp_ray.runtime.process import ProcessContext
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import _autocast, run_atp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def text_file(tmp_path):
    """Local text rows (no package corpora needed on a bare GPU machine)."""
    path = tmp_path / "rows.jsonl"
    parts = ["head", "chest", "knee", "hand", "back", "eye"]
    rows = [{"text": f"case {i}: pain in the {parts[i % 6]}, mild fever for {i % 9 + 1} days."} for i in range(400)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def nccl_group(monkeypatch):
    """A one-process NCCL group with the environment a launcher (Ray Train, torchrun) sets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for key, value in {**launcher, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _gpu_config(model_dir, text_file, checkpoint_every=8, **distributed):
    raw = tiny_run_config(
        model_dir,
        data={"source": f"file:{text_file}", "max_documents": None},
        train={"steps": 16, "device": "cuda", "precision": "auto", "checkpoint_every": checkpoint_every},
    )
    if distributed:
        raw["distributed"] = distributed
    return load_config(raw)


def test_auto_precision_is_bf16_autocast_on_the_gpu():
    device = torch.device("cuda")
    with _autocast("auto", device):
        product = torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
    assert product.dtype == torch.bfloat16


def test_one_process_run_on_the_gpu_compresses(tiny_model_dir, text_file, tmp_path):
    summary = run_atp(_gpu_config(tiny_model_dir, text_file), tmp_path / "run")
    assert math.isfinite(summary["eval_loss"]) and abs(summary["sparsity"] - 0.4) <= 0.05
    record = compress_run(tmp_path / "run", tmp_path / "small")
    model = load_compressed(tmp_path / "small").to("cuda")
    ids = torch.randint(3, 50, (2, 12), device="cuda")
    assert torch.isfinite(model(ids).logits).all()
    assert record.params < record.dense_params


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_strategy_on_one_gpu_with_nccl(strategy, nccl_group, tiny_model_dir, text_file, tmp_path):
    # ZeRO checkpoints are sharded and go through Ray Train's storage (not started here): none mid-run.
    config = _gpu_config(tiny_model_dir, text_file, checkpoint_every=100, workers=1, strategy=strategy, use_gpu=True)
    context = ProcessContext.current("cuda")
    assert context.device.type == "cuda" and dist.get_backend() == "nccl"
    summary = run_atp(config, tmp_path / "run", context)
    assert RunFolder(tmp_path / "run").is_finished()
    assert math.isfinite(summary["eval_loss"]) and abs(summary["sparsity"] - 0.4) <= 0.05
    compress_run(tmp_path / "run", tmp_path / "small")
    assert load_compressed(tmp_path / "small") is not None
