"""Compression: the compressed model computes what the masked, LoRA-merged model computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, TINY_MODELS, make_tiny_model, make_tiny_tokenizer, random_masks
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import atp_ray
from atp_ray.cli import main
from atp_ray.compression.compress import (
    COMPRESSION_FILE,
    compress_model,
    count_params,
    is_compressed,
    load_compressed,
    read_record,
    save_compressed,
)
from atp_ray.compression.surgery import HeadlessAttention
from atp_ray.errors import CompressionError
from atp_ray.models import DEFAULT_LORA_TARGETS
from atp_ray.pruning.masking import masked
from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.runtime.modeling import load_model, load_run_model
from atp_ray.runtime.run_folder import RunFolder

def build_run(root: Path, name: str, masks_for=lambda space: random_masks(space, seed=3, keep=0.5)) -> Path:
    """A finished-looking run folder: base model on disk, a non-trivial LoRA adapter, a mask."""
    model = make_tiny_model(name)
    base = root / "base"
    model.save_pretrained(base)
    make_tiny_tokenizer().save_pretrained(base)
    run = RunFolder(root / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"model": {"path": str(base), "dtype": "float32"}}))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=DEFAULT_LORA_TARGETS))
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.2)  # peft starts B at zero; the merge must change the weights
    peft_model.save_pretrained(run.adapter)
    space = PruningSpace.from_config(model.config)
    run.write_mask(space, masks_for(space))
    return run.root


def input_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(7))


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-4 * scale


@torch.no_grad()
def masked_logits(model, space, masks, ids) -> torch.Tensor:
    with masked(model, space, masks):
        return model(ids).logits


def compressed_copy(model, space, masks):
    copy_ = copy.deepcopy(model)
    record = compress_model(copy_, space, masks, source_model="tiny")
    return copy_, record


# -- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_compressed_logits_equal_masked_merged_model(tmp_path, name):
    model, space, masks = load_run_model(build_run(tmp_path, name))
    ids = input_ids()
    expected = masked_logits(model, space, masks, ids)
    small, _ = compressed_copy(model, space, masks)
    with torch.no_grad():
        assert_close_logits(small(ids).logits, expected)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_param_count_is_exact(name, seed):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    masks = random_masks(space, seed=seed, keep=0.5)
    small, record = compressed_copy(model, space, masks)
    non_prunable = count_params(model) - space.prunable_params
    assert count_params(small) == record.params == non_prunable + int(space.kept_params(masks))
    assert record.sparsity == pytest.approx(space.sparsity(masks))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_layers_get_one_query_group_size_each(name):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    masks = random_masks(space, seed=2, keep=0.5)
    small, record = compressed_copy(model, space, masks)
    for layer, widths in zip(small.model.layers, record.layers):
        attn = layer.self_attn
        assert attn.num_key_value_groups == widths.queries_per_group
        assert attn.q_proj.out_features == widths.query_heads * attn.head_dim
        assert attn.k_proj.out_features == widths.kv_heads * attn.head_dim
        assert attn.head_dim == model.model.layers[0].self_attn.head_dim
        assert attn.scaling == model.model.layers[0].self_attn.scaling
        assert layer.mlp.down_proj.in_features == widths.mlp_channels


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mha"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_cache_matches_masked_model(name, cache):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    masks = random_masks(space, seed=4, keep=0.5)
    ids = input_ids(batch=1)
    with torch.no_grad(), masked(model, space, masks):
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    small, _ = compressed_copy(model, space, masks)
    tokens = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, cache_implementation=cache)
    assert torch.equal(tokens, expected)


# -- save and load --------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, tiny_model):
    space = PruningSpace.from_config(tiny_model.config)
    masks = random_masks(space, seed=5, keep=0.5)
    small, record = compressed_copy(tiny_model, space, masks)
    out = save_compressed(small, make_tiny_tokenizer(), record, tmp_path / "small")
    loaded = atp_ray.load_compressed(out)
    assert type(loaded) is type(tiny_model)
    assert read_record(out) == record
    assert is_compressed(out) and not is_compressed(tmp_path)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small(ids).logits)
    assert count_params(loaded) == record.params
    again = save_compressed(loaded, None, read_record(out), tmp_path / "again")
    assert torch.equal(load_compressed(again)(ids).logits, loaded(ids).logits)


def test_round_trip_keeps_tied_embeddings(tmp_path):
    model = make_tiny_model("llama-gqa")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    space = PruningSpace.from_config(model.config)
    small, record = compressed_copy(model, space, random_masks(space, seed=6))
    loaded = load_compressed(save_compressed(small, None, record, tmp_path / "small"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(input_ids()).logits, small(input_ids()).logits)


def test_load_casts_dtype(tmp_path):
    model = make_tiny_model("qwen2-gqa")
    space = PruningSpace.from_config(model.config)
    small, record = compressed_copy(model, space, random_masks(space))
    loaded = load_compressed(save_compressed(small, None, record, tmp_path / "small"), dtype="bfloat16")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_plain_from_pretrained_refuses_compressed_folder(tmp_path):
    """docs/compression.md says transformers alone cannot load the folder; keep that true."""
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    small, record = compressed_copy(model, space, random_masks(space, seed=1, keep=0.5))
    out = save_compressed(small, None, record, tmp_path / "small")
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(out)


def saved_tiny(tmp_path: Path) -> Path:
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    small, record = compressed_copy(model, space, random_masks(space, seed=1, keep=0.5))
    return save_compressed(small, None, record, tmp_path / "small")


def edit_record(out: Path, edit) -> None:
    data = json.loads((out / COMPRESSION_FILE).read_text())
    edit(data)
    (out / COMPRESSION_FILE).write_text(json.dumps(data))


def test_load_rejects_plain_folder(tmp_path):
    make_tiny_model("llama-gqa").save_pretrained(tmp_path / "plain")
    with pytest.raises(CompressionError, match=COMPRESSION_FILE):
        load_compressed(tmp_path / "plain")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(layers=d["layers"][:1]), "layers"),
        (lambda d: d["layers"][0].update(mlp_channels=d["layers"][0]["mlp_channels"] + 1), "size mismatch"),
        (lambda d: d.update(version=99), "version"),
    ],
)
def test_load_rejects_records_that_do_not_match(tmp_path, edit, message):
    out = saved_tiny(tmp_path)
    edit_record(out, edit)
    with pytest.raises(CompressionError, match=message):
        load_compressed(out)


def test_load_rejects_missing_weights(tmp_path):
    out = saved_tiny(tmp_path)
    weights = load_file(out / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, out / "model.safetensors")
    with pytest.raises(CompressionError, match="up_proj"):
        load_compressed(out)


def test_save_refuses_non_empty_folder(tmp_path):
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    small, record = compressed_copy(model, space, space.full_masks())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CompressionError, match="not empty"):
        save_compressed(small, None, record, tmp_path / "taken")


# -- edge cases -----------------------------------------------------------------------------
def test_full_mask_changes_nothing():
    model = make_tiny_model("llama-mha-bias")
    space = PruningSpace.from_config(model.config)
    small, record = compressed_copy(model, space, space.full_masks())
    assert record.params == record.dense_params and record.sparsity == 0.0
    with torch.no_grad():
        assert torch.equal(small(input_ids()).logits, model(input_ids()).logits)


def headless_and_channelless(space: PruningSpace):
    """Layer 0 loses every head, layer 1 every MLP channel (biases, where present, remain)."""
    masks = random_masks(space, seed=8, keep=0.5)
    masks[space.group(0, UnitKind.KV_GROUP)].zero_()
    masks[space.group(1, UnitKind.MLP_CHANNEL)].zero_()
    return masks


@pytest.mark.parametrize("name", ["llama-mha-bias", "qwen2-gqa"])
def test_layer_without_heads_or_channels(tmp_path, name):
    model, space, masks = load_run_model(build_run(tmp_path, name, headless_and_channelless))
    ids = input_ids(batch=1)
    expected = masked_logits(model, space, masks, ids)
    with torch.no_grad(), masked(model, space, masks):
        expected_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    small, record = compressed_copy(model, space, masks)
    assert isinstance(small.model.layers[0].self_attn, HeadlessAttention)
    assert record.layers[0].kv_heads == 0 and record.layers[1].mlp_channels == 0
    loaded = load_compressed(save_compressed(small, None, record, tmp_path / "small"))
    with torch.no_grad():
        assert_close_logits(loaded(ids).logits, expected)
    for cache in ("dynamic", "static"):
        tokens = loaded.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation=cache)
        assert torch.equal(tokens, expected_tokens)


def test_kv_heads_without_query_slots_are_dropped():
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    masks = space.full_masks()
    masks[space.group(1, UnitKind.QUERY_SLOT)].zero_()
    small, record = compressed_copy(model, space, masks)
    assert record.layers[1].kv_heads == 0
    # The dead KV heads go too, so the model is smaller than the mask's own accounting says.
    assert record.params < count_params(model) - space.prunable_params + int(space.kept_params(masks))
    with torch.no_grad():
        assert_close_logits(small(input_ids()).logits, masked_logits(model, space, masks, input_ids()))


def test_soft_mask_and_peft_model_are_refused():
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    soft = {g: torch.full((g.size,), 0.7) for g in space.groups}
    with pytest.raises(CompressionError, match="not hard"):
        compress_model(model, space, soft, source_model="tiny")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CompressionError, match="merge"):
        compress_model(peft_model, space, space.full_masks(), source_model="tiny")


# -- command line ---------------------------------------------------------------------------
def test_cli_compress_end_to_end(tmp_path, capsys):
    run = build_run(tmp_path, "qwen2-gqa")
    out = tmp_path / "compressed"
    assert main(["compress", str(run), "--out", str(out)]) == 0
    assert "compressed model" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", COMPRESSION_FILE):
        assert (out / name).is_file(), name
    model, space, masks = load_run_model(run)
    ids = input_ids()
    with torch.no_grad():
        assert_close_logits(load_compressed(out)(ids).logits, masked_logits(model, space, masks, ids))
    record = read_record(out)
    assert record.source_model == str(tmp_path / "base")
    assert record.sparsity == pytest.approx(json.loads((run / "mask.json").read_text())["sparsity"])


def test_cli_compress_reports_errors(tmp_path, capsys):
    run = build_run(tmp_path, "llama-gqa")
    out = tmp_path / "compressed"
    assert main(["compress", str(run), "--out", str(out)]) == 0
    assert main(["compress", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(["compress", str(tmp_path / "empty_run"), "--out", str(tmp_path / "x")]) == 2
    assert "no finished ATP run" in capsys.readouterr().err


def test_trained_run_merges_its_adapter_and_compresses_to_the_masked_adapted_model(finished_run, tmp_path):
    """A real ATP run: its adapter is not zero, the merged weights differ from the base, and the
    compressed logits equal those of the masked model with the adapter attached (not merged),
    a comparison that a skipped merge would fail by far more than its tolerance."""
    run = finished_run.folder
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert max(float(w.abs().max()) for name, w in adapter.items() if "lora_B" in name) > 0
    base_path = finished_run.raw["model"]["path"]
    merged, space, masks = load_run_model(run.root)
    base = load_model(base_path)
    changed = [name for name, w in base.state_dict().items() if not torch.equal(w, merged.state_dict()[name])]
    assert changed and all("proj" in name for name in changed)

    out = tmp_path / "compressed"
    assert main(["compress", str(run.root), "--out", str(out)]) == 0
    adapted = PeftModel.from_pretrained(load_model(base_path), run.adapter).eval()
    ids = input_ids()
    expected = masked_logits(adapted, space, masks, ids)
    with torch.no_grad():
        assert_close_logits(load_compressed(out)(ids).logits, expected)
    unmerged = masked_logits(base, space, masks, ids)
    assert (unmerged - expected).abs().max() > 100 * 1e-4 * expected.abs().max()


# -- the real embedded model ------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_compresses_exactly(tmp_path):
    from atp_ray.models.embedded import EMBEDDED_MODEL
    from atp_ray.pruning.magnitude import uniform_magnitude_masks
    from atp_ray.runtime.modeling import load_model, load_tokenizer

    model = load_model(EMBEDDED_MODEL)
    space = PruningSpace.from_config(model.config)
    masks = uniform_magnitude_masks(model, space, 0.4)
    ids = load_tokenizer(EMBEDDED_MODEL)("Hypertension is", return_tensors="pt").input_ids
    expected = masked_logits(model, space, masks, ids)
    with torch.no_grad(), masked(model, space, masks):
        expected_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    small, record = compressed_copy(model, space, masks)
    assert record.params == count_params(model) - space.prunable_params + int(space.kept_params(masks))
    loaded = load_compressed(save_compressed(small, load_tokenizer(EMBEDDED_MODEL), record, tmp_path / "small"))
    with torch.no_grad():
        assert_close_logits(loaded(ids).logits, expected)
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False), expected_tokens)
