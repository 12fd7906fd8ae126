"""Does a learned token beat words? Measured on the toy world's held-out concepts.

For each concept of --concepts_dir (default examples/concepts/, the held-out concepts; `python -m
toy_infinity.world --concept KIND:COLOUR` writes others), with the fidelity recogniser of
toy_infinity/recogniser.py (P(kind) x P(colour)):
  words     images of the best plain-words description (`words_prompt` in concepts.json,
            "a photo of a pink cross"): the strongest simple alternative to a learned token
  SETTING   images of "a photo of a <concept>" after textual inversion with the training script's
            default recipe plus the setting's flags, one run per training seed
  ceiling   the concept's own images
each without and with a background in the prompt ("... on grass", "... in the sky", "... at
night", pooled), and for the latter how often the background follows the prompt (the recogniser's
P(background), mean): whether the concept stays editable. A cell is the mean over training seeds
of each run's mean, ± the standard error of those run means, and the worst run; words and the
ceiling have no training seed (± is then the standard error over images). Same sampling seeds
everywhere.

    python benchmarks/bench_toy_fidelity.py                                      # default recipe, seeds 0 1 2
    python benchmarks/bench_toy_fidelity.py --setting input="--ti_mode input" --setting "free=--no-hold_norm"
    python benchmarks/bench_toy_fidelity.py --setting from-words='--initializer_token "{description}"'

Each run is the training script in its own process (200 steps, batch 4, 0.06M: the issue's
budget) and takes about a minute on 2 CPU cores; the raw scores go to results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time

import torch

from infinity_t2i.files import write_json
from infinity_t2i.pipeline import InfinityPipeline
from toy_infinity import fidelity as toy_fidelity
from toy_infinity import world as toy_world
from toy_infinity.recogniser import FidelityScorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BACKGROUNDS = ("grass", "sky", "night")


def prompts_for(subject: str) -> dict[str, list[tuple[str, str | None]]]:
    """The plain prompt, and the same subject on each background: (prompt, background or None)."""
    return {
        "plain": [(f"a photo of a {subject}", None)],
        "background": [(f"a photo of a {subject} {toy_world.BACKGROUNDS[b][1]}", b) for b in BACKGROUNDS],
    }


def score_prompts(scorer, pipe, concept, prompts: dict, num_images: int) -> dict[str, list[float]]:
    """Fidelity of every image per prompt group (num_images per prompt), and P(the prompt's
    background) of the background group's images."""
    scores = {group: [] for group in prompts} | {"background_followed": []}
    for group, texts in prompts.items():
        for prompt, background in texts:
            images = toy_fidelity.generate(pipe, prompt, num_images, seed=0)
            scores[group] += scorer.score(images, concept).tolist()
            if background is not None:
                scores["background_followed"] += scorer.background(images, background).tolist()
    return scores


def image_cell(scores: list[float]) -> str:
    t = torch.tensor(scores)
    return f"{t.mean():.3f} ± {t.std() / len(t) ** 0.5:.3f}"


def run_cell(runs: list[list[float]]) -> str:
    """mean ± s.e. of the run means (worst run)"""
    means = torch.tensor([sum(r) / len(r) for r in runs])
    se = means.std() / len(means) ** 0.5 if len(means) > 1 else torch.tensor(float("nan"))
    return f"{means.mean():.3f} ± {se:.3f} (worst {means.min():.3f})"


