"""Tiny random decoders of every supported shape, built locally (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from atp_ray.config import DataConfig, load_config
from atp_ray.data.batches import BatchStream, build_splits
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

# name -> (model class, config class, extra config); "gqa" variants share KV heads.
TINY_MODELS = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha-bias": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    ),
    "mistral-gqa": (MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-gqa": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)),
    "qwen2-mha": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=4)),
}


# -- a tiny character-level tokenizer that fits the tiny models' vocabulary of 64 --------------

TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'-()\n"
TINY_SPECIALS = ["<pad>", "<eos>", "<unk>"]
# Each turn is "role: content<eos>"; the generation prompt is "assistant: ".
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def make_tiny_tokenizer(chat_template: bool = False):
    """One token per (lower-cased) character; ids < 64 so the tiny models can read them."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + list(TINY_CHARS))}
    # BPE without merges and without a pre-tokenizer splits a text into single characters.
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_chat_tokenizer():
    return make_tiny_tokenizer(chat_template=True)


@pytest.fixture
def tiny_chat_model_dir(tmp_path):
    """A local transformers folder: the tiny GQA Llama with the tiny chat tokenizer."""
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama-gqa").save_pretrained(folder)
    make_tiny_tokenizer(chat_template=True).save_pretrained(folder)
    return folder


def make_tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised causal LM in fp32 eval mode."""
    model_cls, config_cls, extra = TINY_MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra})
    model = model_cls(config).eval()
    # Random init leaves biases at zero; perturb them so bias slicing is really tested.
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if name_.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request) -> torch.nn.Module:
    return make_tiny_model(request.param)


def random_masks(space, seed: int = 0, keep: float = 0.6):
    """A random hard mask that keeps at least one unit per group."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for group in space.groups:
        m = (torch.rand(group.size, generator=gen) < keep).float()
        m[torch.randint(group.size, (1,), generator=gen)] = 1.0
        masks[group] = m
    return masks


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (GQA) with the character tokenizer: a complete local model folder, shared by a session."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama-gqa").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """The tiny Llama after 300 AdamW steps on the HPO text (loss 4.2 -> 2.0; ~10 s on one core).

    A random model's loss hardly depends on which units it keeps; this one's does, so its
    task loss pushes back against pruning the way a real model's does.
    """
    folder = tmp_path_factory.mktemp("trained-tiny")
    model, tokenizer = make_tiny_model("llama-gqa").train(), make_tiny_tokenizer()
    blocks = build_splits(DataConfig(source="builtin:hpo", seq_len=32, max_documents=600), tokenizer, 0).train
    stream = BatchStream(blocks, 16, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(300):
        loss = model(**stream.batch(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 2.5
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_run_config(model_dir, **sections) -> dict:
    """A raw run config for a fast ATP run on the tiny model; ``sections`` update its parts."""
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"source": "builtin:hpo", "seq_len": 32, "max_documents": 600},
        "lora": {"rank": 4, "alpha": 8},
        "atp": {"sparsity": 0.4, "generator_lr": 0.02, "freeze_patience": 5},
        "train": {"steps": 40, "batch_size": 4, "calibration_batch_size": 4, "lr": 1e-3, "log_every": 5, "checkpoint_every": 10},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session, in its own short temp dir.

    Started here and shut down here only (never `ray stop`: the machine may run other Ray
    instances). Imported lazily so that tests without Ray never pay for it.
    """
    import shutil
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="atpray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    # Workers unpickle trainables defined in test modules, which pytest imports by bare name
    # from this folder: put it (and the repository) on their path.
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(filter(None, [str(here), str(here.parent), os.environ.get("PYTHONPATH")]))
    from atp_ray.training.distributed import init_ray

    init_ray(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
def reference_run_config(model_dir) -> dict:
    """The tiny run config whose generator holds the target long enough to freeze early.

    With this seed the generator's noise-free mask reaches 0.40 sparsity at step 20 and
    holds it, and the mask freezes at step 26, inside the 30-step control phase; checkpoints
    at steps 10 (control) and 30 (frozen) sit on both sides of the freeze.
    """
    return tiny_run_config(model_dir, atp={"control_fraction": 0.75, "freeze_patience": 3})


@dataclass
class FinishedRun:
    raw: dict
    folder: RunFolder
    summary: dict
    checkpoints: dict[int, dict]  # step -> the contents of checkpoint.pt as the run wrote it


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, tmp_path_factory) -> FinishedRun:
    """One uninterrupted ATP run of ``reference_run_config``, shared by a session; its checkpoints are kept."""
    raw = reference_run_config(tiny_model_dir)
    folder = RunFolder(tmp_path_factory.mktemp("reference") / "run")
    checkpoints: dict[int, dict] = {}
    save = RunFolder.save_checkpoint

    def save_and_keep(self, state):
        save(self, state)
        loaded = self.load_checkpoint()
        checkpoints[loaded["step"]] = loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunFolder, "save_checkpoint", save_and_keep)
        summary = run_atp(load_config(raw), folder.root)
    return FinishedRun(raw, folder, summary, checkpoints)
