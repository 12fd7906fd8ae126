"""How sharply does the toy model draw what it was trained on? Fidelity of the seen pairings.

For every pairing of a named kind and a colour that pretraining shows (toy_infinity.world, the
held-out pairings excluded), images of its words prompt ("a photo of a red cross", sampling seeds
0..N-1, the pipeline's default sampling) are scored by the recogniser of toy_infinity/recogniser.py:
fidelity = P(kind) x P(colour), and how often its most likely kind and colour are right. This is
the ceiling any prompt, words or learned token, reaches on this model. Beside it, the ceiling the
VAE sets: the same score of fresh renders of each pairing (views pretraining never shows) after a
round trip through the VAE's multi-scale bits. Then, for the kinds no word
names: which kinds "a photo of a <colour> thing" draws (every colour pooled), i.e. whether the
model draws the unnamed kinds when a prompt leaves room.

    python benchmarks/bench_toy_seen_fidelity.py                   # 38 pairings x 48 images
    python benchmarks/bench_toy_seen_fidelity.py --pretrained_model_name_or_path /tmp/new-toy
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from infinity_t2i.files import write_json
from infinity_t2i.pipeline import to_uint8
from toy_infinity import fidelity as toy_fidelity
from toy_infinity import world as toy_world
from toy_infinity.recogniser import COLOUR_NAMES, to_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=os.path.join(ROOT, "examples", "toy-infinity"))
    p.add_argument("--num_images", type=int, default=48, help="Images per pairing (sampling seeds 0..N-1).")
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "toy-seen-fidelity.json"))
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main():
    args = parse_args()
    start = time.time()
    pipe, scorer = toy_fidelity.load_for_scoring(args.pretrained_model_name_or_path, args.threads)
    pairings = sorted(
        {(o.kind, o.colour) for o in toy_world.pretraining_objects() if o.kind in toy_world.NAMED_KINDS},
        key=lambda p: (toy_world.KINDS.index(p[0]), COLOUR_NAMES.index(p[1])),
    )
    grids = pipe.schedule(1.0, toy_world.PN).vae_grids(pipe.transformer.config.spatial_patchify)
    rng = np.random.default_rng(0)
    rows = []
    for kind, colour in pairings:
        k, c = toy_world.KINDS.index(kind), COLOUR_NAMES.index(colour)
        renders = [toy_world.render(toy_world.sample_object(rng, kind, colour)) for _ in range(args.num_images)]
        with torch.no_grad():
            pixels = to_uint8(pipe.vae.decode_bits(pipe.vae.encode_bits(to_input(renders).to(pipe.device), grids)))
        p = scorer.probabilities([Image.fromarray(x) for x in pixels.cpu().numpy()])
        round_trip = (p["kind"][:, k] * p["colour"][:, c]).mean().item()
        images = toy_fidelity.generate(pipe, f"a photo of a {colour} {kind}", args.num_images, seed=0)
        p = scorer.probabilities(images)
        p_kind, p_colour = p["kind"], p["colour"]
        rows.append({
            "kind": kind, "colour": colour, "vae_round_trip": round_trip,
            "fidelity": (p_kind[:, k] * p_colour[:, c]).mean().item(),
            "p_kind": p_kind[:, k].mean().item(), "p_colour": p_colour[:, c].mean().item(),
            "kind_right": (p_kind.argmax(-1) == k).float().mean().item(),
            "colour_right": (p_colour.argmax(-1) == c).float().mean().item(),
        })  # fmt: skip
    drawn_for_thing = torch.zeros(len(toy_world.KINDS), dtype=torch.long)
    colour_right_for_thing = []
    for c, colour in enumerate(COLOUR_NAMES):
        images = toy_fidelity.generate(pipe, f"a photo of a {colour} {toy_world.GENERIC_KIND_WORD}", args.num_images, 0)
        p = scorer.probabilities(images)
        drawn_for_thing += torch.bincount(p["kind"].argmax(-1), minlength=len(toy_world.KINDS))
        colour_right_for_thing.append((p["colour"].argmax(-1) == c).float().mean().item())
    thing = {kind: n / drawn_for_thing.sum().item() for kind, n in zip(toy_world.KINDS, drawn_for_thing.tolist())}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_json(
        args.output,
        {"model": args.pretrained_model_name_or_path, "num_images": args.num_images, "rows": rows, "thing": thing},
    )

    def mean_se(key: str, subset=rows) -> str:
        t = torch.tensor([r[key] for r in subset])
        return f"{t.mean():.3f} ± {t.std() / len(t) ** 0.5:.3f}"

    print(f"{args.pretrained_model_name_or_path}: {len(rows)} seen pairings x {args.num_images} images")
    columns = ("fidelity", "p_kind", "kind_right", "p_colour", "colour_right", "vae_round_trip")
    print("| kind | fidelity | P(kind) | kind right | P(colour) | colour right | VAE round trip of renders |")
    print("|---|---|---|---|---|---|---|")
    for kind in toy_world.NAMED_KINDS:
        subset = [r for r in rows if r["kind"] == kind]
        cells = [mean_se(key, subset) for key in columns]
        print(f"| {kind} | {' | '.join(cells)} |")
    cells = [mean_se(key) for key in columns]
    print(f"| all | {' | '.join(cells)} |")
    print("(± the standard error over pairings)")
    shares = ", ".join(f"{kind} {share:.0%}" for kind, share in sorted(thing.items(), key=lambda kv: -kv[1]) if share)
    thing_prompt = f"a photo of a <colour> {toy_world.GENERIC_KIND_WORD}"
    print(f'"{thing_prompt}", {len(COLOUR_NAMES)} colours x {args.num_images} images, kinds drawn: {shares}')
    print(f"colour right {sum(colour_right_for_thing) / len(colour_right_for_thing):.0%}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