def parse_args():
    p = argparse.ArgumentParser(
        description="Fidelity of learned tokens against the best words, on concepts of the toy world."
    )
    p.add_argument("--pretrained_model_name_or_path", default=os.path.join(ROOT, "examples", "toy-infinity"))
    p.add_argument(
        "--concepts_dir",
        default=os.path.join(ROOT, "examples", "concepts"),
        help="Concept folders and their concepts.json, as `python -m toy_infinity.world` writes them.",
    )
    p.add_argument("--concept", action="append", help="A concept of --concepts_dir (repeatable). Default: all.")
    p.add_argument(
        "--setting",
        action="append",
        default=None,
        help=(
            'NAME=FLAGS: training flags on top of the default recipe (repeatable); default: "default=" alone. '
            '{description} in FLAGS stands for the concept\'s words ("pink cross" of "a photo of a pink cross").'
        ),
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds.")
    p.add_argument("--num_images", type=int, default=32, help="Images per prompt (sampling seeds 0, 1, ...).")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "toy-fidelity"))
    p.add_argument(
        "--table_only", action="store_true", help="Print the table of the settings from results.json; run nothing."
    )
    return p.parse_args()


def main():
    args = parse_args()
    settings = dict(s.split("=", 1) for s in (args.setting or ["default="]))
    concepts = toy_world.select_concepts(args.concepts_dir, args.concept)
    scorer = FidelityScorer()
    results_path = os.path.join(args.output_dir, "results.json")
    os.makedirs(args.output_dir, exist_ok=True)
    results = {}
    if os.path.exists(results_path):  # runs of earlier invocations stay; a setting's seed is run again
        with open(results_path) as f:
            results = json.load(f)
    for name in [] if args.table_only else concepts:
        concept = concepts[name]
        entry = results.setdefault(name, {"runs": {}})
        base = InfinityPipeline.from_pretrained(args.pretrained_model_name_or_path)
        description = concept.words_prompt.removeprefix("a photo of a ")
        entry["words"] = score_prompts(scorer, base, concept, prompts_for(description), args.num_images)
        entry["ceiling"] = scorer.score(toy_fidelity.concept_images(args.concepts_dir, name), concept).tolist()
        for setting, flags in settings.items():
            for seed in args.seeds:
                start = time.time()
                out = os.path.join(args.output_dir, setting, f"{name}-seed{seed}")
                toy_fidelity.train_concept(
                    args.pretrained_model_name_or_path,
                    args.concepts_dir,
                    name,
                    out,
                    "--seed",
                    str(seed),
                    *shlex.split(flags.replace("{description}", description)),
                )
                trained = time.time() - start
                pipe, subject, _ = toy_fidelity.with_learned_concept(args.pretrained_model_name_or_path, out, "{}")
                scores = score_prompts(scorer, pipe, concept, prompts_for(subject), args.num_images)
                entry["runs"].setdefault(setting, {})[str(seed)] = {**scores, "flags": flags, "train_seconds": trained}
                plain = sum(scores["plain"]) / len(scores["plain"])
                print(
                    f"{name} {setting} seed {seed}: {plain:.3f} (words "
                    f"{sum(entry['words']['plain']) / args.num_images:.3f}; training {trained:.0f} s)",
                    flush=True,
                )
                write_json(results_path, results)

    print(
        f"\nfidelity = P(kind) x P(colour); {args.num_images} images per prompt; TI cells: mean ± s.e. over training "
        f"seeds {args.seeds} (worst run)\n"
    )
    print("| concept | prompt | words | " + " | ".join(settings) + " | ceiling (own images) |")
    print("|---|---|---|" + "---|" * len(settings) + "---|")
    groups = {"plain": "plain", "background": "on a background", "background_followed": "P(that background)"}
    for name in concepts:
        entry = results[name]
        for group, label in groups.items():
            runs = {s: [run[group] for run in entry["runs"].get(s, {}).values() if group in run] for s in settings}
            cells = [run_cell(runs[s]) if runs[s] else "" for s in settings]
            words = image_cell(entry["words"][group]) if group in entry["words"] else ""
            ceiling = image_cell(entry["ceiling"]) if group == "plain" else ""
            print(f"| <{name}> | {label} | {words} | " + " | ".join(cells) + f" | {ceiling} |")
    print(f"\nraw scores: {results_path}")


if __name__ == "__main__":
    main()
