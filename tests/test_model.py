"""Behaviour of the transformer and the sampler on random tiny models (2B-like and 8B-like)."""

import pytest
import torch

from infinity_t2i.multiscale import (
    bits_to_codes,
    bits_to_tokens,
    latents_to_tokens,
    next_scale_input,
    tokens_to_bits,
    upsample_codes,
)
from infinity_t2i.resolution import get_schedule
from infinity_t2i.sampling import SamplingSettings, sample, sample_bits_from_logits
from infinity_t2i.text import TextCondition
from infinity_t2i.training import bitwise_loss, make_training_inputs
from toy_infinity.tiny import build_tiny_models


def random_text(batch, channels, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, max(lens), channels, generator=g)
    mask = torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]
    return TextCondition(features, mask)


def teacher_forcing_inputs(bits, schedule, patchify):
    """The transformer inputs implied by generated bits (the oracle for the KV-cached path)."""
    grids = schedule.vae_grids(patchify)
    summed = torch.zeros(bits[0].shape[0], bits[0].shape[-1], *grids[-1])
    inputs = []
    for s, b in enumerate(bits[:-1]):
        summed = summed + upsample_codes(bits_to_codes(b), grids[-1])
        inputs.append(latents_to_tokens(next_scale_input(summed, grids[s + 1]), patchify))
    return torch.cat(inputs, dim=1)


