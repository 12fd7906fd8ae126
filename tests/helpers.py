"""Tiny models for tests: a T5 encoder with a SentencePiece vocabulary trained on the fly, and a
random Infinity transformer + BSQ-VAE with the real architecture at toy widths."""

from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

from infinity_t2i.config import InfinityConfig, VAEConfig
from infinity_t2i.pipeline import InfinityPipeline, load_text_encoder
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE

# The toy world's pretraining script writes small T5 encoders; tests and benchmarks reuse it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from pretrain_toy_infinity import T5_WIDTH as TINY_T5_WIDTH  # noqa: E402
from pretrain_toy_infinity import write_text_encoder  # noqa: E402

TINY_CORPUS = [
    "a photo of a dog",
    "a photo of a cat on the beach",
    "a close-up photo of a small dog in the garden",
    "a rendering of a red circle on a blue background",
    "a painting in the style of a watercolor",
    "a photo of a toy on a table next to a window",
    "a cropped photo of the clean object, dark and bright",
    "a good photo of a weird thing, a nice picture of one",
]


def build_tiny_text_encoder(directory: str, seed: int = 0) -> str:
    """Writes a tokenizer (spiece.model, T5 conventions) and a random 2-layer T5 encoder."""
    return write_text_encoder(directory, TINY_CORPUS * 4, vocab_size=120, model_type="unigram", seed=seed)


def tiny_configs(spatial_patchify: bool = False, text_channels: int = TINY_T5_WIDTH) -> tuple[InfinityConfig, VAEConfig]:
    if spatial_patchify:  # 8B-like: stride-8 VAE, 2x2 latent cell per token
        vae = VAEConfig(codebook_dim=6, patch_size=8, base_channels=32, encoder_ch_mult=(1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    else:
        vae = VAEConfig(codebook_dim=8, patch_size=16, base_channels=32, encoder_ch_mult=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
    transformer = InfinityConfig(
        embed_dim=64,
        depth=4,
        num_heads=4,
        block_chunks=2,
        text_channels=text_channels,
        text_maxlen=64,
        codebook_dim=vae.codebook_dim,
        spatial_patchify=spatial_patchify,
    )
    return transformer, vae


def build_tiny_models(seed: int = 0, spatial_patchify: bool = False, text_channels: int = TINY_T5_WIDTH):
    transformer_cfg, vae_cfg = tiny_configs(spatial_patchify, text_channels)
    torch.manual_seed(seed)
    transformer = InfinityTransformer(transformer_cfg).eval().requires_grad_(False)
    vae = BSQVAE(vae_cfg).eval().requires_grad_(False)
    return transformer, vae


def build_tiny_pipeline_dir(directory: str, seed: int = 0) -> str:
    """A complete local model folder (InfinityPipeline.from_pretrained reads it)."""
    text_dir = build_tiny_text_encoder(os.path.join(directory, "text_encoder"), seed)
    tokenizer, text_encoder = load_text_encoder(text_dir, torch.float32, "cpu")
    transformer, vae = build_tiny_models(seed)
    InfinityPipeline(transformer, vae, tokenizer, text_encoder).save_pretrained(directory)
    return directory


def run_script_expecting_error(script: str, argv: list, capsys) -> str:
    """Runs `python script argv` in this process (the script's own __main__ block) and returns
    its one-line error, after checking the exit: status 1 with the message for bad input, or
    argparse's status 2 with its usage line and message on stderr."""
    saved = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved
    code = exit_info.value.code
    if isinstance(code, str):  # sys.exit("error: ...") prints it and exits with status 1
        assert code.startswith("error: ") and "\n" not in code, code
        return code
    assert code == 2, code
    return capsys.readouterr().err.strip().splitlines()[-1]


def draw_concept(path, size=(96, 80), shift=0, mode="RGB"):
    """A small training image of the tests' concept: an orange blob on a blue ground."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (40 + 20 * shift, 110, 190))
    ImageDraw.Draw(image).ellipse((10 + 4 * shift, 12, size[0] - 12, size[1] - 10), fill=(240, 90, 30))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
