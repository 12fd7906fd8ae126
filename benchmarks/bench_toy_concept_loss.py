"""Teacher-forced loss of a toy concept's images under words and under learned tokens: on the 8
training images (and their mirror images, as training sees them with --random_flip) and on fresh renders of the same
concept. The loss is the training script's (per-bit cross entropy, tokens weighted by
1/sqrt(scale area)); each scale's mean is printed too.

A learned token that is below the words on the training images but not on fresh renders has
fitted those 8 images rather than the concept; where on the scales that happens says what it
learned (the coarsest scales decide colour and layout when sampling).

    python benchmarks/bench_toy_concept_loss.py --concept pink-cross \\
        --learned_embeds outputs/toy-fidelity/default/pink-cross-seed0 --prompt "a photo of a cross"
"""

from __future__ import annotations

import argparse
import os

import torch
from PIL import ImageOps

from infinity_t2i.pipeline import InfinityPipeline
from infinity_t2i.training import bitwise_loss, make_training_inputs, per_scale_metrics
from toy_infinity import fidelity as toy_fidelity
from toy_infinity import world as toy_world
from toy_infinity.recogniser import to_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=os.path.join(ROOT, "examples", "toy-infinity"))
    p.add_argument(
        "--concepts_dir",
        default=os.path.join(ROOT, "examples", "concepts"),
        help="Concept folders and their concepts.json, as `python -m toy_infinity.world` writes them.",
    )
    p.add_argument("--concept", required=True, help="A concept of --concepts_dir, e.g. pink-cross.")
    p.add_argument(
        "--learned_embeds", action="append", default=[], help="A training run's output on the concept (repeatable)."
    )
    p.add_argument(
        "--prompt", action="append", default=[], help="More prompts in words besides the concept's words_prompt."
    )
    p.add_argument("--num_fresh", type=int, default=48, help="Fresh renders of the concept (new views).")
    p.add_argument("--seed", type=int, default=98765, help="Seed of the fresh renders.")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    concept = toy_world.select_concepts(args.concepts_dir, [args.concept])[args.concept]
    base = InfinityPipeline.from_pretrained(args.pretrained_model_name_or_path)
    schedule = base.schedule(1.0, toy_world.PN)
    own = toy_fidelity.concept_images(args.concepts_dir, args.concept)
    image_sets = {
        "training images": own + [ImageOps.mirror(image) for image in own],
        "fresh renders": toy_world.render_concept_images(concept, args.num_fresh, args.seed),
    }
    patchify = base.transformer.config.spatial_patchify
    with torch.no_grad():
        inputs = {
            name: make_training_inputs(base.vae.encode(to_input(images)), schedule, patchify)
            for name, images in image_sets.items()
        }

    drawers = [(concept.words_prompt, base, concept.words_prompt)] + [(p, base, p) for p in args.prompt]
    for path in args.learned_embeds:
        pipe, prompt, _ = toy_fidelity.with_learned_concept(args.pretrained_model_name_or_path, path)
        drawers.append((path, pipe, prompt))

    grids = " ".join(f"{h}x{w}" for h, w in schedule.vae_grids(patchify))
    print(f"<{args.concept}>: loss (as training weights it) and each scale's mean loss ({grids})")
    for label, pipe, prompt in drawers:
        print(label)
        for name, x in inputs.items():
            with torch.no_grad():
                logits = base.transformer(pipe.encode_prompt([prompt] * len(x.labels)), x.x_tokens, schedule)
            loss = bitwise_loss(logits, x.labels, schedule, reweight_by_scale=True).item()
            scales = per_scale_metrics(logits, x.labels, schedule)["loss"].tolist()
            print(f"  {name:16s} {loss:.4f}   " + " ".join(f"{v:.3f}" for v in scales), flush=True)


if __name__ == "__main__":
    main()
