"""A procedural toy world for pretraining a small Infinity and testing textual inversion on it.

Every image is one flat-coloured object on a plain background, rendered at IMAGE_SIZE x IMAGE_SIZE
from a seed (numpy's PCG64, so the same seed gives the same pixels everywhere). An object is a
kind (shape), a colour, a size and a background. Captions name the kind, and sometimes the
colour, the size and the background, inside the textual-inversion templates: "a photo of a small
red circle in the sky", "a rendering of a square at night".

The world is small on purpose, so that a 1M-parameter transformer learns it in minutes on 2
CPU cores. Objects are large, centred and of two fixed sizes, so that the kind already shows in
the coarse scales, which the transformer learns from the prompt. Backgrounds are named by their
own words (sky, grass, ...), not by colour words: with "a red circle on a white background" the
model swapped object and background colours.

Held-out concepts: three pairings of kind and colour (a pink cross, a purple square, a yellow
circle) never appear in pretraining, neither drawn nor captioned, although each kind and each
colour appears often in other pairings. A concept is one such object, the way one's own teapot is
always the same teapot (examples/concepts/<name>/: 8 images on varied backgrounds). Textual
inversion starts from the kind's word (the initializer) and has to find, in one token, the look
the model has never been shown. (Two earlier worlds held out looks that no caption named at all:
kinds called only "thing" (star, heart, moon) and colours never named (orange, teal, brown). The
model drew them when a caption left the attribute open, but had no text direction for them, and
textual inversion found none: an unnamed attribute is never tied to the text.)

    python -m toy_infinity.world        # from the repository root: writes examples/concepts/
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # pixels per side: the toy model's VAE grid (16) x its patch size (4)
PN = "0.06M"  # the Infinity resolution of IMAGE_SIZE: 7 scales, 1x1 ... 16x16 tokens
SUPERSAMPLING = 4  # shapes are drawn 4x larger and box-filtered down, for smooth edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "pink": (245, 140, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {  # name: (colour, caption phrase)
    "sky": (COLOURS["blue"], "in the sky"),
    "grass": (COLOURS["green"], "on grass"),
    "sand": (COLOURS["yellow"], "on sand"),
    "snow": (COLOURS["white"], "in the snow"),
    "night": (COLOURS["black"], "at night"),
    "brick": (COLOURS["red"], "on bricks"),
}
SIZES: dict[str, float] = {"small": 19.0, "large": 27.0}  # radius, pixels; every object is centred
KINDS = ("circle", "square", "triangle", "cross", "diamond")

# How often a caption names each attribute; omitting them teaches the
# model the marginals, so that short prompts such as "a photo of a circle" are in distribution.
COLOUR_WORD_RATE, SIZE_WORD_RATE, BACKGROUND_WORD_RATE = 0.7, 0.4, 0.6

# The caption templates of textual inversion (infinity_t2i.textual_inversion.OBJECT_TEMPLATES,
# copied so that the toy world does not change when they do) without "the small/large {}", which
# would contradict the size words; "a photo of a" most often. Their extra words carry no meaning
# here and the model learns to ignore them, so a textual-inversion run's prompts are in distribution.
TEMPLATES = (
    ("a photo of a {}", 0.4),
    ("a picture of a {}", 0.05),
    ("a close-up photo of a {}", 0.05),
    ("a cropped photo of the {}", 0.05),
    ("a bright photo of the {}", 0.05),
    ("a dark photo of a {}", 0.05),
    ("a good photo of the {}", 0.05),
    ("a photo of my {}", 0.05),
    ("a photo of one {}", 0.05),
    ("a rendering of a {}", 0.05),
    ("a clean photo of the {}", 0.05),
    ("an image of a {}", 0.1),
)


@dataclass(frozen=True)
class ToyObject:
    kind: str
    colour: str  # a key of COLOURS
    background: str  # a key of BACKGROUNDS
    size: str


@dataclass(frozen=True)
class HeldOutConcept:
    name: str  # the folder name; the placeholder is <name>
    kind: str  # what every image of the concept shows ...
    colour: str  # ... in this colour, a pairing pretraining never shows

    @property
    def initializer(self) -> str:
        """The closest one word gets: the kind."""
        return self.kind

    @property
    def words_prompt(self) -> str:
        """The best plain-words description, the baseline a learned token must beat."""
        return f"a photo of a {self.colour} {self.kind}"


HELD_OUT_CONCEPTS: dict[str, HeldOutConcept] = {
    c.name: c
    for c in (
        HeldOutConcept("pink-cross", "cross", "pink"),
        HeldOutConcept("purple-square", "square", "purple"),
        HeldOutConcept("yellow-circle", "circle", "yellow"),
    )
}
HELD_OUT_PAIRS = {(c.kind, c.colour) for c in HELD_OUT_CONCEPTS.values()}


# ---- rendering ------------------------------------------------------------------------------------
def _polygon(n: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    """Regular polygon around the origin; y points down."""
    return [
        (radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _draw_kind(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    def shifted(points):
        return [(cx + x, cy + y) for x, y in points]

    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        draw.polygon(shifted(_polygon(3, 1.1 * r)), fill=fill)
    elif kind == "diamond":
        draw.polygon(shifted(_polygon(4, 1.05 * r)), fill=fill)
    elif kind == "cross":
        arm = 0.36 * r
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}; kinds are {KINDS}")


def render(obj: ToyObject) -> Image.Image:
    """The object as an RGB image of IMAGE_SIZE x IMAGE_SIZE."""
    s = SUPERSAMPLING
    background = BACKGROUNDS[obj.background][0]
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    centre = IMAGE_SIZE * s / 2
    _draw_kind(ImageDraw.Draw(canvas), obj.kind, centre, centre, SIZES[obj.size] * s, COLOURS[obj.colour])
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


# ---- sampling objects and captions -----------------------------------------------------------------
def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_object(
    rng: np.random.Generator, kind: str | None = None, colour: str | None = None, pretraining: bool = False
) -> ToyObject:
    """A random object; `kind` and `colour` fix those attributes. Object and background differ.
    With `pretraining`, never a held-out pairing (drawn again instead)."""
    while True:
        obj_kind, obj_colour = kind or _choice(rng, KINDS), colour or _choice(rng, tuple(COLOURS))
        background = _choice(rng, tuple(b for b, (rgb, _) in BACKGROUNDS.items() if rgb != COLOURS[obj_colour]))
        obj = ToyObject(obj_kind, obj_colour, background, _choice(rng, tuple(SIZES)))
        if not (pretraining and (obj_kind, obj_colour) in HELD_OUT_PAIRS):
            return obj


def describe(obj: ToyObject, rng: np.random.Generator) -> str:
    """A pretraining caption."""
    words = []
    if rng.random() < SIZE_WORD_RATE:
        words.append(obj.size)
    if rng.random() < COLOUR_WORD_RATE:
        words.append(obj.colour)
    words.append(obj.kind)
    if rng.random() < BACKGROUND_WORD_RATE:
        words.append(BACKGROUNDS[obj.background][1])
    templates, weights = zip(*TEMPLATES)
    template = templates[int(rng.choice(len(templates), p=np.array(weights) / sum(weights)))]
    return template.format(" ".join(words))


def pretraining_objects() -> list[ToyObject]:
    """Every object pretraining can show: 5 kinds x 42 colour-background pairs x 2 sizes, less the
    held-out pairings (3 x 5 or 6 backgrounds x 2 sizes) = 386."""
    return [
        ToyObject(kind, colour, background, size)
        for kind in KINDS
        for colour, colour_rgb in COLOURS.items()
        if (kind, colour) not in HELD_OUT_PAIRS
        for background, (rgb, _) in BACKGROUNDS.items()
        if rgb != colour_rgb
        for size in SIZES
    ]


def pretraining_examples(n: int, seed: int) -> tuple[list[Image.Image], list[str], list[ToyObject]]:
    """n (image, caption, object) triples of the pretraining distribution."""
    rng = np.random.default_rng(seed)
    objects = [sample_object(rng, pretraining=True) for _ in range(n)]
    captions = [describe(obj, rng) for obj in objects]
    return [render(obj) for obj in objects], captions, objects


def caption_corpus(n: int, seed: int) -> list[str]:
    """Captions alone (for the tokenizer), from the same distribution."""
    rng = np.random.default_rng(seed)
    return [describe(sample_object(rng, pretraining=True), rng) for _ in range(n)]


def render_concept_images(concept: HeldOutConcept, n: int, seed: int) -> list[Image.Image]:
    """n images of a held-out concept, at random sizes and backgrounds."""
    rng = np.random.default_rng(seed)
    return [render(sample_object(rng, kind=concept.kind, colour=concept.colour)) for _ in range(n)]


# ---- writing the concept folders -------------------------------------------------------------------
def parse_args():
    p = argparse.ArgumentParser(description="Write the held-out concept images and their metadata.")
    p.add_argument("--out", default=os.path.join("examples", "concepts"))
    p.add_argument("--images_per_concept", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def main():
    args = parse_args()
    metadata = {}
    for i, concept in enumerate(HELD_OUT_CONCEPTS.values()):
        folder = os.path.join(args.out, concept.name)
        os.makedirs(folder, exist_ok=True)
        for j, image in enumerate(render_concept_images(concept, args.images_per_concept, args.seed + i)):
            image.save(os.path.join(folder, f"{j:02d}.png"))
        metadata[concept.name] = {
            "placeholder_token": f"<{concept.name}>",
            "initializer": concept.initializer,
            "kind": concept.kind,
            "colour": concept.colour,
            "image_size": IMAGE_SIZE,
            "pn": PN,
            "prompt_template": "a photo of a {}",
            "words_prompt": concept.words_prompt,
        }
    with open(os.path.join(args.out, "concepts.json"), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    print(f"wrote {len(metadata)} concepts to {args.out}")


if __name__ == "__main__":
    main()
