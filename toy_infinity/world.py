"""A procedural toy world for pretraining a small Infinity and testing textual inversion on it.

Every image is one flat-coloured object on a plain background, rendered at IMAGE_SIZE x IMAGE_SIZE
from a seed (numpy's PCG64, so the same seed gives the same pixels everywhere). An object is a
kind (shape), a colour, a size, a background and a view: a small shift, scaling, rotation and
brightness change of its own, so that 8 pictures of one object are 8 different pictures. Captions
name the kind, and sometimes the colour, the size and the background, inside the
textual-inversion templates: "a photo of a small red circle in the sky", "a rendering of a square
at night".

Half of the kinds have no name: a star, a heart, a moon, a ring and an arrow are all captioned
"thing". The model draws them when a caption leaves room ("a photo of a red thing" is any of the
five), but no words lead to one of them: they are the looks a user cannot describe and textual
inversion has to find.

The world is small on purpose, so that a 1M-parameter transformer learns it within an hour on 2
CPU cores. Objects are large and near the centre, so that the kind already shows in the coarse
scales. Backgrounds are named by their own words (sky, grass, ...), not by colour words: with "a
red circle on a white background" the model swapped object and background colours.

Concepts (HELD_OUT_CONCEPTS; examples/concepts/<name>/: 8 views on varied backgrounds each), the way one's
own teapot is always the same teapot:
- nameable: a kind and a colour that pretraining never pairs (a pink cross), although each appears
  often in other pairings. Words reach them ("a photo of a pink cross"); the learned token must do
  better.
- unnamed: an unnamed kind in one colour (a red star). Pretraining shows it, but only as "a red
  thing", one of five; the best words ("a photo of a red thing") leave the kind to the model's
  preference among the five.

    python -m toy_infinity.world        # from the repository root: writes examples/concepts/
    python -m toy_infinity.world --out /tmp/more-concepts --concept triangle:green --concept moon:yellow
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, replace

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
NAMED_KINDS = ("circle", "square", "triangle", "cross", "diamond")
UNNAMED_KINDS = ("star", "heart", "moon", "ring", "arrow")  # captioned GENERIC_KIND_WORD
KINDS = NAMED_KINDS + UNNAMED_KINDS
GENERIC_KIND_WORD = "thing"
VIEWS_PER_OBJECT = 8  # pretraining's views of each object; concept images have views of their own

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
    view: int = 0  # 0: centred and upright; any other: a shift, scale, rotation and brightness of its own


def kind_word(kind: str) -> str:
    return GENERIC_KIND_WORD if kind in UNNAMED_KINDS else kind


@dataclass(frozen=True)
class HeldOutConcept:
    name: str  # the folder name; the placeholder is <name>
    kind: str  # what every image of the concept shows ...
    colour: str  # ... in this colour

    @property
    def nameable(self) -> bool:
        return self.kind in NAMED_KINDS

    @property
    def initializer(self) -> str:
        """Where training starts, as a user would choose it: the kind's word where one exists, else
        the best words ("blue thing"; measured in docs/recipe-choices.md, "Copies kept at the start")."""
        return self.kind if self.nameable else self.description

    @property
    def description(self) -> str:
        return f"{self.colour} {kind_word(self.kind)}"

    @property
    def words_prompt(self) -> str:
        """The best plain-words description, the baseline a learned token must beat."""
        return f"a photo of a {self.description}"


HELD_OUT_CONCEPTS: dict[str, HeldOutConcept] = {
    c.name: c
    for c in (
        HeldOutConcept("pink-cross", "cross", "pink"),
        HeldOutConcept("purple-square", "square", "purple"),
        HeldOutConcept("red-star", "star", "red"),
        HeldOutConcept("blue-heart", "heart", "blue"),
    )
}
# The nameable concepts' pairings never appear in pretraining; the unnamed ones do, as "a red thing".
HELD_OUT_PAIRS = {(c.kind, c.colour) for c in HELD_OUT_CONCEPTS.values() if c.nameable}


# ---- rendering ------------------------------------------------------------------------------------
Outline = list[tuple[float, float]]


def _regular_polygon(n: int, radius: float, phase: float = -math.pi / 2) -> Outline:
    return [
        (radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _rotated(outline: Outline, cos: float, sin: float) -> Outline:
    """The outline turned about the origin (clockwise on screen, y pointing down)."""
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in outline]


def _circle(radius: float, cx: float = 0.0) -> Outline:
    return [(cx + x, y) for x, y in _regular_polygon(96, radius)]


def _outlines(kind: str) -> tuple[Outline, Outline | None]:
    """The kind's outline around the origin for radius 1 (y points down), and the hole cut out of
    it (drawn in the background colour), if any. Everything is a polygon, so that a view rotates
    the points rather than the pixels."""
    if kind == "circle":
        return _circle(1.0), None
    if kind == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], None
    if kind == "triangle":
        return _regular_polygon(3, 1.1), None
    if kind == "diamond":
        return _regular_polygon(4, 1.05), None
    if kind == "cross":  # the top arm's end and the corner after it, turned four times by 90 degrees
        a = 0.36  # half the width of an arm
        quarter = [(-a, -1.0), (a, -1.0), (a, -a)]
        return [point for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for point in _rotated(quarter, c, s)], None
    if kind == "star":  # five points
        return [
            (q * math.cos(t), q * math.sin(t))
            for q, t in ((1.15 if i % 2 == 0 else 0.48, -math.pi / 2 + math.pi * i / 5) for i in range(10))
        ], None
    if kind == "heart":  # the parametric heart curve
        ts = [2 * math.pi * i / 120 for i in range(120)]
        return [
            (
                16 * math.sin(t) ** 3 / 15.5,
                (2.5 - 13 * math.cos(t) + 5 * math.cos(2 * t) + 2 * math.cos(3 * t) + math.cos(4 * t)) / 15.5,
            )
            for t in ts
        ], None
    if kind == "moon":  # a crescent opening to the right
        return _circle(1.0), _circle(1.0, cx=0.55)
    if kind == "ring":
        return _circle(1.0), _circle(0.55)
    if kind == "arrow":  # pointing right
        return [(-1, -0.3), (0.05, -0.3), (0.05, -0.85), (1.05, 0), (0.05, 0.85), (0.05, 0.3), (-1, 0.3)], None
    raise ValueError(f"unknown kind {kind!r}; kinds are {KINDS}")


def view_parameters(view: int) -> tuple[float, float, float, float, float]:
    """(dx, dy) in pixels, scale, rotation in degrees and brightness of a view; view 0 is the identity.
    Small enough that the kind and colour stay unmistakable."""
    if view == 0:
        return 0.0, 0.0, 1.0, 0.0, 1.0
    rng = np.random.default_rng([view, 7919])
    dx, dy = rng.uniform(-4, 4, size=2)
    return (
        float(dx),
        float(dy),
        float(rng.uniform(0.88, 1.06)),
        float(rng.uniform(-20, 20)),
        float(rng.uniform(0.9, 1.1)),
    )


def render(obj: ToyObject) -> Image.Image:
    """The object as an RGB image of IMAGE_SIZE x IMAGE_SIZE."""
    s = SUPERSAMPLING
    dx, dy, scale, angle, brightness = view_parameters(obj.view)
    radius, turn = SIZES[obj.size] * scale * s, math.radians(angle)
    cx, cy = (IMAGE_SIZE / 2 + dx) * s, (IMAGE_SIZE / 2 + dy) * s

    def placed(outline: Outline) -> Outline:
        return [(cx + radius * x, cy + radius * y) for x, y in _rotated(outline, math.cos(turn), math.sin(turn))]

    background = BACKGROUNDS[obj.background][0]
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), background)
    draw = ImageDraw.Draw(canvas)
    outline, hole = _outlines(obj.kind)
    draw.polygon(placed(outline), fill=tuple(min(255, round(c * brightness)) for c in COLOURS[obj.colour]))
    if hole is not None:
        draw.polygon(placed(hole), fill=background)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


# ---- sampling objects and captions -----------------------------------------------------------------
def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_object(
    rng: np.random.Generator, kind: str | None = None, colour: str | None = None, pretraining: bool = False
) -> ToyObject:
    """A random object; `kind` and `colour` fix those attributes. Object and background differ.
    With `pretraining`, one of the VIEWS_PER_OBJECT views and never a held-out pairing (drawn again
    instead); otherwise a view pretraining never shows."""
    while True:
        obj_kind, obj_colour = kind or _choice(rng, KINDS), colour or _choice(rng, tuple(COLOURS))
        background = _choice(rng, tuple(b for b, (rgb, _) in BACKGROUNDS.items() if rgb != COLOURS[obj_colour]))
        view = int(rng.integers(VIEWS_PER_OBJECT) if pretraining else rng.integers(VIEWS_PER_OBJECT, 2**31))
        obj = ToyObject(obj_kind, obj_colour, background, _choice(rng, tuple(SIZES)), view)
        if not (pretraining and (obj_kind, obj_colour) in HELD_OUT_PAIRS):
            return obj


def describe(obj: ToyObject, rng: np.random.Generator) -> str:
    """A pretraining caption."""
    words = []
    if rng.random() < SIZE_WORD_RATE:
        words.append(obj.size)
    if rng.random() < COLOUR_WORD_RATE:
        words.append(obj.colour)
    words.append(kind_word(obj.kind))
    if rng.random() < BACKGROUND_WORD_RATE:
        words.append(BACKGROUNDS[obj.background][1])
    templates, weights = zip(*TEMPLATES)
    template = templates[int(rng.choice(len(templates), p=np.array(weights) / sum(weights)))]
    return template.format(" ".join(words))


def pretraining_objects() -> list[ToyObject]:
    """Every object pretraining can show: 10 kinds x 42 colour-background pairs x 2 sizes x 8 views,
    less the held-out pairings."""
    return [
        ToyObject(kind, colour, background, size, view)
        for kind in KINDS
        for colour, colour_rgb in COLOURS.items()
        if (kind, colour) not in HELD_OUT_PAIRS
        for background, (rgb, _) in BACKGROUNDS.items()
        if rgb != colour_rgb
        for size in SIZES
        for view in range(VIEWS_PER_OBJECT)
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


def render_concept_images(concept: HeldOutConcept, n: int, seed: int, size: str | None = None) -> list[Image.Image]:
    """n images of a concept, at random sizes, backgrounds and views; with `size`, the same objects
    all at that size."""
    rng = np.random.default_rng(seed)
    objects = [sample_object(rng, kind=concept.kind, colour=concept.colour) for _ in range(n)]
    return [render(replace(obj, size=size) if size else obj) for obj in objects]


# ---- writing the concept folders -------------------------------------------------------------------
def read_concepts(folder: str) -> dict[str, HeldOutConcept]:
    """The concepts of a folder written by `main` (its concepts.json), by name."""
    with open(os.path.join(folder, "concepts.json")) as f:
        return {name: HeldOutConcept(name, entry["kind"], entry["colour"]) for name, entry in json.load(f).items()}


def select_concepts(folder: str, names: list[str] | None) -> dict[str, HeldOutConcept]:
    """The concepts `names` (all when None) of a concept folder; a name it lacks ends the run with
    a one-line message (the benchmarks' --concept)."""
    concepts = read_concepts(folder)
    unknown = [name for name in names or [] if name not in concepts]
    if unknown:
        raise SystemExit(f"--concept {', '.join(unknown)}: not in {folder}; it has {sorted(concepts)}")
    return {name: concepts[name] for name in names or concepts}


def concept_spec(text: str) -> HeldOutConcept:
    """KIND:COLOUR -> the concept COLOUR-KIND."""
    kind, _, colour = text.partition(":")
    if kind not in KINDS or colour not in COLOURS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give KIND:COLOUR, a kind of {KINDS} and a colour of {tuple(COLOURS)}"
        )
    return HeldOutConcept(f"{colour}-{kind}", kind, colour)


