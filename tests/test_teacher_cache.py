"""A fixed teacher's top-k logits computed once (atp_ray/training/teacher_cache.py) and read by the LoRA step."""

import json

import pytest
import torch
from conftest import tiny_run_config
from safetensors.torch import load_file

import atp_ray.training.atp
from atp_ray.cli import main
from atp_ray.config import load_config
from atp_ray.data.batches import BatchStream, build_splits
from atp_ray.errors import ConfigError
from atp_ray.runtime.modeling import load_tokenizer
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import build_teacher_cache, run_atp
from atp_ray.training.distillation import distillation_loss, top_logits
from atp_ray.training.teacher_cache import block_key, drawn_blocks

TOP_K = 8  # of the tiny models' 64 tokens


def _raw(model_dir, teacher: str, teacher_run=None, **distill) -> dict:
    raw = tiny_run_config(model_dir, train={"steps": 12, "log_every": 1})
    raw["distill"] = {"weight": 1.0, "temperature": 2.0, "teacher": teacher, "top_k": TOP_K, **distill}
    if teacher == "tuned":
        raw["distill"]["teacher_run"] = str(teacher_run)
    return raw


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir, tmp_path_factory):
    """A finished dense LoRA run of the tiny model: the tuned teacher's adapter."""
    out = tmp_path_factory.mktemp("teacher") / "lora"
    run_atp(load_config(tiny_run_config(tiny_model_dir, train={"steps": 6}), ["method=lora"]), out)
    return out


def test_cached_top_logits_give_the_live_top_k_loss():
    """The KL on precomputed top logits is the KL with top_k on the full logits, value and gradient."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 6, 64, generator=gen)
    labels = torch.randint(64, (2, 6), generator=gen)
    labels[0, 3] = -100
    live = distillation_loss(student, teacher, labels, 2.0, top_k=TOP_K)
    (live_grad,) = torch.autograd.grad(live, student)
    cached = distillation_loss(student, top_logits(teacher, TOP_K), labels, 2.0)
    (cached_grad,) = torch.autograd.grad(cached, student)
    assert float(cached) == float(live) and torch.equal(cached_grad, live_grad)
    full = distillation_loss(student, teacher, labels, 2.0)
    assert float(live) != pytest.approx(float(full))  # top-k is not the full KL


def test_the_cache_holds_every_block_every_rank_draws_once(tiny_model_dir):
    """Two workers, two micro-batches a step: the blocks of every rank's every micro-batch, no more, no repeats."""
    raw = tiny_run_config(tiny_model_dir, train={"steps": 5, "batch_size": 3})
    raw["distributed"] = {"workers": 2, "gradient_accumulation_steps": 2}
    config = load_config(raw)
    train = build_splits(config.data, load_tokenizer(str(tiny_model_dir)), config.train.seed).train
    blocks = drawn_blocks(config, train)
    drawn = {
        block_key(row)
        for rank in range(2)
        for index in range(10)
        for row in BatchStream(train, 3, config.train.seed, rank, 2).batch(index)["input_ids"]
    }
    keys = [block_key(row) for row in blocks["input_ids"]]
    assert len(keys) == len(set(keys)) and set(keys) == drawn
    assert 30 < len(keys) <= 60 and set(blocks) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.parametrize("teacher", ["dense", "tuned"])
def test_a_cached_teacher_trains_as_the_live_one_without_its_forward(
    tiny_model_dir, teacher_run, tmp_path, monkeypatch, teacher
):
    """A run reading the cache logs the live top-k run's losses and KL, and never runs the teacher."""
    live = run_atp(load_config(_raw(tiny_model_dir, teacher, teacher_run)), tmp_path / "live")
    cache = tmp_path / "teacher.safetensors"
    config_file = _config_file(tmp_path, _raw(tiny_model_dir, teacher, teacher_run))
    assert main(["distill-cache", "--config", str(config_file), "--out", str(cache)]) == 0
    assert {k.split(".")[1] for k in load_file(cache)} == {"values", "indices"}

    def no_teacher(*args):
        raise AssertionError("the teacher ran although its logits are cached")

    monkeypatch.setattr(atp_ray.training.atp, "teacher_logits", no_teacher)
    cached = run_atp(load_config(_raw(tiny_model_dir, teacher, teacher_run, cache=str(cache))), tmp_path / "cached")
    for a, b in zip(_rows(tmp_path / "live"), _rows(tmp_path / "cached"), strict=True):
        for key in ("loss", "distill", "group_lasso", "sparsity"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert cached["eval_loss"] == pytest.approx(live["eval_loss"], rel=1e-4)


def _config_file(tmp_path, raw: dict):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def test_a_cache_for_another_teacher_or_other_data_is_refused(tiny_model_dir, tmp_path):
    cache = tmp_path / "teacher.safetensors"
    build_teacher_cache(load_config(_raw(tiny_model_dir, "dense")), cache, progress=False)
    with pytest.raises(ConfigError, match="built for another teacher: top_k '8' \\(this run: '4'\\)"):
        run_atp(load_config(_raw(tiny_model_dir, "dense", cache=str(cache), top_k=4)), tmp_path / "k4")
    other_seed = _raw(tiny_model_dir, "dense", cache=str(cache))
    other_seed["train"]["seed"] = 1  # other splits and order: blocks the cache never saw
    with pytest.raises(ConfigError, match="lacks .* blocks: it was built for other data"):
        run_atp(load_config(other_seed), tmp_path / "seed1")
    with pytest.raises(ConfigError, match="no such file; build it with `atp-ray distill-cache`"):
        run_atp(load_config(_raw(tiny_model_dir, "dense", cache=str(tmp_path / "none"))), tmp_path / "none-run")


@pytest.mark.parametrize("distill", [{"teacher": "inplace"}, {"top_k": None}])
def test_a_cache_needs_a_fixed_teacher_and_top_k(tiny_model_dir, tmp_path, distill):
    raw = _raw(tiny_model_dir, "dense", cache=str(tmp_path / "c"))
    raw["distill"] |= distill
    with pytest.raises(ConfigError, match="cache holds a fixed teacher's top-k logits"):
        load_config(raw)
