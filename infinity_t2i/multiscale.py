"""Multi-scale residual binary quantization: bit labels, codes and the transformer's inputs.

The VAE latent F (B, d, H, W) is described coarse to fine. At scale s the residual F - acc is
area-downsampled to the scale's grid, and its sign gives d bits per position (bit 1 <=> positive).
Bits become unit codes (+-1/sqrt(d) per channel), which are upsampled (trilinear) to the full
grid and added to acc. The transformer predicts the bits of scale s+1 from acc resized
(trilinear, no antialias) to the grid of scale s+1. Interpolations run on 5D (B, d, 1, h, w)
tensors, as officially, because 4D bilinear differs by a few ulps.

Layouts: bits (B, h, w, d) uint8 on the VAE grid; codes and latents (B, d, h, w) float32. With
spatial patchify (8B) a transformer token holds the 2x2 latent cell below it: 4d channels in
pixel_unshuffle order (channel 4k + 2dy + dx).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


def quantize(residual: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> bits (B, h, w, d): 1 where the residual is positive (exact zero -> 0)."""
    return (residual > 0).permute(0, 2, 3, 1).to(torch.uint8)


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """bits (B, h, w, d) -> unit codes (B, d, h, w): +-1/sqrt(d) per channel, l2-normalised."""
    d = bits.shape[-1]
    scale = 1 / math.sqrt(d)
    codes = bits.float() * (2 * scale) - scale
    return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)  # the normalisation is a no-op up to rounding


def _interpolate(x: torch.Tensor, size: Grid, mode: str) -> torch.Tensor:
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode=mode).squeeze(2)


def upsample_codes(codes: torch.Tensor, size: Grid) -> torch.Tensor:
    return _interpolate(codes, size, "trilinear")


def next_scale_input(summed_codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The accumulated codes resized to a coarser grid: what the transformer sees of the past."""
    return _interpolate(summed_codes, grid, "trilinear")


def latents_to_tokens(x: torch.Tensor, spatial_patchify: bool) -> torch.Tensor:
    """(B, d, h, w) on the VAE grid -> (B, n, d_token) in row-major token order."""
    if spatial_patchify:
        x = F.pixel_unshuffle(x, 2)
    return x.flatten(2).transpose(1, 2)


def bits_to_tokens(bits: torch.Tensor, spatial_patchify: bool) -> torch.Tensor:
    """bits (B, h, w, d) on the VAE grid -> (B, n, d_token)."""
    return latents_to_tokens(bits.permute(0, 3, 1, 2), spatial_patchify)


def tokens_to_bits(tokens: torch.Tensor, grid: Grid, spatial_patchify: bool) -> torch.Tensor:
    """(B, h*w, d_token) for a transformer grid (h, w) -> bits (B, h', w', d) on the VAE grid."""
    x = tokens.unflatten(1, grid).permute(0, 3, 1, 2)  # B, d_token, h, w
    if spatial_patchify:
        x = F.pixel_shuffle(x, 2)
    return x.permute(0, 2, 3, 1)


@dataclass
class ResidualQuantization:
    labels: list[torch.Tensor]  # per scale, the clean bits (B, h, w, d) of the residual
    inputs: list[torch.Tensor]  # per scale s >= 1, the accumulated codes resized to its grid (B, d, h, w)
    summed_codes: torch.Tensor  # (B, d, H, W): what the VAE decoder reconstructs from


BitFlip = Callable[[int, torch.Tensor], torch.Tensor]


def residual_quantize(
    features: torch.Tensor, grids: Sequence[Grid], flip: BitFlip | None = None
) -> ResidualQuantization:
    """Quantizes VAE features (B, d, H, W) scale by scale; `flip(s, bits)` may corrupt the bits
    that are accumulated (bitwise self-correction) while the labels stay the clean bits."""
    features = features.float()
    full = tuple(features.shape[-2:])
    if tuple(grids[-1]) != full:
        raise ValueError(f"the last scale {tuple(grids[-1])} must equal the latent grid {full}")
    summed = torch.zeros_like(features)
    labels, inputs = [], []
    for s, grid in enumerate(grids):
        residual = features - summed
        if s < len(grids) - 1:
            residual = _interpolate(residual, grid, "area")
        bits = quantize(residual)
        labels.append(bits)
        if flip is not None:
            bits = flip(s, bits)
        summed = summed + upsample_codes(bits_to_codes(bits), full)
        if s < len(grids) - 1:
            inputs.append(next_scale_input(summed, grids[s + 1]))
    return ResidualQuantization(labels, inputs, summed)


def summed_codes_from_bits(bits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse direction: per-scale bits (B, h, w, d) -> accumulated codes on the last grid,
    contiguous like the VAE's own quantizer output, so that decoding them reconstructs the image
    as the VAE's encode-decode round trip does."""
    full = tuple(bits[-1].shape[1:3])
    return sum(upsample_codes(bits_to_codes(b), full) for b in bits).contiguous()


def random_bit_flip(strength: float, num_scales: int, generator: torch.Generator | None = None) -> BitFlip | None:
    """Bitwise self-correction as officially trained: for each of the first `num_scales` scales a
    flip probability is drawn uniformly from {0, 0.01, ..., strength} (one draw per scale per
    step, shared by the batch) and each bit is flipped with that probability."""
    if strength <= 0 or num_scales <= 0:
        return None
    max_percent = round(100 * strength)

    def flip(s: int, bits: torch.Tensor) -> torch.Tensor:
        if s >= num_scales:
            return bits
        p = torch.randint(0, max_percent + 1, (), generator=generator).item() / 100
        mask = torch.rand(bits.shape, generator=generator, device=generator.device if generator else "cpu") < p
        return bits ^ mask.to(bits.device, torch.uint8)

    return flip
