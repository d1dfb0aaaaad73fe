"""Elastic ATP: one run, one generator and one LoRA, a frozen mask at every sparsity budget."""

import json

import pytest
import torch
from conftest import make_tiny_model, tiny_run_config
from safetensors.torch import load_file
from transformers import AutoConfig
from test_atp import _stop_after_checkpoint, assert_same_run

from atp_ray.config import load_config
from atp_ray.errors import ConfigError, RunFolderError
from atp_ray.pruning.generator import PruningGenerator
from atp_ray.pruning.losses import ratio_loss
from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.runtime.run_folder import RunFolder, budget_key
from atp_ray.evaluation.eval_recipe import run_eval
from atp_ray.training.atp import FINAL_EVAL_BLOCKS, run_atp

BUDGETS = [0.2, 0.4]


def elastic_config(model_dir) -> dict:
    """A tiny elastic run whose two budgets freeze on target at step 19 of 30 (a strong lasso; checkpoints every 5 steps)."""
    return tiny_run_config(
        model_dir,
        atp={"sparsity": BUDGETS, "control_fraction": 0.6, "freeze_patience": 2, "lasso_weight": 1.0},
        train={"steps": 30, "checkpoint_every": 5, "lr": 1e-2},
    )


@pytest.fixture(scope="module")
def elastic_run(tiny_model_dir, tmp_path_factory) -> tuple[dict, RunFolder, dict]:
    raw = elastic_config(tiny_model_dir)
    folder = RunFolder(tmp_path_factory.mktemp("elastic") / "run")
    summary = run_atp(load_config(raw), folder.root)
    return raw, folder, summary


# -- config ----------------------------------------------------------------------------------


def test_budgets_given_as_a_list_or_a_range(tiny_model_dir):
    listed = load_config(tiny_run_config(tiny_model_dir, atp={"sparsity": [0.5, 0.2, 0.3]})).atp
    assert listed.elastic and listed.budgets == (0.2, 0.3, 0.5) and listed.sparsity == 0.5
    ranged = load_config(tiny_run_config(tiny_model_dir, atp={"sparsity": {"range": [0.2, 0.6]}})).atp
    assert ranged.budgets == (0.2, 0.3, 0.4, 0.5, 0.6)
    single = load_config(tiny_run_config(tiny_model_dir)).atp
    assert not single.elastic and single.budgets == (0.4,) and single.sparsities is None
    # The resolved config round-trips: a resumed run compares it with the saved one.
    config = load_config(tiny_run_config(tiny_model_dir, atp={"sparsity": {"range": [0.2, 0.6], "points": 3}}))
    assert load_config(config.to_dict()) == config


@pytest.mark.parametrize(
    "atp, method, message",
    [
        ({"sparsity": [0.3]}, "atp", "at least 2 distinct budgets"),
        ({"sparsity": [0.3, 0.3]}, "atp", "at least 2 distinct budgets"),
        ({"sparsity": {"range": [0.2]}}, "atp", "range: [lo, hi]"),
        ({"sparsity": [0.2, 0.4]}, "two-step", "need method atp"),
        ({"sparsity": 0.3, "sparsities": [0.2, 0.4]}, "atp", "must be the largest"),
        ({"sparsity": [0.2, 0.4], "sparsity_control": "schedule"}, "atp", "schedule takes one sparsity"),
    ],
)
def test_bad_budgets_are_refused(tiny_model_dir, atp, method, message):
    raw = tiny_run_config(tiny_model_dir, atp=atp)
    raw["method"] = method
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(raw)


# -- the generator ---------------------------------------------------------------------------


def test_generator_learns_a_mask_per_budget():
    """Trained on the ratio loss alone, alternating two budgets, one generator meets both.

    Without the budget input (or with it where it barely moves the logits) both budgets
    end at one sparsity between the two.
    """
    space = PruningSpace.from_config(make_tiny_model("llama-gqa").config)
    generator = PruningGenerator(space, budgets=(0.2, 0.6))
    optimizer = torch.optim.AdamW(generator.parameters(), lr=0.02)
    for step in range(120):
        budget = (0.2, 0.6)[step % 2]
        masks = generator(torch.Generator().manual_seed(step), budget)
        loss = ratio_loss(space.kept_fraction(masks), 1 - budget)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    low, high = (space.sparsity(generator.deterministic_masks(b)) for b in (0.2, 0.6))
    assert abs(low - 0.2) < 0.06 and abs(high - 0.6) < 0.06


def test_generator_takes_a_budget_exactly_when_built_for_budgets():
    space = PruningSpace.from_config(make_tiny_model("llama-gqa").config)
    with pytest.raises(ValueError, match="takes a sparsity budget"):
        PruningGenerator(space, budgets=(0.2, 0.4)).logits()
    with pytest.raises(ValueError, match="takes no budget"):
        PruningGenerator(space).logits(0.2)


def test_masks_within_a_smaller_budget_are_nested_and_exact():
    space = PruningSpace.from_config(make_tiny_model("llama-gqa").config)
    torch.manual_seed(0)
    generator = PruningGenerator(space, budgets=(0.2, 0.6))
    torch.nn.init.normal_(generator.budget_directions)  # budgets rank units differently
    small = generator.masks_at_sparsity(0.2, budget=0.2)
    free = generator.masks_at_sparsity(0.6, budget=0.6)
    nested = generator.masks_at_sparsity(0.6, budget=0.6, within=small)
    assert any(bool((free[g] > small[g]).any()) for g in space.groups)  # unnested: some unit comes back
    assert all(bool((nested[g] <= small[g]).all()) for g in space.groups)
    assert abs(space.sparsity(nested) - 0.6) < 0.05


