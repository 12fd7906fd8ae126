"""A small CNN that tells a toy-world image's kind, colour and background, and the scores built on it.

The recogniser reads a 64x64 image and gives three distributions: over the 10 kinds of the world
(named or not), its 8 object colours and its 6 backgrounds. The fidelity of an image to a held-out concept
(toy_infinity.world) is

    fidelity = P(kind = concept's kind) * P(object colour = concept's colour)      in [0, 1]

so an image scores high only if it shows that object in that colour: a pink circle, a red cross or
a shapeless pink blob all score low. The background is not part of it (it varies across the
concept's own images too); P(background) says whether a prompt's "... on grass" was followed, which
is how editable a learned concept is.

Why it is fair: the recogniser never sees the toy Infinity or its VAE. It is trained on fresh
renders of every kind, colour, size, background and view (uniformly, other seeds than the pretraining
set and the concept images), with blur, noise, colour jitter and down-up sampling so that the
softness of generated images does not by itself change its answer. It therefore rates textual
inversion on the question "does the image show the concept", with the concept's own images as the
ceiling (close to 1) and other toy objects as the floor (close to 0).

    python -m toy_infinity.recogniser --threads 6   # trains it (99 s measured), writes recogniser.safetensors
    python -m toy_infinity.recogniser --only_head background   # a head on the frozen rest
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
BACKGROUND_NAMES = tuple(toy_world.BACKGROUNDS)
CLASSES = {"kind": toy_world.KINDS, "colour": COLOUR_NAMES, "background": BACKGROUND_NAMES}
TRAINING_SEED = 777_000  # far from the seeds of the pretraining set and the concept images


class ToyRecogniser(nn.Module):
    """Four conv + batch-norm + ReLU stages (64 -> 8 pixels), global pooling, a linear head per
    attribute (kind, colour, background)."""

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
        self.kind_head = nn.Linear(2 * channels[-1], len(CLASSES["kind"]))
        self.colour_head = nn.Linear(2 * channels[-1], len(CLASSES["colour"]))
        self.background_head = nn.Linear(2 * channels[-1], len(CLASSES["background"]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, 64, 64) in [-1, 1] -> logits per attribute: kind (B, 5), colour (B, 8), background (B, 6)."""
        h = self.features(x)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)  # mean: how much, max: whether at all
        return {name: getattr(self, f"{name}_head")(pooled) for name in CLASSES}


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
    def probabilities(self, images) -> dict[str, torch.Tensor]:
        """P(kind) (B, 10), P(colour) (B, 8), P(background) (B, 6), in the orders of CLASSES."""
        return {name: logits.softmax(-1) for name, logits in self.model(to_input(images)).items()}

    def score(self, images, concept: str | toy_world.HeldOutConcept) -> torch.Tensor:
        """Fidelity of each image to the concept, (B,) in [0, 1]."""
        concept = toy_world.HELD_OUT_CONCEPTS[concept] if isinstance(concept, str) else concept
        p = self.probabilities(images)
        return p["kind"][:, toy_world.KINDS.index(concept.kind)] * p["colour"][:, COLOUR_NAMES.index(concept.colour)]

    def background(self, images, background: str) -> torch.Tensor:
        """P(the background is `background`) for each image, (B,)."""
        return self.probabilities(images)["background"][:, BACKGROUND_NAMES.index(background)]


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


def labels_of(objects: list[toy_world.ToyObject]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([CLASSES[name].index(getattr(o, name)) for o in objects]) for name in CLASSES}


def training_batch(batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    objects = [toy_world.sample_object(rng) for _ in range(batch_size)]
    return to_input([augment(toy_world.render(obj), rng) for obj in objects]), labels_of(objects)


def train(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(TRAINING_SEED + args.seed)
    model = ToyRecogniser()
    trained = list(CLASSES)
    if args.only_head:  # the rest as it is (frozen, batch norm in eval mode): its scores do not change
        state = {k: v.float() for k, v in load_file(args.weights).items()}
        model.load_state_dict(state, strict=False)
        trained = [args.only_head]
        model.eval().requires_grad_(False)
        head = getattr(model, f"{args.only_head}_head")
        head.reset_parameters()  # from scratch, whatever the file held for it
        head.requires_grad_(True)
    else:
        model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    bar = tqdm(range(args.steps), desc="recogniser", unit="step")
    for _ in bar:
        x, labels = training_batch(args.batch_size, rng)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in trained)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():  # held-out check on fresh clean and augmented renders (other seeds)
        for kind_of_render, clean in (("clean", True), ("augmented", False)):
            test_rng = np.random.default_rng(TRAINING_SEED - 1)
            objects = [toy_world.sample_object(test_rng) for _ in range(800)]
            images = [toy_world.render(o) if clean else augment(toy_world.render(o), test_rng) for o in objects]
            logits, labels = model(to_input(images)), labels_of(objects)
            accuracy = {name: (logits[name].argmax(-1) == labels[name]).float().mean().item() for name in CLASSES}
            print(f"{kind_of_render} renders: " + ", ".join(f"{k} accuracy {v:.3f}" for k, v in accuracy.items()))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, args.weights)
    print(f"wrote {args.weights}")


def parse_args():
    p = argparse.ArgumentParser(description="Train the toy-world recogniser on fresh renders and write its weights.")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS)
    p.add_argument(
        "--only_head",
        choices=list(CLASSES),
        default=None,
        help="Train this head alone on the frozen rest of --weights (the other scores stay bit for bit).",
    )
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
