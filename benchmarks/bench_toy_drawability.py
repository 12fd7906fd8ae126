"""Can the toy model draw each kind, and at which scale does it decide it? Fidelity with the first
k scales given.

For every kind, N fresh renders (views pretraining never shows) in one colour are encoded to their
bits; the model then draws from the kind's best words ("a photo of a red cross", or "a photo of a
red thing" for a kind no word names) with the renders' first k scales given instead of drawn
(`prefix_bits`, the official sampler's gt_leak), k = 0 (a free draw) .. all scales (the VAE round
trip). The recogniser scores P(kind) x P(colour). A kind whose score stays low until the fine
scales are given is one the model cannot draw even when its layout is settled; a kind that jumps
once the first few scales are given is drawable, and only the choice between kinds is left to the
prompt. `--pretraining_views` renders in the 8 poses pretraining shows instead of new ones.

`--learned_embeds DIR` (a training run's output on a concept of the toy world) asks the same of a learned
token: the concept's kind in the concept's colour, drawn from its words and from the token. Where
the token beats the words only on free draws, it acts by choosing the first scales; where it also
finishes a rendered layout better, it acts at the scales where the kind is settled. Two more rows
then swap the prompt part way: the first k scales drawn from the words and the rest from the token,
and the other way round (the sampler re-reads the coarser scales under each new prompt, as with
vectors per scale). They say at which scales the token draws worse than the words.

    python benchmarks/bench_toy_drawability.py                  # 10 kinds x 8 prefixes x 32 images
    python benchmarks/bench_toy_drawability.py --colour blue --num_images 16
    python benchmarks/bench_toy_drawability.py --learned_embeds outputs/toy-fidelity/default/blue-heart-seed0
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from infinity_t2i.files import write_json
from toy_infinity import fidelity as toy_fidelity
from toy_infinity import world as toy_world
from toy_infinity.recogniser import COLOUR_NAMES, to_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=os.path.join(ROOT, "examples", "toy-infinity"))
    p.add_argument("--colour", default="red", choices=COLOUR_NAMES)
    p.add_argument("--num_images", type=int, default=32, help="Renders per kind (and sampling seeds 0..N-1).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the renders' sizes, backgrounds and views.")
    p.add_argument(
        "--pretraining_views",
        action="store_true",
        help="Render in the views pretraining shows (the same poses the model learned) instead of new ones.",
    )
    p.add_argument(
        "--learned_embeds",
        default=None,
        help="A learned concept of the toy world, <COLOUR-KIND> (training output folder or file): its kind and colour, "
        "words against token.",
    )
    p.add_argument("--output", default=None, help="Default: outputs/toy-drawability[-CONCEPT].json")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def at_scale(condition, scale: int):
    """A prompt's condition at one scale: itself, or its set for that scale (vectors per scale)."""
    return condition[min(scale, len(condition) - 1)] if isinstance(condition, list) else condition


def main():
    args = parse_args()
    start = time.time()
    pipe, scorer = toy_fidelity.load_for_scoring(args.pretrained_model_name_or_path, args.threads)
    schedule = pipe.schedule(1.0, toy_world.PN)
    grids = schedule.vae_grids(pipe.transformer.config.spatial_patchify)
    if args.learned_embeds:  # one kind and colour, from the words and from the token
        token_pipe, token_prompt, placeholder = toy_fidelity.with_learned_concept(
            args.pretrained_model_name_or_path, args.learned_embeds
        )
        concept = toy_world.concept_named(placeholder.strip("<>"))
        colour, kinds = concept.colour, [concept.kind]
        output = args.output or os.path.join(ROOT, "outputs", f"toy-drawability-{concept.name}.json")
        prompts = {concept.kind: [(pipe, concept.words_prompt), (token_pipe, token_prompt)]}
    else:
        colour, kinds = args.colour, toy_world.KINDS
        output = args.output or os.path.join(ROOT, "outputs", "toy-drawability.json")
        prompts = {kind: [(pipe, f"a photo of a {colour} {toy_world.kind_word(kind)}")] for kind in kinds}
    rows = []
    n, views = args.num_images, "pretraining's views" if args.pretraining_views else "new views"
    print(f"{colour}, {n} renders per kind in {views}; columns: the first k scales given")
    columns = ["free"] + [f"{k}:{h}x{w}" for k, (h, w) in enumerate(grids, 1)]
    print(f"{'kind':8s} {'prompt':28s} " + " ".join(c.rjust(7) for c in columns))
    for kind in kinds:
        rng = np.random.default_rng(args.seed)
        objects = [toy_world.sample_object(rng, kind, colour, args.pretraining_views) for _ in range(n)]
        pixels = to_input([toy_world.render(obj) for obj in objects])  # at the world's size: no resampling
        with torch.no_grad():
            bits = pipe.vae.encode_bits(pixels.to(pipe.device), grids)
        k_index, c_index = toy_world.KINDS.index(kind), COLOUR_NAMES.index(colour)
        for drawing_pipe, prompt in prompts[kind]:
            fidelity = []
            for k in range(len(grids) + 1):
                images = drawing_pipe([prompt] * n, pn=toy_world.PN, seed=0, prefix_bits=bits[:k]).images
                p = scorer.probabilities(images)
                fidelity.append((p["kind"][:, k_index] * p["colour"][:, c_index]).mean().item())
            rows.append({"kind": kind, "named": kind in toy_world.NAMED_KINDS, "prompt": prompt, "fidelity": fidelity})
            print(f"{kind:8s} {prompt[:28]:28s} " + " ".join(f"{f:7.2f}" for f in fidelity), flush=True)
    if args.learned_embeds:
        print("columns: the first k scales drawn from the first prompt named, the rest from the other")
        words, token = (token_pipe.encode_prompt([p]) for p in (concept.words_prompt, token_prompt))
        for first, rest, label in ((words, token, "words, then token"), (token, words, "token, then words")):
            fidelity = []
            for k in range(len(grids) + 1):
                conditions = [at_scale(first if s < k else rest, s) for s in range(len(grids))]
                images = token_pipe([""] * n, pn=toy_world.PN, seed=0, prompt_embeds=conditions).images
                fidelity.append(scorer.score(images, concept).mean().item())
            rows.append({"kind": concept.kind, "named": concept.nameable, "prompt": label, "fidelity": fidelity})
            print(f"{concept.kind:8s} {label:28s} " + " ".join(f"{f:7.2f}" for f in fidelity), flush=True)
    write_json(
        output,
        {"model": args.pretrained_model_name_or_path, "colour": colour, "num_images": args.num_images,
         "pretraining_views": args.pretraining_views, "learned_embeds": args.learned_embeds,
         "grids": [list(g) for g in grids], "rows": rows, "seconds": time.time() - start},
    )  # fmt: skip
    print(f"wrote {output} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
