"""The two-step baseline (score units once, cut, then tune) and dense LoRA, through the ATP recipe."""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from conftest import TINY_MODELS, make_tiny_model, tiny_run_config

from atp_ray.cli import main
from atp_ray.compression.compress import read_record
from atp_ray.config import IMPORTANCE_CRITERIA, load_config
from atp_ray.errors import ConfigError
from atp_ray.pruning.importance import IMPORTANCE, importance_masks, importance_prior
from atp_ray.pruning.magnitude import unit_scores
from atp_ray.pruning.structures import PruningSpace, UnitGroup, UnitKind
from atp_ray.runtime.modeling import load_model
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp


def _batches(model, count=2, batch=2, seq=16):
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(model.config.vocab_size, (batch, seq), generator=gen) for _ in range(count)]
    return [{"input_ids": t, "labels": t} for t in tokens]


@pytest.mark.parametrize("criterion", sorted(IMPORTANCE))
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("sparsity", [0.2, 0.6])
def test_cut_hits_the_requested_kept_parameter_count(criterion, name, sparsity):
    model = make_tiny_model(name)
    space = PruningSpace.from_config(model.config)
    masks = importance_masks(model, space, sparsity, IMPORTANCE[criterion], _batches(model))
    requested = (1 - sparsity) * space.prunable_params
    assert abs(float(space.kept_params(masks)) - requested) <= space.mlp_channel_params
    assert set(masks) == set(space.groups) and all(((m == 0) | (m == 1)).all() for m in masks.values())


def test_taylor_ranks_a_large_but_dead_channel_last_where_magnitude_keeps_it():
    """Channel 0 of layer 0: huge gate row and down column, zero up row. Its output is always
    zero, so every |w * dL/dw| it owns is zero (Taylor: least important), while its weights
    are the largest of the layer (magnitude: most important)."""
    model = make_tiny_model("llama-gqa")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[0] *= 20
        mlp.down_proj.weight[:, 0] *= 20
        mlp.up_proj.weight[0] = 0
    space = PruningSpace.from_config(model.config)
    batches = _batches(model)
    flags = [p.requires_grad for p in model.parameters()]
    magnitude = IMPORTANCE["magnitude"].score(model, space, batches)[0][UnitKind.MLP_CHANNEL]
    taylor = IMPORTANCE["taylor"].score(model, space, batches)[0][UnitKind.MLP_CHANNEL]
    assert magnitude.argmax() == 0 and taylor[0] == 0 and taylor[1:].min() > 0
    channels = space.group(0, UnitKind.MLP_CHANNEL)
    assert importance_masks(model, space, 0.5, IMPORTANCE["magnitude"], batches)[channels][0] == 1
    assert importance_masks(model, space, 0.5, IMPORTANCE["taylor"], batches)[channels][0] == 0
    # The model leaves scoring as it came: same trainable flags, no gradients left behind.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def _taylor_by_one_backward(model, space, batches):
    """The criterion's definition: one backward per batch through the whole model, then |w * dL/dw|."""
    layers = space.layout.layers(model)
    owned = [piece.module(layer).weight for layer in layers for pieces in space.layout.slices.values() for piece in pieces]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in owned:
        w.requires_grad_(True)
    model.eval()
    for batch in batches:
        (model(**batch).loss.float() / len(batches)).backward()
    return [
        {kind: scores for kind, scores in unit_scores(layer, space, lambda m, axis: (m.weight * m.weight.grad).abs()).items()}
        for layer in layers
    ]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_layer_at_a_time_taylor_equals_one_backward_through_the_model(name):
    """Replaying one layer at a time (what ZeRO-3 needs) gives the whole backward's scores, with LoRA on."""
    model = make_tiny_model(name)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    space = PruningSpace.from_config(model.config)
    batches = _batches(model, count=3)
    scores = IMPORTANCE["taylor"].score(peft_model, space, batches)
    expected = _taylor_by_one_backward(copy.deepcopy(peft_model), space, batches)
    for layer, layer_expected in zip(scores, expected, strict=True):
        for kind, values in layer_expected.items():
            torch.testing.assert_close(layer[kind], values, rtol=1e-5, atol=1e-8)


def test_registry_matches_the_config_choices():
    assert set(IMPORTANCE) == set(IMPORTANCE_CRITERIA)


def test_method_is_a_top_level_key(tiny_model_dir):
    raw = tiny_run_config(tiny_model_dir)
    assert load_config(raw).method == "atp"
    config = load_config(raw, ["method=two-step", "baseline.importance=taylor"])
    assert (config.method, config.baseline.importance) == ("two-step", "taylor")
    with pytest.raises(ConfigError, match="method"):
        load_config(raw, ["method=prune"])


def _rows(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in folder.metrics.read_text().splitlines()]


