"""Distillation (atp_ray/training/distillation.py) and its place in the LoRA step, on the tiny models."""

import contextlib
import copy
import json
import math
import shutil

import pytest
import torch
from conftest import make_tiny_model, random_masks, tiny_run_config
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_atp import _stop_after_checkpoint, assert_same_run

import atp_ray.training.atp
from atp_ray.config import DISTILL_TEACHERS, load_config
from atp_ray.data.batches import IGNORE_INDEX
from atp_ray.errors import ConfigError, RunFolderError
from atp_ray.models import DEFAULT_LORA_TARGETS
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import PruningSpace
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp
from atp_ray.training.distillation import (
    TEACHER_ADAPTER,
    TEACHERS,
    attach_tuned_teacher,
    distillation_loss,
    teacher_logits,
)


def _random_lora(seed: int):
    """A tiny peft model whose LoRA B is seeded noise, so its LoRA changes the output."""
    lora = LoraConfig(r=4, lora_dropout=0.2, target_modules=DEFAULT_LORA_TARGETS)
    peft_model = get_peft_model(make_tiny_model("llama-gqa"), lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B"):
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=gen))
    return peft_model


def _lora_model(teacher: str = "inplace", tmp_path=None):
    """A tiny peft model in train mode, with LoRA dropout and non-zero B, so LoRA changes the output.

    For the tuned teacher it also wears another seed's adapter, saved in ``tmp_path``, as the teacher;
    that adapter's own model (in eval mode) is returned third, else None.
    """
    peft_model, tuned = _random_lora(seed=1), None
    if teacher == "tuned":
        tuned = _random_lora(seed=7).eval()
        tuned.save_pretrained(tmp_path / "teacher")
        attach_tuned_teacher(peft_model, tmp_path / "teacher")
    return peft_model.train(), PruningSpace.from_config(peft_model.config), tuned


def _batch() -> dict[str, torch.Tensor]:
    """Two sequences of 10 tokens; the first three labels of the first and the last two of the second are ignored."""
    input_ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, top_k=None):
    """T^2 x mean over predicted positions of sum_v p_v (log p_v - log q_v), in Python floats, position by position."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE_INDEX:  # the logits at t predict label t + 1
                continue
            z_s = [z / temperature for z in student[b, t].tolist()]
            z_t = [z / temperature for z in teacher[b, t].tolist()]
            q = [math.exp(z) / sum(math.exp(y) for y in z_s) for z in z_s]
            support = sorted(range(len(z_t)), key=lambda v: -z_t[v])[: top_k or len(z_t)]
            mass = sum(math.exp(z_t[v]) for v in support)
            p = {v: math.exp(z_t[v]) / mass for v in support}
            total += sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in support)
            count += 1
    return temperature**2 * total / count


def _student(model, space, batch) -> torch.Tensor:
    """The masked model's logits, with a seeded LoRA dropout draw (so a second pass repeats it)."""
    torch.manual_seed(5)
    with masked(model, space, random_masks(space, seed=3, keep=0.5)):
        return model(**batch).logits


def _student_and_teacher(teacher: str = "inplace", tmp_path=None):
    model, space, tuned = _lora_model(teacher, tmp_path)
    batch = _batch()
    target = teacher_logits(model, batch, teacher)
    return model, space, batch, _student(model, space, batch), target, tuned


# -- the value --------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_value_matches_a_hand_computation(temperature):
    """The masked tiny model against its in-place teacher: the full KL and the KL on the teacher's top 5."""
    _, _, batch, student, teacher, _ = _student_and_teacher()
    labels = batch["labels"]
    full = distillation_loss(student, teacher, labels, temperature)
    assert full.item() == pytest.approx(_hand_kl(student, teacher, labels, temperature), rel=1e-4)
    assert full.item() > 0
    top5 = distillation_loss(student, teacher, labels, temperature, top_k=5)
    assert top5.item() == pytest.approx(_hand_kl(student, teacher, labels, temperature, top_k=5), rel=1e-4)
    assert distillation_loss(student, teacher, labels, temperature, top_k=64).item() == pytest.approx(full.item())


def test_value_is_zero_against_itself_and_without_targets():
    _, _, batch, student, _, _ = _student_and_teacher()
    assert float(distillation_loss(student, student, batch["labels"], 2.0)) == pytest.approx(0.0, abs=1e-6)
    no_targets = torch.full_like(batch["labels"], IGNORE_INDEX)
    assert float(distillation_loss(student, student + 1, no_targets, 2.0)) == 0.0


