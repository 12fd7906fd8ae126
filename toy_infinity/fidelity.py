"""Textual inversion on a held-out concept of the toy world, before and after, as the benchmark
(benchmarks/bench_toy_fidelity.py), the demo and the tests run it. The training runs as a user's
would: the repository's training script in its own process (this needs the repository, i.e. an
editable install)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from infinity_t2i.pipeline import InfinityPipeline, generate_images
from toy_infinity import world as toy_world
from toy_infinity.recogniser import FidelityScorer

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_SCRIPT = os.path.join(REPOSITORY, "train_textual_inversion_infinity.py")
PROMPT_TEMPLATE = "a photo of a {}"
# Textual-inversion settings of the demo (examples/toy_demo.sh), the benchmark and the test; the
# recipe itself (mode, vectors, learning rate) is the script's default.
TOY_TRAINING_ARGS = ("--pn", toy_world.PN, "--train_batch_size", "4", "--max_train_steps", "200", "--seed", "0")


def concept_images(concepts_dir: str, name: str) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(glob.glob(os.path.join(concepts_dir, name, "*.png")))]


def other_objects(concept: toy_world.HeldOutConcept, n: int, seed: int) -> list[Image.Image]:
    """Random toy objects that are not the concept: another kind or another colour."""
    rng = np.random.default_rng(seed)
    images = []
    while len(images) < n:
        obj = toy_world.sample_object(rng)
        if (obj.kind, obj.colour) != (concept.kind, concept.colour):
            images.append(toy_world.render(obj))
    return images


def train_concept(model: str, concepts_dir: str, name: str, output_dir: str, *extra_args: str) -> str:
    """Runs the training script on a concept of `concepts_dir` with the demo's settings; `extra_args`
    override them. Returns the output folder."""
    concept = toy_world.read_concepts(concepts_dir)[name]
    command = [
        sys.executable, TRAINING_SCRIPT,
        "--pretrained_model_name_or_path", model,
        "--train_data_dir", os.path.join(concepts_dir, name),
        "--placeholder_token", f"<{name}>",
        "--initializer_token", concept.initializer,
        "--output_dir", output_dir, "--overwrite_output_dir",  # a benchmark runs a setting's seed again
        *TOY_TRAINING_ARGS,
        *extra_args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"textual inversion of {name} failed:\n{result.stderr[-3000:]}")
    return output_dir


def load_for_scoring(model: str, threads: int | None = None):
    """The pipeline of a toy model and the recogniser that scores its images (a benchmark's start)."""
    if threads:
        torch.set_num_threads(threads)
    return InfinityPipeline.from_pretrained(model), FidelityScorer()


def generate(pipe, prompt: str, num_images: int, seed: int) -> list[Image.Image]:
    """Images of a prompt at the toy resolution, with the inference script's sampling defaults."""
    return generate_images(pipe, prompt, num_images, seed=seed, batch_size=num_images, pn=toy_world.PN)


def with_learned_concept(model: str, embedding: str, template: str = PROMPT_TEMPLATE):
    """A pipeline of `model` with the learned concept of `embedding` loaded as the inference
    script loads it (`load_textual_inversion`: the pipeline expands the placeholder), `template`
    filled with the concept's placeholder, and the placeholder."""
    pipe = InfinityPipeline.from_pretrained(model)
    (placeholder,) = pipe.load_textual_inversion(embedding)
    return pipe, template.format(placeholder), placeholder


def before_and_after(
    model: str, embedding_dir: str, name: str, num_images: int, seed: int
) -> tuple[list[Image.Image], list[Image.Image]]:
    """Images of "a photo of a <initializer>" from the base model, and of "a photo of a <name>"
    with the learned embedding loaded as the inference script loads it; same seeds."""
    concept = toy_world.HELD_OUT_CONCEPTS[name]
    pipe, prompt, _ = with_learned_concept(model, embedding_dir)  # prompts without the token encode as before
    before = generate(pipe, PROMPT_TEMPLATE.format(concept.initializer), num_images, seed)
    return before, generate(pipe, prompt, num_images, seed)