@pytest.mark.parametrize("patchify", [False, True], ids=["2b-like", "8b-like"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kv_cached_sampling_equals_teacher_forcing(patchify, cfg):
    model, _ = build_tiny_models(seed=1, spatial_patchify=patchify)
    schedule = get_schedule(0.75, "0.06M").prefix(5)  # non-square: (1,1) (2,2) (3,4) (6,8) (9,12)
    text = random_text(2, model.config.text_channels, [5, 9])
    settings = SamplingSettings(cfg=cfg, tau=0.7)
    out = sample(model, text, schedule, settings, generator=torch.Generator().manual_seed(0), return_logits=True)
    assert [tuple(b.shape[1:3]) for b in out.bits] == list(schedule.vae_grids(patchify))
    head = torch.cat(out.head_logits, dim=1)
    x_tokens = teacher_forcing_inputs(out.bits, schedule, patchify)
    with torch.no_grad():
        assert torch.allclose(model(text, x_tokens, schedule), head[:2], atol=1e-5)
        if cfg != 1:  # the unconditional rows see the same image tokens
            assert torch.allclose(model(model.uncond_text(text), x_tokens, schedule), head[2:], atol=1e-5)


def test_greedy_sampling_takes_the_larger_logit_of_each_bit():
    logits = torch.randn(3, 10, 16)
    bits = sample_bits_from_logits(logits.clone(), top_k=1, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bits, logits.view(3, 10, 8, 2).argmax(-1))


def test_top_p_forbids_a_bit_value_of_probability_at_most_one_minus_top_p():
    p_one = torch.tensor([0.02, 0.03, 0.05, 0.98])  # probability of bit value 1
    logits = torch.stack([torch.zeros(4), torch.log(p_one / (1 - p_one))], dim=-1).view(1, 1, 8)
    draws = torch.stack(
        [sample_bits_from_logits(logits.clone(), 900, 0.97, torch.Generator().manual_seed(s))[0, 0] for s in range(400)]
    )
    assert draws[:, 0].sum() == 0 and draws[:, 1].sum() == 0  # 0.02 and 0.03 are cut
    assert 0 < draws[:, 2].sum() < 60  # 0.05 survives and is drawn about 5% of the time
    assert draws[:, 3].sum() == 400  # the 0.02 minority of the last bit is cut


def test_same_seed_same_bits_other_seed_other_bits():
    model, _ = build_tiny_models(seed=2)
    schedule = get_schedule(1.0, "0.06M").prefix(4)
    text = random_text(1, model.config.text_channels, [6])
    run = lambda seed: sample(model, text, schedule, generator=torch.Generator().manual_seed(seed)).bits
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("patchify", [False, True], ids=["2b-like", "8b-like"])
def test_prefix_bits_are_kept_and_the_model_continues_them(patchify):
    model, _ = build_tiny_models(seed=4, spatial_patchify=patchify)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    text = random_text(2, model.config.text_channels, [5, 8])
    run = lambda prefix: sample(model, text, schedule, generator=torch.Generator().manual_seed(0), prefix_bits=prefix)
    free = run(()).bits
    assert all(torch.equal(x, y) for x, y in zip(run(free[:3]).bits, free))  # a run's own prefix: the same run
    other = sample(model, text, schedule, generator=torch.Generator().manual_seed(9)).bits
    continued = run(other[:2]).bits
    assert all(torch.equal(x, y) for x, y in zip(continued[:2], other[:2]))
    assert not torch.equal(continued[2], free[2])  # later scales follow the given layout
    with pytest.raises(ValueError, match=r"prefix_bits\[1\]"):
        run([free[0], free[2]])
    with pytest.raises(ValueError, match="schedule has 5"):
        run(free + free[:1])


def test_the_text_is_seen_without_positions():
    """Cross-attention and the pooled condition see the text as a set: reordering its rows changes
    nothing (so identical learned vectors get identical gradients; README, "8 vectors or 4")."""
    model, _ = build_tiny_models(seed=5)
    schedule = get_schedule(1.0, "0.06M").prefix(3)
    text = random_text(2, model.config.text_channels, [6, 4])
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = TextCondition(text.features.clone(), text.mask.clone())
    shuffled.features[0] = text.features[0, order]
    shuffled.features[1, :4] = text.features[1, order[order < 4]]
    x = torch.randn(2, schedule.total_len - 1, model.config.codebook_dim)
    with torch.no_grad():
        logits = model(text, x, schedule)
        assert torch.allclose(logits, model(shuffled, x, schedule), atol=1e-5)
        shuffled.features[0, 0] = 0  # while what the rows say does matter
        assert not torch.allclose(logits, model(shuffled, x, schedule), atol=1e-3)


def test_negative_prompt_changes_only_the_unconditional_half():
    model, _ = build_tiny_models(seed=3)
    schedule = get_schedule(1.0, "0.06M").prefix(3)
    text = random_text(2, model.config.text_channels, [4, 7])
    negative = random_text(2, model.config.text_channels, [3, 11], seed=5)
    greedy = SamplingSettings(cfg=3.0, top_k=1)
    out = sample(model, text, schedule, greedy, negative_text=negative, return_logits=True)
    plain = sample(model, text, schedule, greedy, return_logits=True)
    assert torch.allclose(out.head_logits[0][:2], plain.head_logits[0][:2], atol=1e-6)  # same prompt rows
    assert not torch.allclose(out.head_logits[0][2:], plain.head_logits[0][2:])


@pytest.mark.parametrize("patchify", [False, True], ids=["2b-like", "8b-like"])
def test_bits_tokens_round_trip(patchify):
    bits = torch.randint(0, 2, (2, 6, 8, 5), dtype=torch.uint8)
    grid = (3, 4) if patchify else (6, 8)
    tokens = bits_to_tokens(bits, patchify)
    assert tokens.shape == (2, 12 if patchify else 48, 20 if patchify else 5)
    assert torch.equal(tokens_to_bits(tokens, grid, patchify), bits)
    if patchify:  # token channel 4k + 2dy + dx is VAE channel k at offset (dy, dx) of the 2x2 cell
        assert tokens[0, 0, 4 * 2 + 2 * 1 + 0] == bits[0, 1, 0, 2]


def training_loss_and_grad(model, text, x_tokens, labels, schedule):
    features = text.features.clone().requires_grad_(True)
    loss = bitwise_loss(model(TextCondition(features, text.mask), x_tokens, schedule), labels, schedule)
    loss.backward()
    return loss.detach(), features.grad


def test_gradient_checkpointing_changes_nothing():
    model, vae = build_tiny_models(seed=4)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    inputs = make_training_inputs(vae.encode(images), schedule, False)
    text = random_text(2, model.config.text_channels, [5, 8])
    plain = training_loss_and_grad(model, text, inputs.x_tokens, inputs.labels, schedule)
    model.gradient_checkpointing = True
    checkpointed = training_loss_and_grad(model, text, inputs.x_tokens, inputs.labels, schedule)
    assert torch.equal(plain[0], checkpointed[0]) and torch.allclose(plain[1], checkpointed[1], atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # frozen weights never get gradients


def test_text_padding_and_packing_do_not_change_the_output():
    model, _ = build_tiny_models(seed=5)
    schedule = get_schedule(1.0, "0.06M").prefix(3)
    text = random_text(2, model.config.text_channels, [4, 6])
    padded = TextCondition(
        torch.cat([text.features, torch.randn(2, 5, text.features.shape[-1])], 1),
        torch.cat([text.mask, torch.zeros(2, 5, dtype=bool)], 1),
    )
    kv, lens, cu, max_len = text.packed()
    assert lens == [4, 6] and cu.tolist() == [0, 4, 10] and max_len == 6 and kv.shape == (10, text.features.shape[-1])
    x = torch.randn(2, schedule.total_len - 1, model.config.bits_per_token)
    with torch.no_grad():
        reference = model(text, x, schedule)
        assert torch.allclose(model(padded, x, schedule), reference, atol=1e-6)
        assert torch.allclose(model(TextCondition.from_packed(kv, lens), x, schedule), reference, atol=1e-6)


def test_bfloat16_blocks_keep_float32_islands_and_stay_close():
    model, _ = build_tiny_models(seed=6)
    schedule = get_schedule(1.0, "0.06M").prefix(4)
    text = random_text(2, model.config.text_channels, [4, 6])
    x = torch.randn(2, schedule.total_len - 1, model.config.bits_per_token)
    with torch.no_grad():
        full = model(text, x, schedule)
        model.set_block_dtype(torch.bfloat16)
        half = model(text, x, schedule)
    assert model.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == model.text_proj_for_ca[0].weight.dtype == torch.float32
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_condition_dropout_is_off_unless_asked():
    model, _ = build_tiny_models(seed=7)
    schedule = get_schedule(1.0, "0.06M").prefix(2)
    text = random_text(4, model.config.text_channels, [3, 4, 5, 6])
    x = torch.randn(4, schedule.total_len - 1, model.config.bits_per_token)
    with torch.no_grad():
        kept = model(text, x, schedule)
        dropped = model(text, x, schedule, cond_drop_rate=1.0)
        uncond = model(model.uncond_text(text), x, schedule)
    assert torch.equal(dropped, uncond) and not torch.allclose(kept, uncond)


def test_per_scale_text_equal_to_the_prompt_changes_nothing_and_each_scale_is_drawn_under_its_own():
    model, _ = build_tiny_models(seed=1)
    schedule = get_schedule(1.0, "0.06M").prefix(5)
    text = random_text(2, model.config.text_channels, [5, 9])
    settings = SamplingSettings(cfg=3.0, tau=0.7)
    shared = sample(model, text, schedule, settings, generator=torch.Generator().manual_seed(0), return_logits=True)
    same = sample(model, [text] * 3, schedule, settings, generator=torch.Generator().manual_seed(0), return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(shared.bits, same.bits))
    assert all(torch.equal(a, b) for a, b in zip(shared.head_logits, same.head_logits))
    x_tokens = teacher_forcing_inputs(shared.bits, schedule, False)
    with torch.no_grad():
        # teacher forcing reads per-token tables then: the same numbers up to float rounding
        reference = model([text] * 5, x_tokens, schedule)
        assert torch.allclose(reference, model(text, x_tokens, schedule), atol=1e-5)
        # another prompt from scale 2 on: the first two scales' logits stay, the others move
        other = random_text(2, model.config.text_channels, [5, 9], seed=1)
        mixed = model([text, text, other], x_tokens, schedule)
    start = schedule.offsets[2]
    assert torch.equal(mixed[:, :start], reference[:, :start])
    assert not torch.allclose(mixed[:, start:], reference[:, start:])
    # from scale 2 on the model reads `other` everywhere, the coarser scales' tokens included
    with torch.no_grad():
        assert torch.allclose(mixed[:, start:], model(other, x_tokens, schedule)[:, start:], atol=1e-5)
    # the KV-cached sampler reads each scale's own prompt as teacher forcing does
    out = sample(model, [text, text, other], schedule, SamplingSettings(cfg=1.0), return_logits=True,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    x_tokens = teacher_forcing_inputs(out.bits, schedule, False)
    with torch.no_grad():
        assert torch.allclose(model([text, text, other], x_tokens, schedule), torch.cat(out.head_logits, 1), atol=1e-5)
