"""`InfinityPipeline`: load the released model (or a local one) and turn prompts into images.

pipe = InfinityPipeline.from_pretrained("FoundationVision/Infinity", model_type="infinity_2b",
                                        torch_dtype=torch.bfloat16, device="cuda")
images = pipe("a photo of a dog on the beach", seed=0).images

Textual inversion as in diffusers: the pipeline remembers the concepts it loads and expands their
placeholders in every prompt it encodes (`<tok>:0.8` weights one for that prompt):

pipe.load_textual_inversion("user/my-dog-ti")       # a file, a folder with learned_embeds.safetensors, a hub id
images = pipe("a photo of a <my-dog> on the beach", seed=0).images
pipe.unload_textual_inversion()                     # the base model again, bit for bit
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image

from .config import MODEL_CONFIG_NAME, MODEL_PRESETS, ModelPreset, load_model_config, save_model_config
from .loading import (
    ModelFilesNotFound,
    load_into,
    looks_like_a_path,
    read_state_dict,
    resolve_model_file,
    save_state_dict,
    vae_state_dict,
)
from .resolution import ScaleSchedule, get_schedule
from .sampling import Generators, SamplingSettings, sample
from .text import T5_MAX_LENGTH, TextCondition, encode_prompt
from .textual_inversion import (
    ConceptError,
    ConceptMismatch,
    LearnedConcept,
    Placeholders,
    apply_concepts,
    check_weight,
    concept_mismatches,
    load_learned_embeds,
    placeholder_tokens,
    put_concept,
    remove_output_rows,
    scaled_vectors,
)
from .transformer import InfinityTransformer
from .vae import BSQVAE

logger = logging.getLogger(__name__)


def resolve_preset(pretrained_model_name_or_path: str, model_type: str) -> ModelPreset:
    """A local folder may describe its own architecture in infinity_config.json; otherwise the
    released preset named by `model_type` gives the architecture and the file names."""
    local_config = os.path.join(pretrained_model_name_or_path, MODEL_CONFIG_NAME)
    if os.path.isdir(pretrained_model_name_or_path) and os.path.exists(local_config):
        return load_model_config(local_config)
    if model_type not in MODEL_PRESETS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[model_type]


def effective_model_type(pretrained_model_name_or_path: str, model_type: str) -> str:
    """What an embedding records as its model: the preset's name, or "custom" for a local folder
    whose own infinity_config.json decides the architecture (the flag is then ignored)."""
    local_config = os.path.join(pretrained_model_name_or_path, MODEL_CONFIG_NAME)
    return "custom" if os.path.isdir(pretrained_model_name_or_path) and os.path.exists(local_config) else model_type


def resolve_text_encoder(
    pretrained_model_name_or_path: str, text_encoder_name_or_path: str | None, preset: ModelPreset
) -> str:
    """The text encoder `from_pretrained` loads: the one named, else a local model folder's own
    (bundled under the preset's name), else the preset's hub id (google/flan-t5-xl)."""
    if text_encoder_name_or_path:
        return text_encoder_name_or_path
    bundled = os.path.join(pretrained_model_name_or_path, preset.text_encoder)
    return bundled if os.path.isdir(bundled) else preset.text_encoder


def load_transformer(path: str, preset: ModelPreset, block_dtype: torch.dtype, device) -> InfinityTransformer:
    with torch.device("meta"):
        model = InfinityTransformer(preset.transformer)
    model.set_block_dtype(block_dtype)
    load_into(model, read_state_dict(path), what=path)
    return model.to(device).eval().requires_grad_(False)


def load_vae(path: str, preset: ModelPreset, device) -> BSQVAE:
    with torch.device("meta"):
        vae = BSQVAE(preset.vae)
    load_into(vae, vae_state_dict(read_state_dict(path), vae.state_dict().keys()), what=path)
    return vae.to(device).eval().requires_grad_(False)


TEXT_ENCODER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_text_encoder_dtype(device) -> torch.dtype:
    """flan-T5 as the official code runs it on a GPU: float16, with transformers keeping T5's FFN
    output layers in float32 (its `_keep_in_fp32_modules`), which stops the overflow of plain
    float16 and is ~10x closer to float32 features than bfloat16 (benchmarks/bench_t5_precision.py).
    float32 on the CPU, where float16 is slow."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def text_encoder_not_found(name_or_path: str, error: OSError) -> ModelFilesNotFound:
    """What a failed load of flan-T5 from a folder or a hub id says to do."""
    if os.path.isdir(name_or_path):
        return ModelFilesNotFound(
            f"{name_or_path} holds no complete flan-T5 encoder ({type(error).__name__}); it needs config.json, the "
            "weights (model.safetensors or pytorch_model.bin) and the tokenizer files of the flan-T5 repo"
        )
    return ModelFilesNotFound(
        f"could not load the T5 text encoder from {name_or_path!r} ({type(error).__name__}); download "
        f"https://huggingface.co/{name_or_path} (config, weights, tokenizer files) into a folder DIR and pass DIR"
    )


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """flan-T5's tokenizer alone: seconds, where the encoder takes minutes at flan-T5-XL's size."""
    from transformers import AutoTokenizer

    if looks_like_a_path(name_or_path) and not os.path.isdir(name_or_path):
        raise ModelFilesNotFound(
            f"text encoder folder {name_or_path} does not exist; pass a flan-T5 folder or a hub repo id such as "
            "google/flan-t5-xl"
        )
    if os.path.isdir(name_or_path) and not any(
        os.path.exists(os.path.join(name_or_path, f)) for f in ("spiece.model", "tokenizer.json")
    ):
        # transformers would build a tokenizer of special tokens only, and every word would be <unk>
        raise ModelFilesNotFound(
            f"{name_or_path} has no tokenizer files (spiece.model or tokenizer.json); copy them from the flan-T5 repo "
            "beside the weights"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, legacy=True)
    except OSError as e:
        raise text_encoder_not_found(name_or_path, e) from e
    tokenizer.model_max_length = T5_MAX_LENGTH
    return tokenizer


def load_text_encoder(name_or_path: str, dtype: torch.dtype, device, revision: str | None = None):
    """flan-T5 tokenizer and encoder (the encoder half only, frozen). Loaded in `dtype` by
    `from_pretrained` and never cast afterwards: a later `.half()` would undo the float32 FFN outputs."""
    from transformers import T5EncoderModel

    tokenizer = load_tokenizer(name_or_path, revision)
    try:
        text_encoder = T5EncoderModel.from_pretrained(name_or_path, revision=revision, dtype=dtype)
    except OSError as e:
        raise text_encoder_not_found(name_or_path, e) from e
    return tokenizer, text_encoder.to(device).eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, truncating like the official conversion."""
    return ((images + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8)


def decode_to_uint8(transformer: InfinityTransformer, vae: BSQVAE, summed_codes: torch.Tensor) -> torch.Tensor:
    """The sampler's codes -> (B, H, W, 3) uint8 pixels. The official inference decodes under bf16
    autocast when its blocks run in bf16 on a GPU."""
    block_dtype = transformer.blocks[0].ffn.fc1.weight.dtype
    bf16_decode = summed_codes.device.type == "cuda" and block_dtype == torch.bfloat16
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_decode):
        return to_uint8(vae.decode(summed_codes))


@dataclass
class InfinityPipelineOutput:
    images: list[Image.Image]  # RGB
    bits: list[torch.Tensor] | None = None  # per scale (B, h, w, d) on the VAE grid, with return_bits


@dataclass
class LoadedConcept:
    """A concept `load_textual_inversion` put in place: its token ids and its default weight."""

    concept: LearnedConcept
    token_ids: list[int]
    weight: float = 1.0


@dataclass
class _BaseText:
    """What loading concepts changes, as the base model had it: the tokenizer, the embedding
    matrix's size and its spare rows (where new tokens go)."""

    tokenizer: object
    num_rows: int
    first_spare: int
    spare_rows: torch.Tensor
    requires_grad: bool


class InfinityPipeline:
    def __init__(self, transformer: InfinityTransformer, vae: BSQVAE, tokenizer, text_encoder):
        self.transformer, self.vae, self.tokenizer, self.text_encoder = transformer, vae, tokenizer, text_encoder
        self.learned_concepts: dict[str, LoadedConcept] = {}  # placeholder -> concept (load_textual_inversion)
        self._base_text: _BaseText | None = None
        # what from_pretrained loaded, compared with an embedding's metadata (None: not known)
        self.name_or_path: str | None = None
        self.model_type: str | None = None
        self.text_encoder_name_or_path: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        model_type: str = "infinity_2b",
        text_encoder_name_or_path: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        text_encoder_dtype: torch.dtype | None = None,
    ) -> InfinityPipeline:
        """Loads from a hub repo id (FoundationVision/Infinity file names) or a local folder with
        the same file names. `torch_dtype` applies to the transformer blocks; the VAE and the
        transformer's float32 parts stay float32, as in the official bf16 inference. T5 runs in
        `text_encoder_dtype` (default: `default_text_encoder_dtype(device)`)."""
        preset = resolve_preset(pretrained_model_name_or_path, model_type)
        transformer_path = resolve_model_file(pretrained_model_name_or_path, preset.transformer_file, revision)
        vae_path = resolve_model_file(pretrained_model_name_or_path, preset.vae_file, revision)
        transformer = load_transformer(transformer_path, preset, torch_dtype, device)
        vae = load_vae(vae_path, preset, device)
        text_encoder_path = resolve_text_encoder(pretrained_model_name_or_path, text_encoder_name_or_path, preset)
        tokenizer, text_encoder = load_text_encoder(
            text_encoder_path, text_encoder_dtype or default_text_encoder_dtype(device), device, None
        )
        pipe = cls(transformer, vae, tokenizer, text_encoder)
        pipe.name_or_path = pretrained_model_name_or_path
        pipe.model_type = effective_model_type(pretrained_model_name_or_path, model_type)
        pipe.text_encoder_name_or_path = text_encoder_path
        return pipe

    def save_pretrained(self, directory: str) -> None:
        """Writes a folder `from_pretrained` reads: weights as safetensors, the architecture in
        infinity_config.json and the T5 tokenizer and encoder under text_encoder/."""
        os.makedirs(directory, exist_ok=True)
        save_state_dict(self.transformer, os.path.join(directory, "transformer.safetensors"))
        save_state_dict(self.vae, os.path.join(directory, "vae.safetensors"))
        self.tokenizer.save_pretrained(os.path.join(directory, "text_encoder"))
        self.text_encoder.save_pretrained(os.path.join(directory, "text_encoder"))
        preset = ModelPreset(
            self.transformer.config, self.vae.config, "transformer.safetensors", "vae.safetensors", "text_encoder"
        )
        save_model_config(preset, directory)  # last: a folder with a config is a complete one

    def fingerprint(self) -> str:
        """A short hash of the base model itself, the same whatever path, device or block dtype it
        was loaded with: its architecture and a few of its float32 weights. An embedding records
        it, so that inference can tell another model behind the same folder name (and the same
        model in another folder)."""
        digest = hashlib.sha256()
        configs = {"transformer": asdict(self.transformer.config), "vae": asdict(self.vae.config)}
        digest.update(json.dumps(configs, sort_keys=True).encode())
        for weight in (self.transformer.pos_start, self.transformer.lvl_embed.weight, self.transformer.head.weight):
            digest.update(weight.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_start.device

    def to(self, device) -> InfinityPipeline:
        for module in (self.transformer, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def token_stride(self) -> int:
        """Image pixels per transformer token, per side."""
        cfg = self.transformer.config
        return self.vae.config.patch_size * (2 if cfg.spatial_patchify else 1)

    def schedule(self, h_div_w: float = 1.0, pn: str = "1M") -> ScaleSchedule:
        return get_schedule(h_div_w, pn)

    # -----------------------------------------------------------------------------------------
    # Textual inversion
    # -----------------------------------------------------------------------------------------

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: str | os.PathLike | LearnedConcept | Sequence[LearnedConcept],
        token: str | None = None,
        weight: float = 1.0,
        revision: str | None = None,
        force: bool = False,
    ) -> list[str]:
        """Loads learned concepts: a `.safetensors` (or diffusers' / A1111's) file, a folder
        holding learned_embeds.safetensors, a hub repo id (at `revision`), or `LearnedConcept`s
        already read. `token` renames the placeholder. `weight` (-1 to 2) is the concept's weight
        in prompts that give it none (`<tok>:0.8` gives one). From now on every prompt's
        placeholders are expanded into all their tokens. Returns the placeholders loaded.

        Refused (ConceptError, nothing changed): a token already loaded (unload it first), a word
        the tokenizer knows, vectors of another width, and a file trained for another model (its
        model_type, its base model's fingerprint, or its hub names), unless `force`."""
        if isinstance(pretrained_model_name_or_path, LearnedConcept):
            concepts = [pretrained_model_name_or_path]
        elif isinstance(pretrained_model_name_or_path, (list, tuple)):
            concepts = list(pretrained_model_name_or_path)
        else:
            concepts = load_learned_embeds(os.fspath(pretrained_model_name_or_path), token=token, revision=revision)
            token = None  # renamed as read
        if token is not None:
            if len(concepts) != 1:
                raise ConceptError(f"{len(concepts)} concepts; a single token cannot rename them all")
            (concept,) = concepts
            concepts = [replace(concept, placeholder=token, tokens=placeholder_tokens(token, len(concept.tokens)))]
        weight = check_weight(weight)
        fingerprint = self.fingerprint()
        for concept in concepts:
            problems = concept_mismatches(
                concept, self.model_type, self.name_or_path, self.text_encoder_name_or_path, fingerprint
            )
            if problems:
                where = f"{concept.source or concept.placeholder} ({concept.placeholder})"
                what = f"{where} was trained for {'; '.join(problems)}"
                if not force:
                    raise ConceptMismatch(what, "load that model, or pass force=True to use the embedding anyway")
                logger.warning(f"{what}; forced: using it anyway")
        loaded = {t: c.concept.source or p for p, c in self.learned_concepts.items() for t in c.concept.tokens}
        for concept in concepts:
            for t in concept.tokens:
                if t in loaded:
                    raise ConceptError(
                        f"{t!r} is already loaded (from {loaded[t]}); unload it first (unload_textual_inversion), "
                        "or load this one under another name (token=...)"
                    )
        self._put_concepts(concepts, weight)
        return [c.placeholder for c in concepts]

    def _put_concepts(self, concepts: Sequence[LearnedConcept], weight: float) -> None:
        if self._base_text is None:
            embedding = self.text_encoder.get_input_embeddings()
            first_spare = len(self.tokenizer)
            self._base_text = _BaseText(
                copy.deepcopy(self.tokenizer),
                embedding.num_embeddings,
                first_spare,
                embedding.weight[first_spare:].detach().clone(),
                embedding.weight.requires_grad,
            )
        # checks all, then changes; a concept with vectors per scale rests at its first scale's
        ids = apply_concepts(self.tokenizer, self.text_encoder, [c.at_scale(0) for c in concepts])
        for concept in concepts:
            self.learned_concepts[concept.placeholder] = LoadedConcept(concept, ids[concept.placeholder], weight)
            if weight != 1:
                put_concept(self.text_encoder, concept.at_scale(0), ids[concept.placeholder], weight)

    def unload_textual_inversion(self, tokens: str | Sequence[str] | None = None) -> None:
        """Unloads the concepts whose placeholders are given (default: all). Without concepts the
        tokenizer, the embedding matrix and T5's outputs are the base model's again, bit for bit."""
        if isinstance(tokens, str):
            tokens = [tokens]
        if tokens is not None:
            unknown = [t for t in tokens if t not in self.learned_concepts]
            if unknown:
                loaded = ", ".join(self.learned_concepts) or "none"
                raise ConceptError(f"{', '.join(unknown)} not loaded (loaded: {loaded})")
        keep = [c for p, c in self.learned_concepts.items() if tokens is not None and p not in tokens]
        base = self._base_text
        if base is None:
            return
        remove_output_rows(self.text_encoder)
        if self.text_encoder.get_input_embeddings().num_embeddings != base.num_rows:
            self.text_encoder.resize_token_embeddings(base.num_rows)
        embedding = self.text_encoder.get_input_embeddings()
        with torch.no_grad():
            embedding.weight[base.first_spare :] = base.spare_rows.to(embedding.weight)
        embedding.weight.requires_grad_(base.requires_grad)
        self.tokenizer = copy.deepcopy(base.tokenizer)
        self.learned_concepts, self._base_text = {}, None
        for loaded in keep:
            self._put_concepts([loaded.concept], loaded.weight)

    def parse_prompt(self, prompt: str) -> tuple[str, dict[str, float]]:
        """What `encode_prompt` encodes for a prompt: its weights (`<tok>:0.8`) taken out and
        checked, each loaded placeholder expanded into all its tokens; and the weights."""
        if not self.learned_concepts:
            return prompt, {}
        placeholders = Placeholders({p: c.concept.tokens for p, c in self.learned_concepts.items()})
        text, weights = placeholders.take_weights(prompt)
        return placeholders.expand(text), weights

    def encode_prompt(self, prompts: Sequence[str]) -> TextCondition | list[TextCondition]:
        """T5 features of the prompts, with the loaded concepts' placeholders expanded and weighted.
        With a concept that has vectors per generation scale: one condition per scale (as many as
        that concept has sets; the sampler gives the last to the scales after them)."""
        num_scales = max((c.concept.num_scales for c in self.learned_concepts.values()), default=1)
        texts = [self._encode_at_scale(prompts, s) for s in range(num_scales)]
        return texts[0] if num_scales == 1 else texts

    def _encode_at_scale(self, prompts: Sequence[str], scale: int) -> TextCondition:
        if not self.learned_concepts:
            text = encode_prompt(self.tokenizer, self.text_encoder, prompts)
        else:
            parsed = [self.parse_prompt(p) for p in prompts]
            groups = [parsed] if all(w == parsed[0][1] for _, w in parsed) else [[p] for p in parsed]
            text = None
            for group in groups:  # one T5 call per set of weights
                condition = self._encode_weighted([t for t, _ in group], group[0][1], scale)
                text = condition if text is None else text.cat(condition)
        # T5 may live on another device than the transformer (training offloads it in output mode)
        return text.to(self.device)

    def _encode_weighted(self, texts: list[str], weights: dict[str, float], scale: int = 0) -> TextCondition:
        concepts = {p: c.concept.at_scale(scale) for p, c in self.learned_concepts.items()}
        token_ids = {p: c.token_ids for p, c in self.learned_concepts.items()}
        rest = {p: c.weight for p, c in self.learned_concepts.items()}
        # a concept with vectors per scale holds this scale's for the call, then its first scale's again
        moved = [p for p, c in self.learned_concepts.items() if scale > 0 and c.concept.num_scales > 1]
        try:
            for p in moved:
                put_concept(self.text_encoder, concepts[p], token_ids[p], rest[p])
            with scaled_vectors(self.text_encoder, concepts, token_ids, weights, rest):
                return encode_prompt(self.tokenizer, self.text_encoder, texts)
        finally:
            for p in moved:
                put_concept(self.text_encoder, self.learned_concepts[p].concept.at_scale(0), token_ids[p], rest[p])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        h_div_w: float = 1.0,
        pn: str = "1M",
        schedule: ScaleSchedule | None = None,
        seed: int | None = None,
        generator: Generators = None,
        return_bits: bool = False,
        prefix_bits: Sequence[torch.Tensor] = (),
        prompt_embeds: TextCondition | Sequence[TextCondition] | None = None,
        **sampling,
    ) -> InfinityPipelineOutput:
        """Generates `num_images_per_prompt` images for each prompt in one batch. `sampling`: cfg
        (or guidance_scale), tau, top_k, top_p, cfg_insertion_layer (`SamplingSettings`, official
        defaults).

        With `seed`, image k of the batch draws from its own generator seeded `seed + k` on the
        model's device (for a single image this is the official per-call seeding); `generator`
        (one for the batch, or one per image) overrides it. `prefix_bits`: the first scales' bits,
        given instead of drawn (see `sample`). `prompt_embeds`: T5's features of the prompts (one
        row per prompt), already computed, used instead of encoding them (training's validation
        encodes its prompts once, while T5 is on the GPU)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images_per_prompt < 1:
            raise ValueError(
                f"give at least one prompt and one image per prompt, got {prompts} x {num_images_per_prompt}"
            )
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if prompt_embeds is None:
            text = self.encode_prompt(prompts)
        elif isinstance(prompt_embeds, TextCondition):
            text = prompt_embeds.repeat(len(prompts) // prompt_embeds.batch_size).to(self.device)
        else:  # one per scale
            text = [t.repeat(len(prompts) // t.batch_size).to(self.device) for t in prompt_embeds]
        negative = None
        if negative_prompt:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            negatives = (
                negatives
                if len(negatives) == len(prompts)
                else [n for n in negatives for _ in range(num_images_per_prompt)]
            )
            negative = self.encode_prompt(negatives)
        if generator is None and seed is not None:
            generator = [torch.Generator(self.device).manual_seed(seed + k) for k in range(len(prompts))]
        out = sample(
            self.transformer,
            text,
            schedule or self.schedule(h_div_w, pn),
            SamplingSettings.from_kwargs(**sampling),
            negative_text=negative,
            generator=generator,
            prefix_bits=prefix_bits,
        )
        pixels = decode_to_uint8(self.transformer, self.vae, out.summed_codes).cpu().numpy()
        images = [Image.fromarray(p) for p in pixels]
        return InfinityPipelineOutput(images, out.bits if return_bits else None)


def generate_images(
    pipe: InfinityPipeline,
    prompt: str,
    num_images: int,
    seed: int = 0,
    batch_size: int = 4,
    progress: Callable[[int], object] | None = None,
    **settings,
) -> list[Image.Image]:
    """`num_images` images of one prompt, image i drawn with seed `seed + i`: the random draws do
    not depend on the batch size (batched float math may still differ in the last bits). The
    generation the inference script and the training script's validation share.
    `progress(n)` is called after each batch with its number of images (e.g. a tqdm's update)."""
    images = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        generators = [torch.Generator(pipe.device).manual_seed(seed + start + k) for k in range(n)]
        images += pipe([prompt] * n, generator=generators, **settings).images
        if progress is not None:
            progress(n)
    return images
