"""A small CNN that tells a toy-world image's kind and colour, and the fidelity score built on it.

The recogniser reads a 64x64 image and gives two distributions: over the 5 kinds of the world and
over its 8 colours. The fidelity of an image to a held-out concept (toy_infinity.world) is

    fidelity = P(kind = concept's kind) * P(object colour = concept's colour)      in [0, 1]

so an image scores high only if it shows that object in that colour: a pink circle, a red cross or
a shapeless pink blob all score low. The background is not scored (it varies across the concept's
own images too).

Why it is fair: the recogniser never sees the toy Infinity or its VAE. It is trained on fresh
renders of every kind, colour, size and background (uniformly, other seeds than the pretraining
set and the concept images), with blur, noise, colour jitter and down-up sampling so that the
softness of generated images does not by itself change its answer. It therefore rates textual
inversion on the question "does the image show the concept", with the concept's own images as the
ceiling (close to 1) and other toy objects as the floor (close to 0).

    python -m toy_infinity.recogniser     # trains it (~4 minutes on 2 cores), writes recogniser.safetensors
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from toy_infinity import world as toy_world

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recogniser.safetensors")
COLOUR_NAMES = tuple(toy_world.COLOURS)
TRAINING_SEED = 777_000  # far from the seeds of the pretraining set and the concept images


class ToyRecogniser(nn.Module):
    """Four conv + batch-norm + ReLU stages (64 -> 8 pixels), global pooling, two linear heads."""

    def __init__(self, width: int = 32):
        super().__init__()
        channels = (3, width, 2 * width, 2 * width, 4 * width)
        layers = []
        for i in range(4):
            layers += [
                nn.Conv2d(channels[i], channels[i + 1], 3, padding=1),
                nn.BatchNorm2d(channels[i + 1]),
                nn.ReLU(),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.kind_head = nn.Linear(2 * channels[-1], len(toy_world.KINDS))
        self.colour_head = nn.Linear(2 * channels[-1], len(COLOUR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, 64, 64) in [-1, 1] -> kind logits (B, 5), colour logits (B, 8)."""
        h = self.features(x)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # mean: how much, max: whether at all
        return self.kind_head(pooled), self.colour_head(pooled)


def to_input(images) -> torch.Tensor:
    """PIL images (any size; resized to 64x64) -> (B, 3, 64, 64) floats in [-1, 1]."""
    size = toy_world.IMAGE_SIZE
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class FidelityScorer:
    def __init__(self, weights: str = DEFAULT_WEIGHTS):
        self.model = ToyRecogniser()
        self.model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def probabilities(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(kind) (B, 5) in toy_world.KINDS order, P(colour) (B, 8) in COLOUR_NAMES order)."""
        kind_logits, colour_logits = self.model(to_input(images))
        return kind_logits.softmax(-1), colour_logits.softmax(-1)

    def score(self, images, concept: str | toy_world.HeldOutConcept) -> torch.Tensor:
        """Fidelity of each image to the concept, (B,) in [0, 1]."""
        concept = toy_world.HELD_OUT_CONCEPTS[concept] if isinstance(concept, str) else concept
        kinds, colours = self.probabilities(images)
        return kinds[:, toy_world.KINDS.index(concept.kind)] * colours[:, COLOUR_NAMES.index(concept.colour)]


# ---- training -----------------------------------------------------------------------------------
def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur, down-up sampling, colour jitter and noise: the ways generated images differ from renders."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    if rng.random() < 0.3:
        small = toy_world.IMAGE_SIZE // 2
        image = image.resize((small, small), Image.BILINEAR).resize(image.size, Image.BILINEAR)
    pixels = np.asarray(image).astype(np.float32)
    pixels = pixels * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-12, 12, size=3)
    pixels = pixels + rng.normal(0, rng.uniform(0, 8), size=pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def training_batch(batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    objects = [toy_world.sample_object(rng) for _ in range(batch_size)]
    images = [augment(toy_world.render(obj), rng) for obj in objects]
    kinds = torch.tensor([toy_world.KINDS.index(o.kind) for o in objects])
    colours = torch.tensor([COLOUR_NAMES.index(o.colour) for o in objects])
    return to_input(images), kinds, colours


def train(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(TRAINING_SEED + args.seed)
    model = ToyRecogniser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(args.steps), desc="recogniser", unit="step")
    for _ in bar:
        x, kinds, colours = training_batch(args.batch_size, rng)
        kind_logits, colour_logits = model(x)
        loss = F.cross_entropy(kind_logits, kinds) + F.cross_entropy(colour_logits, colours)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():  # held-out check on clean and on augmented renders
        for name, clean in (("clean", True), ("augmented", False)):
            test_rng = np.random.default_rng(TRAINING_SEED - 1)
            objects = [toy_world.sample_object(test_rng) for _ in range(800)]
            images = [toy_world.render(o) if clean else augment(toy_world.render(o), test_rng) for o in objects]
            kind_logits, colour_logits = model(to_input(images))
            kind_acc = (
                (kind_logits.argmax(-1) == torch.tensor([toy_world.KINDS.index(o.kind) for o in objects]))
                .float()
                .mean()
            )
            colour_acc = (
                (colour_logits.argmax(-1) == torch.tensor([COLOUR_NAMES.index(o.colour) for o in objects]))
                .float()
                .mean()
            )
            print(f"{name} renders: kind accuracy {kind_acc:.3f}, colour accuracy {colour_acc:.3f}")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, args.weights)
    print(f"wrote {args.weights}")


def parse_args():
    p = argparse.ArgumentParser(description="Train the toy-world recogniser on fresh renders and write its weights.")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    train(args)
    print(f"{time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
