"""Units whose removal alone breaks the model are found before training and never cut (atp.protect_loss_increase)."""

import json
import logging

import pytest
import torch
from conftest import make_tiny_model, tiny_run_config

from atp_ray.config import load_config
from atp_ray.pruning.critical import critical_units
from atp_ray.pruning.importance import IMPORTANCE, importance_masks
from atp_ray.pruning.structures import PruningSpace, UnitKind
from atp_ray.runtime.run_folder import RunFolder
from atp_ray.training.atp import run_atp
from atp_ray.training.mask_sources import LearnedMasks


@pytest.fixture
def space():
    return PruningSpace.from_config(make_tiny_model("llama-gqa").config)


def test_the_screen_flags_exactly_the_units_whose_removal_alone_costs_more_than_the_threshold(space):
    kv = [g for g in space.groups if g.kind == UnitKind.KV_GROUP]
    costs = {(kv[0], 1): 0.8, (kv[1], 0): 0.3}  # what removing each of these alone adds to the loss
    calls = []

    def loss_of(masks):
        calls.append(masks)
        cut = sum(cost for (group, unit), cost in costs.items() if masks[group][unit] == 0)
        others = sum(float((masks[g] == 0).sum()) for g in space.groups if g.kind != UnitKind.KV_GROUP)
        return 2.0 + cut + 10.0 * others  # a cut query slot or channel would cost far more: they are not screened

    protected = critical_units(space, loss_of, threshold=0.5)
    flagged = {(g, unit) for g, keep in protected.items() for unit in keep.nonzero().flatten().tolist()}
    assert flagged == {(kv[0], 1)}
    assert set(protected) == set(space.groups) and all(protected[g].dtype == torch.bool for g in space.groups)
    assert len(calls) == 1 + sum(g.size for g in kv)  # the reference, then one removal per KV group


# KV group 1 of layer 0 is the tiny trained model's most critical unit: removing it alone adds about
# 0.20 nats on the calibration batches, every other KV group at most 0.14.
CRITICAL = ("layers.0.kv_group", 1)


def _final_keeps_critical(folder) -> bool:
    name, unit = CRITICAL
    return json.loads(RunFolder(folder).mask.read_text())["groups"][name][unit] == 1


def test_a_critical_unit_the_prior_ranks_last_is_cut_for_good_unless_protected(
    trained_model_dir, tmp_path, monkeypatch, caplog
):
    """builtin:icd10cm's cliff at 60% (docs/method.md), on the tiny trained model.

    There, Taylor's prior ranked the critical group of layer 1 last in its layer. Control cut
    it, its logit saturated, and no gradient brought it back. Here a prior of -20 on the tiny
    model's critical unit does the same. The screen protects it, and the run ends with a lower loss.
    """

    def prior_against_the_critical_unit(config, bench):
        prior = {g: torch.zeros(g.size) for g in bench.space.groups}
        name, unit = CRITICAL
        prior[next(g for g in bench.space.groups if g.name == name)][unit] = -20.0
        return prior

    monkeypatch.setattr(LearnedMasks, "_prior", staticmethod(prior_against_the_critical_unit))
    atp = {"sparsity": 0.5}
    plain = run_atp(load_config(tiny_run_config(trained_model_dir, atp=atp)), tmp_path / "plain")
    assert not _final_keeps_critical(tmp_path / "plain")

    raw = tiny_run_config(trained_model_dir, atp=atp | {"protect_loss_increase": 0.17})
    with caplog.at_level(logging.INFO, logger="atp_ray.training.mask_sources"):
        protected = run_atp(load_config(raw), tmp_path / "protected")
    assert any("protected from pruning" in r.getMessage() and "layers.0.kv_group[1]" in r.getMessage() for r in caplog.records)
    assert _final_keeps_critical(tmp_path / "protected")
    assert protected["sparsity"] == pytest.approx(plain["sparsity"], abs=0.03)  # the budget is still met
    assert protected["eval_loss"] < plain["eval_loss"]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_two_step_keeps_a_protected_unit_its_criterion_would_cut(criterion):
    model = make_tiny_model("llama-gqa")
    space = PruningSpace.from_config(model.config)
    tokens = torch.randint(model.config.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": t, "labels": t} for t in tokens]
    group = space.group(0, UnitKind.KV_GROUP)
    plain = importance_masks(model, space, 0.6, IMPORTANCE[criterion], batches)
    assert plain[group].sum() == 1  # one KV group of two kept per layer at 60%
    cut = int(plain[group].argmin())
    protected = {g: torch.zeros(g.size, dtype=torch.bool) for g in space.groups}
    protected[group][cut] = True
    masks = importance_masks(model, space, 0.6, IMPORTANCE[criterion], batches, protected=protected)
    assert masks[group][cut] == 1 and masks[group].sum() == 1  # kept in place of the other: the same shape
    assert space.sparsity(masks) == pytest.approx(space.sparsity(plain))


def test_two_step_gets_the_same_protection(trained_model_dir, tmp_path):
    """Magnitude ranks the tiny trained model's critical KV group last in its layer; the screen keeps it."""
    raw = tiny_run_config(trained_model_dir, baseline={"importance": "magnitude"}, atp={"sparsity": 0.5}, train={"steps": 2})
    raw["method"] = "two-step"
    run_atp(load_config(raw), tmp_path / "plain")
    assert not _final_keeps_critical(tmp_path / "plain")
    raw["atp"]["protect_loss_increase"] = 0.17
    run_atp(load_config(raw), tmp_path / "protected")
    assert _final_keeps_critical(tmp_path / "protected")
