#!/usr/bin/env python
"""Generate images with Infinity and learned textual-inversion embeddings.

    python infer_textual_inversion.py \\
        --pretrained_model_name_or_path FoundationVision/Infinity \\
        --learned_embeds user/my-dog-ti \\
        --prompt "A photo of a <my-dog> on the beach" --num_images 4 --seed 0

`--learned_embeds` (repeatable) takes a `.safetensors` file, a folder holding
`learned_embeds.safetensors` (what train_textual_inversion_infinity.py writes) or a hub repo id.
Besides this project's format it reads diffusers' `{token: tensor}` files and A1111 embeddings
(`string_to_param`), when their vectors have the text encoder's width (2048 for flan-T5-XL).
The tokens are added to the tokenizer exactly as training added them and the vectors are written
into their embedding rows; prompts without a learned token encode exactly as with the base model.
`<my-dog>:0.8` in a prompt weights that concept for that prompt: an input-mode concept's vectors
are scaled by 0.8; an output-mode concept's features are 0.8 x its vectors + 0.2 x what T5
outputs there for the initializer word (0 = the word, 1 = the concept).

Generation goes through `infinity_t2i.pipeline.generate_images`, the function the training
script's validation uses: image i of a prompt is drawn with seed `--seed + i`, whatever
`--batch_size`. The sampling defaults are the official ones (cfg 3 on the logits, tau 1, top-k 900,
top-p 0.97; each bit is sampled on its own, i.e. the official sampling_per_bits=1).

Written to `--output_dir`: `{slug}_seed{seed}_{index}.png` per image, `{slug}_grid.png` per prompt,
`{slug}_compare.png` with `--compare` (each seed's image beside the one with the initializer word
in place of the learned token), and `settings.json` (every setting, the embeddings' metadata). The
slug keeps a learned token visible: "a photo of a <my-dog>" -> `a-photo-of-a-[my-dog]`.
"""

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from infinity_t2i.files import save_image, unwritable_reason, write_json
from infinity_t2i.grids import labelled_grid
from infinity_t2i.loading import CheckpointError, ModelFilesNotFound
from infinity_t2i.pipeline import (
    TEXT_ENCODER_DTYPES,
    InfinityPipeline,
    effective_model_type,
    generate_images,
    resolve_preset,
    resolve_text_encoder,
)
from infinity_t2i.resolution import PN_NUM_SCALES, get_schedule, nearest_template
from infinity_t2i.sampling import SamplingSettings
from infinity_t2i.textual_inversion import (
    ConceptError,
    LearnedConcept,
    apply_concepts,
    expand_placeholders,
    is_hub_repo_id,
    load_learned_embeds,
    placeholder_pattern,
    replace_placeholder,
    set_output_rows,
    write_rows,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SETTINGS_NAME = "settings.json"
SAMPLING_DEFAULTS = SamplingSettings()  # the official run_infinity.py's
# "<my-dog>:0.8" -> scale 0.8 (no sign means positive; "2." keeps the sentence's full stop)
SCALE_SUFFIX = r":(-?(?:\d+(?:\.\d+)?|\.\d+))"


class UsageError(Exception):
    """Bad input: reported as one line, with a non-zero exit and nothing written."""


BAD_INPUT = (UsageError, ConceptError, ModelFilesNotFound, CheckpointError)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate images with Infinity and textual-inversion embeddings.")
    # model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub repo id (FoundationVision/Infinity) or a local folder with the same file names.",
    )
    parser.add_argument("--model_revision", type=str, default=None, help="Revision of the Infinity hub repo.")
    parser.add_argument(
        "--model_type",
        type=str,
        default="infinity_2b",
        choices=["infinity_2b", "infinity_8b"],
        help="Which released model (ignored for a local folder with infinity_config.json).",
    )
    parser.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default=None,
        help="flan-T5 encoder and tokenizer (default: google/flan-t5-xl, or the folder's own text_encoder/).",
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default=None,
        choices=sorted(DTYPES),
        help="Weights of the transformer blocks (the VAE stays float32); default bfloat16 on CUDA, float32 on CPU.",
    )
    parser.add_argument(
        "--text_encoder_dtype",
        type=str,
        default=None,
        choices=sorted(TEXT_ENCODER_DTYPES),
        help="flan-T5's weights; default float16 on CUDA (FFN outputs kept in float32, as officially), float32 on CPU.",
    )
    parser.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    # embeddings
    parser.add_argument(
        "--learned_embeds",
        type=str,
        action="append",
        required=True,
        help=(
            "A .safetensors/.bin/.pt embedding, a folder with learned_embeds.safetensors, or a hub repo id; repeatable."
        ),
    )
    parser.add_argument(
        "--token",
        type=str,
        action="append",
        default=None,
        help=(
            "A new name for the placeholder of the matching --learned_embeds (the first --token renames the first "
            "file's, ...); repeatable."
        ),
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of --learned_embeds hub repos.")
    parser.add_argument(
        "--force",
        action="store_true",
        help="Use embeddings whose metadata names another model_type, base model or text encoder.",
    )
    # prompts
    parser.add_argument(
        "--prompt",
        type=str,
        action="append",
        default=None,
        help='A prompt, e.g. "a photo of a <my-dog>" or "a photo of a <my-dog>:0.8" (weighted concept); repeatable.',
    )
    parser.add_argument(
        "--prompt_file", type=str, default=None, help="A text file with one prompt per line (blank lines skipped)."
    )
    parser.add_argument(
        "--negative_prompt",
        type=str,
        default=None,
        help="Guides away from this prompt instead of the unconditional one.",
    )
    # generation
    parser.add_argument("--num_images", type=int, default=4, help="Images per prompt.")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Image i of each prompt uses seed + i (default: a random seed, recorded in settings.json).",
    )
    parser.add_argument(
        "--batch_size", type=int, default=4, help="Images generated together (does not change the images)."
    )
    parser.add_argument(
        "--pn",
        type=str,
        default="1M",
        choices=sorted(PN_NUM_SCALES),
        help="Total pixels: 0.06M (256px), 0.25M (512px), 0.60M or 1M (1024px) for square images.",
    )
    parser.add_argument(
        "--h_div_w", type=float, default=1.0, help="Aspect ratio height/width; the nearest Infinity template is used."
    )
    parser.add_argument(
        "--cfg",
        "--guidance_scale",
        dest="cfg",
        type=float,
        default=SAMPLING_DEFAULTS.cfg,
        help="Classifier-free guidance scale (1 = none).",
    )
    parser.add_argument(
        "--tau", type=float, default=SAMPLING_DEFAULTS.tau, help="Sampling temperature of the bit logits."
    )
    parser.add_argument(
        "--top_k",
        type=int,
        default=SAMPLING_DEFAULTS.top_k,
        help="Per-bit top-k (>= 2 keeps both values, 1 is greedy, 0 off).",
    )
    parser.add_argument("--top_p", type=float, default=SAMPLING_DEFAULTS.top_p, help="Per-bit top-p (0 off).")
    parser.add_argument(
        "--cfg_insertion_layer",
        type=int,
        default=SAMPLING_DEFAULTS.cfg_insertion_layer,
        help="0: guidance on the logits; -k: on the hidden states after block depth-k.",
    )
    # output
    parser.add_argument("--output_dir", type=str, default="outputs", help="Where images, grids and settings.json go.")
    parser.add_argument(
        "--compare",
        action="store_true",
        help=(
            "Also render each prompt with the initializer word in place of the learned token, and write side-by-side "
            "grids."
        ),
    )
    args = parser.parse_args(argv)

    if not args.prompt and not args.prompt_file:
        parser.error("give at least one --prompt or a --prompt_file")
    if args.token and len(args.token) > len(args.learned_embeds):
        parser.error(
            f"{len(args.token)} --token for {len(args.learned_embeds)} --learned_embeds; each --token renames the "
            "matching file's placeholder"
        )
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not args.h_div_w > 0:
        parser.error(f"--h_div_w must be positive, got {args.h_div_w}")
    if not 0 <= args.top_p <= 1 or args.top_k < 0 or not args.tau > 0:
        parser.error("need 0 <= --top_p <= 1, --top_k >= 0 and --tau > 0")
    return args


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file} ({e.strerror or e})") from e
    if not prompts:
        raise UsageError(f"--prompt_file {args.prompt_file} holds no prompts")
    return prompts


