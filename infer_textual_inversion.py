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
The script loads them with `InfinityPipeline.load_textual_inversion`, the Python API: the tokens
are added to the tokenizer exactly as training added them, the vectors written into their embedding
rows, and each prompt's placeholders expanded into all their tokens; prompts without a learned
token encode exactly as with the base model. An embedding is refused (unless `--force`) when its
metadata names another model_type, another base model (by the fingerprint training records, or by
hub repo id for files without one) or another hub text encoder.

`<my-dog>:0.8` in a prompt weights that concept for that prompt (and the negative prompt has its
own): an input-mode concept's vectors are scaled by 0.8; an output-mode concept's features are
0.8 x its vectors + 0.2 x what T5 outputs there for the initializer word (0 = the word, 1 = the
concept). A weight is a number from -1 to 2 (`1`, `.5`, `-0.25`, `2e-1`); anything else written
right after `<tok>:` (`<tok>:abc`, `<tok>:1e3`) is refused; `<tok>: text` stays text.

Generation goes through `infinity_t2i.pipeline.generate_images`, the function the training
script's validation uses: image i of a prompt is drawn with seed `--seed + i`, whatever
`--batch_size`. The sampling defaults are the official ones (cfg 3 on the logits, tau 1, top-k 900,
top-p 0.97; each bit is sampled on its own, i.e. the official sampling_per_bits=1). Every numeric
flag is checked against the range its --help states before anything loads.

