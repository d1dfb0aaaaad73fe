"""The memory plan against what real models hold, and activation checkpointing on the tiny model.

Measured, not mocked: the bytes the autograd graph saves for backward (saved_tensors_hooks,
exact on CPU), the real model's, LoRA's, AdamW's and the generator's tensors. Tolerances
are tight enough that a forgotten factor of 2 or a left-out dimension fails.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODELS, make_tiny_model, random_masks, tiny_run_config
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.utils.checkpoint import CheckpointError
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from atp_ray.cli import main
from atp_ray.config import load_config
from atp_ray.errors import ConfigError
from atp_ray.models import DEFAULT_LORA_TARGETS
from atp_ray.pruning.generator import PruningGenerator
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import PruningSpace
from atp_ray.runtime.modeling import enable_activation_checkpointing, eval_for_backward
from atp_ray.search.space import gpu_memory_plan, load_space
from atp_ray.training.atp import run_atp
from atp_ray.training.memory_plan import (
    GIB,
    LLMPass,
    ModelShape,
    Precision,
    check_run_plan,
    fit_problems,
    heaviest_trial,
    plan_memory,
    read_model_shape,
    saved_activation_bytes,
)

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
# Left out of the plan: RoPE's cos/sin tables (2 x seq x head_dim), under 1% of what these shapes save.
ACTIVATION_TOLERANCE = 0.02

# A small decoder with every dimension distinct, so a term on the wrong one shows.
SMALL = dict(
    vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, max_position_embeddings=128, tie_word_embeddings=False,
)  # fmt: skip
SMALL_QWEN = dict(SMALL, num_key_value_heads=1)  # Qwen2: q/k/v biases
BATCH, SEQ, RANK = 2, 40, 4
TARGETS_SOME = ["q_proj", "v_proj", "down_proj"]


def small_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL_QWEN))
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def with_lora(model: torch.nn.Module, targets: list[str], dropout: float = 0.05) -> torch.nn.Module:
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=8, lora_dropout=dropout, target_modules=targets))


def measure_saved_bytes(model: torch.nn.Module, llm_pass: LLMPass) -> int:
    """Bytes of the distinct storages one masked forward saves for backward, weights and buffers left out."""
    space = PruningSpace.from_config(model.config)
    masks = random_masks(space)
    if llm_pass.masks_need_grad:  # the generator step: eval mode, gradients flow into the masks
        masks = {g: m.requires_grad_() for g, m in masks.items()}
        eval_for_backward(model)
    else:
        model.train()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (llm_pass.batch_size, llm_pass.seq_len))
    with masked(model, space, masks), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return sum(saved.values())


# (name, architecture, base dtype, a DeepSpeed-like cast of LoRA to bf16, LoRA targets, generator step)
ACTIVATION_CASES = [
    ("fp32 LoRA step", "llama", torch.float32, False, DEFAULT_LORA_TARGETS, False),
    ("fp32 generator step", "llama", torch.float32, False, DEFAULT_LORA_TARGETS, True),
    ("bf16 base, fp32 LoRA (ddp)", "llama", torch.bfloat16, False, DEFAULT_LORA_TARGETS, False),
    ("bf16 base, fp32 LoRA, generator step", "llama", torch.bfloat16, False, DEFAULT_LORA_TARGETS, True),
    ("bf16 everywhere (ZeRO engine)", "llama", torch.bfloat16, True, DEFAULT_LORA_TARGETS, False),
    ("qwen2, some targets", "qwen2", torch.float32, False, TARGETS_SOME, False),
    ("qwen2, some targets, generator step", "qwen2", torch.float32, False, TARGETS_SOME, True),
]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES])
def test_activation_term_matches_the_bytes_saved_for_backward(case, checkpointing):
    _, arch, dtype, engine_cast, targets, generator_step = case
    model = with_lora(small_model(arch).to(dtype), targets)
    if engine_cast:
        model.to(torch.bfloat16)  # what a DeepSpeed bf16 engine does to the whole model, LoRA included
    if checkpointing:
        enable_activation_checkpointing(model)
    llm_pass = LLMPass(BATCH, SEQ, lora_dropout=not generator_step, masks_need_grad=generator_step,
                       checkpointing=checkpointing)  # fmt: skip
    lora_bytes = 2 if engine_cast else 4
    precision = Precision(weights=dtype.itemsize, activations=dtype.itemsize, lora=lora_bytes)
    planned = saved_activation_bytes(ModelShape.from_config(model.config), RANK, targets, precision, llm_pass)
    measured = measure_saved_bytes(model, llm_pass)
    assert planned == pytest.approx(measured, rel=ACTIVATION_TOLERANCE)


def test_checkpointing_really_keeps_less():
    """On the small model, checkpointing keeps under a quarter of the activations (layer inputs and the loss)."""
    plain, checkpointed = (
        measure_saved_bytes(_checkpointed(with_lora(small_model("llama"), DEFAULT_LORA_TARGETS), on),
                            LLMPass(BATCH, SEQ, True, False, on))
        for on in (False, True)
    )  # fmt: skip
    assert checkpointed < plain / 4


def _checkpointed(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    if on:
        enable_activation_checkpointing(model)
    return model


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_weight_lora_and_optimizer_terms_match_the_real_tensors(name, tiny_model_dir):
    """The plan's rows for a one-process fp32 run against the model, LoRA, AdamW and generator tensors."""
    base = make_tiny_model(name)
    shape = ModelShape.from_config(base.config)
    assert shape.embedding_params == base.get_input_embeddings().weight.numel()
    assert shape.layer_params == sum(p.numel() for p in base.model.layers[0].parameters())
    targets = TARGETS_SOME if "qwen" in name else DEFAULT_LORA_TARGETS
    raw = tiny_run_config(tiny_model_dir, lora={"rank": RANK, "target_modules": targets}, atp={"generator_width": 16})
    plan = plan_memory(load_config(raw), shape)
    assert plan.component("base weights") == sum(p.nbytes for p in base.parameters())

    model = with_lora(base, targets)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert plan.component("LoRA weights") == sum(p.nbytes for p in lora)
    # One AdamW step: what the plan counts is the gradients plus the two moments.
    optimizer = torch.optim.AdamW(lora)
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    grad_bytes = sum(p.grad.nbytes for p in lora)
    moment_bytes = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
    assert plan.component("LoRA grads + AdamW") == grad_bytes + moment_bytes

    generator = PruningGenerator(shape.space, width=16)
    generator_optimizer = torch.optim.AdamW(generator.parameters())
    sum(m.sum() for m in generator().values()).backward()
    generator_optimizer.step()
    held = [*generator.parameters(), *(p.grad for p in generator.parameters())]
    held += [t for state in generator_optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert plan.component("generator + AdamW") == sum(t.nbytes for t in held)


# -- activation checkpointing in the recipe ---------------------------------------------------


def _loss_and_grads(checkpointing: bool, generator_step: bool, backward_inside: bool = True):
    model = with_lora(small_model("llama"), DEFAULT_LORA_TARGETS)
    if checkpointing:
        enable_activation_checkpointing(model)
    space = PruningSpace.from_config(model.config)
    masks = {g: m.requires_grad_(generator_step) for g, m in random_masks(space).items()}
    eval_for_backward(model) if generator_step else model.train()
    ids = torch.randint(0, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # LoRA dropout's draws
    with masked(model, space, masks):
        loss = model(input_ids=ids, labels=ids).loss
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    mask_grads = [m.grad for m in masks.values()] if generator_step else []
    return loss.detach(), lora, mask_grads


@pytest.mark.parametrize("generator_step", [False, True], ids=["lora step", "generator step"])
def test_checkpointing_gives_the_same_loss_and_gradients(generator_step):
    """LoRA step (dropout on) and generator step (eval mode, gradients into the masks), with and without it."""
    loss, lora, masks = _loss_and_grads(False, generator_step)
    loss_ck, lora_ck, masks_ck = _loss_and_grads(True, generator_step)
    assert torch.equal(loss, loss_ck)
    for name, grad in lora.items():
        torch.testing.assert_close(lora_ck[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for grad, grad_ck in zip(masks, masks_ck):
        torch.testing.assert_close(grad_ck, grad, rtol=1e-5, atol=1e-7)


def test_checkpointed_backward_outside_the_masks_is_refused():
    """Why the recipe runs backward inside ``masked``: the recomputation replays the mask hooks,
    and without them it saves other tensors than the forward did (torch checks, and refuses)."""
    with pytest.raises(CheckpointError, match="saved during recomputation"):
        _loss_and_grads(True, False, backward_inside=False)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # four short runs: about 100 s on 2 shared cores
def test_a_checkpointed_run_matches_a_plain_one_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    from atp_ray.runtime.run_folder import RunFolder

    raw = tiny_run_config(tiny_model_dir, train={"steps": 8, "checkpoint_every": 4, "log_every": 4})
    plain = run_atp(load_config(copy.deepcopy(raw), ["train.activation_checkpointing=false"]), tmp_path / "plain")
    config = load_config(copy.deepcopy(raw), ["train.activation_checkpointing=true"])
    checkpointed = run_atp(config, tmp_path / "ck")
    assert checkpointed["sparsity"] == plain["sparsity"]
    assert checkpointed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    for name, tensor in _adapter(tmp_path / "plain").items():
        torch.testing.assert_close(_adapter(tmp_path / "ck")[name], tensor, rtol=1e-4, atol=1e-6)

    save = RunFolder.save_checkpoint

    def save_then_stop(self, state):
        save(self, state)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunFolder, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_atp(config, tmp_path / "resumed")
    assert run_atp(config, tmp_path / "resumed") == checkpointed
    for name, tensor in _adapter(tmp_path / "ck").items():
        assert torch.equal(_adapter(tmp_path / "resumed")[name], tensor), name


# -- the plan where it is used ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["healthcare", "legal"])
def test_the_shipped_gpu_spaces_fit_their_gpus_and_would_not_without_their_settings(name):
    space, base = load_space(SPACES / f"{name}.yaml")  # validates the plan: no download (KNOWN_CONFIGS)
    plan, problems = gpu_memory_plan(space, base)
    assert problems == [] and plan.fits() and plan.checkpointing
    assert 8 < plan.peak_gib < space.resources.gpu_memory_gib
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing=true"):
        load_space(SPACES / f"{name}.yaml", ["train.activation_checkpointing=false"])
    if name == "healthcare":  # Llama-2-7B on 2 workers would fit with ddp too (about 20 of 22.5 GiB)
        with pytest.raises(ConfigError, match=r"set distributed\.strategy=zero3"):
            load_space(SPACES / f"{name}.yaml", ["distributed.strategy=ddp"])


def _gpu_config(model_path: str | Path, **distributed) -> dict:
    raw = tiny_run_config(model_path, train={"activation_checkpointing": False})
    raw["distributed"] = {"use_gpu": True, **distributed}
    return raw


def test_a_plan_that_cannot_fit_names_the_knobs_that_would():
    hub_model = "meta-llama/Llama-2-7b-hf"  # its shape from KNOWN_CONFIGS: nothing is downloaded
    raw = _gpu_config(hub_model, workers=2, strategy="ddp")
    raw["model"]["dtype"] = "bfloat16"
    raw["data"]["seq_len"] = 1024
    config = load_config(raw)
    shape = read_model_shape(hub_model)
    # Just below the plan's peak: each of these fixes is enough on its own.
    limit = (plan_memory(config, shape).peak_bytes - 1) / GIB
    (problem,) = fit_problems(config, shape, limit, "distributed.gpu_memory_gib")
    assert "distributed.gpu_memory_gib" in problem and "activation checkpointing off" in problem
    for fix in ("set train.activation_checkpointing=true", "set distributed.strategy=zero3",
                "lower train.batch_size and train.calibration_batch_size to 3", "more workers: 3"):  # fmt: skip
        assert fix in problem


def test_train_refuses_a_gpu_run_whose_plan_cannot_fit_before_starting(tiny_model_dir, tmp_path, capsys):
    raw = _gpu_config(tiny_model_dir, gpu_memory_gib=0.5)
    config_file = tmp_path / "gpu.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"does not fit the 0\.5 GiB of distributed\.gpu_memory_gib"):
        check_run_plan(load_config(raw))
    assert main(["train", "--config", str(config_file), "--out", str(tmp_path / "run")]) == 2
    assert "distributed.gpu_memory_gib" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_distillation_adds_the_teachers_vocabulary_sized_tensors_to_the_lora_step():
    """The teacher's logits and the KL's fp32 tensors are batch x seq x vocab each: on Llama-3-8B's
    128k vocabulary at 4 x 1024 tokens that is about 9 GiB more, which the healthcare space's
    A10G cannot hold."""
    space, base = load_space(SPACES / "healthcare.yaml")
    shape = read_model_shape(base["model"]["path"])
    config = heaviest_trial(base, {"lora.rank": [8, 16]}, shape)
    gpu = space.resources.gpu_memory_gib
    plain = plan_memory(config, shape, gpu_memory_gib=gpu)
    distilled_config = heaviest_trial({**base, "distill": {"weight": 1.0}}, {"lora.rank": [8, 16]}, shape)
    distilled = plan_memory(distilled_config, shape, gpu_memory_gib=gpu)
    tokens = config.train.batch_size * config.data.seq_len
    extra = tokens * shape.vocab_size * (2 + 5 * 4)  # bf16 teacher logits + five fp32 tensors
    assert distilled.component("activations, LoRA step") - plain.component("activations, LoRA step") == extra
    assert plain.fits() and not distilled.fits()