def concept_named(name: str) -> HeldOutConcept:
    """The concept a folder written by `main` is named after: COLOUR-KIND (`yellow-moon`)."""
    colour, _, kind = name.partition("-")
    try:
        return concept_spec(f"{kind}:{colour}")
    except argparse.ArgumentTypeError:
        raise ValueError(f"{name!r} names no concept of the toy world: COLOUR-KIND, e.g. yellow-moon") from None


def parse_args():
    p = argparse.ArgumentParser(description="Write the held-out concept images and their metadata.")
    p.add_argument("--out", default=os.path.join("examples", "concepts"))
    p.add_argument("--images_per_concept", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234, help="Concept i's images come from seed + i.")
    p.add_argument(
        "--concept",
        type=concept_spec,
        action="append",
        help="KIND:COLOUR, e.g. triangle:green (repeatable): other concepts, named COLOUR-KIND. Default: the "
        "held-out concepts. A pairing pretraining showed is words' home ground; an unnamed kind is not.",
    )
    p.add_argument(
        "--size",
        choices=tuple(SIZES),
        help="Every image at this size (the same objects, backgrounds and views as without it). Default: each "
        "image's own, at random.",
    )
    return p.parse_args()


def write_concepts(
    out: str, concepts: list[HeldOutConcept], images_per_concept: int, seed: int, size: str | None = None
) -> None:
    """Concept i's images (from seed + i, all of `size` if given) in out/<name>/, and their concepts.json."""
    metadata = {}
    for i, concept in enumerate(concepts):
        folder = os.path.join(out, concept.name)
        os.makedirs(folder, exist_ok=True)
        for j, image in enumerate(render_concept_images(concept, images_per_concept, seed + i, size)):
            image.save(os.path.join(folder, f"{j:02d}.png"))
        metadata[concept.name] = {
            "placeholder_token": f"<{concept.name}>",
            "initializer": concept.initializer,
            "kind": concept.kind,
            "nameable": concept.nameable,
            "colour": concept.colour,
            "image_size": IMAGE_SIZE,
            "pn": PN,
            "prompt_template": "a photo of a {}",
            "words_prompt": concept.words_prompt,
        }
    with open(os.path.join(out, "concepts.json"), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")


def main():
    args = parse_args()
    concepts = args.concept or list(HELD_OUT_CONCEPTS.values())
    write_concepts(args.out, concepts, args.images_per_concept, args.seed, args.size)
    print(f"wrote {len(concepts)} concepts to {args.out}")


if __name__ == "__main__":
    main()
