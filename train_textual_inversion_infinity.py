#!/usr/bin/env python
"""Textual inversion for Infinity: learn a T5 token embedding that makes Infinity draw a concept.

    accelerate launch train_textual_inversion_infinity.py \\
        --pretrained_model_name_or_path FoundationVision/Infinity \\
        --train_data_dir ./my_dog --placeholder_token "<my-dog>" --initializer_token dog \\
        --output_dir my-dog-ti

Only the new token vectors train (float32); flan-T5, the Infinity transformer and the BSQ-VAE stay
frozen. The loss is Infinity's own training loss: the images are tokenized into multi-scale bits
once (the VAE features are cached), and the transformer predicts each scale's bits from the
coarser scales, conditioned on captions that contain the placeholder; by default on the coarse
half of the scales (--train_scales half), where a concept's colour, layout and shape are chosen. On
the 1x1 scale, the picture's overall tone, the target is what the frozen model draws for the concept
at its start (--prior_scales, --prior_weight), so the token learns the concept, not its images'
backgrounds. What the run validates and saves is a moving average of the vectors over about the
last 20 steps (--ema_decay).
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import uuid
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from infinity_t2i.files import atomic_write, save_image, unwritable_reason, write_json, write_text
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
from infinity_t2i.resolution import H_DIV_W_TEMPLATES, PN_NUM_SCALES, ScaleSchedule, get_schedule, nearest_template
from infinity_t2i.similarity import ConceptSimilarity, check_similarity_model
from infinity_t2i.text import T5_MAX_LENGTH, TextCondition, encode_prompt, tokenize
from infinity_t2i.textual_inversion import (
    LEARNED_EMBEDS_NAME,
    T5_INPUT_SUFFIX,
    TEMPLATES,
    TI_MODES,
    ConceptError,
    LearnedConcept,
    LearnedVectors,
    Placeholders,
    add_placeholder_tokens,
    check_new_token,
    ensure_embedding_rows,
    expand_placeholders,
    initializer_pieces,
    initializer_vectors,
    is_hub_repo_id,
    mean_embedding_norm,
    placeholder_tokens,
    replace_placeholder,
    replace_rows,
    save_learned_embeds,
    write_rows,
)
from infinity_t2i.training import bitwise_loss, make_training_inputs, num_training_scales

logger = get_logger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # GIF/TIFF: the first frame
STEP_RNG_NAME = "step_rng.safetensors"
DEFAULT_CAPTION_COLUMN = "text"  # the datasets imagefolder name: a dataset without it trains on templates
# Measured on the toy world (README): in output mode 8 vectors, identical copies when the
# initializer is one piece, give the concept 8 rows of Infinity's cross-attention and beat 4 on
# plain prompts (the unnamed blue heart 0.51 vs 0.28), while 16 lose the concept.
DEFAULT_NUM_VECTORS = {"output": 8, "input": 1, "per_scale": 1}  # per_scale: in each scale's set
# Flags that shape the result (concept, data, loss, optimizer): a run records them in run.json and
# every checkpoint, and a resume with other values is refused, since it would not continue the run
# that was saved (defaults change too).
RECIPE_FLAGS = (
    "placeholder_token", "initializer_token", "num_vectors", "ti_mode", "vector_layout", "hold_norm",
    "learnable_property",
    "image_column", "caption_column", "pn", "aspect_ratio", "repeats", "random_flip", "center_crop",
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "max_grad_norm",
    "self_correction_strength", "self_correction_scales", "train_scales", "reweight_loss_by_scale",
    "prior_scales", "prior_weight", "ema_decay", "text_encoder_dtype",
)  # fmt: skip
# What a run recorded before these flags existed did: a resume of it must keep that, not take
# the flag's present default.
RECORDED_BEFORE_THE_FLAG = {"vector_layout": "shared", "prior_weight": "0.0", "ema_decay": "0.0"}
RUN_RECORD_NAME = "run.json"  # who the run in --output_dir is: its RECIPE_FLAGS, data, seed, processes, id
LOCK_NAME = ".lock"  # held by the run writing to --output_dir
# folder -> its open lock file: held until the run ends (the system drops it when a process dies)
_HELD_LOCKS = {}


MAX_VECTORS = 64  # the placeholder's tokens share a caption's 512; the measured best is 8


def _finite_in(low: float, high: float, high_included: bool = True):
    return lambda x: math.isfinite(x) and low <= x and (x <= high if high_included else x < high)


# The range of every numeric flag, checked at parse time: (what the value must be, the test).
NUMBER_RULES = {
    **{
        name: ("at least 1", lambda n: n >= 1)
        for name in (
            "repeats", "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
            "lr_num_cycles", "num_validation_images", "validation_steps", "save_steps", "checkpointing_steps",
            "checkpoints_total_limit",
        )
    },
    "num_vectors": (f"between 1 and {MAX_VECTORS}", lambda n: 1 <= n <= MAX_VECTORS),
    **{name: ("at least 0", lambda n: n >= 0) for name in ("lr_warmup_steps", "dataloader_num_workers")},
    **{name: ("at least 0", lambda n: n >= 0) for name in ("self_correction_scales", "prior_scales")},
    "seed": (f"between 0 and {2**32 - 1}", lambda n: 0 <= n < 2**32),
    **{name: ("a positive number", lambda x: math.isfinite(x) and x > 0) for name in (
        "learning_rate", "adam_epsilon", "max_grad_norm")},
    "adam_weight_decay": ("a number of at least 0", lambda x: math.isfinite(x) and x >= 0),
    "adam_beta1": ("in [0, 1)", _finite_in(0, 1, high_included=False)),
    "adam_beta2": ("in [0, 1)", _finite_in(0, 1, high_included=False)),
    "ema_decay": ("in [0, 1)", _finite_in(0, 1, high_included=False)),
    **{name: ("in [0, 1]", _finite_in(0, 1)) for name in ("self_correction_strength", "prior_weight")},
}  # fmt: skip


class UsageError(Exception):
    """Bad input: reported as one line, with a non-zero exit and nothing written."""


BAD_INPUT = (UsageError, ConceptError, ModelFilesNotFound, CheckpointError)


def scales_to_train(value: str) -> str | int:
    if value in ("half", "all"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give half, all or a number of scales") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Textual inversion for Infinity (FoundationVision).")
    # model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub repo id (FoundationVision/Infinity) or a local folder with the same file names.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the Infinity hub repo.")
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
    # concept
    parser.add_argument(
        "--placeholder_token", type=str, required=True, help="A new token standing for the concept, e.g. <my-dog>."
    )
    parser.add_argument(
        "--initializer_token",
        type=str,
        required=True,
        help=(
            "A word or phrase close to the concept: its kind's word ('dog') where there is one, else your best "
            "words for it ('blue thing'); one learned vector starts at each of its word pieces."
        ),
    )
    parser.add_argument(
        "--num_vectors",
        type=int,
        default=None,
        help=(
            "At least this many vectors (tokens <tok>, <tok>_1, ...), vector i starting at initializer piece i mod k; "
            "default 8 in output mode, 1 in input mode (the measured best)."
        ),
    )
    parser.add_argument(
        "--ti_mode",
        type=str,
        default="output",
        choices=TI_MODES,
        help=(
            "output: learn T5's output feature at the token (T5 runs once, not per step); input: learn the token's T5 "
            "input embedding."
        ),
    )
    parser.add_argument(
        "--vector_layout",
        type=str,
        default="shared",
        choices=["shared", "per_scale"],
        help=(
            "Output mode: shared, one set of vectors read by every generation scale; per_scale, a set for each "
            "trained scale, read by the whole model while that scale is drawn (the finer scales read the last), "
            "--num_vectors in each (default: one per initializer piece)."
        ),
    )
    parser.add_argument(
        "--learnable_property",
        type=str,
        default="object",
        choices=["object", "style"],
        help="Caption templates for an object or a style.",
    )
    # data
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Folder of images (jpg/png/webp), optionally with metadata.jsonl or .txt captions.",
    )
    parser.add_argument(
        "--dataset_name", type=str, default=None, help="A datasets name or local folder, instead of --train_data_dir."
    )
    parser.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    parser.add_argument(
        "--caption_column",
        type=str,
        default=DEFAULT_CAPTION_COLUMN,
        help="Caption column (of --dataset_name or metadata.jsonl); captions must contain the placeholder.",
    )
    parser.add_argument(
        "--repeats", type=int, default=100, help="How many times to repeat the training images per epoch."
    )
    parser.add_argument(
        "--pn",
        type=str,
        default="0.25M",
        choices=sorted(PN_NUM_SCALES),
        help="Training resolution: 0.06M (256px), 0.25M (512px), 0.60M (768px) or 1M (1024px) for square images.",
    )
    parser.add_argument(
        "--aspect_ratio",
        type=str,
        default="square",
        choices=["square", "nearest"],
        help="square: every image at 1:1; nearest: each image at its nearest Infinity aspect-ratio template.",
    )
    parser.add_argument(
        "--center_crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "Crop to the template's aspect ratio before resizing (the official preprocessing); --no-center_crop "
            "stretches instead."
        ),
    )
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    parser.add_argument(
        "--cache_latents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Encode each image (and flip) with the VAE once instead of every step.",
    )
    # optimisation
    parser.add_argument(
        "--output_dir", type=str, default="text-inversion-model", help="Where the embedding, checkpoints and logs go."
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument(
        "--max_train_steps", type=int, default=2000, help="Total optimisation steps; overrides --num_train_epochs."
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimisation step."
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute Infinity block activations in the backward pass to save memory.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=2e-2,
        help="Learning rate (after warmup); with --hold_norm about the angle in radians a vector turns per step.",
    )
    parser.add_argument(
        "--hold_norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "Keep each vector's starting norm and train only its direction (no norm inflation; one learning rate fits "
            "every model); --no-hold_norm trains the vectors freely."
        ),
    )
    parser.add_argument(
        "--ema_decay",
        type=float,
        default=0.95,
        help=(
            "Validate and save an exponential moving average of the vectors with this decay per step (0.95: about the "
            "last 20 steps); 0 saves the last step's vectors."
        ),
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by processes x accumulation steps x batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of the learning-rate schedule.")
    parser.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument(
        "--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay of the learned vectors."
    )
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument(
        "--self_correction_strength",
        type=float,
        default=0.0,
        help=(
            "Bitwise self-correction: flip up to this fraction of input bits per scale (the released recipe used "
            "0.3); 0 = plain teacher forcing."
        ),
    )
    parser.add_argument(
        "--self_correction_scales", type=int, default=13, help="Flip bits on this many coarsest scales."
    )
    parser.add_argument(
        "--train_scales",
        type=scales_to_train,
        default="half",
        help=(
            "Scales the loss covers: 'half' (those up to half the last scale's side: 5 of 7 at 0.06M, 10 of 13 at "
            "1M, which costs what 0.25M does), 'all', or the first K."
        ),
    )
    parser.add_argument(
        "--reweight_loss_by_scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "Weight tokens by 1/sqrt(scale area), as the released recipe; --no-reweight_loss_by_scale weights all "
            "tokens equally."
        ),
    )
    parser.add_argument(
        "--prior_scales",
        type=int,
        default=1,
        help=(
            "On this many coarsest trained scales (the 1x1 one: the picture's overall tone, mostly its background) "
            "the target mixes each image's bits with what the frozen model predicts for the caption with the "
            "concept at its start (the initializer), so that the token does not fix its images' backgrounds; 0 "
            "turns it off."
        ),
    )
    parser.add_argument(
        "--prior_weight",
        type=float,
        default=1.0,
        help="The prediction's weight in those targets (the image's bits get 1 - this); 0 turns the prior off.",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="bf16 runs the frozen Infinity blocks in bfloat16, as officially (default: accelerate config).",
    )
    parser.add_argument(
        "--text_encoder_dtype",
        type=str,
        default=None,
        choices=sorted(TEXT_ENCODER_DTYPES),
        help=(
            "flan-T5's weights; default float16 on a GPU (FFN outputs kept in float32, as the official code runs it), "
            "float32 on the CPU."
        ),
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    # logging, validation, saving
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, under --output_dir.")
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        choices=["tensorboard", "wandb", "mlflow", "comet_ml", "all", "none"],
        help="Where to log; none turns tracking off.",
    )
    parser.add_argument(
        "--validation_prompt",
        type=str,
        action="append",
        default=None,
        help="A prompt with the placeholder to render during training; repeatable.",
    )
    parser.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    parser.add_argument(
        "--validation_similarity_model",
        type=str,
        default=None,
        help="A CLIP or DINOv2 model (local folder or hub id, e.g. openai/clip-vit-base-patch32): at each "
        "validation, log the mean similarity of the images to the training images and (CLIP) to their prompt.",
    )
    parser.add_argument(
        "--validation_steps", type=int, default=100, help="Render the validation prompts every X steps (and at step 0)."
    )
    parser.add_argument(
        "--save_steps", type=int, default=500, help="Save learned_embeds-steps-X.safetensors every X steps."
    )
    parser.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable training state every X steps."
    )
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder, or "latest".')
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace another run's files in --output_dir (a new run refuses a folder that holds them).",
    )
    parser.add_argument(
        "--push_to_hub", action="store_true", help="Upload the embedding, concept files, card and grid to the hub."
    )
    parser.add_argument("--hub_token", type=str, default=None, help="Token for --push_to_hub.")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Repo to push to (default: the output folder's name)."
    )
    args = parser.parse_args(argv)

    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --train_data_dir or --dataset_name")
    if args.mixed_precision == "fp16":
        parser.error(
            "--mixed_precision fp16 is refused: Infinity's blocks run in bfloat16, as officially (T5's precision is "
            "--text_encoder_dtype); use bf16 or no"
        )
    if isinstance(args.train_scales, int) and args.train_scales < 2:
        parser.error("--train_scales must be at least 2 (scale 1 is the first one with image inputs)")
    if args.vector_layout == "per_scale" and args.ti_mode != "output":
        parser.error("--vector_layout per_scale learns T5 output features; use it with --ti_mode output")
    if args.num_vectors is None:
        args.num_vectors = DEFAULT_NUM_VECTORS["per_scale" if args.vector_layout == "per_scale" else args.ti_mode]
    for name, (rule, holds) in NUMBER_RULES.items():
        value = getattr(args, name)
        if value is not None and not holds(value):
            parser.error(f"--{name} must be {rule}, got {value}")
    if args.lr_warmup_steps and args.lr_scheduler == "constant" and not args.resume_from_checkpoint:
        # the constant schedule has no warmup and ignores it (a run recorded so still resumes as it ran)
        parser.error("--lr_warmup_steps needs a schedule with a warmup; add --lr_scheduler constant_with_warmup")
    if args.report_to in ("wandb", "mlflow", "comet_ml") and importlib.util.find_spec(args.report_to) is None:
        # accelerate would train on with a warning and log nothing
        parser.error(
            f"--report_to {args.report_to} needs its package: pip install {args.report_to}, or log to tensorboard"
        )
    templates = H_DIV_W_TEMPLATES if args.aspect_ratio == "nearest" else (1.0,)
    trained = min(num_training_scales(get_schedule(t, args.pn), args.train_scales) for t in templates)
    if args.prior_weight == 1 and args.prior_scales >= trained:
        parser.error(
            f"--prior_scales {args.prior_scales} covers all {trained} trained scales (--pn {args.pn}, --train_scales "
            f"{args.train_scales}) with --prior_weight 1: no bit of the images would reach the loss; give fewer"
        )
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        parser.error(
            "--resume_from_checkpoint continues the run in --output_dir, --overwrite_output_dir replaces it; "
            "give one of them"
        )
    if args.validation_similarity_model and not args.validation_prompt:
        parser.error("--validation_similarity_model scores the validation images; give a --validation_prompt too")
    model = args.validation_similarity_model
    if model and looks_like_a_path(model) and not os.path.isdir(model):
        parser.error(f"--validation_similarity_model {model} does not exist; pass a CLIP or DINOv2 folder or hub id")
    try:
        check_new_token(args.placeholder_token)  # the vocabulary is checked once the tokenizer is loaded
    except ConceptError as e:
        parser.error(f"--placeholder_token: {e}")
    if args.placeholder_token.isalnum():  # an added token also matches inside words: "irc" would split "circle"
        parser.error(
            f"--placeholder_token {args.placeholder_token!r} is a bare word that would match inside other words; mark "
            f"it, e.g. <{args.placeholder_token}>"
        )
    placeholder = Placeholders([args.placeholder_token])
    for prompt in args.validation_prompt or []:
        try:
            _, weights = placeholder.take_weights(prompt)
        except ConceptError as e:
            parser.error(f"--validation_prompt: {e}")
        if not placeholder.named(prompt):
            parser.error(f"--validation_prompt {prompt!r} does not contain {args.placeholder_token}; add it")
        if weights:  # validation draws the vectors as they are trained
            parser.error(
                f"--validation_prompt {prompt!r} weights {args.placeholder_token}; give it without the weight "
                "(weights are for infer_textual_inversion.py)"
            )
    return args


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    name: str
    image: Image.Image  # RGB, at the size the model trains on
    caption: str | None


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; greyscale, 16-bit, palette and CMYK converted; transparency
    composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError("it holds non-finite pixel values")
        if image.mode.startswith("I;16"):  # 16-bit, whatever its brightest pixel
            scale = 65535.0
        elif image.mode == "F":  # floating point: 0-1 by convention, 0-255 where it goes above 1
            scale = 1.0 if array.max() <= 1.0 else 255.0
        else:  # 32-bit integers: 8- or 16-bit data widened
            scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_to(image: Image.Image, size: tuple[int, int], center_crop: bool) -> Image.Image:
    """To exactly (H, W): cover-resize (LANCZOS) and centre-crop, as the official data pipeline,
    or a plain resize that stretches."""
    height, width = size
    if not center_crop:
        return image.resize((width, height), resample=Image.LANCZOS)
    w, h = image.size
    if w / h <= width / height:
        new_w, new_h = width, int(width / (w / h))
    else:
        new_w, new_h = int((w / h) * height), height
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def read_text(path: str) -> str:
    """UTF-8, with or without the byte-order mark Windows editors write."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e


