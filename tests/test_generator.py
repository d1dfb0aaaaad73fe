import pytest
import torch
from conftest import make_tiny_model

from atp_ray.pruning.generator import PruningGenerator, binarize
from atp_ray.pruning.structures import ATTENTION_KINDS, PruningSpace, UnitKind


@pytest.fixture
def space():
    return PruningSpace.from_config(make_tiny_model("qwen2-gqa").config)


def test_one_logit_per_unit(space):
    generator = PruningGenerator(space)
    logits = generator.logits()
    assert set(logits) == set(space.groups)
    assert all(logits[g].shape == (g.size,) for g in space.groups)


def test_masks_are_hard_with_straight_through_gradients(space):
    generator = PruningGenerator(space).train()
    masks = generator(torch.Generator().manual_seed(0))
    values = torch.cat([m.detach() for m in masks.values()])
    assert set(values.unique().tolist()) <= {0.0, 1.0}
    space.kept_fraction(masks).backward()
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_eval_masks_are_deterministic_and_training_masks_are_noisy(space):
    generator = PruningGenerator(space, base=0.0)  # logits near the threshold: noise flips units
    generator.eval()
    first = generator()
    assert all(torch.equal(first[g], m) for g, m in generator().items())
    generator.train()
    a, b = generator(torch.Generator().manual_seed(1)), generator(torch.Generator().manual_seed(2))
    assert any(not torch.equal(a[g], b[g]) for g in space.groups)


def test_fresh_generator_keeps_everything(space):
    masks = PruningGenerator(space).eval()()
    assert space.sparsity(masks) == pytest.approx(0.0)


def test_at_least_one_unit_is_always_kept():
    mask = binarize(torch.full((5,), -100.0), temperature=0.4, base=3.0, stochastic=False)
    assert mask.sum() == 1


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_masks_at_sparsity_meet_the_budget(space, target):
    generator = PruningGenerator(space)
    with torch.no_grad():  # spread the logits so units differ
        for head in generator.heads.values():
            head.weight.normal_(0, 1.0)
    masks = generator.masks_at_sparsity(target)
    assert space.sparsity(masks) == pytest.approx(target, abs=0.03)


MLP = (UnitKind.MLP_CHANNEL,)


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_offsets_by_part_cut_the_attention_and_the_mlp_each_at_the_target(space, target):
    """atp.sparsity_control=schedule: the offsets put the noise-free mask's attention and its MLP
    each on the target; the masks the generator emits and the freeze's cut by part are that same
    mask. With one offset for all, the split follows the logits (here they favour the MLP)."""
    worth_more = {g: torch.full((g.size,), 4.0 if g.kind is UnitKind.MLP_CHANNEL else 0.0) for g in space.groups}
    generator = PruningGenerator(space, prior=worth_more)  # MLP channels' logits 4 higher
    with torch.no_grad():
        for head in generator.heads.values():
            head.weight.normal_(0, 0.1)  # logits spread about 1 around the prior
    offsets = generator.offsets_for_sparsity(target)
    shifted = generator.deterministic_masks(offset=offsets)
    for kinds in (ATTENTION_KINDS, MLP):
        assert space.part_sparsity(shifted, kinds) == pytest.approx(target, abs=0.05)
    assert space.sparsity(shifted) == pytest.approx(target, abs=0.01)
    cut = generator.masks_at_sparsity(target, by_part=True)
    assert all(torch.equal(shifted[g], cut[g]) for g in space.groups)
    one_offset = generator.masks_at_sparsity(target)
    assert space.part_sparsity(one_offset, MLP) < space.part_sparsity(one_offset, ATTENTION_KINDS) - 0.1
    emitted = generator.eval()(offset=offsets)  # what a step without noise would sample
    assert all(torch.equal(emitted[g], shifted[g]) for g in space.groups)


def test_a_prior_offsets_the_logits_and_travels_with_the_weights(space):
    prior = {g: torch.linspace(-1.0, 1.0, g.size) * 5 for g in space.groups}
    torch.manual_seed(0)
    plain = PruningGenerator(space)
    torch.manual_seed(0)
    primed = PruningGenerator(space, prior=prior)
    plain_logits, primed_logits = plain.logits(), primed.logits()
    assert all(torch.allclose(primed_logits[g], plain_logits[g] + prior[g]) for g in space.groups)
    # At half the budget the lowest-prior units go first: the prior outweighs a fresh generator's logits.
    masks = primed.masks_at_sparsity(0.5)
    channels = next(g for g in space.groups if g.kind.value == "mlp_channel")
    assert masks[channels][0] == 0 and masks[channels][-1] == 1
    # Saved and restored with the weights (generator.safetensors, checkpoints).
    again = PruningGenerator(space, prior={g: torch.zeros(g.size) for g in space.groups})
    again.load_state_dict(primed.state_dict())
    assert all(torch.equal(again.logits()[g], primed_logits[g]) for g in space.groups)


def test_a_protected_unit_is_kept_by_every_mask_and_sends_no_gradient(space):
    group = next(g for g in space.groups if g.kind.value == "kv_group")
    protected = {g: torch.zeros(g.size, dtype=torch.bool) for g in space.groups}
    protected[group][1] = True
    everything_out = {g: torch.full((g.size,), -50.0) for g in space.groups}  # a prior that cuts every unit
    everything_out[group][0] = -40.0  # unit 0 is the one a group keeps when every unit is cut
    generator = PruningGenerator(space, prior=everything_out, protected=protected).train()
    for seed in range(20):
        masks = generator(torch.Generator().manual_seed(seed))
        assert masks[group][1] == 1
    space.kept_fraction(masks).backward()
    assert all(torch.isfinite(p.grad).all() for p in generator.parameters() if p.grad is not None)
    assert generator.heads[f"layer{group.layer}_{group.kind.value}"].weight.grad[1].abs().sum() == 0
    generator.eval()
    assert generator()[group][1] == 1 and generator.masks_at_sparsity(0.99)[group][1] == 1
    # Saved and restored with the weights, like the prior.
    again = PruningGenerator(space, prior=everything_out, protected={g: torch.zeros(g.size, dtype=torch.bool) for g in space.groups})
    again.load_state_dict(generator.state_dict())
    assert again.eval()()[group][1] == 1
