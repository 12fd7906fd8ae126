"""The BSQ-VAE image tokenizer: a convolutional encoder/decoder around multi-scale bit quantization.

Flux-VQGAN style, 2D, no attention: GroupNorm (eps 1e-6) + swish + 3x3 convs in ResNet blocks,
strided-conv downsampling, nearest-neighbour upsampling. Submodule names follow the official
state dict (convs and norms sit one level down, `conv_in.conv.weight`, `norm1.norm.weight`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .multiscale import Grid, residual_quantize, summed_codes_from_bits


def swish(x: torch.Tensor) -> torch.Tensor:
    # the official formula: `F.silu` is the same function but rounds differently, and the
    # difference grows through the decoder's 29 ResNet blocks to ~1e-4
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Normalize(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        if channels % 32 == 0:
            groups = 32
        elif channels % 24 == 0:
            groups = 24
        else:
            raise ValueError(f"GroupNorm needs channels divisible by 32 or 24, got {channels}")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x):
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.encoder_ch_mult
        self.conv_in = Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1,) + mult
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(ch * (in_mult[i] if j == 0 else m), ch * m) for j in range(cfg.num_res_blocks)
            )
            if i < cfg.num_downsamples:
                level.downsample = Downsample(ch * m)
            self.down.append(level)
        mid_ch = ch * mult[-1]
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(mid_ch, mid_ch)
        self.mid.block_2 = ResnetBlock(mid_ch, mid_ch)
        self.norm_out = Normalize(mid_ch)
        self.conv_out = Conv(mid_ch, cfg.codebook_dim, 3, padding=1)

    def forward(self, x):  # B, 3, H, W -> B, d, H/p, W/p
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.decoder_ch_mult
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        levels = []
        for i in reversed(range(len(mult))):  # built finest-last, stored by level index
            level = nn.Module()
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            level.block = nn.ModuleList(blocks)
            if 1 <= i <= cfg.num_downsamples:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, 3, 3, padding=1)

    def forward(self, z):  # B, d, h, w -> B, 3, h*p, w*p
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class _BitWeights(nn.Module):
    """Holds the official `lfq.mask` buffer (2^(d-1-k), for integer token ids). Bit labels never
    use it, but the released state dicts carry it."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))


class BSQVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = nn.Module()
        self.quantizer.lfq = _BitWeights(config.codebook_dim)
        self.quantize = self.quantizer  # the official model registers it under both names

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.conv.weight.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> continuous latent (B, d, H/p, W/p), float32."""
        return self.encoder(images.to(self.dtype)).float()

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, d, h, w) -> images (B, 3, H, W) clamped to [-1, 1], float32.

        The convolutions run in the memory layout of the input (NCHW or channels-last), as the
        official decoder does; the two layouts round differently (~1e-4 apart after the decoder)."""
        return self.decoder(summed_codes.to(self.dtype)).float().clamp(-1, 1)

    def encode_bits(self, images: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """Images -> bits (B, h, w, d) of every scale of the VAE grids."""
        return residual_quantize(self.encode(images), grids).labels

    def decode_bits(self, bits: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode(summed_codes_from_bits(bits))
