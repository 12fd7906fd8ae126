#!/usr/bin/env python
"""Seconds per image of Infinity generation: scale-by-scale sampling with the KV cache, CFG and
per-bit top-k/top-p, then the BSQ-VAE decode to uint8 pixels (what `InfinityPipeline.__call__`
and so `infer_textual_inversion.py` run per image, less T5: random T5 features stand in for the
prompt, so no text encoder or checkpoint is needed).

    python benchmarks/bench_sampling.py              # on a busy shared CPU add --threads 1

Rows:
- the tests' tiny model (toy_infinity/tiny.py: 4 blocks of width 64, a 32-channel VAE) on CPU in
  float32 at every --pn (default 0.06M, 0.25M, 1M);
- when CUDA is available, the full infinity_2b architecture (MODEL_PRESETS, random weights built
  on the GPU, blocks in bfloat16 as in the official inference) at 1M, beside the official claim
  of 0.8 s per 1024x1024 image, with the peak GPU memory.

Every row: CFG 3 on the logits (2 rows through the transformer per image), the official sampling
defaults, one image per batch unless --batch_size; the median of --runs timed runs after
--warmup untimed ones, with torch.cuda.synchronize around each on the GPU. The CPU rows also
time the baseline, a straightforward sampler of the same math without the KV cache (every scale
re-runs the teacher-forced forward over all tokens so far), alternating with ours.

Measured on 2 shared, busy CPU cores (no GPU lent), --threads 1, median of 3:
tiny 0.06M 0.60 s, 0.25M 2.7 s, 1M 11.4 s per image. With 2 threads the same machine took
4.8 s and 11.3 s at 0.06M and 0.25M: the threads wait on each other when the cores are shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from infinity_t2i.config import MODEL_PRESETS, InfinityConfig, VAEConfig
from infinity_t2i.multiscale import (
    bits_to_codes,
    latents_to_tokens,
    next_scale_input,
    tokens_to_bits,
    upsample_codes,
)
from infinity_t2i.pipeline import decode_to_uint8
from infinity_t2i.resolution import PN_NUM_SCALES, get_schedule
from infinity_t2i.sampling import SamplingSettings, sample, sample_bits_from_logits
from infinity_t2i.text import TextCondition
from infinity_t2i.transformer import InfinityTransformer
from infinity_t2i.vae import BSQVAE

OFFICIAL_SECONDS_1M = 0.8  # Infinity-2B, one 1024x1024 image (paper and README)
PROMPT_TOKENS = 32  # T5 rows of the stand-in prompt
DEFAULTS = SamplingSettings()


def build(
    transformer_config: InfinityConfig,
    vae_config: VAEConfig,
    device: torch.device,
    block_dtype: torch.dtype,
    seed: int = 0,
):
    """Random weights, made directly on `device`; blocks in `block_dtype`, the rest float32."""
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = InfinityTransformer(transformer_config)
        vae = BSQVAE(vae_config)
    transformer.set_block_dtype(block_dtype)
    return transformer.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_without_cache(transformer, text, schedule, cfg: float, generators):
    """The straightforward implementation of the same math, the baseline: no KV cache, every
    scale re-runs the teacher-forced forward over all tokens so far and keeps the last scale's
    logits. Same sampling rule, so the same bits up to float rounding at near-ties."""
    cfg_model = transformer.config
    B, patchify = text.batch_size, cfg_model.spatial_patchify
    both = text.cat(transformer.uncond_text(text)) if cfg != 1 else text
    grids = schedule.vae_grids(patchify)
    summed = torch.zeros(B, cfg_model.codebook_dim, *grids[-1], device=text.features.device)
    inputs = [torch.zeros(B, 0, cfg_model.bits_per_token, device=text.features.device)]
    for s, grid in enumerate(schedule.grids):
        prefix = schedule.prefix(s + 1)
        x_tokens = torch.cat(inputs, dim=1).repeat(both.batch_size // B, 1, 1)
        logits = transformer(both, x_tokens, prefix)[:, prefix.offsets[s] :]
        if cfg != 1:
            logits = cfg * logits[:B] + (1 - cfg) * logits[B:]
        bits = tokens_to_bits(
            sample_bits_from_logits(logits, DEFAULTS.top_k, DEFAULTS.top_p, generators), grid, patchify
        )
        codes = bits_to_codes(bits.to(torch.uint8))
        summed = summed + (codes if s == len(grids) - 1 else upsample_codes(codes, grids[-1]))
        if s < len(grids) - 1:
            inputs.append(latents_to_tokens(next_scale_input(summed, grids[s + 1]), patchify))
    return summed


@torch.no_grad()
def time_generation(
    transformer,
    vae,
    pn: str,
    device: torch.device,
    batch_size: int,
    runs: int,
    warmup: int,
    cfg: float,
    baseline: bool = False,
) -> dict:
    schedule = get_schedule(1.0, pn)
    g = torch.Generator(device).manual_seed(0)
    features = (
        torch.randn(batch_size, PROMPT_TOKENS, transformer.config.text_channels, device=device, generator=g)
        / transformer.config.text_channels**0.5
    )
    text = TextCondition(features, torch.ones(batch_size, PROMPT_TOKENS, dtype=torch.bool, device=device))

    def generate(seed: int, cached: bool = True):
        generators = [torch.Generator(device).manual_seed(seed + k) for k in range(batch_size)]
        if cached:
            summed = sample(transformer, text, schedule, SamplingSettings(cfg=cfg), generator=generators).summed_codes
        else:
            summed = sample_without_cache(transformer, text, schedule, cfg, generators)
        return decode_to_uint8(transformer, vae, summed).cpu()  # as the pipeline decodes

    for k in range(warmup):
        generate(1000 + k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, baseline_seconds = [], []
    for k in range(runs):  # the two samplers alternate, so machine noise hits both alike
        for cached, times in ((True, seconds), (False, baseline_seconds)) if baseline else ((True, seconds),):
            sync(device)
            start = time.perf_counter()
            pixels = generate(k, cached)
            sync(device)
            times.append((time.perf_counter() - start) / batch_size)
    height, width = pixels.shape[1:3]
    return {
        "pn": pn,
        "image": f"{width}x{height}",
        "tokens": schedule.total_len,
        "scales": len(schedule),
        "s_per_image": statistics.median(seconds),
        "min": min(seconds),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "baseline": statistics.median(baseline_seconds) if baseline else None,
    }


def print_table(rows: list[dict]) -> None:
    header = [
        "model",
        "device",
        "blocks",
        "pn",
        "image",
        "scales",
        "tokens",
        "s/image (median)",
        "min",
        "no-cache baseline",
        "peak GPU GiB",
        "official",
    ]
    lines = [header]
    for r in rows:
        lines.append([
            r["model"], r["device"], r["dtype"], r["pn"], r["image"], str(r["scales"]), str(r["tokens"]),
            f"{r['s_per_image']:.3f}", f"{r['min']:.3f}",
            f"{r['baseline']:.3f} s ({r['baseline'] / r['s_per_image']:.1f}x)" if r["baseline"] is not None else "-",
            f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-",
            f"{OFFICIAL_SECONDS_1M} s" if r["model"] == "infinity_2b" and r["pn"] == "1M" else "-",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if n == 0:
            print("-|-".join("-" * w for w in widths))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pn",
        nargs="+",
        default=["0.06M", "0.25M", "1M"],
        choices=sorted(PN_NUM_SCALES),
        help="Resolutions of the tiny CPU model.",
    )
    parser.add_argument("--runs", type=int, default=3, help="Timed runs per row (the median is reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs first.")
    parser.add_argument("--batch_size", type=int, default=1, help="Images per generation call.")
    parser.add_argument(
        "--cfg", type=float, default=3.0, help="Guidance scale (3 = the official default: 2 rows per image)."
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's).")
    parser.add_argument(
        "--gpu_pn",
        type=str,
        default="1M",
        choices=sorted(PN_NUM_SCALES),
        help="Resolution of the full 2B model on CUDA.",
    )
    parser.add_argument("--no_gpu", action="store_true", help="Skip the CUDA row even when a GPU is present.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from toy_infinity.tiny import tiny_configs  # the tests' tiny architecture

    rows = []
    cpu = torch.device("cpu")
    transformer, vae = build(*tiny_configs(), cpu, torch.float32)
    for pn in args.pn:
        row = time_generation(
            transformer, vae, pn, cpu, args.batch_size, args.runs, args.warmup, args.cfg, baseline=True
        )
        rows.append({"model": "tiny (tests)", "device": f"cpu x{torch.get_num_threads()}", "dtype": "float32", **row})
        print(f"  done: tiny {pn}: {row['s_per_image']:.3f} s/image", file=sys.stderr)
    del transformer, vae

    if torch.cuda.is_available() and not args.no_gpu:
        gpu = torch.device("cuda")
        preset = MODEL_PRESETS["infinity_2b"]
        transformer, vae = build(preset.transformer, preset.vae, gpu, torch.bfloat16)
        row = time_generation(
            transformer, vae, args.gpu_pn, gpu, args.batch_size, args.runs, max(args.warmup, 1), args.cfg
        )
        rows.append({"model": "infinity_2b", "device": torch.cuda.get_device_name(gpu), "dtype": "bfloat16", **row})
    else:
        print("  no CUDA device: the infinity_2b row needs a GPU", file=sys.stderr)

    print(
        f"Infinity generation, seconds per image (sampling with CFG {args.cfg} + VAE decode; T5 not timed), batch "
        f"{args.batch_size}, median of {args.runs}"
    )
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