def read_captions(folder: str, caption_column: str) -> dict[str, str]:
    """Captions from metadata.jsonl (the datasets imagefolder convention) or sidecar .txt files."""
    captions = {}
    metadata = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(metadata):
        lines = {}  # file name -> the line that captions it
        for n, line in enumerate(read_text(metadata).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{metadata} line {n} is not JSON ({e}); write one object per line") from e
            if not (
                isinstance(row, dict)
                and isinstance(row.get("file_name"), str)
                and isinstance(row.get(caption_column), str)
            ):
                raise UsageError(
                    f"{metadata} line {n}: expected an object with a string file_name and a string {caption_column} "
                    f"(a caption with the placeholder); fix the line or remove it"
                )
            name = row["file_name"]
            if name in lines:
                raise UsageError(f"{metadata} captions {name} twice (lines {lines[name]} and {n}); keep one line")
            lines[name], captions[name] = n, row[caption_column]
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".txt" and stem and not name.startswith("."):  # macOS's "._name.txt" beside each copy
            for image_name in os.listdir(folder):
                if (
                    os.path.splitext(image_name)[0] == stem
                    and os.path.splitext(image_name)[1].lower() in IMAGE_EXTENSIONS
                ):
                    captions.setdefault(image_name, read_text(os.path.join(folder, name)).strip())
    return captions


def read_examples(args) -> list[tuple[str, Image.Image, str | None]]:
    """(name, RGB image at its original size, caption or None) for every training image; a
    caption must name the placeholder."""
    examples = _read_images_and_captions(args)
    for name, _, caption in examples:
        if caption is not None and not isinstance(caption, str):
            raise UsageError(f"the caption of {name} is {caption!r}, not text; give a caption with the placeholder")
        if caption is not None and args.placeholder_token not in caption:
            raise UsageError(f"the caption of {name} does not contain {args.placeholder_token}: {caption!r}")
    return examples


def _read_images_and_captions(args) -> list[tuple[str, Image.Image, str | None]]:
    if args.dataset_name is not None:
        from datasets import load_dataset

        try:
            dataset = load_dataset(args.dataset_name, split="train")
        except Exception as e:
            raise UsageError(f"could not load dataset {args.dataset_name!r}: {e}") from e
        if args.image_column not in dataset.column_names:
            raise UsageError(
                f"dataset has no column {args.image_column!r} (columns: {dataset.column_names}); set --image_column"
            )
        has_captions = args.caption_column in dataset.column_names
        if not has_captions and args.caption_column != DEFAULT_CAPTION_COLUMN:
            raise UsageError(
                f"dataset has no column {args.caption_column!r} (columns: {dataset.column_names}); set --caption_column"
            )
        return [
            (
                f"{args.dataset_name}[{i}]",
                to_rgb(row[args.image_column]),
                row[args.caption_column] if has_captions else None,
            )
            for i, row in enumerate(dataset)
        ]

    folder = args.train_data_dir
    if not os.path.isdir(folder):
        raise UsageError(f"--train_data_dir {folder} is not a folder; point it at a folder of images")
    names = sorted(  # not hidden files: macOS writes a "._name.png" of metadata beside each copied image
        n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and not n.startswith(".")
    )
    if not names:
        raise UsageError(
            f"--train_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add 3-20 photos of "
            "the concept"
        )
    subfolders = sorted(
        n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)) and not n.startswith(".")
    )
    if subfolders:
        # the data is read before accelerate starts, so the plain logger
        logging.getLogger(__name__).warning(
            f"--train_data_dir {folder}: subfolders are not read ({', '.join(subfolders)}); put every image in the "
            "folder itself"
        )
    captions = read_captions(folder, args.caption_column)
    unknown = sorted(set(captions) - set(names))
    if unknown:
        raise UsageError(
            f"{os.path.join(folder, 'metadata.jsonl')} names {', '.join(unknown)}, not an image in {folder}; fix the "
            "file_name or add the image"
        )
    examples = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as image:
                image.load()
                examples.append((name, to_rgb(image), captions.get(name)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UsageError(f"cannot read image {os.path.join(folder, name)} ({e}); fix or remove it") from e
    return examples


def prepare_examples(args, raw, token_stride: int) -> tuple[list[Example], list[ScaleSchedule]]:
    """Resizes every image to its template's pixel size."""
    examples, schedules = [], []
    for name, image, caption in raw:
        template = 1.0 if args.aspect_ratio == "square" else nearest_template(image.height / image.width)
        schedule = get_schedule(template, args.pn)
        height, width = schedule.image_size(token_stride)
        if image.width < width or image.height < height:
            logger.warning(
                f"{name} is {image.width}x{image.height}, smaller than the training size {width}x{height}; it is "
                "upscaled"
            )
        examples.append(Example(name, resize_to(image, (height, width), args.center_crop), caption))
        schedules.append(schedule)
    return examples, schedules


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class RepeatedIndices(Dataset):
    """Item i is example i % n; the loop looks everything up by that index."""

    def __init__(self, num_examples: int, repeats: int):
        self.num_examples, self.repeats = num_examples, repeats

    def __len__(self):
        return self.num_examples * self.repeats

    def __getitem__(self, i):
        return i % self.num_examples


class SameShapeBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches whose images share one template (one tensor shape), reshuffled from
    (seed, epoch) so that a resumed run sees exactly the batches the original run saw.

    Several processes share out the batches themselves (process r takes batches r, r + n, ...;
    the list is padded to a multiple of n with its first batches, so every process runs the same
    number of steps and no batch mixes shapes): accelerate's sharding assumes fixed-size batches."""

    def __init__(
        self,
        dataset: RepeatedIndices,
        schedule_keys: list,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.dataset, self.keys, self.batch_size, self.seed, self.epoch = dataset, schedule_keys, batch_size, seed, 0
        self.num_processes, self.process_index = num_processes, process_index

    def use_epoch(self, epoch: int):
        # not `set_epoch`: that name invites callers (accelerate) that count epochs their own way,
        # restarting at 0 in a resumed run
        self.epoch = epoch

    def _batches(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        buckets: dict = {}
        for i in torch.randperm(len(self.dataset), generator=g).tolist():
            buckets.setdefault(self.keys[i % self.dataset.num_examples], []).append(i)
        batches = [b[k : k + self.batch_size] for b in buckets.values() for k in range(0, len(b), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[k] for k in order]
        batches += [batches[k % len(batches)] for k in range(-len(batches) % self.num_processes)]
        return batches[self.process_index :: self.num_processes]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return len(self._batches())


class CaptionFeatures:
    """Output mode: T5 features of every caption the run can draw, encoded once and one caption
    at a time (as inference encodes a prompt), so T5 runs neither per step nor for gradients."""

    def __init__(self, tokenizer, text_encoder, captions: list[str]):
        self.rows = {}
        with torch.no_grad():
            for caption in captions:
                features = encode_prompt(tokenizer, text_encoder, [caption]).features[0]  # Lt, C
                self.rows[caption] = (tokenize(tokenizer, [caption])[0][0].to(features.device), features)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, TextCondition]:
        """Token ids (B, Lt) and features of the captions, padded to the longest."""
        ids, features = zip(*(self.rows[c] for c in captions))
        pad = torch.nn.utils.rnn.pad_sequence
        mask = pad([torch.ones(len(i), dtype=torch.bool, device=i.device) for i in ids], batch_first=True)
        return pad(ids, batch_first=True), TextCondition(pad(features, batch_first=True), mask)


@dataclass
class TrainingData:
    """What the loop draws its batches from."""

    examples: list[Example]
    schedules: list[ScaleSchedule]  # per example: its template's scales at --pn
    pixels: list[list[torch.Tensor]]  # per example: (3, H, W) in [-1, 1], and its mirror with --random_flip
    cached_features: list[list[torch.Tensor]] | None  # the VAE's features of the same (--cache_latents)
    caption_features: CaptionFeatures | None  # output mode
    batch_sampler: SameShapeBatchSampler
    dataloader: DataLoader

    def captions(self, indices: list[int], templates: list[str], placeholder: str, rng: torch.Generator) -> list[str]:
        """Each image's own caption, or a caption template drawn from `rng`."""
        return [
            self.examples[i].caption
            if self.examples[i].caption is not None
            else templates[torch.randint(0, len(templates), (), generator=rng).item()].format(placeholder)
            for i in indices
        ]


def encode_training_captions(args, examples: list[Example], pipe, concept) -> CaptionFeatures:
    """Output mode: every caption the run can draw, and the validation prompts, through T5 once;
    then T5 leaves the GPU for good."""
    captions = {e.caption for e in examples if e.caption is not None} | {
        t.format(args.placeholder_token) for t in TEMPLATES[args.learnable_property]
    }
    captions |= set(args.validation_prompt or [])
    caption_features = CaptionFeatures(pipe.tokenizer, pipe.text_encoder, sorted(concept.expand(c) for c in captions))
    if pipe.device.type == "cuda":
        pipe.text_encoder.to("cpu")
        torch.cuda.empty_cache()
        t5_bytes = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters())
        logger.info(
            f"flan-T5 moved to the CPU after encoding {len(captions)} captions "
            f"({t5_bytes / 2**30:.2f} GiB of GPU memory freed)"
        )
    return caption_features


def prepare_training_data(args, raw_examples, pipe, concept, accelerator) -> TrainingData:
    """Images at their templates' sizes; the VAE's features computed once per image and flip; the
    batches, each of one shape, shared out between the processes."""
    examples, schedules = prepare_examples(args, raw_examples, pipe.token_stride)
    pixels = [
        [to_tensor(e.image)] + ([to_tensor(ImageOps.mirror(e.image))] if args.random_flip else []) for e in examples
    ]
    cached_features = None
    if args.cache_latents:
        with torch.no_grad():
            cached_features = [
                [pipe.vae.encode(p.unsqueeze(0).to(pipe.device))[0] for p in variants]
                for variants in tqdm(pixels, desc="Encoding images", disable=not accelerator.is_local_main_process)
            ]
    caption_features = encode_training_captions(args, examples, pipe, concept) if args.ti_mode == "output" else None
    dataset = RepeatedIndices(len(examples), args.repeats)
    batch_sampler = SameShapeBatchSampler(
        dataset,
        [s.grids for s in schedules],
        args.train_batch_size,
        args.seed,
        accelerator.num_processes,
        accelerator.process_index,
    )
    dataloader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.dataloader_num_workers)
    return TrainingData(examples, schedules, pixels, cached_features, caption_features, batch_sampler, dataloader)


# ---------------------------------------------------------------------------------------------
# The concept: its tokens and their trainable vectors
# ---------------------------------------------------------------------------------------------


@dataclass
class ConceptTokens:
    """The placeholder's tokens as the tokenizer knows them, and what the vectors start from."""

    placeholder: str
    tokens: list[str]  # <tok>, <tok>_1, ...
    token_ids: list[int]
    start: torch.Tensor  # N, C: the vectors at step 0   (--vector_layout per_scale: S, N, C)
    t5_input: torch.Tensor | None  # output mode: the rows T5 reads at the tokens (the initializer's)
    vocab_norm: float  # the vocabulary's mean norm, logged beside the vectors'

    def expand(self, text: str) -> str:
        """The placeholder replaced by all its tokens, as every caption and prompt is."""
        return expand_placeholders(text, {self.placeholder: self.tokens})


def check_concept_words(args) -> None:
    """The placeholder and the initializer checked against flan-T5's vocabulary with its tokenizer
    alone, before minutes of loading the models. A tokenizer that cannot be had here is left to
    the loading, which reports it in its turn."""
    preset = resolve_preset(args.pretrained_model_name_or_path, args.model_type)
    try:
        tokenizer = load_tokenizer(
            resolve_text_encoder(args.pretrained_model_name_or_path, args.text_encoder_name_or_path, preset)
        )
    except ModelFilesNotFound:
        return
    vocab = tokenizer.get_vocab()
    for token in concept_words(args, tokenizer)[1]:
        check_new_token(token, vocab)


def concept_words(args, tokenizer) -> tuple[list[int], list[str]]:
    """The initializer's word pieces and the placeholder's tokens: --num_vectors of them, and at
    least one per piece."""
    pieces = initializer_pieces(tokenizer, args.initializer_token)
    return pieces, placeholder_tokens(args.placeholder_token, max(args.num_vectors, len(pieces)))


def add_concept_tokens(args, tokenizer, text_encoder) -> ConceptTokens:
    """Adds the placeholder's tokens to the tokenizer and T5. An initializer of k word pieces gives
    k vectors, one per piece, so that at step 0 the concept draws what the word draws."""
    embedding = text_encoder.get_input_embeddings()
    pieces, tokens = concept_words(args, tokenizer)
    start = initializer_vectors(embedding.weight[pieces], len(tokens))
    logger.info(
        f"initializer {args.initializer_token!r} = {tokenizer.convert_ids_to_tokens(pieces)}: {len(tokens)} vector(s) "
        f"{tokens}"
    )
    token_ids = add_placeholder_tokens(tokenizer, tokens)
    ensure_embedding_rows(text_encoder, len(tokenizer))
    vocab_norm = mean_embedding_norm(text_encoder.get_input_embeddings().weight, len(tokenizer) - len(tokens))
    concept = ConceptTokens(args.placeholder_token, tokens, token_ids, start, None, vocab_norm)
    if args.ti_mode == "output":
        # T5 reads the initializer's pieces at the tokens (so the prompt around them encodes as with
        # the word), and the vectors start at T5's output there in the first caption template
        concept.t5_input = start
        write_rows(text_encoder, token_ids, start)
        first_caption = concept.expand(TEMPLATES[args.learnable_property][0].format(args.placeholder_token))
        ids, features = CaptionFeatures(tokenizer, text_encoder, [first_caption]).rows[first_caption]
        concept.start = torch.stack([features[int((ids == i).nonzero()[0, 0])] for i in token_ids]).cpu()
    if args.vector_layout == "per_scale":  # a set for each trained scale, all from the same start
        num_sets = num_training_scales(get_schedule(1.0, args.pn), args.train_scales)
        concept.start = concept.start.expand(num_sets, -1, -1).clone()
    return concept


class HalfGradientScale:
    """The backward through a float16 T5 at a power of two. Textual inversion's gradient at T5's
    output is small (d loss / d feature RMS 1e-5 to 1e-4 on Infinity-2B) and flushes to zero in
    float16's range (docs/hardware.md, T5 precision). Each backward multiplies it by the power of
    two that brings it to unit RMS, chosen from the gradient itself (no scaler state, no skipped
    steps), and divides it out in float32 at T5's input: exact, as powers of two are."""

    def __init__(self):
        self.exponent = 0

    def at_output(self, grad: torch.Tensor) -> torch.Tensor:
        rms = grad.float().pow(2).mean().sqrt().item()
        self.exponent = round(-math.log2(rms)) if 0 < rms < math.inf else 0
        return grad * 2.0**self.exponent

    def at_input(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2.0**-self.exponent


def encode_with_learned(tokenizer, text_encoder, learned: LearnedVectors, captions: list[str]) -> TextCondition:
    """Input mode: T5 run on its input embedding with the learned rows in place, in T5's dtype as
    inference writes them (accelerate returns float32 under mixed precision); a float16 T5
    backpropagates at a power of two (HalfGradientScale)."""
    embedding = text_encoder.get_input_embeddings()
    scale = HalfGradientScale() if embedding.weight.dtype == torch.float16 else None

    def embed_tokens(input_ids: torch.Tensor) -> torch.Tensor:
        rows = learned(input_ids, embedding(input_ids).float())  # float32: the scale divides out exactly
        if scale is not None and rows.requires_grad:
            rows.register_hook(scale.at_input)
        return rows.to(embedding.weight.dtype)

    text = encode_prompt(tokenizer, text_encoder, captions, embed_tokens=embed_tokens)
    if scale is not None and text.features.requires_grad:
        text.features.register_hook(scale.at_output)
    return text


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def shareable_name(name_or_path: str) -> str:
    """A model as an embedding or card may name it: a hub id as it is, a local folder by its name
    only (a path says nothing to anyone else, and may say too much)."""
    return name_or_path if is_hub_repo_id(name_or_path) else os.path.basename(os.path.normpath(name_or_path))


def run_files(args) -> list[str]:
    """The names in --output_dir that a training run wrote (what --overwrite_output_dir removes):
    those only this script writes and, where run.json shows that a run was there, its card, logs,
    grids and unfinished writes, which could otherwise be the user's own."""
    if not os.path.isdir(args.output_dir):
        return []
    own = {RUN_RECORD_NAME, LEARNED_EMBEDS_NAME, "token_identifier.txt", "type_of_concept.txt"}
    ran_here = os.path.exists(os.path.join(args.output_dir, RUN_RECORD_NAME))
    if ran_here:
        own |= {"README.md", "validation", os.path.normpath(args.logging_dir).split(os.sep)[0]}
    return sorted(
        name
        for name in os.listdir(args.output_dir)
        if name in own
        or name.startswith(("checkpoint-", "learned_embeds-steps-"))
        or (ran_here and name.endswith(".tmp"))
    )


def check_output_dir(args) -> None:
    """Refuses, before anything loads, a folder that cannot be written or that holds another run's
    results (unless told to resume that run or to replace it)."""
    problem = unwritable_reason(args.output_dir)
    if problem:
        raise UsageError(f"--output_dir: {problem}; choose another folder")
    readme = os.path.join(args.output_dir, "README.md")
    if os.path.isfile(readme) and not os.path.exists(os.path.join(args.output_dir, RUN_RECORD_NAME)):
        raise UsageError(
            f"--output_dir {args.output_dir} holds a README.md but no run.json (no run's record), and the run's model "
            "card would replace it; move it away or choose another folder"
        )
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    results = [n for n in run_files(args) if n in (RUN_RECORD_NAME, LEARNED_EMBEDS_NAME) or n.startswith("checkpoint-")]
    if results:
        who = read_run_record(args.output_dir).get("placeholder_token", "another run")
        raise UsageError(
            f"--output_dir {args.output_dir} holds the results of {who} ({', '.join(results[:3])}"
            f"{', ...' if len(results) > 3 else ''}); continue it with --resume_from_checkpoint latest, replace it "
            "with --overwrite_output_dir, or choose another folder"
        )


def read_run_record(output_dir: str) -> dict[str, str]:
    """run.json of the run in `output_dir` ({} if there is none)."""
    path = os.path.join(output_dir, RUN_RECORD_NAME)
    if not os.path.exists(path):
        return {}
    try:
        record = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is damaged ({e}); pass --overwrite_output_dir to start a new run there") from e
    if not isinstance(record, dict):
        raise UsageError(f"{path} is not a run record; pass --overwrite_output_dir to start a new run there")
    return {str(k): str(v) for k, v in record.items()}


def lock_output_dir(output_dir: str) -> None:
    """One run at a time writes to a folder: a second one is refused in one line."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return
    path = os.path.abspath(os.path.join(output_dir, LOCK_NAME))
    if path in _HELD_LOCKS:  # this process's earlier run into the folder (in-process callers) is over
        _HELD_LOCKS.pop(path).close()
    handle = open(path, "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(
            f"another training run is writing to {output_dir}; wait for it to end or choose another --output_dir"
        ) from None
    _HELD_LOCKS[path] = handle


def take_output_dir(args, identity: dict[str, str]) -> None:
    """The first writes, on the main process, once everything has been checked: the folder,
    locked for this run; another run's files removed with --overwrite_output_dir; run.json."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        lock_output_dir(args.output_dir)
    except OSError as e:  # writable by its permissions, yet not (a read-only mount, a squashed root)
        raise UsageError(
            f"could not write to --output_dir {args.output_dir} ({first_line(e)}); choose another folder"
        ) from e
    record = read_run_record(args.output_dir)
    if args.overwrite_output_dir:
        for name in run_files(args):
            path = os.path.join(args.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif record.get("run_id", identity["run_id"]) != identity["run_id"]:  # a run started here meanwhile
        raise UsageError(
            f"another run ({record.get('placeholder_token')}) wrote to {args.output_dir} while this one loaded; "
            "choose another --output_dir or pass --overwrite_output_dir"
        )
    with writing(RUN_RECORD_NAME, args.output_dir):
        write_json(os.path.join(args.output_dir, RUN_RECORD_NAME), identity)


def on_main_process(accelerator: Accelerator, work):
    """`work()` on the main process; every process gets its result, and its one-line error stops
    every process (the others would otherwise wait for the main one forever)."""
    shared = [None, None]  # result, error
    if accelerator.is_main_process:
        try:
            shared[0] = work()
        except BAD_INPUT as e:
            shared[1] = str(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(shared)
    if shared[1] is not None:
        raise UsageError(shared[1])
    return shared[0]


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def saved_state(output_dir: str) -> str:
    """What a stopped run leaves in `output_dir`, and how to go on from it."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        return "no checkpoint was written yet: --resume_from_checkpoint latest starts the run again with its seed"
    return f"the last complete checkpoint is {checkpoint}: continue with --resume_from_checkpoint latest"


@contextlib.contextmanager
def writing(what: str, output_dir: str):
    """A write that fails (a full disk, a lost mount) ends the run in one line; the atomic writes
    have left every earlier file whole."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as e:
        raise UsageError(f"could not write {what} ({first_line(e)}); {saved_state(output_dir)} once it is fixed") from e


def data_fingerprint(raw_examples) -> str:
    """A hash of the training images (their pixels) and captions, recorded by the run: a resume
    with other data is refused."""
    digest = hashlib.sha256()
    for name, image, caption in raw_examples:
        digest.update(json.dumps([name, caption, image.size]).encode())
        digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def create_hub_repo(args) -> str:
    """The hub repo for --push_to_hub, created before any model loads: a bad token or no network
    fails in seconds, not after the training."""
    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as e:  # network, authentication, naming: whatever the hub client raises
        raise UsageError(
            f"--push_to_hub: could not create the hub repo {name} ({first_line(e)}); check the network "
            "and --hub_token, or train without --push_to_hub"
        ) from e


def embedding_metadata(args, pipe, num_vectors: int) -> dict:
    """What an embedding file records besides its vectors: the concept's recipe, and the model and
    tokenizer it was learned on (a local model by its name and fingerprint, never its path)."""
    preset = resolve_preset(args.pretrained_model_name_or_path, args.model_type)
    text_encoder = resolve_text_encoder(args.pretrained_model_name_or_path, args.text_encoder_name_or_path, preset)
    return {
        "initializer_token": args.initializer_token,
        "num_vectors": num_vectors,
        "hold_norm": args.hold_norm,
        "learnable_property": args.learnable_property,
        "layout": args.vector_layout,
        "base_model": shareable_name(args.pretrained_model_name_or_path),
        "base_model_fingerprint": pipe.fingerprint(),
        "model_type": effective_model_type(args.pretrained_model_name_or_path, args.model_type),
        "text_encoder": shareable_name(text_encoder),
        "tokenizer": {
            "class": type(pipe.tokenizer).__name__,
            "legacy": True,
            "model_max_length": pipe.tokenizer.model_max_length,
            "added_token": "lstrip=False rstrip=False normalized=False special=False",
        },
        "pn": args.pn,
    }


def save_embedding(path: str, args, concept: ConceptTokens, learned: LearnedVectors, metadata: dict, step: int) -> None:
    """The learned vectors (their moving average with --ema_decay) as learned_embeds.safetensors,
    with what inference needs to use them (`metadata`: the model and tokenizer, see
    `embedding_metadata`). Non-finite vectors are never written: the last good file stays."""
    vectors = learned.saved_vectors.detach().float().cpu()
    if not torch.isfinite(vectors).all():
        raise UsageError(f"the vectors of step {step} are not finite; {path} keeps the last good ones")
    concept_file = LearnedConcept(
        args.placeholder_token,
        concept.tokens,
        vectors,
        metadata | {"step": step},
        mode=args.ti_mode,
        t5_input=concept.t5_input,
    )
    with writing(path, args.output_dir):
        save_learned_embeds(path, concept_file)


def save_model_card(args, learned_embeds: str, grid_name: str | None, vectors: torch.Tensor, scores: dict) -> None:
    """README.md: the hub's card. `learned_embeds` is what its command loads: the hub repo, or
    path/to/ the output folder's name (no local path reaches a card that may be uploaded)."""
    base, on_hub = args.pretrained_model_name_or_path, is_hub_repo_id(args.pretrained_model_name_or_path)
    card_data = ModelCardData(
        license="mit",
        base_model=base if on_hub else None,  # a local path is no hub link
        tags=["infinity", "text-to-image", "textual-inversion", "flan-t5"],
        instance_prompt=args.placeholder_token,
    )
    model_type = effective_model_type(base, args.model_type)
    base_link = f"[{base}](https://huggingface.co/{base})" if on_hub else f"the local model `{shareable_name(base)}`"
    base_flag = base if on_hub else f"path/to/{shareable_name(base)}"
    type_flag = "" if model_type == "custom" else f" --model_type {model_type}"
    placeholder = args.placeholder_token
    where = "T5 output features, --ti_mode output" if args.ti_mode == "output" else "input embedding, --ti_mode input"
    sets = f" for each of {vectors.shape[0]} generation scales" if vectors.dim() == 3 else ""
    entries = f'"{placeholder}": {tuple(vectors.shape)}'
    if args.ti_mode == "output":  # and the T5 input rows the vectors' tokens read
        entries += f', "{placeholder}{T5_INPUT_SUFFIX}": {tuple(vectors.shape[-2:])}'
    grid = f"\n![validation images]({grid_name})\n" if grid_name else ""
    if scores:  # mean cosine similarities, --validation_similarity_model
        prompt_score = f", to their prompt {scores['prompt_to_image']:.3f}" if "prompt_to_image" in scores else ""
        grid += (
            f"\nConcept scores at step {scores['step']} ({shareable_name(args.validation_similarity_model)}): "
            "validation images "
            f"to the training images {scores['image_to_training']:.3f}{prompt_score}.\n"
        )
    content = f"""---
{card_data.to_yaml()}
---

# Textual inversion: `{placeholder}` for Infinity ({model_type})

A learned flan-T5 token ({where}) for {base_link}:
write **`{placeholder}`** in a prompt to get the concept ({args.learnable_property}, initialised from
"{args.initializer_token}", {vectors.shape[-2]} vector(s){sets}, trained at {args.pn}).
{grid}
## Use

```bash
python infer_textual_inversion.py --pretrained_model_name_or_path {base_flag} \\
   {type_flag} --learned_embeds {learned_embeds} \\
    --prompt "a photo of a {placeholder} on the beach" --num_images 4 --seed 0
```

`learned_embeds.safetensors` holds `{{{entries}}}` with metadata naming the
tokens, the initializer and the base model; `token_identifier.txt` and `type_of_concept.txt` name the
trigger token and the kind of concept. Made with infinity-textual-inversion's
`train_textual_inversion_infinity.py`; `infer_textual_inversion.py` comes with it.
"""
    path = os.path.join(args.output_dir, "README.md")
    with atomic_write(path) as tmp:
        ModelCard(content).save(tmp)


def prune_checkpoints(output_dir: str, keep: int, run_id: str) -> None:
    """Removes this run's oldest checkpoints so that `keep` remain (never another run's)."""
    checkpoints = sorted(
        (
            d
            for d in os.listdir(output_dir)
            if d.startswith("checkpoint-")
            and d.split("-")[1].isdigit()
            and checkpoint_run(os.path.join(output_dir, d), check=False).get("run_id", run_id) == run_id
        ),
        key=lambda d: int(d.split("-")[1]),
    )
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        logger.info(f"removing checkpoint {old} (--checkpoints_total_limit {keep})")
        shutil.rmtree(os.path.join(output_dir, old))


def resolve_resume(args) -> str | None:
    """The checkpoint folder --resume_from_checkpoint names: a path, checkpoint-N inside
    --output_dir (diffusers' form), or the latest there (None if there is none yet)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(args.output_dir)
    for path in (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint)):
        if os.path.isdir(path):
            return path
    raise UsageError(
        f"checkpoint {args.resume_from_checkpoint} does not exist; pass a checkpoint-N folder (in --output_dir or a "
        "path) or 'latest'"
    )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint(path: str, num_processes: int) -> None:
    """Refuses, in one line and before any model loads, a checkpoint that cannot resume exactly:
    a missing, empty, truncated or changed file (accelerate would skip broken random states
    silently), or one without its run record."""
    names = [
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        STEP_RNG_NAME,
        *(f"random_states_{i}.pkl" for i in range(num_processes)),
    ]
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            raise UsageError(f"checkpoint {path} lacks {name}; resume from another checkpoint or start a new run")
        if name.endswith(".safetensors"):
            try:
                load_file(file)
                intact = True
            except (SafetensorError, OSError):  # a damaged or unreadable file
                intact = False
        else:
            intact = zipfile.is_zipfile(file)  # torch.save's archive: a truncated one has no central directory
        if not intact:
            raise UsageError(
                f"checkpoint {path}: {name} is truncated or damaged; resume from another checkpoint or start a new run"
            )
    saved = checkpoint_run(path)
    for key, digest in saved.items():
        if key.startswith("sha256:") and file_sha256(os.path.join(path, key[len("sha256:") :])) != digest:
            raise UsageError(
                f"checkpoint {path}: {key[len('sha256:') :]} has changed since it was written; resume from another "
                "checkpoint or start a new run"
            )


def run_identity(args, data: str, accelerator: Accelerator) -> dict[str, str]:
    """What the run is, as recorded in run.json and every checkpoint: RECIPE_FLAGS as given
    (--scale_lr rescales the learning rate later), the data's fingerprint, the processes and the
    precision (the seed and the run id are added once known). Under a schedule that decays over
    the run, its length too: a run resumed to a new length would splice two schedules (a
    constant learning rate lets a run be extended)."""
    identity = {name: str(getattr(args, name)) for name in RECIPE_FLAGS}
    if args.lr_scheduler not in ("constant", "constant_with_warmup"):
        identity["max_train_steps"] = str(args.max_train_steps)
    return identity | {
        "data": data,
        "num_processes": str(accelerator.num_processes),
        "mixed_precision": accelerator.mixed_precision,
    }


def checkpoint_run(path: str, check: bool = True) -> dict[str, str]:
    """The run record a checkpoint was written with (save_checkpoint's `run`); with `check`, a
    checkpoint without one is refused."""
    try:
        with safe_open(os.path.join(path, STEP_RNG_NAME), "pt") as f:
            saved = f.metadata() or {}
    except (SafetensorError, OSError):
        saved = {}
    if check and "seed" not in saved:
        raise UsageError(
            f"checkpoint {path}: {STEP_RNG_NAME} has no run record; resume from another checkpoint or start a new run"
        )
    return saved


def check_recipe(where: str, saved: dict[str, str], identity: dict[str, str]) -> None:
    """Refuses to resume a run (`saved`: its checkpoint's or run.json's record) with another
    identity: other RECIPE_FLAGS, data, seed, process count or precision. A record older than a
    flag ran as RECORDED_BEFORE_THE_FLAG says; other keys it lacks are taken as they are."""
    if saved:  # a record (a new run has none)
        saved = RECORDED_BEFORE_THE_FLAG | saved
    changed = [k for k in identity if k in saved and k != "run_id" and saved[k] != identity[k]]
    if changed:

        def named(values: dict) -> str:
            return " ".join(f"training data {values[k]}" if k == "data" else f"--{k} {values[k]}" for k in changed)

        raise UsageError(
            f"{where} was made with {named(saved)}, this run has {named(identity)}; pass the run's values to "
            "resume it, or start a new run (another --output_dir, or --overwrite_output_dir)"
        )


def latest_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    done = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return os.path.join(output_dir, max(done, key=lambda d: int(d.split("-")[1]))) if done else None


def checkpoint_step(path: str, saved: dict[str, str]) -> int:
    """The step a checkpoint was saved at: its record's, else its folder's name (checkpoint-N)."""
    if "step" in saved:
        return int(saved["step"])
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit():
        return int(name.split("-", 1)[1])
    raise UsageError(f"checkpoint {path} does not record its step; rename it checkpoint-N after the step it holds")


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, step: int, step_rng: torch.Generator, run: dict[str, str]
) -> None:
    """accelerate's state (vectors, optimizer, schedule, RNGs) plus the per-step generator of
    every process, with `run` (the run's identity and validation state), the step and each file's
    checksum as its metadata, written to a temporary folder and renamed when complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    states = accelerator.gather(step_rng.get_state().to(accelerator.device).unsqueeze(0)).cpu()
    with writing(final, output_dir):
        accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process has written its part before the rename
    if accelerator.is_main_process:
        with writing(final, output_dir):
            sums = {f"sha256:{name}": file_sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            save_file(
                {f"process_{i}": s for i, s in enumerate(states)},
                os.path.join(tmp, STEP_RNG_NAME),
                metadata=run | {"step": str(step)} | sums,
            )
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        logger.info(f"saved state to {final}")
    accelerator.wait_for_everyone()


def save_final_files(args, concept, learned: LearnedVectors, metadata: dict, step: int, validation, repo_id) -> None:
    """The embedding, the token and kind files and the model card; then the hub, if asked."""
    save_embedding(os.path.join(args.output_dir, LEARNED_EMBEDS_NAME), args, concept, learned, metadata, step)
    with writing("the concept files and card", args.output_dir):
        write_text(os.path.join(args.output_dir, "token_identifier.txt"), args.placeholder_token)
        write_text(os.path.join(args.output_dir, "type_of_concept.txt"), args.learnable_property)
        save_model_card(
            args,
            repo_id or args.hub_model_id or f"path/to/{os.path.basename(os.path.abspath(args.output_dir))}",
            validation.last_grid,
            learned.saved_vectors,
            validation.last_scores,
        )
    if args.push_to_hub:
        try:
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message=f"Textual inversion {args.placeholder_token}, step {step}",
                allow_patterns=[LEARNED_EMBEDS_NAME, "token_identifier.txt", "type_of_concept.txt", "README.md"]
                + ([validation.last_grid] if validation.last_grid else []),
                token=args.hub_token,
            )
        except Exception as e:  # whatever the hub client raises: the run itself is complete
            raise UsageError(
                f"training finished and {args.output_dir} holds every file, but the upload to {repo_id} failed "
                f"({first_line(e)}); upload the folder later (huggingface-cli upload)"
            ) from e


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class Validation:
    """Renders --validation_prompt with the current vectors put in place as inference puts them,
    saves a labelled grid (and shows it in the trackers); with --validation_similarity_model,
    scores the images against the training images. Runs on the main process only."""

    def __init__(self, args, pipe, concept: ConceptTokens, data: TrainingData, accelerator: Accelerator):
        self.args, self.pipe, self.concept, self.accelerator = args, pipe, concept, accelerator
        self.caption_features = data.caption_features  # output mode: the prompts' T5 features
        self.enabled = bool(args.validation_prompt) and accelerator.is_main_process
        self.similarity = None
        if args.validation_similarity_model and accelerator.is_main_process:
            self.similarity = ConceptSimilarity.from_pretrained(args.validation_similarity_model, accelerator.device)
            self.similarity.set_reference([e.image for e in data.examples])
        self.last_grid, self.last_scores = None, {}  # for the model card

    def state(self) -> dict[str, str]:
        """What a checkpoint keeps of the validation, so that a resumed run's card shows it."""
        return {"last_grid": self.last_grid or "", "last_scores": json.dumps(self.last_scores)}

    def restore(self, saved: dict[str, str]) -> None:
        self.last_grid = saved.get("last_grid") or None
        self.last_scores = json.loads(saved.get("last_scores", "{}"))

    def __call__(self, step: int, vectors: torch.Tensor) -> None:
        if not self.enabled:
            return
        args, text_encoder = self.args, self.pipe.text_encoder
        if args.ti_mode == "input":
            write_rows(text_encoder, self.concept.token_ids, vectors)
        was_training = text_encoder.training
        text_encoder.eval()
        schedule = get_schedule(1.0, args.pn)
        # one image at a time: each image's KV caches (CFG doubles them) would otherwise add up to
        # more than the training step needs at 1M; the random draws are those of any batch size
        images = [
            generate_images(
                self.pipe, self.concept.expand(p), args.num_validation_images, seed=args.seed, batch_size=1,
                schedule=schedule, prompt_embeds=self.prompt_embeds(p, vectors),
            )
            for p in args.validation_prompt
        ]  # fmt: skip
        text_encoder.train(was_training)
        if self.similarity is not None:  # the prompts in words (the initializer for the token) for CLIP's text side
            words = [
                replace_placeholder(p, args.placeholder_token, args.initializer_token) for p in args.validation_prompt
            ]
            scores = self.similarity.scores(
                [im for row in images for im in row], [w for w in words for _ in range(len(images[0]))]
            )
            self.last_scores = {"step": step, **scores}
            self.accelerator.log({f"similarity/{k}": v for k, v in scores.items()}, step=step)
        grid = labelled_grid(
            images,
            row_labels=args.validation_prompt,
            column_labels=[f"seed {args.seed + i}" for i in range(args.num_validation_images)],
            title=f"{args.placeholder_token}, step {step}",
        )
        os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
        self.last_grid = os.path.join("validation", f"step-{step:06d}.png")
        with writing(self.last_grid, args.output_dir):
            save_image(grid, os.path.join(args.output_dir, self.last_grid))
        self.log_grid(grid, step)

    def prompt_embeds(self, prompt: str, vectors: torch.Tensor) -> TextCondition | None:
        """Output mode: the prompt's features from the start, with the vectors written over the
        concept's rows as inference's T5 hook writes them; input mode: None (T5 runs)."""
        if self.caption_features is None:
            return None
        ids, text = self.caption_features([self.concept.expand(prompt)])
        token_ids = torch.tensor(self.concept.token_ids, device=ids.device)
        texts = [
            TextCondition(replace_rows(ids, text.features, token_ids, v.to(text.features)), text.mask)
            for v in (vectors if vectors.dim() == 3 else vectors[None])
        ]
        return texts if vectors.dim() == 3 else texts[0]  # per scale: one condition per scale

    def log_grid(self, grid: Image.Image, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                caption = " | ".join(self.args.validation_prompt)
                tracker.log({"validation": [wandb.Image(grid, caption=caption)]}, step=step)
            elif tracker.name == "mlflow":
                tracker.tracker.log_image(grid, f"validation/step-{step:06d}.png")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def check_inputs(args) -> tuple[list[tuple[str, Image.Image, str | None]], str]:
    """The data, the output folder, the concept's words and the similarity model, checked before
    anything is loaded or written; returns the training images and their fingerprint."""
    raw_examples = read_examples(args)
    check_output_dir(args)
    check_concept_words(args)
    if args.validation_similarity_model:  # on every process, so that none goes on alone
        try:
            check_similarity_model(args.validation_similarity_model)
        except ValueError as e:
            raise UsageError(str(e)) from e
    return raw_examples, data_fingerprint(raw_examples)


def make_accelerator(args) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # e.g. --multi_gpu on a CPU machine: N separate runs into one folder
        raise UsageError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes}; on CPUs launch with "
            "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train_textual_inversion_infinity.py ..."
        )
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    if accelerator.mixed_precision == "fp16":  # from the accelerate config file, past parse_args' check
        raise UsageError(
            "mixed precision fp16 (from your accelerate config) is refused: Infinity's blocks run in bfloat16; pass "
            "--mixed_precision bf16 or no"
        )
    return accelerator


@dataclass
class RunStart:
    identity: dict[str, str]  # run_identity, the seed and the run id: run.json and every checkpoint
    resume_path: str | None  # the checkpoint to resume
    saved: dict[str, str]  # its record (or run.json's, for a run stopped before its first checkpoint)


def start_or_resume_run(args, accelerator: Accelerator, data: str) -> RunStart:
    """A new run, or the one in --output_dir to resume: its checkpoint checked and its identity
    matched (flags, data, seed, processes, precision). The seed is --seed, else the run's, else a
    new one drawn on the main process for every process."""
    identity = run_identity(args, data, accelerator)
    resume_path = resolve_resume(args)
    saved = {}
    if resume_path is not None:
        check_checkpoint(resume_path, accelerator.num_processes)
        saved = checkpoint_run(resume_path)
    elif args.resume_from_checkpoint:  # no checkpoint yet: the run's own record, if it started
        saved = read_run_record(args.output_dir)
    if args.seed is not None:
        identity["seed"] = str(args.seed)
    check_recipe(f"checkpoint {resume_path}" if resume_path else f"the run in {args.output_dir}", saved, identity)
    if "seed" in saved and args.seed is None:  # the batch order depends on the seed
        args.seed = int(saved["seed"])
        logger.info(f"no --seed given; resuming with the run's seed {args.seed}")
    fresh = [int(torch.randint(0, 2**31 - 1, ()).item()), uuid.uuid4().hex[:12]]
    if accelerator.num_processes > 1:
        broadcast_object_list(fresh)  # one seed and one id for every process
    if args.seed is None:
        args.seed = fresh[0]
        logger.info(f"no --seed given; using {args.seed}")
    identity |= {"seed": str(args.seed), "run_id": saved.get("run_id", fresh[1])}
    return RunStart(identity, resume_path, saved)


def check_captions_fit(args, captions: list[str], tokenizer, concept: ConceptTokens, text_maxlen: int) -> None:
    """Every caption, template and validation prompt, with the placeholder's tokens, fits what
    T5 and Infinity read: a longer one would lose its end, the placeholder maybe with it."""
    limit = min(T5_MAX_LENGTH, text_maxlen)
    for caption in captions:
        length = int(tokenize(tokenizer, [concept.expand(caption)], max_length=10**6)[1].sum())
        if length > limit:
            raise UsageError(
                f"{caption[:60]!r}... is {length} tokens with the placeholder's {len(concept.tokens)}, more than the "
                f"{limit} Infinity reads; shorten it (or use fewer --num_vectors)"
            )


def make_optimizer(args, learned: LearnedVectors, num_batches: int, num_processes: int):
    """AdamW over the vectors and the learning-rate schedule; returns them and the optimisation
    steps per epoch. --scale_lr and a missing --max_train_steps are resolved here."""
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    optimizer = torch.optim.AdamW(
        learned.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)  # this process's share
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = transformers.get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        scheduler_specific_kwargs={"num_cycles": args.lr_num_cycles}
        if args.lr_scheduler == "cosine_with_restarts"
        else None,
    )
    return optimizer, lr_scheduler, steps_per_epoch


def resume_training_state(
    args, accelerator: Accelerator, learned, run: RunStart, step_rng: torch.Generator, steps_per_epoch: int
) -> tuple[int, int, int]:
    """Loads a checkpoint's vectors, optimizer, schedule and random states; returns the step it
    was saved at, the epoch to go on with and the batches of that epoch already done."""
    resume_path = run.resume_path
    if resume_path is None:
        if args.resume_from_checkpoint:
            accelerator.print("No checkpoint found; starting the run from step 0.")
        return 0, 0, 0
    accelerator.print(f"Resuming from {resume_path}")
    saved = {k: tuple(v.shape) for k, v in load_file(os.path.join(resume_path, "model.safetensors")).items()}
    expected = {k: tuple(v.shape) for k, v in accelerator.unwrap_model(learned).state_dict().items()}
    if saved != expected:
        raise UsageError(
            f"checkpoint {resume_path} holds {saved}, this run trains {expected}: it was made with another "
            "--num_vectors, --ti_mode, --vector_layout or --hold_norm"
        )
    try:
        accelerator.load_state(resume_path)
    except Exception as e:  # a file that passed the checks but is not what accelerate wrote
        raise UsageError(
            f"checkpoint {resume_path} cannot be loaded ({type(e).__name__}); resume from another checkpoint"
        ) from e
    if not torch.isfinite(accelerator.unwrap_model(learned).weight).all():
        raise UsageError(
            f"checkpoint {resume_path} holds non-finite vectors (the run diverged before it); resume from an "
            "earlier checkpoint"
        )
    step_rng.set_state(load_file(os.path.join(resume_path, STEP_RNG_NAME))[f"process_{accelerator.process_index}"])
    global_step = checkpoint_step(resume_path, run.saved)  # the record start_or_resume_run read
    first_epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return global_step, first_epoch, steps_into_epoch * args.gradient_accumulation_steps


def training_loss(
    args,
    indices: list[int],
    data: TrainingData,
    pipe,
    concept: ConceptTokens,
    learned,
    at_start: LearnedVectors | None,
    step_rng: torch.Generator,
) -> torch.Tensor:
    """Infinity's training loss on one batch: each trained scale's bits predicted from the coarser
    scales, conditioned on the captions with the placeholder. With `at_start` (the concept's
    starting vectors, frozen), the targets of the first --prior_scales mix in what the model
    predicts there for the same captions with those vectors: the prior. Per-step randomness
    (flips, self-correction, caption templates) comes from `step_rng`, in that order."""
    schedule = data.schedules[indices[0]]
    flips = (
        torch.randint(0, 2, (len(indices),), generator=step_rng).tolist() if args.random_flip else [0] * len(indices)
    )
    with torch.no_grad():
        if data.cached_features is not None:
            features = torch.stack([data.cached_features[i][f] for i, f in zip(indices, flips)])
        else:
            features = pipe.vae.encode(torch.stack([data.pixels[i][f] for i, f in zip(indices, flips)]).to(pipe.device))
        num_scales = num_training_scales(schedule, args.train_scales)
        inputs = make_training_inputs(
            features,
            schedule,
            pipe.transformer.config.spatial_patchify,
            args.self_correction_strength,
            args.self_correction_scales,
            step_rng,
            num_scales,
        )
        schedule = schedule.prefix(num_scales)
    captions = data.captions(indices, TEMPLATES[args.learnable_property], args.placeholder_token, step_rng)
    captions = [concept.expand(c) for c in captions]
    caption_rows = None if data.caption_features is None else data.caption_features(captions)
    logits = pipe.transformer(caption_condition(pipe, learned, captions, caption_rows), inputs.x_tokens, schedule)
    prior = None
    if at_start is not None:
        # attention is causal by scale: a forward over the prior's scales alone gives their logits
        prefix = schedule.prefix(args.prior_scales)
        with torch.no_grad():
            text = caption_condition(pipe, at_start, captions, caption_rows)
            prior = pipe.transformer(text, inputs.x_tokens[:, : prefix.total_len - 1], prefix)
    return bitwise_loss(logits, inputs.labels, schedule, args.reweight_loss_by_scale, prior, args.prior_weight)


def caption_condition(pipe, vectors: LearnedVectors, captions: list[str], caption_rows) -> TextCondition | list:
    """The captions' condition with `vectors` at the concept's tokens: input mode runs T5 on them;
    output mode (`caption_rows`, the cached T5 features) puts them over the features, one condition
    per scale for per-scale vectors."""
    if caption_rows is None:
        return encode_with_learned(pipe.tokenizer, pipe.text_encoder, vectors, captions)
    input_ids, text = caption_rows
    features = vectors(input_ids, text.features)  # B, Lt, C   (per scale: S, B, Lt, C)
    if features.dim() == 3:
        return TextCondition(features, text.mask)
    return [TextCondition(f, text.mask) for f in features]


def all_finite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """Decided together: a NaN on any process stops every process."""
    return accelerator.gather(torch.isfinite(value.detach()).all().float().reshape(1)).min().item() > 0


def stop_non_finite(
    args, accelerator, concept, learned: LearnedVectors, metadata, last_good, last_good_step, what, step
):
    """Ends the run when the loss or the vectors turn non-finite: the main process puts back the
    vectors that last gave a finite loss and saves them (their moving average with --ema_decay)."""
    if accelerator.is_main_process:
        learned.load_state_dict(last_good)
        path = os.path.join(args.output_dir, LEARNED_EMBEDS_NAME)
        save_embedding(path, args, concept, learned, metadata, last_good_step)
    raise UsageError(
        f"the {what} became non-finite at step {step}; the last good embedding (step {last_good_step}) is in "
        f"{args.output_dir}/{LEARNED_EMBEDS_NAME} (lower --learning_rate)"
    )


def save_progress(args, accelerator, concept, learned, metadata, step: int, step_rng, run: dict[str, str]) -> None:
    """The embedding every --save_steps and a resumable checkpoint every --checkpointing_steps
    (this run's oldest pruned once the new one is complete)."""
    if accelerator.is_main_process and step % args.save_steps == 0:
        path = os.path.join(args.output_dir, f"learned_embeds-steps-{step}.safetensors")
        save_embedding(path, args, concept, accelerator.unwrap_model(learned), metadata, step)
    if step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, args.output_dir, step, step_rng, run)
        if accelerator.is_main_process and args.checkpoints_total_limit is not None:
            prune_checkpoints(args.output_dir, args.checkpoints_total_limit, run["run_id"])


def main(args):
    # 1. Check the data and where the results go, before anything is loaded or written.
    raw_examples, data = check_inputs(args)

    # 2. Accelerator and logging; the run (new, or the one to resume) and its seed; the hub repo.
    accelerator = make_accelerator(args)
    run = start_or_resume_run(args, accelerator, data)
    set_seed(args.seed)
    repo_id = on_main_process(accelerator, lambda: create_hub_repo(args)) if args.push_to_hub else None
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32

    # 3. Frozen models: flan-T5 and the Infinity blocks in the weight dtype, the VAE in float32.
    pipe = InfinityPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        model_type=args.model_type,
        text_encoder_name_or_path=args.text_encoder_name_or_path,
        torch_dtype=weight_dtype,
        device=accelerator.device,
        revision=args.revision,
        text_encoder_dtype=TEXT_ENCODER_DTYPES.get(args.text_encoder_dtype),
    )

    # 4. The placeholder's tokens and their trainable vectors (float32, outside the frozen model).
    concept = add_concept_tokens(args, pipe.tokenizer, pipe.text_encoder)
    learned = LearnedVectors(concept.token_ids, concept.start, args.hold_norm, args.ema_decay).to(accelerator.device)
    at_start = None  # the prior's vectors: where the concept starts, frozen (per scale: every set starts alike)
    if args.prior_scales > 0 and args.prior_weight > 0:
        start = concept.start[0] if concept.start.dim() == 3 else concept.start
        at_start = LearnedVectors(concept.token_ids, start).requires_grad_(False).to(accelerator.device)
    metadata = embedding_metadata(args, pipe, len(concept.tokens))

    # 5. Memory savers. Frozen weights never get gradients; only activations on the path to the
    #    learned vectors are kept. T5 is not checkpointed: HF checkpoints only in train mode, where
    #    T5's attention applies its dropout, and its activations at caption length are small.
    if args.gradient_checkpointing:
        pipe.transformer.gradient_checkpointing = True

    # 6. Data, once every caption is known to fit.
    captions = [c for _, _, c in raw_examples if c is not None] + (args.validation_prompt or [])
    captions += [t.format(args.placeholder_token) for t in TEMPLATES[args.learnable_property]]
    check_captions_fit(args, captions, pipe.tokenizer, concept, pipe.transformer.config.text_maxlen)
    data = prepare_training_data(args, raw_examples, pipe, concept, accelerator)

    # 7. Optimizer and schedule.
    optimizer, lr_scheduler, steps_per_epoch = make_optimizer(
        args, learned, len(data.dataloader), accelerator.num_processes
    )
    learned, optimizer, lr_scheduler = accelerator.prepare(learned, optimizer, lr_scheduler)  # the loader shards itself
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # per-step randomness (caption templates, flips, self-correction) from one generator per
    # process, saved with each checkpoint
    step_rng = torch.Generator().manual_seed(args.seed + accelerator.process_index)

    # 8. The first writes (everything above has been checked): the folder, locked for this run, and trackers.
    on_main_process(accelerator, lambda: take_output_dir(args, run.identity))
    if accelerator.is_main_process:
        # never the token: trackers write their config to disk and to their servers
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers("textual_inversion_infinity", config=config)

    # 9. Resume.
    global_step, first_epoch, skip_batches = resume_training_state(
        args, accelerator, learned, run, step_rng, steps_per_epoch
    )
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running textual inversion *****")
    logger.info(
        f"  Images = {len(data.examples)} (x{args.repeats} repeats), tokens = {concept.tokens}, initializer = "
        f"{args.initializer_token!r}"
    )
    logger.info(
        f"  Batch size per device = {args.train_batch_size}, total = {total_batch_size}, steps = {args.max_train_steps}"
    )
    validation = Validation(args, pipe, concept, data, accelerator)
    validation.restore(run.saved)
    if global_step == 0:
        validation(0, accelerator.unwrap_model(learned).saved_vectors)
    # the vectors (and their average) that last gave a finite loss, saved if the loss or the vectors turn NaN
    last_good = {k: v.clone() for k, v in accelerator.unwrap_model(learned).state_dict().items()}
    last_good_step = global_step

    # 10. The loop. An optimisation step takes --gradient_accumulation_steps batches, or the rest of
    #     the epoch: every epoch starts a step, so that a step never mixes two epochs.
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    accumulation = args.gradient_accumulation_steps
    for epoch in range(first_epoch, args.num_train_epochs):
        data.batch_sampler.use_epoch(epoch)
        num_batches, skip = len(data.dataloader), skip_batches if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(data.dataloader, skip) if skip else data.dataloader
        for k, indices in enumerate(batches, skip):
            if global_step >= args.max_train_steps:  # a resumed run that had already finished
                break
            group_start = k - k % accumulation
            group_end = min(group_start + accumulation, num_batches)
            sync = k + 1 == group_end
            if k == group_start:
                step_loss = torch.zeros((), device=accelerator.device)  # this process's mean over the step's batches
            with contextlib.nullcontext() if sync else accelerator.no_sync(learned):
                loss = training_loss(args, indices.tolist(), data, pipe, concept, learned, at_start, step_rng)
                if not all_finite(accelerator, loss):
                    stop_non_finite(args, accelerator, concept, accelerator.unwrap_model(learned), metadata,
                                    last_good, last_good_step, "loss", global_step)  # fmt: skip
                for name, value in accelerator.unwrap_model(learned).state_dict().items():
                    last_good[name].copy_(value)
                last_good_step = global_step
                accelerator.backward(loss / (group_end - group_start))
                step_loss += loss.detach() / (group_end - group_start)  # read once, when logged
            if not sync:
                continue
            accelerator.clip_grad_norm_(learned.parameters(), args.max_grad_norm)
            optimizer.step()
            accelerator.unwrap_model(learned).project_()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not all_finite(accelerator, accelerator.unwrap_model(learned).weight):
                stop_non_finite(args, accelerator, concept, accelerator.unwrap_model(learned), metadata,
                                last_good, last_good_step, "vectors", global_step + 1)  # fmt: skip
            accelerator.unwrap_model(learned).update_ema_(global_step + 1)  # finite vectors only

            global_step += 1
            progress_bar.update(1)
            logs = {
                "loss": step_loss.item(),
                "lr": lr_scheduler.get_last_lr()[0],
                "vector_norm": accelerator.unwrap_model(learned).vectors.detach().norm(dim=-1).mean().item(),
                "vocab_mean_norm": concept.vocab_norm,
            }
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % args.validation_steps == 0:  # before the checkpoint, which records it
                validation(global_step, accelerator.unwrap_model(learned).saved_vectors)
            save_progress(args, accelerator, concept, learned, metadata, global_step, step_rng,
                          run.identity | validation.state())  # fmt: skip
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # 11. Final files, then the hub.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_files(args, concept, accelerator.unwrap_model(learned), metadata, global_step, validation, repo_id)
    if accelerator.device.type == "cuda":  # what the card this ran on needed (validation included)
        logger.info(f"peak GPU memory: {torch.cuda.max_memory_allocated(accelerator.device) / 2**30:.2f} GiB")
    accelerator.end_training()
    for handle in _HELD_LOCKS.values():
        handle.close()  # closing the file releases its lock
    _HELD_LOCKS.clear()


def cli(argv=None) -> None:
    """The command line: bad input, a failed write and Ctrl-C end in one line on stderr (exit 1)."""
    args = parse_args(argv)
    try:
        main(args)
    except BAD_INPUT as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"error: interrupted; {saved_state(args.output_dir)}")


if __name__ == "__main__":
    cli()
