"""The official training objective: teacher-forced inputs with bitwise self-correction, and the
per-bit cross entropy weighted over tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .multiscale import bits_to_tokens, latents_to_tokens, random_bit_flip, residual_quantize
from .resolution import ScaleSchedule


@dataclass
class TrainingInputs:
    x_tokens: torch.Tensor  # B, L - 1, d_token   inputs of the scales after the first
    labels: torch.Tensor  # B, L, d_token uint8   bits every token must predict


def make_training_inputs(
    features: torch.Tensor,
    schedule: ScaleSchedule,
    spatial_patchify: bool,
    self_correction_strength: float = 0.0,
    self_correction_scales: int = 13,
    generator: torch.Generator | None = None,
    num_scales: int | None = None,
) -> TrainingInputs:
    """Inputs and labels from VAE features (B, d, H, W).

    Bitwise self-correction (the released recipe: strength 0.3 on the first 13 scales) flips a
    random fraction of each scale's bits before they are accumulated, so later scales learn to
    correct earlier mistakes; labels always stay the clean bits of the (corrupted) residual.
    Strength 0 is plain teacher forcing. `num_scales` keeps only the first scales (the official
    `always_training_scales`): the transformer then runs on `schedule.prefix(num_scales)`.
    """
    flip = random_bit_flip(self_correction_strength, self_correction_scales, generator)
    rq = residual_quantize(features, schedule.vae_grids(spatial_patchify), flip)
    kept = len(schedule) if num_scales is None else min(num_scales, len(schedule))
    x_tokens = torch.cat([latents_to_tokens(x, spatial_patchify) for x in rq.inputs[: kept - 1]], dim=1)
    labels = torch.cat([bits_to_tokens(b, spatial_patchify) for b in rq.labels[:kept]], dim=1)
    return TrainingInputs(x_tokens, labels)


def num_training_scales(schedule: ScaleSchedule, train_scales: str | int) -> int:
    """How many of the schedule's scales training predicts: "all", a number, or "half": those whose
    side is at most half the last scale's (5 of 7 scales at 0.06M, 10 of 13 at 1M), where colour,
    layout and shape are chosen; the finer ones add the detail a few images overfit."""
    if train_scales == "all":
        return len(schedule)
    if train_scales == "half":
        last = max(schedule.grids[-1])
        return max(2, sum(2 * max(grid) <= last for grid in schedule.grids))  # scale 2 has the first image input
    return min(int(train_scales), len(schedule))


def token_weights(schedule: ScaleSchedule, reweight_by_scale: bool, device=None) -> torch.Tensor:
    """(L,) weights summing to 1: uniform, or (reweight_by_scale) each token of scale s weighted
    by 1/sqrt(h_s * w_s), so every scale's total weight grows only with sqrt of its size.

    The official trainer crashes on its reweighting branch (`.prod()` on a tuple); this computes
    what that branch intends, as its validation-loss script does.
    """
    lengths = schedule.lengths
    per_token = [math.sqrt(lengths[-1] / n) if reweight_by_scale else 1.0 for n in lengths]
    total = sum(w * n for w, n in zip(per_token, lengths))
    return torch.cat([torch.full((n,), w / total) for w, n in zip(per_token, lengths)]).to(device)


def bit_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L, 2d) logits and (B, L, d) bits -> (B, L, d) two-class cross entropy per bit."""
    B, L, d = labels.shape
    return F.cross_entropy(logits.view(B, L, d, 2).permute(0, 3, 1, 2), labels.long(), reduction="none")


def bitwise_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    schedule: ScaleSchedule,
    reweight_by_scale: bool = False,
    prior_logits: torch.Tensor | None = None,
    prior_weight: float = 0.0,
) -> torch.Tensor:
    """Mean over bits, weighted sum over tokens, mean over the batch.

    `prior_logits` (B, Lp, 2d) cover the first Lp tokens: there each bit's target is its label
    with weight 1 - prior_weight and the prior's probabilities with weight prior_weight (a cross
    entropy is linear in its target, so the two cross entropies are mixed)."""
    per_bit = bit_cross_entropy(logits, labels)  # B, L, d
    if prior_logits is not None and prior_weight > 0:
        B, Lp, d = prior_logits.shape[0], prior_logits.shape[1], labels.shape[-1]
        log_probs = F.log_softmax(logits[:, :Lp].float().view(B, Lp, d, 2), dim=-1)
        prior_probs = F.softmax(prior_logits.float().view(B, Lp, d, 2), dim=-1)
        to_prior = -(prior_probs * log_probs).sum(-1)  # B, Lp, d
        coarse = (1 - prior_weight) * per_bit[:, :Lp] + prior_weight * to_prior
        per_bit = torch.cat([coarse, per_bit[:, Lp:]], dim=1)
    per_token = per_bit.mean(-1)  # B, L
    if reweight_by_scale:
        weights = token_weights(schedule, True, per_token.device)
    else:
        weights = 1.0 / schedule.total_len  # the official constant, bit for bit
    return (per_token * weights).sum(-1).mean()


@torch.no_grad()
def per_scale_metrics(logits: torch.Tensor, labels: torch.Tensor, schedule: ScaleSchedule) -> dict[str, torch.Tensor]:
    """Per scale: mean bit loss, bit accuracy and whole-token accuracy (all fractions, not %)."""
    B, L, d = labels.shape
    ce = bit_cross_entropy(logits, labels).mean(-1).mean(0)  # L
    correct = (logits.view(B, L, d, 2).argmax(-1) == labels.long()).float()  # B, L, d
    bit_acc = correct.mean(-1).mean(0)
    token_acc = (correct.sum(-1) == d).float().mean(0)
    split = list(schedule.lengths)
    return {
        "loss": torch.stack([x.mean() for x in ce.split(split)]),
        "bit_accuracy": torch.stack([x.mean() for x in bit_acc.split(split)]),
        "token_accuracy": torch.stack([x.mean() for x in token_acc.split(split)]),
    }
