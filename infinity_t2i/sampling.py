"""Scale-by-scale generation with a KV cache, classifier-free guidance and per-bit top-k/top-p.

Defaults are those of the official `tools/run_infinity.py` (cfg 3, tau 1, top-k 900, top-p 0.97,
CFG on the logits). With the same device, seed and inputs the bits equal the official sampler's:
the same logits go through the same masking and the same `torch.multinomial` call sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .multiscale import bits_to_codes, latents_to_tokens, next_scale_input, tokens_to_bits, upsample_codes
from .resolution import ScaleSchedule
from .text import TextCondition
from .transformer import InfinityTransformer, KVCache


@dataclass(frozen=True)
class SamplingSettings:
    """How bits are drawn; the defaults are the official `tools/run_infinity.py`'s. `cfg` and `tau`
    may give one value per scale."""

    cfg: float | Sequence[float] = 3.0  # logits = cfg * cond + (1 - cfg) * uncond
    tau: float | Sequence[float] = 1.0  # temperature of the bit logits
    top_k: int = 900  # per bit: >= 2 keeps both values, 1 is greedy, 0 off
    top_p: float = 0.97  # per bit, 0 off
    cfg_insertion_layer: int | Sequence[int] = 0  # 0: guidance on the logits; -k: on hidden states after block depth-k

    def __post_init__(self):
        """Refuses what no sampler can draw with (the scripts' flags keep to narrower ranges)."""
        rules = {"cfg": ("finite", math.isfinite), "tau": ("positive", lambda v: math.isfinite(v) and v > 0)}
        for name, (rule, holds) in rules.items():
            value = getattr(self, name)
            if not all(holds(v) for v in ([value] if isinstance(value, (int, float)) else value)):
                raise ValueError(f"{name} must be {rule} (one value, or one per scale), got {value}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be at least 0 (0: off), got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (0: off), got {self.top_p}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingSettings:
        """Keyword arguments of a pipeline call; `guidance_scale` (diffusers' name) means cfg."""
        if "guidance_scale" in kwargs:
            if "cfg" in kwargs:
                raise TypeError("give cfg or guidance_scale, not both")
            kwargs["cfg"] = kwargs.pop("guidance_scale")
        unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
        if unknown:
            known = ", ".join(["cfg (guidance_scale)", *list(cls.__dataclass_fields__)[1:]])
            raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {known}")
        return cls(**kwargs)


@dataclass
class SamplingOutput:
    bits: list[torch.Tensor]  # per scale, (B, h, w, d) on the VAE grid
    summed_codes: torch.Tensor  # B, d, H, W   input of the VAE decoder (channels-last, as officially)
    head_logits: list[torch.Tensor] = field(default_factory=list)  # per scale raw head outputs (B or 2B rows)
    sample_logits: list[torch.Tensor] = field(default_factory=list)  # per scale, after 1/tau and guidance


def per_scale(value: float | Sequence[float], num_scales: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * num_scales
    value = [float(v) for v in value]
    if len(value) < num_scales:
        raise ValueError(f"{name} has {len(value)} values, the schedule has {num_scales} scales")
    return value


Generators = torch.Generator | Sequence[torch.Generator] | None


def sample_bits_from_logits(logits: torch.Tensor, top_k: int, top_p: float, generator: Generators) -> torch.Tensor:
    """(B, n, 2d) logits -> (B, n, d) bits. Each bit is a 2-way softmax: top-k keeps the k
    largest (k >= 2 keeps both, k = 1 is greedy), top-p forbids the value whose probability is
    at most 1 - top_p. Modifies `logits` in place, like the official sampler.

    One generator draws for the whole batch, as officially; a list of B generators draws each
    row from its own, so an image depends only on its own seed, not on the batch it is in."""
    B, n, _ = logits.shape
    z = logits.view(B, -1, 2)
    if top_k > 0:
        kth = z.topk(min(top_k, 2), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        z.masked_fill_(z < kth, -torch.inf)
    if top_p > 0:
        sorted_z, order = z.sort(dim=-1, descending=False)
        drop_sorted = sorted_z.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        z.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    probs = z.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B}")
        bits = torch.stack(
            [torch.multinomial(p.view(-1, 2), 1, replacement=True, generator=g) for p, g in zip(probs, generator)]
        )
    else:
        bits = torch.multinomial(probs.view(-1, 2), num_samples=1, replacement=True, generator=generator)
    return bits.view(B, n, -1)


@torch.no_grad()
def sample(
    model: InfinityTransformer,
    text: TextCondition | Sequence[TextCondition],
    schedule: ScaleSchedule,
    settings: SamplingSettings = SamplingSettings(),  # frozen: one shared default is safe
    *,
    negative_text: TextCondition | Sequence[TextCondition] | None = None,
    generator: Generators = None,
    return_logits: bool = False,
    prefix_bits: Sequence[torch.Tensor] = (),
) -> SamplingOutput:
    """Generates the bits of every scale for the prompts in `text` (or in one prompt condition per
    scale, for per-scale concept vectors: scale s is drawn by the model reading text[s], the scales
    past the list its last; where the prompt changes, the coarser scales are read again under the
    new one, so the KV cache holds what teacher forcing computes).

    Guidance pairs each prompt with the unconditional rows (`cfg_uncond` cut to its length) or
    with `negative_text`: logits = cfg * cond + (1 - cfg) * uncond, both scaled by 1/tau first.

    `prefix_bits` (per scale (B, h, w, d), e.g. `BSQVAE.encode_bits` of images) are used for the
    first scales instead of the drawn bits, as the official sampler's `gt_leak`: the model then
    continues a given coarse layout. The draws still happen, so the later scales see the random
    stream of a free run.
    """
    texts = [text] if isinstance(text, TextCondition) else list(text)
    cfg_model, device = model.config, texts[0].features.device
    S, B = len(schedule), texts[0].batch_size
    cfgs, taus = per_scale(settings.cfg, S, "cfg"), per_scale(settings.tau, S, "tau")
    insertion = settings.cfg_insertion_layer
    layers = [insertion] if isinstance(insertion, int) else list(insertion)
    if any(k > 0 or k <= -cfg_model.depth for k in layers):
        raise ValueError(f"cfg_insertion_layer must be 0 (logits) or in [-{cfg_model.depth - 1}, -1], got {layers}")
    guide_logits = 0 in layers
    guide_after_block = {cfg_model.depth + k for k in layers if k < 0}

    guided = any(c != 1 for c in cfgs)
    if guided:
        negatives = [negative_text] if isinstance(negative_text, TextCondition) else list(negative_text or [])
        uncond = [n.to(device) for n in negatives] or [model.uncond_text(texts[0])]
        if uncond[0].batch_size != B:
            raise ValueError(f"negative prompts ({uncond[0].batch_size}) must match the prompts ({B})")
        count = max(len(texts), len(uncond))
        texts = [texts[min(k, len(texts) - 1)].cat(uncond[min(k, len(uncond) - 1)]) for k in range(count)]
    rows = 2 * B if guided else B
    conditions = model.scale_conditions(texts, S)
    rope = model.rope(schedule, device)
    block_dtype = model.blocks[0].ffn.fc1.weight.dtype
    caches = [
        KVCache(rows, cfg_model.num_heads, schedule.total_len, cfg_model.head_dim, block_dtype, device)
        for _ in model.blocks
    ]
    patchify = cfg_model.spatial_patchify
    vae_grids = schedule.vae_grids(patchify)
    if len(prefix_bits) > S:
        raise ValueError(f"prefix_bits has {len(prefix_bits)} scales, the schedule has {S}")
    for s, (bits, grid) in enumerate(zip(prefix_bits, vae_grids)):
        expected = (B, *grid, cfg_model.codebook_dim)
        if tuple(bits.shape) != expected:
            raise ValueError(f"prefix_bits[{s}] is {tuple(bits.shape)}, scale {s} needs {expected}")
    # channels-last: the official sampler sums permuted code tensors, so its decoder input has this
    # layout, and the decoder's convolutions round by layout
    summed = torch.zeros(B, cfg_model.codebook_dim, *vae_grids[-1], device=device).to(memory_format=torch.channels_last)
    out = SamplingOutput(bits=[], summed_codes=summed)

    def mix_hidden(guidance: float) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def mix(i: int, h: torch.Tensor) -> torch.Tensor:
            if guidance == 1 or i not in guide_after_block:
                return h
            h = guidance * h[:B] + (1 - guidance) * h[B:]
            return torch.cat([h, h])

        return mix

    def read_scale(j: int, x: torch.Tensor, c) -> torch.Tensor:  # scale j's tokens through the blocks
        x = x + model.lvl_embed.weight[j]
        span = slice(schedule.offsets[j], schedule.offsets[j] + schedule.lengths[j])
        return model.run_blocks(x, c, rope[:, span], kv_caches=caches, after_block=mix_hidden(cfgs[j]))

    inputs = []  # the input tokens of scales 1, 2, ... (rows, n, C): what a new prompt re-reads
    x = model.start_tokens(conditions[0])  # rows, 1, C
    for s, grid in enumerate(schedule.grids):
        guidance, c = cfgs[s], conditions[s]
        if s > 0 and c is not conditions[s - 1]:  # another prompt: the coarser scales again, under it
            for cache in caches:
                cache.length = 0
            for j, x_j in enumerate([model.start_tokens(c), *inputs[: s - 1]]):
                read_scale(j, x_j, c)
        x = read_scale(s, x, c)
        if guidance != 1 and guide_logits:
            head = model.logits(x, c.cond)
            logits = head.mul(1 / taus[s])
            logits = guidance * logits[:B] + (1 - guidance) * logits[B:]
        else:
            head = model.logits(x[:B], c.cond[:B])
            logits = head.mul(1 / taus[s])
        if return_logits:
            out.head_logits.append(head)
            out.sample_logits.append(logits.clone())
        tokens = sample_bits_from_logits(logits, settings.top_k, settings.top_p, generator)  # B, n, d_token
        bits = tokens_to_bits(tokens, grid, patchify).to(torch.uint8)
        if s < len(prefix_bits):
            bits = prefix_bits[s].to(bits)
        out.bits.append(bits)
        codes = bits_to_codes(bits)
        if s == S - 1:
            summed += codes
        else:
            summed += upsample_codes(codes, vae_grids[-1])
            nxt = latents_to_tokens(next_scale_input(summed, vae_grids[s + 1]), patchify)
            x = model.embed_tokens(nxt).repeat(rows // B, 1, 1)
            inputs.append(x)
    return out
