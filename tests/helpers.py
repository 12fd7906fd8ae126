"""Tiny models for tests: a T5 encoder with a SentencePiece vocabulary trained on the fly, and a
random Infinity transformer + BSQ-VAE with the real architecture at toy widths."""

from __future__ import annotations

import io
import json
import os
import runpy
import sys

import pytest
import torch

from infinity_t2i.config import InfinityConfig, VAEConfig
from infinity_t2i.pipeline import InfinityPipeline, load_text_encoder
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE

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
SPARE_EMBEDDING_ROWS = 28  # flan-t5-xl: 32128 embedding rows for a 32100-token vocabulary
TINY_T5_WIDTH = 128  # the attentive pool has text_channels // 128 heads


def build_tiny_text_encoder(directory: str, seed: int = 0) -> str:
    """Writes a tokenizer (spiece.model, T5 conventions) and a random 2-layer T5 encoder."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 4),
        model_writer=model,
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 4, "legacy": True, "model_max_length": 512}, f)
    tokenizer = AutoTokenizer.from_pretrained(directory, legacy=True)
    tokenizer.save_pretrained(directory)  # adds tokenizer.json, as the released flan-t5 folder has
    config = T5Config(
        vocab_size=len(tokenizer) + SPARE_EMBEDDING_ROWS,
        d_model=TINY_T5_WIDTH,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(directory)
    return directory


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
