"""Tiny models: a T5 encoder with a SentencePiece vocabulary trained on the fly (the toy model's
text encoder is one), and random Infinity transformers + BSQ-VAEs with the real architecture at
toy widths, for the tests and the benchmarks."""

from __future__ import annotations

import io
import json
import os

import torch

from infinity_t2i.config import InfinityConfig, VAEConfig
from infinity_t2i.pipeline import InfinityPipeline, load_text_encoder
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE

T5_WIDTH = 128  # the attentive pool has T5_WIDTH // 128 heads
SPARE_EMBEDDING_ROWS = 28  # like flan-t5 (32128 rows for 32100 tokens): room for placeholder tokens


def write_text_encoder(directory: str, corpus: list[str], vocab_size: int, model_type: str, seed: int) -> str:
    """Writes a SentencePiece tokenizer trained on `corpus`, in flan-T5's conventions (pad 0, eos
    1, unk 2; spiece.model, tokenizer.json, tokenizer_config.json) and a random 2-layer T5 encoder
    with spare embedding rows, as a folder T5EncoderModel / AutoTokenizer load."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    os.makedirs(directory, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type=model_type,
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
        d_model=T5_WIDTH,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(directory)
    return directory


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


def tiny_configs(spatial_patchify: bool = False, text_channels: int = T5_WIDTH) -> tuple[InfinityConfig, VAEConfig]:
    if spatial_patchify:  # 8B-like: stride-8 VAE, 2x2 latent cell per token
        vae = VAEConfig(
            codebook_dim=6,
            patch_size=8,
            base_channels=32,
            encoder_ch_mult=(1, 1, 1, 1),
            decoder_ch_mult=(1, 1, 1, 1),
            num_res_blocks=1,
        )
    else:
        vae = VAEConfig(
            codebook_dim=8,
            patch_size=16,
            base_channels=32,
            encoder_ch_mult=(1, 1, 1, 1, 1),
            decoder_ch_mult=(1, 1, 1, 1, 1),
            num_res_blocks=1,
        )
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


def build_tiny_models(seed: int = 0, spatial_patchify: bool = False, text_channels: int = T5_WIDTH):
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


def build_tiny_clip(directory: str, seed: int = 0) -> str:
    """A random CLIP (width 32, 32x32 images) with a letter-level BPE tokenizer and an image
    processor, saved as a folder CLIPModel / AutoProcessor load (for --validation_similarity_model)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({piece: len(vocab) + i for i, piece in enumerate([*letters, *(c + "</w>" for c in letters)])})
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(vocab),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    return directory


def build_tiny_dinov2(directory: str, seed: int = 0) -> str:
    """A random DINOv2 (width 32, 32x32 images) and its image processor, saved as a folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    Dinov2Model(config).save_pretrained(directory)
    return directory
