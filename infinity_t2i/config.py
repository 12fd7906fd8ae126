"""Architecture configs of the Infinity transformer and its BSQ-VAE, and the released presets.

Only the settings the released checkpoints use are configurable; everything the official code
exposes as a flag but the released models never change (shared AdaLN, cosine attention, bit
labels, 2D RoPE normalised to the 1M grid, level embedding on the first block only, ...) is
simply how this implementation works.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .files import write_json


@dataclass(frozen=True)
class VAEConfig:
    codebook_dim: int = 32  # d: bits per latent position
    patch_size: int = 16  # image pixels per latent position, per side
    base_channels: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        n_down = self.patch_size.bit_length() - 1
        if 2**n_down != self.patch_size:
            raise ValueError(f"VAE patch_size must be a power of two, got {self.patch_size}")
        if n_down > len(self.encoder_ch_mult) or n_down > len(self.decoder_ch_mult) - 1:
            raise ValueError(f"VAE patch_size {self.patch_size} needs more levels than the channel multipliers give")

    @property
    def num_downsamples(self) -> int:
        return self.patch_size.bit_length() - 1


@dataclass(frozen=True)
class InfinityConfig:
    embed_dim: int = 2048  # C (the condition width D equals C in every released model)
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    block_chunks: int = 8  # only changes state-dict key names: block_chunks.{i}.module.{j}
    text_channels: int = 2048  # width of the T5 features (flan-t5-xl d_model)
    text_maxlen: int = 512  # rows of cfg_uncond
    codebook_dim: int = 32  # bits the VAE stores per latent position
    spatial_patchify: bool = False  # 8B: a transformer token holds a 2x2 cell of VAE positions
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError("embed_dim / num_heads must be a multiple of 4 (2D RoPE rotates pairs per axis)")
        if self.pool_num_heads < 1 or self.embed_dim % self.pool_num_heads:
            raise ValueError(f"text_channels {self.text_channels} gives no valid head count for the attentive pool")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def bits_per_token(self) -> int:
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def pool_num_heads(self) -> int:
        # The official pool picks its head count from the T5 width (128 channels a head, 64 for
        # very wide models) and then splits the *model* width into that many heads.
        return self.text_channels // (128 if self.embed_dim <= 4096 else 64)


@dataclass(frozen=True)
class ModelPreset:
    """A released model: architecture plus the file names the FoundationVision/Infinity repo uses."""

    transformer: InfinityConfig
    vae: VAEConfig
    transformer_file: str  # a .pth state dict, or a folder of shards with an index json
    vae_file: str
    text_encoder: str = "google/flan-t5-xl"


MODEL_PRESETS: dict[str, ModelPreset] = {
    "infinity_2b": ModelPreset(
        transformer=InfinityConfig(embed_dim=2048, depth=32, num_heads=16, block_chunks=8, codebook_dim=32),
        vae=VAEConfig(codebook_dim=32, patch_size=16, encoder_ch_mult=(1, 2, 4, 4, 4), decoder_ch_mult=(1, 2, 4, 4, 4)),
        transformer_file="infinity_2b_reg.pth",
        vae_file="infinity_vae_d32reg.pth",
    ),
    "infinity_8b": ModelPreset(
        transformer=InfinityConfig(
            embed_dim=3584, depth=40, num_heads=28, block_chunks=8, codebook_dim=14, spatial_patchify=True
        ),
        vae=VAEConfig(codebook_dim=14, patch_size=8, encoder_ch_mult=(1, 2, 4, 4), decoder_ch_mult=(1, 2, 4, 4)),
        transformer_file="infinity_8b_weights",
        vae_file="infinity_vae_d56_f8_14_patchify.pth",
    ),
}

# A local model folder may carry this file to describe an architecture that is not a preset
# (the tiny test models and the toy model do); see `save_model_config` / `load_model_config`.
MODEL_CONFIG_NAME = "infinity_config.json"


def save_model_config(preset: ModelPreset, directory: str) -> str:
    path = os.path.join(directory, MODEL_CONFIG_NAME)
    payload = {
        "transformer": dataclasses.asdict(preset.transformer),
        "vae": dataclasses.asdict(preset.vae),
        "transformer_file": preset.transformer_file,
        "vae_file": preset.vae_file,
        "text_encoder": preset.text_encoder,
    }
    write_json(path, payload)
    return path


def load_model_config(path: str) -> ModelPreset:
    with open(path) as f:
        payload = json.load(f)
    return ModelPreset(
        transformer=InfinityConfig(**payload["transformer"]),
        vae=VAEConfig(**payload["vae"]),
        transformer_file=payload["transformer_file"],
        vae_file=payload["vae_file"],
        text_encoder=payload.get("text_encoder", "google/flan-t5-xl"),
    )


# Official constructor arguments that this implementation hard-wires. A reference config that
# sets any of them differently describes a model this package does not build.
_FIXED_TRANSFORMER_KWARGS = {
    "shared_aln": True,
    "head_aln": True,
    "cos_attn": True,
    "swiglu": False,
    "rms_norm": False,
    "nm0": False,
    "head_depth": 1,
    "cross_attn_layer_scale": -1.0,
    "use_bit_label": 1,
    "add_lvl_embeding_only_first_block": 1,
    "rope2d_each_sa_layer": 1,
    "rope2d_normalized_by_hw": 2,
    "rand_uncond": False,
}


def configs_from_official_kwargs(reference_config: dict) -> tuple[InfinityConfig, VAEConfig]:
    """Builds configs from the official constructor arguments recorded in a reference config.json.

    The file records `vae.call_args` (vae_model(...)), `vae.autoencoder_args` and
    `transformer.resolved_kwargs` (Infinity(...) after defaults were applied).
    """
    vae_args = {**reference_config["vae"]["autoencoder_args"], **reference_config["vae"]["call_args"]}
    if vae_args.get("cnn_attention", "no") != "no" or vae_args.get("use_vae", False):
        raise ValueError("only the released BSQ-VAE layout (no attention blocks, no KL VAE) is supported")
    vae = VAEConfig(
        codebook_dim=int(vae_args["codebook_dim"]),
        patch_size=int(vae_args["patch_size"]),
        base_channels=int(vae_args["base_ch"]),
        encoder_ch_mult=tuple(vae_args["encoder_ch_mult"]),
        decoder_ch_mult=tuple(vae_args["decoder_ch_mult"]),
        num_res_blocks=int(vae_args["num_res_blocks"]),
    )
    kw = reference_config["transformer"]["resolved_kwargs"]
    for name, expected in _FIXED_TRANSFORMER_KWARGS.items():
        if name in kw and kw[name] != expected:
            raise ValueError(f"reference sets {name}={kw[name]!r}; released models (and this package) use {expected!r}")
    transformer = InfinityConfig(
        embed_dim=int(kw["embed_dim"]),
        depth=int(kw["depth"]),
        num_heads=int(kw["num_heads"]),
        mlp_ratio=float(kw["mlp_ratio"]),
        block_chunks=int(kw["block_chunks"]),
        text_channels=int(kw["text_channels"]),
        text_maxlen=int(kw["text_maxlen"]),
        codebook_dim=vae.codebook_dim,
        spatial_patchify=bool(kw["apply_spatial_patchify"]),
        norm_eps=float(kw["norm_eps"]),
    )
    return transformer, vae


__all__ = [
    "MODEL_CONFIG_NAME",
    "MODEL_PRESETS",
    "InfinityConfig",
    "ModelPreset",
    "VAEConfig",
    "configs_from_official_kwargs",
    "load_model_config",
    "save_model_config",
]