# -- a run -----------------------------------------------------------------------------------


def test_elastic_run_freezes_every_budget_nested_and_on_target(elastic_run):
    raw, folder, summary = elastic_run
    space = PruningSpace.from_config(_model_config(raw))
    assert summary["target_sparsities"] == BUDGETS
    assert summary["freeze_step"] is not None and summary["freeze_step"] < raw["train"]["steps"]
    assert folder.mask_budgets() == BUDGETS
    masks = {b: folder.read_mask(space, b) for b in BUDGETS}
    for budget in BUDGETS:
        outcome = summary["budgets"][budget_key(budget)]
        assert outcome["reached_target"]
        assert abs(outcome["sparsity"] - budget) <= space.kv_group_params / space.prunable_params
        assert outcome["sparsity"] == pytest.approx(space.sparsity(masks[budget]))
        assert outcome["eval_perplexity"] > 1
    # Nested: a unit the 0.2 model cuts, the 0.4 model cuts too.
    assert all(bool((masks[0.4][g] <= masks[0.2][g]).all()) for g in space.groups)
    rows = [json.loads(line) for line in folder.metrics.read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"control", "frozen"}
    assert all(min(BUDGETS) <= r["budget"] <= max(BUDGETS) for r in rows)


def test_lasso_empties_lora_only_of_units_cut_at_every_budget(elastic_run):
    """Channels cut at both budgets lose their LoRA weights; those cut only at 0.4 keep theirs,
    as the channels both budgets keep do."""
    raw, folder, _ = elastic_run
    space = PruningSpace.from_config(_model_config(raw))
    weights = load_file(folder.adapter / "adapter_model.safetensors")
    masks = {b: folder.read_mask(space, b) for b in BUDGETS}
    norms = {"cut everywhere": [], "cut at 0.4 only": [], "kept everywhere": []}
    for layer in range(space.num_layers):
        column_norms = next(v for k, v in weights.items() if f"layers.{layer}.mlp.down_proj.lora_A" in k).norm(dim=0)
        group = space.group(layer, UnitKind.MLP_CHANNEL)
        small, large = masks[0.2][group], masks[0.4][group]
        norms["cut everywhere"].append(column_norms[small == 0])
        norms["cut at 0.4 only"].append(column_norms[(small == 1) & (large == 0)])
        norms["kept everywhere"].append(column_norms[large == 1])
    mean = {name: float(torch.cat(values).mean()) for name, values in norms.items()}
    # Measured against the channels both keep: 0.22 (cut everywhere) and 0.64 (cut at 0.4 only);
    # 0.41 for the latter when the lasso empties each step's own cut.
    assert mean["cut everywhere"] < 0.5 * mean["kept everywhere"]
    assert mean["cut at 0.4 only"] > 0.55 * mean["kept everywhere"]


def test_read_mask_of_an_elastic_run_needs_one_of_its_budgets(elastic_run):
    raw, folder, _ = elastic_run
    space = PruningSpace.from_config(_model_config(raw))
    with pytest.raises(RunFolderError, match="choose one of its budgets"):
        folder.read_mask(space)
    with pytest.raises(RunFolderError, match="no mask at sparsity 0.3"):
        folder.read_mask(space, 0.3)


def test_eval_scores_an_elastic_run_at_the_budget_asked(elastic_run):
    """`atp-ray eval RUN --sparsity S`: the held-out perplexity the run measured at S, not at another budget."""
    raw, folder, summary = elastic_run
    blocks = FINAL_EVAL_BLOCKS
    scored = {
        b: run_eval(str(folder.root), ["domain-ppl"], max_samples=blocks, batch_size=raw["train"]["batch_size"], sparsity=b)
        for b in BUDGETS
    }
    for budget in BUDGETS:
        perplexity = scored[budget]["tasks"]["domain-ppl"]["values"]["perplexity"]
        assert perplexity == pytest.approx(summary["budgets"][budget_key(budget)]["eval_perplexity"], rel=1e-5)
    assert scored[0.2]["tasks"]["domain-ppl"]["values"] != scored[0.4]["tasks"]["domain-ppl"]["values"]
    with pytest.raises(ConfigError, match="not a run folder"):
        run_eval(raw["model"]["path"], ["domain-ppl"], max_samples=2, sparsity=0.2)


@pytest.mark.parametrize("checkpoints, phase", [(2, "control"), (5, "frozen")])
def test_interrupted_elastic_run_resumes_exactly(elastic_run, tmp_path, monkeypatch, checkpoints, phase):
    """Stopped at step 10 (control) or 25 (frozen at 19) and resumed: bit-identical to the whole run."""
    raw, reference, summary = elastic_run
    stop_step = checkpoints * raw["train"]["checkpoint_every"]
    rows = [json.loads(line) for line in reference.metrics.read_text().splitlines()]
    assert {r["step"]: r["phase"] for r in rows}[stop_step] == phase
    folder = RunFolder(tmp_path / "run")
    with monkeypatch.context() as patch:
        _stop_after_checkpoint(patch, checkpoints)
        with pytest.raises(KeyboardInterrupt):
            run_atp(load_config(raw), folder.root)
    assert folder.load_checkpoint()["step"] == stop_step
    assert run_atp(load_config(raw), folder.root) == summary
    assert_same_run(folder, reference)


def _model_config(raw: dict):
    return AutoConfig.from_pretrained(raw["model"]["path"])