Written to `--output_dir`: `{slug}_seed{seed}_{index}.png` per image, `{slug}_grid.png` per prompt,
`{slug}_compare.png` with `--compare` (each seed's image beside the one with the initializer word
in place of the learned token), and `settings.json` (every setting, the embeddings' metadata). The
slug keeps a learned token visible: "a photo of a <my-dog>" -> `a-photo-of-a-[my-dog]`; prompts
whose slugs would be the same (they differ in case or punctuation) get a short hash of the prompt
as well (`a-dog-1f0e3d`), and a prompt given twice is rendered once. A run never replaces the files
of an earlier run in the same `--output_dir` unless `--overwrite_output_dir` is given.
"""

import argparse
import hashlib
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from infinity_t2i.files import save_image, unwritable_reason, write_json
from infinity_t2i.grids import labelled_grid
from infinity_t2i.loading import CheckpointError, ModelFilesNotFound, looks_like_a_path
from infinity_t2i.pipeline import (
    TEXT_ENCODER_DTYPES,
    InfinityPipeline,
    effective_model_type,
    generate_images,
    load_tokenizer,
    resolve_preset,
    resolve_text_encoder,
)
from infinity_t2i.resolution import PN_NUM_SCALES, get_schedule, nearest_template
from infinity_t2i.sampling import SamplingSettings
from infinity_t2i.textual_inversion import (
    WEIGHT_RANGE,
    ConceptError,
    ConceptMismatch,
    LearnedConcept,
    Placeholders,
    check_concept_tokens,
    concept_mismatches,
    is_hub_repo_id,
    load_learned_embeds,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SETTINGS_NAME = "settings.json"
SAMPLING_DEFAULTS = SamplingSettings()  # the official run_infinity.py's
MAX_SEED = 2**63 - 1
# flag: (lowest, highest) allowed; floats must be finite. --cfg_insertion_layer's lower end is the
# model's: -(depth - 1), checked against the model's architecture before its weights load.
RANGES = {
    "num_images": (1, 10_000),
    "batch_size": (1, 1024),
    "seed": (0, MAX_SEED),
    "h_div_w": (0.1, 10.0),
    "cfg": (0.0, 20.0),
    "tau": (0.01, 10.0),
    "top_k": (0, 2**31 - 1),
    "top_p": (0.0, 1.0),
    "cfg_insertion_layer": (None, 0),
}
HASH_LENGTH = 6  # hex digits of the prompt's hash in a file name, when two prompts' slugs clash


class UsageError(Exception):
    """Bad input: reported as one line, with a non-zero exit and nothing written."""


BAD_INPUT = (UsageError, ConceptError, ModelFilesNotFound, CheckpointError)


def allowed(name: str) -> str:
    """The range of a numeric flag, as --help and the errors state it."""
    low, high = RANGES[name]
    shown = {2**31 - 1: "2**31-1", MAX_SEED: "2**63-1"}
    if low is None:
        return f"at most {high:g}"
    return f"from {shown.get(low, f'{low:g}')} to {shown.get(high, f'{high:g}')}"


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
    parser.add_argument(
        "--device", type=str, default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)."
    )
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
        help=(
            "Use embeddings whose metadata names another model_type, base model (fingerprint or hub id) or hub text "
            "encoder."
        ),
    )
    # prompts
    parser.add_argument(
        "--prompt",
        type=str,
        action="append",
        default=None,
        help=(
            f'A prompt, e.g. "a photo of a <my-dog>", or "a photo of a <my-dog>:0.8" (the concept weighted, a number '
            f"from {WEIGHT_RANGE[0]:g} to {WEIGHT_RANGE[1]:g}; 1 = as learned); repeatable."
        ),
    )
    parser.add_argument(
        "--prompt_file",
        type=str,
        default=None,
        help="A UTF-8 text file with one prompt per line (blank lines skipped).",
    )
    parser.add_argument(
        "--negative_prompt",
        type=str,
        default=None,
        help="Guides away from this prompt instead of the unconditional one.",
    )
    # generation
    parser.add_argument("--num_images", type=int, default=4, help=f"Images per prompt ({allowed('num_images')}).")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=(
            f"Image i of each prompt uses seed + i ({allowed('seed')}; default: a random seed, recorded in "
            "settings.json)."
        ),
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help=f"Images generated together ({allowed('batch_size')}; the same images, a pixel at most one level apart).",
    )
    parser.add_argument(
        "--pn",
        type=str,
        default="1M",
        choices=sorted(PN_NUM_SCALES),
        help="Total pixels: 0.06M (256px), 0.25M (512px), 0.60M or 1M (1024px) for square images.",
    )
    parser.add_argument(
        "--h_div_w",
        type=float,
        default=1.0,
        help=f"Aspect ratio height/width ({allowed('h_div_w')}); the nearest Infinity template (1/3 to 3) is used.",
    )
    parser.add_argument(
        "--cfg",
        "--guidance_scale",
        dest="cfg",
        type=float,
        default=SAMPLING_DEFAULTS.cfg,
        help=f"Classifier-free guidance scale ({allowed('cfg')}; 1 = none).",
    )
    parser.add_argument(
        "--tau",
        type=float,
        default=SAMPLING_DEFAULTS.tau,
        help=f"Sampling temperature of the bit logits ({allowed('tau')}).",
    )
    parser.add_argument(
        "--top_k",
        type=int,
        default=SAMPLING_DEFAULTS.top_k,
        help=f"Per-bit top-k ({allowed('top_k')}: >= 2 keeps both values, 1 is greedy, 0 off).",
    )
    parser.add_argument(
        "--top_p", type=float, default=SAMPLING_DEFAULTS.top_p, help=f"Per-bit top-p ({allowed('top_p')}; 0 off)."
    )
    parser.add_argument(
        "--cfg_insertion_layer",
        type=int,
        default=SAMPLING_DEFAULTS.cfg_insertion_layer,
        help=(
            "0: guidance on the logits; -k: on the hidden states after block depth-k, for k from 1 to depth-1 of the "
            "model (31 for Infinity-2B)."
        ),
    )
    # output
    parser.add_argument("--output_dir", type=str, default="outputs", help="Where images, grids and settings.json go.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the files of an earlier run in --output_dir (without it, such a run is refused).",
    )
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
    for name, (low, high) in RANGES.items():
        value = getattr(args, name)
        if value is not None and not ((low is None or low <= value) and value <= high):  # NaN fails too
            number = "a finite number" if isinstance(value, float) else "an integer"
            parser.error(f"--{name} must be {number} {allowed(name)}, got {value}")
    if args.device is not None:
        problem = device_problem(args.device)
        if problem:
            parser.error(f"--device {args.device}: {problem}")
    return args


def device_problem(name: str) -> str | None:
    """Why `name` is no device this machine can run on, or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "not a device; use cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type == "mps" and torch.backends.mps.is_available():
        return None
    if device.type != "cuda":
        return "not a device this script runs on; use cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --device cpu"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8-sig") as f:  # a byte-order mark is not the prompt's
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompt_file {args.prompt_file} ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            raise UsageError(
                f"--prompt_file {args.prompt_file} is not UTF-8 text (line {line} holds the byte "
                f"{e.object[e.start]:#04x}); save it as UTF-8"
            ) from e
    if not prompts:
        raise UsageError(f"--prompt_file {args.prompt_file} holds no prompts")
    unique = list(dict.fromkeys(prompts))
    for prompt in [p for p, n in Counter(prompts).items() if n > 1]:
        logger.warning(f"the prompt {prompt!r} is given {Counter(prompts)[prompt]} times; it is rendered once")
    return unique


def slugify(text: str, placeholders: Sequence[str] = (), max_length: int = 60) -> str:
    """A prompt as a file name: lower-case words joined by "-", each learned placeholder kept
    visible in brackets ("a photo of a <blue-heart>" -> "a-photo-of-a-[blue-heart]"), so that it
    never takes the name of the same prompt in words."""

    def words(part: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-")

    parts = Placeholders(placeholders).split(text)  # odd parts: the placeholders
    slug = "-".join(filter(None, (f"[{words(x) or 'token'}]" if i % 2 else words(x) for i, x in enumerate(parts))))
    return slug[:max_length].rstrip("-") or "prompt"


def file_stems(prompts: Sequence[str], placeholders: Sequence[str] = ()) -> dict[str, str]:
    """{prompt: its files' stem}, unique within the run: the slug, and where two prompts' slugs are
    the same ("A dog" and "a dog!"), the slug and a short hash of the prompt, whatever the order."""
    stems = {p: slugify(p, placeholders) for p in prompts}
    for length in (HASH_LENGTH, 12, 64):
        counts = Counter(stems.values())
        clashing = [p for p in prompts if counts[stems[p]] > 1]
        if not clashing:
            break
        for prompt in clashing:
            digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:length]
            stems[prompt] = f"{slugify(prompt, placeholders)}-{digest}"
    return stems


@dataclass
class PromptJob:
    prompt: str  # as given: weights and placeholders as written
    text: str  # weights removed, placeholders not yet expanded
    negative: str | None  # as given
    scales: dict[str, float]  # the prompt's weights
    negative_scales: dict[str, float]
    used: list[str]  # placeholders the prompt (or its negative) names
    slug: str
    compare_text: str | None = None
    compare_negative: str | None = None
    record: dict = field(default_factory=dict)

    def files(self, seeds: list[int]) -> list[str]:
        names = [f"{self.slug}_seed{seeds[0]}_{i}.png" for i in range(len(seeds))] + [f"{self.slug}_grid.png"]
        return names + ([f"{self.slug}_compare.png"] if self.compare_text is not None else [])


def plan_prompts(
    prompts: list[str], negative_prompt: str | None, concepts: dict[str, LearnedConcept], compare: bool
) -> list[PromptJob]:
    """What each prompt renders, checked before any model loads: weights read, the concepts it
    names, its file names and (with `compare`) the prompt with the initializer words instead."""
    placeholders = Placeholders({p: c.tokens for p, c in concepts.items()})
    negative_text, negative_scales = placeholders.take_weights(negative_prompt) if negative_prompt else (None, {})
    stems = file_stems(prompts, list(concepts))
    jobs = []
    for prompt in prompts:
        text, scales = placeholders.take_weights(prompt)
        used = placeholders.named(text, negative_text)
        if not placeholders.named(text):
            logger.warning(
                f"the prompt {prompt!r} names none of the loaded tokens ({', '.join(concepts)}); it renders as with "
                "the base model"
            )
        job = PromptJob(prompt, text, negative_prompt, scales, negative_scales, used, stems[prompt])
        if compare and used:
            missing = [p for p in used if not isinstance(concepts[p].metadata.get("initializer_token"), str)]
            if missing:
                logger.warning(
                    f"--compare: {', '.join(f'{p} ({concepts[p].source})' for p in missing)} records no "
                    f"initializer_token; no comparison for {prompt!r}"
                )
            else:
                words = {p: concepts[p].metadata["initializer_token"] for p in used}
                job.compare_text = placeholders.replace(text, words)
                job.compare_negative = placeholders.replace(negative_text, words) if negative_text else None
        jobs.append(job)
    return jobs


# ---------------------------------------------------------------------------------------------
# Checks before the model loads
# ---------------------------------------------------------------------------------------------


def check_model_path(name: str) -> None:
    """A local folder that is not there is named as such (not looked up on the hub, where the
    error would be about something else)."""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise UsageError(f"--pretrained_model_name_or_path {name} is a file; pass the model's folder or a hub repo id")
    owner = name.split("/")[0]
    if looks_like_a_path(name) or not is_hub_repo_id(name) or os.path.isdir(owner):
        local = f" ({owner}/ is a local folder, so it is no hub repo id)" if os.path.isdir(owner) else ""
        raise UsageError(
            f"--pretrained_model_name_or_path {name}: the folder does not exist{local}; pass a model folder or a hub "
            "repo id such as FoundationVision/Infinity"
        )


def check_cfg_insertion_layer(layer: int, depth: int) -> None:
    if not -(depth - 1) <= layer <= 0:
        hidden = f" or -1 to -{depth - 1} (on the hidden states after block depth-k)" if depth > 1 else ""
        raise UsageError(
            f"--cfg_insertion_layer {layer}: this model has {depth} blocks; give 0 (guidance on the logits){hidden}"
        )


def check_overwrite(output_dir: str, names: list[str], overwrite: bool) -> None:
    existing = [n for n in names if os.path.exists(os.path.join(output_dir, n))]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more file(s) this run writes" if len(existing) > 1 else ""
        raise UsageError(
            f"--output_dir {output_dir} already holds {existing[0]}{more}, from an earlier run; choose another folder, "
            "or pass --overwrite_output_dir to replace them"
        )


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
    problem = device_problem(device)
    if problem:
        raise UsageError(f"--device {device}: {problem}")
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    if args.seed is None:
        args.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        logger.info(f"no --seed given; using {args.seed}")

    # 1. Prompts, model, embedding files and the output folder: checked before the model loads.
    prompts = read_prompts(args)
    check_model_path(args.pretrained_model_name_or_path)
    problem = unwritable_reason(args.output_dir)
    if problem:
        raise UsageError(f"--output_dir: {problem}; choose another folder")
    loaded: list[LearnedConcept] = []
    for k, source in enumerate(args.learned_embeds):
        token = args.token[k] if args.token and k < len(args.token) else None
        loaded += load_learned_embeds(source, token=token, revision=args.revision)
    preset = resolve_preset(args.pretrained_model_name_or_path, args.model_type)
    check_cfg_insertion_layer(args.cfg_insertion_layer, preset.transformer.depth)
    text_encoder_name = resolve_text_encoder(args.pretrained_model_name_or_path, args.text_encoder_name_or_path, preset)
    model_type = effective_model_type(args.pretrained_model_name_or_path, args.model_type)
    for concept in loaded:
        # the base model's fingerprint, when the file has one, is compared once the model is loaded
        problems = concept_mismatches(concept, model_type, args.pretrained_model_name_or_path, text_encoder_name)
        if problems and not args.force:  # with --force, loading warns
            raise UsageError(
                f"{concept.source} ({concept.placeholder}) was trained for {'; '.join(problems)}; load that model, or "
                "pass --force to use the embedding anyway"
            )
    try:  # the tokens against the vocabulary, with the tokenizer alone
        check_concept_tokens(load_tokenizer(text_encoder_name).get_vocab(), loaded)
    except ModelFilesNotFound:
        pass  # the model's loading below reports it in its turn
    concepts = {c.placeholder: c for c in loaded}
    jobs = plan_prompts(prompts, args.negative_prompt, concepts, args.compare)
    seeds = [args.seed + i for i in range(args.num_images)]
    check_overwrite(args.output_dir, [SETTINGS_NAME] + [n for job in jobs for n in job.files(seeds)],
                    args.overwrite_output_dir)  # fmt: skip

    # 2. The base model, then the learned concepts in it (the pipeline's API: a Python user's code path).
    pipe = InfinityPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        model_type=args.model_type,
        text_encoder_name_or_path=args.text_encoder_name_or_path,
        torch_dtype=DTYPES[dtype_name],
        device=device,
        revision=args.model_revision,
        text_encoder_dtype=TEXT_ENCODER_DTYPES.get(args.text_encoder_dtype),
    )
    try:
        pipe.load_textual_inversion(loaded, force=args.force)
    except ConceptMismatch as e:
        raise UsageError(f"{e.what}; load that model, or pass --force to use the embedding anyway") from e
    for placeholder, concept in pipe.learned_concepts.items():
        logger.info(
            f"{placeholder}: {len(concept.token_ids)} vector(s) from {concept.concept.source} -> token ids "
            f"{concept.token_ids}"
        )

    # 3. Generate and save: the pipeline expands and weights each prompt's placeholders.
    template = nearest_template(args.h_div_w)
    schedule = get_schedule(template, args.pn)
    height, width = schedule.image_size(pipe.token_stride)
    sampling = {name: getattr(args, name) for name in SamplingSettings.__dataclass_fields__}
    os.makedirs(args.output_dir, exist_ok=True)
    total = args.num_images * (len(jobs) + sum(job.compare_text is not None for job in jobs))
    progress = tqdm(total=total, desc="Images", unit="image")
    written = {"images": 0, "grids": 0, "compare": 0}
    for job in jobs:
        images = generate_images(pipe, job.prompt, args.num_images, seed=args.seed, batch_size=args.batch_size,
                                 progress=progress.update, negative_prompt=job.negative, schedule=schedule,
                                 **sampling)  # fmt: skip
        names = job.files(seeds)[: args.num_images]
        for image, name in zip(images, names):
            save_image(image, os.path.join(args.output_dir, name))
        save_image(grid_of(images, job.prompt, seeds), os.path.join(args.output_dir, f"{job.slug}_grid.png"))
        written["images"] += len(images)
        written["grids"] += 1
        job.record = {
            "prompt": job.prompt,
            "encoded_prompt": pipe.parse_prompt(job.prompt)[0],
            "negative_prompt": pipe.parse_prompt(job.negative)[0] if job.negative else None,
            "scales": job.scales,
            "negative_scales": job.negative_scales,
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

    # 4. Every setting, and where the embeddings came from.
    settings = {
        "args": vars(args),
        "device": str(pipe.device),
        "dtype": dtype_name,
        "text_encoder_dtype": str(pipe.text_encoder.dtype).removeprefix("torch."),
        "text_encoder": text_encoder_name,
        "base_model_fingerprint": pipe.fingerprint(),
        "h_div_w_template": template,
        "image_size": [height, width],
        "scale_schedule": [list(g) for g in schedule.grids],
        "sampling": {**sampling, "bit_sampling": "each bit on its own (official sampling_per_bits=1)"},
        "embeddings": [
            {
                "placeholder": placeholder,
                "tokens": c.concept.tokens,
                "token_ids": c.token_ids,
                "file": c.concept.source,
                "vector_norms": c.concept.vectors.norm(dim=-1).double().round(decimals=6).tolist(),  # per scale: lists
                "metadata": c.concept.metadata,
            }
            for placeholder, c in pipe.learned_concepts.items()
        ],
        "prompts": [job.record for job in jobs],
    }
    write_json(os.path.join(args.output_dir, SETTINGS_NAME), settings)
    if pipe.device.type == "cuda":  # what the card this ran on needed (benchmarks/device_check.sh reads it)
        logger.info(f"peak GPU memory: {torch.cuda.max_memory_allocated(pipe.device) / 2**30:.2f} GiB")
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
