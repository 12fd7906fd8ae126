"""Does textual inversion learn a concept? Measured on the toy world's held-out concepts.

For each concept of examples/concepts/ (a pairing of kind and colour that pretraining never
showed), with the fidelity recogniser of examples/toy_fidelity.py:
  before   images of "a photo of a <initializer>" from the toy Infinity (what the prompt gives
           without textual inversion)
  after    images of "a photo of a <concept>" after textual inversion on the concept's images
           (the training script, run as a user runs it, with the demo's settings)
  ceiling  the concept's own images
Same seeds before and after. Prints a markdown table and writes a grid per concept (rows:
before, after, own images).

    python benchmarks/bench_toy_fidelity.py                  # ~6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import toy_fidelity
import toy_world

from infinity_t2i.pipeline import make_image_grid


def cell(scores: torch.Tensor) -> str:
    """mean ± standard error"""
    return f"{scores.mean():.3f} ± {scores.std() / len(scores) ** 0.5:.3f}"


def parse_args():
    p = argparse.ArgumentParser(description="Fidelity of the toy world's held-out concepts before and after textual inversion.")
    p.add_argument("--pretrained_model_name_or_path", default=os.path.join(ROOT, "examples", "toy-infinity"))
    p.add_argument("--concepts_dir", default=os.path.join(ROOT, "examples", "concepts"))
    p.add_argument("--concept", action="append", choices=sorted(toy_world.HELD_OUT_CONCEPTS), help="Default: all.")
    p.add_argument("--num_images", type=int, default=16, help="Generated images per prompt (seeds 0, 1, ...).")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "toy-fidelity"))
    p.add_argument("training_args", nargs="*", help="Extra flags for the training script after --, e.g. -- --max_train_steps 400.")
    return p.parse_args()


def main():
    args = parse_args()
    scorer = toy_fidelity.FidelityScorer()
    rows = []
    for name in args.concept or list(toy_world.HELD_OUT_CONCEPTS):
        start = time.time()
        embedding_dir = os.path.join(args.output_dir, name)
        toy_fidelity.train_concept(args.pretrained_model_name_or_path, args.concepts_dir, name, embedding_dir, *args.training_args)
        trained = time.time() - start
        before, after = toy_fidelity.before_and_after(args.pretrained_model_name_or_path, embedding_dir, name, args.num_images, seed=0)
        own = toy_fidelity.concept_images(args.concepts_dir, name)
        scores = [scorer.score(images, name) for images in (before, after, own)]
        n = min(len(own), args.num_images)
        grid = make_image_grid(before[:n] + after[:n] + own[:n], rows=3)
        grid.save(os.path.join(args.output_dir, f"{name}.png"))
        rows.append((name, toy_world.HELD_OUT_CONCEPTS[name].initializer, *scores, trained))
        print(f"{name}: before {scores[0].mean():.3f}, after {scores[1].mean():.3f}, own images {scores[2].mean():.3f} (training {trained:.0f}s)", flush=True)

    print(f"\nfidelity = P(kind) x P(colour) by the recogniser, mean ± standard error over {args.num_images} images (own: the concept's images)\n")
    print("| concept | before TI (\"a photo of a <initializer>\") | after TI (\"a photo of a <concept>\") | ceiling (own images) | TI time |")
    print("|---|---|---|---|---|")
    for name, initializer, before, after, own, trained in rows:
        print(f"| <{name}> | {cell(before)} (\"{initializer}\") | {cell(after)} | {cell(own)} | {trained:.0f} s |")
    print(f"\ngrids (rows: before, after, own images) in {args.output_dir}")


if __name__ == "__main__":
    main()
