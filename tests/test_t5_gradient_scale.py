"""Input-mode gradients through a float16 flan-T5 (docs/hardware.md, T5 precision): a gradient as small as textual
inversion's loss sends back flushes to zero in float16, and a power-of-two scale on the backward through T5 alone
(multiplied in at T5's output, divided out in float32 at its input) gives float32's gradient back."""

import torch

import train_textual_inversion_infinity as train
from infinity_t2i.pipeline import load_text_encoder
from infinity_t2i.text import tokenize
from infinity_t2i.textual_inversion import LearnedVectors


def input_gradient(text_encoder, inputs: torch.Tensor, mask: torch.Tensor, readout: torch.Tensor, scale: float):
    """d sum(features * readout) / d inputs (float32), backpropagated as sum(features * readout * scale) / scale."""
    leaf = inputs.clone().requires_grad_(True)
    embeds = leaf.to(text_encoder.get_input_embeddings().weight.dtype)
    features = text_encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float()
    (features * readout * scale).sum().backward()
    return leaf.grad / scale


def test_a_power_of_two_scale_keeps_small_gradients_through_a_float16_t5(tiny_pipeline_dir):
    tokenizer, t5_full = load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float32, "cpu")
    _, t5_half = load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float16, "cpu")
    assert t5_half.get_input_embeddings().weight.dtype == torch.float16
    ids, mask = tokenize(tokenizer, ["a photo of a dog on the beach"])
    with torch.no_grad():
        inputs = t5_full.get_input_embeddings()(ids)
    readout = torch.randn(*inputs.shape, generator=torch.Generator().manual_seed(0)) * 1e-8  # d loss / d feature
    full = input_gradient(t5_full, inputs, mask, readout, 1.0)
    assert full.abs().min() > 0

    plain = input_gradient(t5_half, inputs, mask, readout, 1.0)
    assert (plain == 0).float().mean() > 0.9  # below float16's 2**-25: flushed to zero

    scale = 2.0 ** round(-torch.log2(readout.pow(2).mean().sqrt()).item())  # back to unit RMS
    scaled = input_gradient(t5_half, inputs, mask, readout, scale)
    assert torch.isfinite(scaled).all()
    assert (scaled - full).norm() < 0.02 * full.norm()


def vector_gradient(tokenizer, text_encoder, readout_scale: float) -> torch.Tensor:
    """The input-mode gradient of one learned vector (the token "dog") through the training script's encoding."""
    ids, _ = tokenize(tokenizer, ["dog"])
    token_id = int(ids[0, 0])
    init = text_encoder.get_input_embeddings().weight[token_id : token_id + 1].float()
    learned = LearnedVectors([token_id], init)
    text = train.encode_with_learned(tokenizer, text_encoder, learned, ["a photo of a dog on the beach"])
    readout = torch.randn(text.features.shape, generator=torch.Generator().manual_seed(0)) * readout_scale
    (text.features * readout).sum().backward()
    return learned.weight.grad


def test_input_mode_training_through_a_float16_t5_gets_float32s_gradient(tiny_pipeline_dir):
    tokenizer, t5_full = load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float32, "cpu")
    _, t5_half = load_text_encoder(f"{tiny_pipeline_dir}/text_encoder", torch.float16, "cpu")
    for readout_scale in (1e-8, 1e-5, 1.0):  # flushed to zero unscaled, half lost unscaled, ordinary
        full = vector_gradient(tokenizer, t5_full, readout_scale)
        half = vector_gradient(tokenizer, t5_half, readout_scale)
        assert full.abs().min() > 0
        assert (half - full).norm() < 0.02 * full.norm(), readout_scale