# -- the teacher ------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher", DISTILL_TEACHERS)
def test_teacher_adds_no_parameters_and_no_graph(teacher, tmp_path):
    """The teacher's forward leaves parameters, buffers, their requires_grad and the modules' modes as they
    were, returns logits without an autograd graph, and is the model it names: the unmasked model with
    its LoRA and no dropout (inplace), the base model without LoRA (dense), or the base model with the
    tuned run's adapter instead of the trained one (tuned)."""
    model, _, tuned = _lora_model(teacher, tmp_path)
    batch = _batch()

    def state():
        params = [(n, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()]
        return params, [n for n, _ in model.named_buffers()], [m.training for m in model.modules()]

    before = state()
    logits = teacher_logits(model, batch, teacher)
    assert state() == before
    assert logits.grad_fn is None and not logits.requires_grad

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        if teacher == "dense":
            expected = make_tiny_model("llama-gqa")(**inputs).logits  # the same seed: the same base weights
        elif teacher == "tuned":
            expected = tuned(**inputs).logits
        else:
            expected = model.eval()(**inputs).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(logits, model(**inputs).logits, atol=1e-3)  # dropout or LoRA would show


def test_teacher_names_match_the_config():
    assert set(TEACHERS) == set(DISTILL_TEACHERS)


@pytest.mark.parametrize("teacher", DISTILL_TEACHERS)
def test_gradient_reaches_lora_only_and_not_through_the_teacher(teacher, tmp_path):
    """Every trained LoRA matrix gets a gradient; no base weight and no tuned teacher's weight does; and it
    is the gradient with the teacher's logits as constants: the teacher rebuilt by hand with autograd on,
    then detached."""
    model, space, batch, student, target, tuned = _student_and_teacher(teacher, tmp_path)
    distillation_loss(student, target, batch["labels"], 2.0).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    lora = {n: g for n, g in grads.items() if "lora_" in n and ".default." in n}
    assert lora and all(g is not None for g in lora.values())
    assert sum(float(g.abs().sum()) for g in lora.values()) > 0
    assert all(g is None for n, g in grads.items() if n not in lora)
    assert (teacher == "tuned") == any(f".{TEACHER_ADAPTER}." in n for n in grads)

    model.zero_grad(set_to_none=True)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if teacher == "tuned":
        by_hand = tuned(**inputs).logits  # the teacher's run alone: its own adapter on the same base weights
    else:
        with model.disable_adapter() if teacher == "dense" else contextlib.nullcontext():
            by_hand = model(**inputs).logits
    model.train()
    assert torch.allclose(by_hand.detach(), target, atol=1e-6)
    distillation_loss(_student(model, space, batch), by_hand.detach(), batch["labels"], 2.0).backward()
    for name, param in model.named_parameters():
        if name in lora:
            assert torch.allclose(param.grad, grads[name], rtol=1e-5, atol=1e-7), name


# -- in the recipe ----------------------------------------------------------------------------
def _rows(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in folder.metrics.read_text().splitlines()]


def _distill_config(model_dir, method: str = "atp", teacher: str = "inplace", teacher_run=None, **sections) -> dict:
    raw = tiny_run_config(model_dir, **sections)
    raw["method"] = method
    raw["distill"] = {"weight": 1.0, "temperature": 2.0, "teacher": teacher}
    if teacher == "tuned":
        raw["distill"]["teacher_run"] = str(teacher_run)
    return raw


@pytest.fixture(scope="module")
def dense_lora_run(tiny_model_dir, tmp_path_factory) -> RunFolder:
    """A finished dense LoRA run of the tiny model: the tuned teacher's adapter."""
    folder = RunFolder(tmp_path_factory.mktemp("teacher") / "lora")
    run_atp(load_config(tiny_run_config(tiny_model_dir, train={"steps": 6}), ["method=lora"]), folder.root)
    return folder


@pytest.mark.parametrize("method, teacher", [("atp", "inplace"), ("two-step", "dense"), ("atp", "tuned")])
def test_run_with_distillation_resumes_exactly(tiny_model_dir, dense_lora_run, tmp_path, monkeypatch, method, teacher):
    """Both methods share the LoRA step and its distillation term; each logs it, and a run stopped after
    its first checkpoint and resumed ends bit-identical to an uninterrupted one."""
    raw = _distill_config(
        tiny_model_dir, method, teacher, dense_lora_run.root, train={"steps": 12, "checkpoint_every": 5, "log_every": 4}
    )
    reference = RunFolder(tmp_path / "reference")
    run_atp(load_config(raw), reference.root)
    rows = _rows(reference)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(r["distill"] > 0 and math.isfinite(r["distill"]) for r in rows)

    folder = RunFolder(tmp_path / "run")
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run_atp(load_config(raw), folder.root)
    assert folder.load_checkpoint()["step"] == 5
    run_atp(load_config(raw), folder.root)
    assert_same_run(folder, reference)


def test_recipe_runs_the_teacher_unmasked_and_without_autograd(tiny_model_dir, tmp_path, monkeypatch):
    """In the LoRA step the teacher sees no mask hook and records no graph; off (weight 0), it never runs
    and no distill metric is logged."""
    calls = []

    def spy(model, batch, teacher):
        assert not any(module._forward_pre_hooks for module in model.modules())  # the mask's hooks are off
        logits = teacher_logits(model, batch, teacher)
        calls.append(logits.grad_fn is None and not logits.requires_grad)
        return logits

    monkeypatch.setattr(atp_ray.training.atp, "teacher_logits", spy)
    raw = _distill_config(tiny_model_dir, train={"steps": 2, "log_every": 1})
    run_atp(load_config(raw), tmp_path / "on")
    assert calls == [True, True]
    raw["distill"]["weight"] = 0.0
    run_atp(load_config(raw), tmp_path / "off")
    assert len(calls) == 2 and not any("distill" in row for row in _rows(RunFolder(tmp_path / "off")))


def test_after_freeze_distils_only_once_the_mask_is_frozen(finished_run, dense_lora_run, tmp_path):
    """With distill.after_freeze the control phase is the plain run's, value for value (the teacher never
    runs there, and loading the tuned teacher's adapter draws nothing from the random streams), and
    every row after the freeze carries the KL."""
    raw = copy.deepcopy(finished_run.raw)
    raw["distill"] = {"weight": 1.0, "after_freeze": True, "teacher": "tuned", "teacher_run": str(dense_lora_run.root)}
    folder = RunFolder(tmp_path / "run")
    summary = run_atp(load_config(raw), folder.root)
    freeze = finished_run.summary["freeze_step"]
    assert summary["freeze_step"] == freeze and 5 < freeze < 35
    rows, plain = _rows(folder), _rows(finished_run.folder)
    control = [r for r in rows if r["step"] <= freeze]
    assert control and all("distill" not in r for r in control)
    assert [r["loss"] for r in control] == [r["loss"] for r in plain if r["step"] <= freeze]
    assert all(r["distill"] > 0 for r in rows if r["step"] > freeze + 1)
    assert rows[-1]["loss"] != plain[-1]["loss"]


def test_accumulation_and_activation_checkpointing_give_the_same_steps(tiny_model_dir, tmp_path):
    """Two micro-batches per step: with activation checkpointing (recomputed inside the mask's context,
    after the teacher's pass) the run logs the same losses and distillation as without, and under bf16
    autocast the term stays finite."""
    def run(name: str, **train) -> list[dict]:
        raw = _distill_config(tiny_model_dir, train={"steps": 3, "log_every": 1, **train})
        raw["distributed"] = {"gradient_accumulation_steps": 2}
        run_atp(load_config(raw), tmp_path / name)
        return _rows(RunFolder(tmp_path / name))

    plain = run("plain", activation_checkpointing=False)
    recomputed = run("checkpointed", activation_checkpointing=True)
    for a, b in zip(plain, recomputed, strict=True):
        for key in ("loss", "distill", "group_lasso"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert all(math.isfinite(r["distill"]) and r["distill"] > 0 for r in run("bf16", precision="bf16"))


# -- the config -------------------------------------------------------------------------------
def test_distillation_is_off_by_default(tiny_model_dir):
    distill = load_config({"model": {"path": str(tiny_model_dir)}}).distill
    assert (distill.weight, distill.temperature, distill.teacher, distill.top_k) == (0.0, 1.0, "inplace", None)


def test_bad_distillation_settings_are_reported_at_once(tiny_model_dir):
    with pytest.raises(ConfigError) as caught:
        load_config(
            {
                "model": {"path": str(tiny_model_dir)},
                "distill": {"weight": -1, "temperature": 0, "teacher": "large", "top_k": 0, "alpha": 1},
            }
        )
    message = str(caught.value)
    for expected in [
        "distill.weight: input should be greater than or equal to 0 (got -1)",
        "distill.temperature: input should be greater than 0 (got 0)",
        "distill.teacher: input should be 'inplace', 'dense' or 'tuned' (got 'large')",
        "distill.top_k: input should be greater than 0 (got 0)",
        "distill.alpha: unknown key (got 1)",
    ]:
        assert expected in message
    assert len(caught.value.problems) == 5


def test_lora_cannot_distill_from_itself(tiny_model_dir):
    raw = {"model": {"path": str(tiny_model_dir)}, "method": "lora", "distill": {"weight": 0.5}}
    with pytest.raises(ConfigError, match="distill.teacher 'inplace' is the unmasked model, which method lora"):
        load_config(raw)
    assert load_config(raw, ["distill.teacher=dense"]).distill.teacher == "dense"
    assert load_config(raw, ["distill.weight=0"]).method == "lora"


def test_tuned_teacher_run_is_checked_and_left_out_of_the_saved_adapter(
    tiny_model_dir, dense_lora_run, finished_run, tmp_path
):
    """The tuned teacher must be a finished dense LoRA run of the same model (a clear error otherwise);
    a run distilled from it saves only its own adapter, the same tensors a run without a teacher saves."""
    run = RunFolder(tmp_path / "distilled")
    run_atp(load_config(_distill_config(tiny_model_dir, "atp", "tuned", dense_lora_run.root, train={"steps": 3})), run.root)
    plain = RunFolder(tmp_path / "plain")
    run_atp(load_config(tiny_run_config(tiny_model_dir, train={"steps": 3})), plain.root)
    assert not (run.adapter / TEACHER_ADAPTER).exists()
    saved = load_file(run.adapter / "adapter_model.safetensors")
    assert saved.keys() == load_file(plain.adapter / "adapter_model.safetensors").keys()
    teacher = load_file(dense_lora_run.adapter / "adapter_model.safetensors")
    assert saved.keys() == teacher.keys() and any(not torch.equal(saved[k], teacher[k]) for k in saved)

    other_model = tmp_path / "other-model"
    shutil.copytree(dense_lora_run.root, other_model)
    moved = other_model / "config.yaml"
    moved.write_text(moved.read_text().replace(str(tiny_model_dir), "/elsewhere/model"))
    for teacher_run, message in [
        (tmp_path / "missing", "no finished run there"),
        (finished_run.folder.root, "a method=atp run; the tuned teacher is a dense LoRA run"),
        (other_model, "tuned '/elsewhere/model', but this run trains"),
    ]:
        raw = _distill_config(tiny_model_dir, "atp", "tuned", teacher_run, train={"steps": 3})
        with pytest.raises(RunFolderError, match=message):
            run_atp(load_config(raw), tmp_path / f"bad-{teacher_run.name}")


def test_tuned_teacher_needs_its_run_and_the_ddp_strategy(tiny_model_dir, dense_lora_run):
    def raw():  # fresh each time: overrides are applied in place
        return {"model": {"path": str(tiny_model_dir)}, "distill": {"weight": 0.5, "teacher": "tuned"}}

    with pytest.raises(ConfigError, match="distill: value error, teacher 'tuned' needs teacher_run"):
        load_config(raw())
    with pytest.raises(ConfigError, match=r"teacher_run is read by teacher 'tuned' only \(got teacher 'inplace'\)"):
        load_config(raw(), ["distill.teacher=inplace", f"distill.teacher_run={dense_lora_run.root}"])
    tuned = load_config(raw(), [f"distill.teacher_run={dense_lora_run.root}"])
    assert tuned.distill.teacher_run == str(dense_lora_run.root.resolve())
    with pytest.raises(ConfigError, match="distill.teacher 'tuned' runs with distributed.strategy ddp only"):
        load_config(raw(), [f"distill.teacher_run={dense_lora_run.root}", "distributed.strategy=zero2", "distributed.workers=2"])


@pytest.mark.slow  # Ray Train + DeepSpeed start-up: minutes on 2 shared cores
def test_dense_teacher_under_zero3_matches_one_process(ray_local, tiny_model_dir, tmp_path):
    """One ZeRO-3 worker (base weights partitioned, gathered by the engine's hooks in every forward): the
    teacher's pass with LoRA disabled runs, and the first step's loss and distillation equal the one-process
    run's; the later steps stay close."""
    from atp_ray.training.distributed import run_distributed

    raw = _distill_config(tiny_model_dir, teacher="dense", train={"steps": 4, "log_every": 1, "checkpoint_every": 100})
    run_atp(load_config(raw), tmp_path / "local")
    raw["distributed"] = {"workers": 1, "strategy": "zero3"}
    run_distributed(load_config(raw), tmp_path / "zero3")
    local, zero3 = _rows(RunFolder(tmp_path / "local")), _rows(RunFolder(tmp_path / "zero3"))
    assert [r["step"] for r in zero3] == [1, 2, 3, 4]
    for key in ("loss", "distill"):
        assert zero3[0][key] == pytest.approx(local[0][key], rel=1e-5), key
        assert [r[key] for r in zero3] == pytest.approx([r[key] for r in local], rel=1e-3), key