def mentions(text: str, placeholder: str) -> bool:
    return placeholder_pattern(placeholder).search(text) is not None


def parse_token_scales(text: str, placeholders, scales: dict[str, float] | None = None) -> tuple[str, dict[str, float]]:
    """Removes `:0.8` after placeholders: ("a <my-dog>:0.8", ...) -> ("a <my-dog>", {"<my-dog>": 0.8}).
    One placeholder gets one scale per prompt (its negative prompt included)."""
    scales, given = dict(scales or {}), text
    for placeholder in sorted(placeholders, key=len, reverse=True):

        def take(match, placeholder=placeholder):
            value = float(match.group(1))
            if scales.get(placeholder, value) != value:
                raise UsageError(
                    f"{placeholder} has two scales ({scales[placeholder]} and {value}) in {given!r}; give it one"
                )
            scales[placeholder] = value
            return placeholder

        text = placeholder_pattern(placeholder, SCALE_SUFFIX).sub(take, text)
    return text, scales


def replace_with_initializers(text: str, concepts: dict[str, LearnedConcept]) -> str:
    for placeholder, concept in concepts.items():
        text = replace_placeholder(text, placeholder, concept.metadata["initializer_token"])
    return text


def slugify(text: str, placeholders: Sequence[str] = (), max_length: int = 60) -> str:
    """A prompt as a file name: lower-case words joined by "-", each learned placeholder kept
    visible in brackets ("a photo of a <blue-heart>" -> "a-photo-of-a-[blue-heart]"), so that it
    never takes the name of the same prompt in words."""

    def words(part: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-")

    # longest first, so that a placeholder inside another one's name does not split it
    names = "|".join(placeholder_pattern(p).pattern for p in sorted(placeholders, key=len, reverse=True))
    parts = re.split(f"({names})", text) if names else [text]  # odd parts: the placeholders
    slug = "-".join(filter(None, (f"[{words(x) or 'token'}]" if i % 2 else words(x) for i, x in enumerate(parts))))
    return slug[:max_length].rstrip("-") or "prompt"


@dataclass
class PromptJob:
    prompt: str  # as given
    text: str  # scales removed, placeholders not yet expanded
    negative: str | None
    scales: dict[str, float]
    used: list[str]  # placeholders the prompt (or its negative) names
    slug: str
    compare_text: str | None = None
    compare_negative: str | None = None
    record: dict = field(default_factory=dict)


def plan_prompts(
    prompts: list[str], negative_prompt: str | None, concepts: dict[str, LearnedConcept], compare: bool
) -> list[PromptJob]:
    jobs, slugs = [], set()
    for prompt in prompts:
        text, scales = parse_token_scales(prompt, concepts)
        negative = None
        if negative_prompt:
            negative, scales = parse_token_scales(negative_prompt, concepts, scales)
        used = [p for p in concepts if mentions(text, p) or (negative and mentions(negative, p))]
        if not mentions_any(text, concepts):
            logger.warning(
                f"the prompt {prompt!r} names none of the loaded tokens ({', '.join(concepts)}); it renders as with "
                "the base model"
            )
        slug, k = slugify(prompt, list(concepts)), 2
        while slug in slugs:
            slug, k = f"{slugify(prompt, list(concepts))}-{k}", k + 1
        slugs.add(slug)
        job = PromptJob(prompt, text, negative, {p: s for p, s in scales.items()}, used, slug)
        if compare and used:
            missing = [p for p in used if not isinstance(concepts[p].metadata.get("initializer_token"), str)]
            if missing:
                logger.warning(
                    f"--compare: {', '.join(f'{p} ({concepts[p].source})' for p in missing)} records no "
                    f"initializer_token; no comparison for {prompt!r}"
                )
            else:
                chosen = {p: concepts[p] for p in used}
                job.compare_text = replace_with_initializers(text, chosen)
                job.compare_negative = replace_with_initializers(negative, chosen) if negative else None
        jobs.append(job)
    return jobs


def mentions_any(text: str, concepts) -> bool:
    return any(mentions(text, p) for p in concepts)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def mismatches(concept: LearnedConcept, model_type: str, base_model: str, text_encoder: str) -> list[str]:
    """What the file's metadata says it was trained for, where that differs from this run.

    model_type is always compared. Model and text encoder names are compared only when both are
    hub repo ids: a local path names the same files differently on every machine."""
    metadata, problems = concept.metadata, []
    stored_type = metadata.get("model_type")
    if isinstance(stored_type, str) and stored_type != model_type:
        problems.append(f"model_type {stored_type} (this run: {model_type})")
    for key, loaded in (("base_model", base_model), ("text_encoder", text_encoder)):
        stored = metadata.get(key)
        if (
            isinstance(stored, str)
            and is_hub_repo_id(stored)
            and is_hub_repo_id(loaded)
            and stored.lower() != loaded.lower()
        ):
            problems.append(f"{key} {stored} (this run: {loaded})")
    return problems


@contextmanager
def scaled_vectors(
    text_encoder, concepts: dict[str, LearnedConcept], token_ids: dict[str, list[int]], scales: dict[str, float]
):
    """A concept weighted by `<tok>:w` inside the block, as loaded after it. Input mode: its rows
    hold w * vectors. Output mode (where a vector's scale means nothing: Infinity RMS-normalises
    each text row): its features are w * vectors + (1 - w) * T5's own output there, which is the
    initializer word's in context at w = 0."""

    def put(placeholder: str, w: float) -> None:
        concept, ids = concepts[placeholder], token_ids[placeholder]
        if concept.mode == "output":
            set_output_rows(text_encoder, ids, concept.vectors, weight=w)
        else:
            write_rows(text_encoder, ids, concept.vectors * w)

    changed = [p for p, s in scales.items() if s != 1.0]
    try:
        for placeholder in changed:
            put(placeholder, scales[placeholder])
        yield
    finally:
        for placeholder in changed:
            put(placeholder, 1.0)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def grid_of(images: list[Image.Image], prompt: str, seeds: list[int]) -> Image.Image:
    """As square as the count allows (4 -> 2x2, 6 -> 2x3, 3 -> 1x3), titled with the prompt."""
    cols = math.ceil(len(images) / max(1, math.isqrt(len(images))))
    rows = [images[i : i + cols] for i in range(0, len(images), cols)]
    return labelled_grid(rows, title=f"{prompt} (seeds {seeds[0]}-{seeds[-1]}, row by row)")


def side_by_side(
    learned: list[Image.Image], baseline: list[Image.Image], job: PromptJob, seeds: list[int]
) -> Image.Image:
    """One row per seed: the learned token's image, then the initializer word's."""
    return labelled_grid(
        [[a, b] for a, b in zip(learned, baseline)],
        row_labels=[f"seed {s}" for s in seeds],
        column_labels=[job.prompt, job.compare_text],
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    if args.seed is None:
        args.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        logger.info(f"no --seed given; using {args.seed}")

    # 1. Prompts, embedding files and the output folder: checked before the model loads.
    prompts = read_prompts(args)
    problem = unwritable_reason(args.output_dir)
    if problem:
        raise UsageError(f"--output_dir: {problem}; choose another folder")
    loaded: list[LearnedConcept] = []
    for k, source in enumerate(args.learned_embeds):
        token = args.token[k] if args.token and k < len(args.token) else None
        loaded += load_learned_embeds(source, token=token, revision=args.revision)
    preset = resolve_preset(args.pretrained_model_name_or_path, args.model_type)
    text_encoder_name = resolve_text_encoder(args.pretrained_model_name_or_path, args.text_encoder_name_or_path, preset)
    for concept in loaded:
        problems = mismatches(
            concept,
            effective_model_type(args.pretrained_model_name_or_path, args.model_type),
            args.pretrained_model_name_or_path,
            text_encoder_name,
        )
        if problems:
            message = f"{concept.source} ({concept.placeholder}) was trained for {'; '.join(problems)}"
            if not args.force:
                raise UsageError(f"{message}; load that model, or pass --force to use the embedding anyway")
            logger.warning(f"{message}; --force: using it anyway")
    concepts = {c.placeholder: c for c in loaded}

    # 2. The base model, then the learned tokens in its tokenizer and embedding matrix.
    pipe = InfinityPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        model_type=args.model_type,
        text_encoder_name_or_path=args.text_encoder_name_or_path,
        torch_dtype=DTYPES[dtype_name],
        device=device,
        revision=args.model_revision,
        text_encoder_dtype=TEXT_ENCODER_DTYPES.get(args.text_encoder_dtype),
    )
    token_ids = apply_concepts(pipe.tokenizer, pipe.text_encoder, loaded)
    for concept in loaded:
        logger.info(
            f"{concept.placeholder}: {len(concept.tokens)} vector(s) from {concept.source} -> token ids "
            f"{token_ids[concept.placeholder]}"
        )
    concept_tokens = {p: c.tokens for p, c in concepts.items()}

    # 3. What each prompt renders: scales taken out, learned tokens expanded.
    jobs = plan_prompts(prompts, args.negative_prompt, concepts, args.compare)
    template = nearest_template(args.h_div_w)
    schedule = get_schedule(template, args.pn)
    height, width = schedule.image_size(pipe.token_stride)
    sampling = {name: getattr(args, name) for name in SamplingSettings.__dataclass_fields__}
    seeds = [args.seed + i for i in range(args.num_images)]

    # 4. Generate and save.
    os.makedirs(args.output_dir, exist_ok=True)
    total = args.num_images * (len(jobs) + sum(job.compare_text is not None for job in jobs))
    progress = tqdm(total=total, desc="Images", unit="image")
    written = {"images": 0, "grids": 0, "compare": 0}
    for job in jobs:
        encoded = expand_placeholders(job.text, concept_tokens)
        negative = expand_placeholders(job.negative, concept_tokens) if job.negative else None
        with scaled_vectors(pipe.text_encoder, concepts, token_ids, job.scales):
            images = generate_images(pipe, encoded, args.num_images, seed=args.seed, batch_size=args.batch_size,
                                     progress=progress.update, negative_prompt=negative, schedule=schedule,
                                     **sampling)  # fmt: skip
        names = [f"{job.slug}_seed{args.seed}_{i}.png" for i in range(args.num_images)]
        for image, name in zip(images, names):
            save_image(image, os.path.join(args.output_dir, name))
        save_image(grid_of(images, job.prompt, seeds), os.path.join(args.output_dir, f"{job.slug}_grid.png"))
        written["images"] += len(images)
        written["grids"] += 1
        job.record = {
            "prompt": job.prompt,
            "encoded_prompt": encoded,
            "negative_prompt": negative,
            "scales": job.scales,
            "concepts": job.used,
            "seeds": seeds,
            "images": names,
            "grid": f"{job.slug}_grid.png",
        }
        if job.compare_text is not None:
            baseline = generate_images(pipe, job.compare_text, args.num_images, seed=args.seed,
                                       batch_size=args.batch_size, progress=progress.update,
                                       negative_prompt=job.compare_negative, schedule=schedule, **sampling)  # fmt: skip
            save_image(
                side_by_side(images, baseline, job, seeds), os.path.join(args.output_dir, f"{job.slug}_compare.png")
            )
            written["compare"] += 1
            job.record.update(
                compare=f"{job.slug}_compare.png",
                compare_prompt=job.compare_text,
                compare_negative_prompt=job.compare_negative,
            )
    progress.close()

    # 5. Every setting, and where the embeddings came from.
    settings = {
        "args": vars(args),
        "device": str(pipe.device),
        "dtype": dtype_name,
        "text_encoder_dtype": str(pipe.text_encoder.dtype).removeprefix("torch."),
        "text_encoder": text_encoder_name,
        "h_div_w_template": template,
        "image_size": [height, width],
        "scale_schedule": [list(g) for g in schedule.grids],
        "sampling": {**sampling, "bit_sampling": "each bit on its own (official sampling_per_bits=1)"},
        "embeddings": [
            {
                "placeholder": c.placeholder,
                "tokens": c.tokens,
                "token_ids": token_ids[c.placeholder],
                "file": c.source,
                "vector_norms": [round(v, 6) for v in c.vectors.norm(dim=-1).tolist()],
                "metadata": c.metadata,
            }
            for c in loaded
        ],
        "prompts": [job.record for job in jobs],
    }
    write_json(os.path.join(args.output_dir, SETTINGS_NAME), settings)
    compare = f", {written['compare']} comparison grid(s)" if args.compare else ""
    print(
        f"Saved {written['images']} image(s) of {len(jobs)} prompt(s) at {width}x{height}, {written['grids']} "
        f"grid(s){compare} and {SETTINGS_NAME} to {os.path.abspath(args.output_dir)}"
    )
    return settings


if __name__ == "__main__":
    try:
        main(parse_args())
    except BAD_INPUT as e:
        sys.exit(f"error: {e}")  # one line on stderr, exit status 1