def test_two_step_run_folder_compresses_and_evaluates_like_an_atp_run(tiny_model_dir, tmp_path):
    raw = tiny_run_config(tiny_model_dir, train={"steps": 10}, baseline={"importance": "taylor", "calibration_batches": 2})
    raw["method"] = "two-step"
    config = load_config(raw)
    summary = run_atp(config, tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    space = PruningSpace.from_config(load_model(str(tiny_model_dir)).config)
    assert abs(summary["kept_prunable_params"] - 0.6 * space.prunable_params) <= space.mlp_channel_params
    assert summary["freeze_step"] == 0
    rows = _rows(folder)
    assert all(r["phase"] == "frozen" and "generator_loss" not in r and r["lasso_weight"] == 0 for r in rows)
    assert all(r["sparsity"] == pytest.approx(summary["sparsity"]) for r in rows)  # one mask from step 0

    # The saved mask is the Taylor mask of the base model on the run's first calibration batches.
    from atp_ray.runtime.process import ProcessContext
    from atp_ray.training.atp import ATPRecipe

    probe = ATPRecipe(config, tmp_path / "probe", ProcessContext.current("cpu"))
    probe.setup()
    batches = [probe.calibration_stream.batch(i) for i in range(2)]
    expected = importance_masks(load_model(str(tiny_model_dir)), space, 0.4, IMPORTANCE["taylor"], batches)
    saved = folder.read_mask(space)
    assert all(torch.equal(saved[g], expected[g]) for g in space.groups)

    compressed = tmp_path / "compressed"
    assert main(["compress", str(folder.root), "--out", str(compressed)]) == 0
    assert read_record(compressed).params < read_record(compressed).dense_params
    reports = {}
    for name, path in (("run", folder.root), ("compressed", compressed)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(path), "--tasks", "domain-ppl", "--max-samples", "all", "--out", str(out)]) == 0
        reports[name] = json.loads(out.read_text())["tasks"]["domain-ppl"]["values"]["perplexity"]
    assert reports["compressed"] == pytest.approx(reports["run"], rel=1e-4)


def test_two_step_tunes_an_atp_runs_mask_and_refuses_one_that_does_not_fit(finished_run, tiny_model_dir, tmp_path):
    """baseline.mask_run: two-step trains from step 0 on exactly the ATP run's final mask; a mask at
    another sparsity, another model's run, an unfinished folder or another method are refused."""
    from atp_ray.errors import RunFolderError

    def two_step(**sections) -> dict:
        raw = tiny_run_config(tiny_model_dir, train={"steps": 6}, baseline={"mask_run": str(finished_run.folder.root)})
        raw["method"] = "two-step"
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return raw

    summary = run_atp(load_config(two_step()), tmp_path / "run")
    space = PruningSpace.from_config(load_model(str(tiny_model_dir)).config)
    atp_mask, tuned = finished_run.folder.read_mask(space), RunFolder(tmp_path / "run").read_mask(space)
    assert all(torch.equal(tuned[g], atp_mask[g]) for g in space.groups)
    assert summary["freeze_step"] == 0 and summary["sparsity"] == pytest.approx(finished_run.summary["sparsity"])
    assert all(r["phase"] == "frozen" for r in _rows(RunFolder(tmp_path / "run")))

    with pytest.raises(RunFolderError, match="pruned for atp.sparsity 0.4, this run's is 0.3: set atp.sparsity=0.4"):
        run_atp(load_config(two_step(atp={"sparsity": 0.3})), tmp_path / "other-sparsity")
    with pytest.raises(RunFolderError, match="no mask.json"):
        run_atp(load_config(two_step(baseline={"mask_run": str(tmp_path)})), tmp_path / "no-run")
    other_model = tmp_path / "other-model"  # the same weights in another folder: another model to the config
    shutil.copytree(tiny_model_dir, other_model)
    with pytest.raises(RunFolderError, match="pruned .* this run tunes"):
        run_atp(load_config(two_step(model={"path": str(other_model)})), tmp_path / "other")
    atp_raw = two_step()
    atp_raw["method"] = "atp"
    with pytest.raises(ConfigError, match="baseline.mask_run gives method two-step its mask"):
        load_config(atp_raw)


def test_lora_method_prunes_nothing(tiny_model_dir, tmp_path):
    raw = tiny_run_config(tiny_model_dir, train={"steps": 5})
    raw["method"] = "lora"
    summary = run_atp(load_config(raw), tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    space = PruningSpace.from_config(load_model(str(tiny_model_dir)).config)
    assert summary["sparsity"] == 0 and summary["kept_prunable_params"] == space.prunable_params
    assert all(bool(m.all()) for m in folder.read_mask(space).values())
    assert all(r["sparsity"] == 0 for r in _rows(folder))


def test_importance_prior_ranks_each_group_as_its_scores_and_scales():
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    scores = IMPORTANCE["taylor"].score(model, space, _batches(model))
    prior = importance_prior(space, scores, 2.0)
    assert set(prior) == set(space.groups)
    for group, offsets in prior.items():
        own = scores[group.layer][group.kind]
        assert torch.equal(offsets.argsort(), own.argsort())  # the same order as the scores, per group
        assert float(offsets.mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(offsets.std()) == pytest.approx(2.0, rel=1e-3)  # the scale is the spread
    lone = SimpleNamespace(groups=[UnitGroup(0, UnitKind.KV_GROUP, 1)])  # e.g. one KV head per layer
    assert torch.equal(importance_prior(lone, [{UnitKind.KV_GROUP: torch.tensor([3.0])}], 2.0)[lone.groups[0]], torch.zeros(1))
