"""The training objective: token weights, bitwise self-correction and the prior on the coarse
scales."""

import pytest
import torch
import torch.nn.functional as F

from infinity_t2i.multiscale import bits_to_codes, quantize, residual_quantize, upsample_codes
from infinity_t2i.resolution import get_schedule
from infinity_t2i.training import bitwise_loss, make_training_inputs, num_training_scales, token_weights


def test_scale_reweighting_gives_each_scale_weight_proportional_to_its_side():
    schedule = get_schedule(1.0, "0.06M")  # sides 1, 2, 4, 6, 8, 12, 16
    w = token_weights(schedule, reweight_by_scale=True)
    per_scale = torch.stack([x.sum() for x in w.split(list(schedule.lengths))])
    expected = torch.tensor([1, 2, 4, 6, 8, 12, 16]) / 49
    assert torch.allclose(per_scale, expected, atol=1e-6)
    assert torch.allclose(token_weights(schedule, False), torch.full((521,), 1 / 521))
    last = token_weights(get_schedule(1.0, "1M"), True).split(list(get_schedule(1.0, "1M").lengths))[-1].sum()
    assert abs(last.item() - 64 / 277) < 1e-6


def test_half_the_scales_are_those_up_to_half_the_last_side():
    toy, one_megapixel = get_schedule(1.0, "0.06M"), get_schedule(1.0, "1M")  # sides up to 16 and 64
    assert num_training_scales(toy, "half") == 5  # 1, 2, 4, 6, 8
    assert num_training_scales(one_megapixel, "half") == 10  # ... 24, 32: the 0.25M schedule's sides
    assert one_megapixel.grids[:10] == get_schedule(1.0, "0.25M").grids
    wide = get_schedule(1 / 3, "1M")  # the longer side decides
    assert max(wide.grids[num_training_scales(wide, "half") - 1]) * 2 <= max(wide.grids[-1])
    assert max(wide.grids[num_training_scales(wide, "half")]) * 2 > max(wide.grids[-1])
    assert [num_training_scales(toy, n) for n in ("all", 3, 9)] == [7, 3, 7]


@pytest.mark.parametrize("patchify", [False, True])
def test_self_correction_flips_inputs_and_relabels_against_the_corrupted_sum(patchify):
    torch.manual_seed(0)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    grids = schedule.vae_grids(patchify)
    features = torch.randn(2, 6, *grids[-1])
    clean = make_training_inputs(features, schedule, patchify)
    noisy = make_training_inputs(features, schedule, patchify, 0.3, 13, torch.Generator().manual_seed(1))
    assert clean.x_tokens.shape == noisy.x_tokens.shape and clean.labels.shape == noisy.labels.shape
    n0 = schedule.lengths[0]
    assert torch.equal(clean.labels[:, :n0], noisy.labels[:, :n0])  # nothing corrupted before scale 0
    assert not torch.equal(clean.x_tokens, noisy.x_tokens)
    assert not torch.equal(clean.labels, noisy.labels)  # later labels correct the flipped bits
    # with scale 0 fully flipped, scale 1 must learn the residual left by the flipped codes
    clean_rq = residual_quantize(features, grids)
    flipped = residual_quantize(features, grids, flip=lambda s, b: b ^ 1 if s == 0 else b)
    left = features - upsample_codes(bits_to_codes(clean_rq.labels[0] ^ 1), grids[-1])
    assert torch.equal(flipped.labels[0], clean_rq.labels[0])
    assert torch.equal(flipped.labels[1], quantize(F.adaptive_avg_pool2d(left, grids[1])))


def test_zero_strength_is_plain_teacher_forcing():
    features = torch.randn(1, 4, 8, 8)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    a = make_training_inputs(features, schedule, False)
    b = make_training_inputs(features, schedule, False, 0.0, 13, torch.Generator().manual_seed(5))
    assert torch.equal(a.x_tokens, b.x_tokens) and torch.equal(a.labels, b.labels)


def test_training_on_the_first_scales_keeps_their_inputs_and_labels():
    features = torch.randn(2, 4, 8, 8)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    full = make_training_inputs(features, schedule, False)
    coarse = make_training_inputs(features, schedule, False, num_scales=3)
    n = schedule.prefix(3).total_len
    assert torch.equal(coarse.labels, full.labels[:, :n]) and torch.equal(coarse.x_tokens, full.x_tokens[:, : n - 1])


def test_a_prior_mixes_into_the_targets_of_the_first_tokens_only():
    torch.manual_seed(0)
    schedule = get_schedule(1.0, "0.06M").prefix(3)  # 1 + 4 + 16 tokens
    B, L, d, Lp, w = 2, schedule.total_len, 4, 5, 0.3
    logits = torch.randn(B, L, 2 * d, requires_grad=True)
    labels = torch.randint(0, 2, (B, L, d), dtype=torch.uint8)
    prior = torch.randn(B, Lp, 2 * d)
    plain = bitwise_loss(logits, labels, schedule, True)
    assert torch.equal(bitwise_loss(logits, labels, schedule, True, prior, 0.0), plain)  # weight 0: the plain loss

    # by hand: on the first Lp tokens each bit's target is (1 - w) * its label + w * the prior's probability
    target = F.one_hot(labels.long(), 2).float()
    target[:, :Lp] = (1 - w) * target[:, :Lp] + w * prior.view(B, Lp, d, 2).softmax(-1)
    per_token = -(target * logits.view(B, L, d, 2).log_softmax(-1)).sum(-1).mean(-1)
    expected = (per_token * token_weights(schedule, True)).sum(-1).mean()
    assert torch.allclose(bitwise_loss(logits, labels, schedule, True, prior, w), expected, atol=1e-6)

    # a prior that is the model's own prediction, at full weight, leaves the first tokens no gradient
    (own,) = torch.autograd.grad(bitwise_loss(logits, labels, schedule, True, logits[:, :Lp].detach(), 1.0), logits)
    (ref,) = torch.autograd.grad(plain, logits)
    assert own[:, :Lp].abs().max() < 1e-7 and ref[:, :Lp].abs().max() > 1e-3
    assert torch.equal(own[:, Lp:], ref[:, Lp:])
