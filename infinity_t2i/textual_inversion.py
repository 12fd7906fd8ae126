"""Textual inversion on flan-T5: placeholder tokens, their learned vectors, and the file format.

A concept is one placeholder (`<my-dog>`) with `num_vectors` vectors; vector i > 0 gets its own
token `<my-dog>_i`, and prompts name only the placeholder, which `expand_placeholders` turns into
all its tokens. New tokens take flan-T5's spare embedding rows (32128 rows for 32100 tokens); the
matrix only ever grows. During training the vectors live outside the frozen matrix as a float32
parameter (`LearnedEmbeddings`); generation writes them into their rows (`write_rows`), which is
what inference does after loading a file (`apply_concepts`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .loading import CheckpointError, ModelFilesNotFound, read_state_dict, resolve_model_file
from .text import SPACE_PIECE

FORMAT = "infinity-textual-inversion/1"
LEARNED_EMBEDS_NAME = "learned_embeds.safetensors"


class ConceptError(ValueError):
    """A placeholder or initializer token that cannot be used, or an embedding that does not fit."""


# Caption templates when images come without captions; {} is the placeholder (all its tokens).
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a picture of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a good photo of the {}",
    "a photo of my {}",
    "a photo of one {}",
    "a rendering of a {}",
    "a clean photo of the {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "an image of a {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a picture in the style of {}",
    "a rendering in the style of {}",
    "an illustration in the style of {}",
    "a drawing in the style of {}",
    "a photo in the style of {}",
    "a cropped painting in the style of {}",
    "a close-up painting in the style of {}",
    "a dark painting in the style of {}",
    "a bright painting in the style of {}",
    "artwork in the style of {}",
    "a small painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """`<my-dog>`, `<my-dog>_1`, ... one token per learned vector."""
    if num_vectors < 1:
        raise ConceptError(f"num_vectors must be at least 1, got {num_vectors}")
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholders(prompt: str, concepts: dict[str, list[str]]) -> str:
    """Replaces each placeholder by all its tokens: "a <my-dog>" -> "a <my-dog> <my-dog>_1"."""
    for placeholder, tokens in concepts.items():
        if len(tokens) > 1:
            prompt = re.sub(re.escape(placeholder) + r"(?!_\d)", lambda _: " ".join(tokens), prompt)
    return prompt


def add_placeholder_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Adds the tokens to the tokenizer (refusing words it already knows) and returns their ids."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not token.strip() or any(c.isspace() for c in token):
            raise ConceptError(f"placeholder token {token!r} must be one word without spaces, e.g. <my-dog>")
        if token in vocab or SPACE_PIECE + token in vocab:
            raise ConceptError(f"{token!r} is already in the tokenizer's vocabulary; choose a new placeholder token such as <{token}-concept>")
    tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in tokens])
    return tokenizer.convert_tokens_to_ids(tokens)


def ensure_embedding_rows(text_encoder, num_tokens: int) -> None:
    """Grows the embedding matrix if the tokens outnumber its rows; never shrinks it (flan-T5
    has 28 spare rows that `resize_token_embeddings(len(tokenizer))` would cut)."""
    if text_encoder.get_input_embeddings().num_embeddings < num_tokens:
        text_encoder.resize_token_embeddings(num_tokens)


def initializer_vectors(tokenizer, embedding_weight: torch.Tensor, initializer: str, num_vectors: int) -> torch.Tensor:
    """Starting vectors (num_vectors, C) from the embedding of an initializer word.

    A word that is one piece starts every vector; a word of exactly `num_vectors` pieces starts
    one vector per piece, in order; otherwise every vector starts at the mean of the pieces."""
    space = tokenizer.convert_tokens_to_ids(SPACE_PIECE)
    ids = [i for i in tokenizer(initializer, add_special_tokens=False).input_ids if i != space]
    if not ids:
        raise ConceptError(f"initializer token {initializer!r} is empty after tokenization; give a word such as 'dog'")
    if tokenizer.unk_token_id in ids:
        raise ConceptError(f"initializer token {initializer!r} is unknown to the tokenizer (it maps to <unk>); give a word it knows")
    pieces = embedding_weight[ids].float()
    if len(ids) == num_vectors:
        return pieces.clone()
    return pieces.mean(0, keepdim=True).repeat(num_vectors, 1)


class LearnedEmbeddings(nn.Module):
    """The learned vectors (num_tokens, C) in float32, swapped in where their tokens occur."""

    def __init__(self, token_ids: list[int], init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().clone())
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)

    def forward(self, input_ids: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        match = input_ids.unsqueeze(-1) == self.token_ids  # B, L, n
        learned = match.any(-1)
        frozen = embedding(input_ids.masked_fill(learned, 0))  # learned ids never index the matrix
        vectors = self.weight[match.float().argmax(-1)].to(frozen.dtype)  # B, L, C
        return torch.where(learned.unsqueeze(-1), vectors, frozen)


@torch.no_grad()
def write_rows(text_encoder, token_ids: list[int], vectors: torch.Tensor) -> None:
    weight = text_encoder.get_input_embeddings().weight
    weight[torch.tensor(token_ids, device=weight.device)] = vectors.to(weight.device, weight.dtype)


@dataclass
class LearnedConcept:
    placeholder: str  # what prompts write
    tokens: list[str]  # one per vector
    vectors: torch.Tensor  # num_vectors, C   float32
    metadata: dict = field(default_factory=dict)
    source: str = ""


def save_learned_embeds(path: str, concept: LearnedConcept) -> None:
    """{placeholder: (num_vectors, C)} with string metadata, written atomically."""
    metadata = {"format": FORMAT, "placeholder_token": concept.placeholder, "tokens": json.dumps(concept.tokens)}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in concept.metadata.items()})
    tmp = path + ".tmp"
    save_file({concept.placeholder: concept.vectors.detach().float().cpu().contiguous()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _decode_metadata(raw: dict) -> dict:
    out = {}
    for key, value in (raw or {}).items():
        try:
            out[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            out[key] = value
    return out


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
EMBEDDING_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_hub_repo_id(name: str) -> bool:
    """`owner/name` that is not a local path: how a hub repo id is told from a folder."""
    return bool(HUB_REPO_ID.match(name)) and not os.path.exists(name) and not name.endswith(EMBEDDING_EXTENSIONS)


def resolve_learned_embeds(name_or_path: str, revision: str | None = None) -> str:
    """Local path of an embedding: the file itself, `learned_embeds.safetensors` in a folder, or
    that file downloaded from a hub repo (at `revision`)."""
    if os.path.isdir(name_or_path):
        for name in (LEARNED_EMBEDS_NAME, "learned_embeds.bin"):  # this project's, then diffusers' older one
            if os.path.exists(os.path.join(name_or_path, name)):
                return os.path.join(name_or_path, name)
        raise ModelFilesNotFound(f"{name_or_path} is a folder without {LEARNED_EMBEDS_NAME}; pass the embedding file itself or the folder the training script wrote")
    if os.path.isfile(name_or_path):
        return name_or_path
    if is_hub_repo_id(name_or_path):
        return resolve_model_file(name_or_path, LEARNED_EMBEDS_NAME, revision)
    raise ModelFilesNotFound(f"{name_or_path} does not exist: pass a .safetensors file, a folder with {LEARNED_EMBEDS_NAME}, or a hub repo id")


def load_learned_embeds(name_or_path: str, token: str | None = None, revision: str | None = None) -> list[LearnedConcept]:
    """Reads this project's file, a diffusers file ({token: (C,) or (n, C)}) or an A1111
    embedding (`string_to_param`, or `emb_params` in safetensors), from a file, a folder or a
    hub repo (`resolve_learned_embeds`). `token` renames the placeholder.

    This project's files name their tokens in the metadata (`tokens`); those are the tokens the
    concept gets, exactly as training added them. Pickled files load with weights_only=True only."""
    path = resolve_learned_embeds(name_or_path, revision)
    metadata = {}
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as f:
                metadata = _decode_metadata(f.metadata())
        except Exception:  # not readable: read_state_dict below names the problem
            metadata = {}
    try:
        state = read_state_dict(path)
    except CheckpointError as e:
        if "pickled objects" not in str(e):
            raise
        raise CheckpointError(f"{path} holds pickled objects other than tensors and is refused (only what torch.load(weights_only=True) rebuilds is read); convert it to .safetensors where you trust it") from e
    stem = os.path.splitext(os.path.basename(path))[0]
    if "string_to_param" in state:  # A1111: {"string_to_param": {"*": (n, C)}, "name": ...}
        params = state["string_to_param"]
        vectors = next(iter(params.values())) if isinstance(params, dict) and params else params
        name = state.get("name") if isinstance(state.get("name"), str) and state.get("name") else stem
        metadata = {"format": "a1111", **{k: state[k] for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") if isinstance(state.get(k), (str, int))}}
        state = {f"<{name}>" if not name.startswith("<") else name: vectors}
    elif set(state) == {"emb_params"}:  # A1111 safetensors: the name is the file's
        metadata = {"format": "a1111", **metadata}
        state = {f"<{stem}>": state["emb_params"]}
    if not state:
        raise CheckpointError(f"{path} holds no embedding")
    concepts = []
    for name, vectors in state.items():
        if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
            raise CheckpointError(f"{path}: entry {name!r} is not an embedding of shape (C,) or (num_vectors, C)")
        vectors = vectors.detach().float().reshape(-1, vectors.shape[-1])
        if not torch.isfinite(vectors).all():
            raise CheckpointError(f"{path}: entry {name!r} holds non-finite values (NaN or inf); use an earlier save")
        placeholder = token or name
        stored = metadata.get("tokens")
        if token is None and isinstance(stored, list) and stored and stored[0] == name:
            if len(stored) != vectors.shape[0] or not all(isinstance(t, str) for t in stored):
                raise CheckpointError(f"{path}: metadata names {len(stored)} tokens for {vectors.shape[0]} vectors of {name!r}")
            tokens = list(stored)
        else:
            tokens = placeholder_tokens(placeholder, vectors.shape[0])
        concepts.append(LearnedConcept(placeholder, tokens, vectors, metadata, source=path))
    if token is not None and len(concepts) > 1:
        raise ConceptError(f"{path} holds {len(concepts)} embeddings; a single --token cannot rename them all")
    return concepts


def apply_concepts(tokenizer, text_encoder, concepts: Sequence[LearnedConcept]) -> dict[str, list[int]]:
    """Makes prompts use the concepts: adds every concept's tokens to the tokenizer as training
    added them, grows the embedding matrix if the spare rows run out, and writes the vectors into
    the tokens' rows. Returns the token ids per placeholder. Everything is checked before
    anything changes; rows of existing tokens are never touched, so prompts without a learned
    token encode exactly as before."""
    width = text_encoder.get_input_embeddings().embedding_dim
    vocab = tokenizer.get_vocab()
    seen: dict[str, str] = {}
    for concept in concepts:
        where = concept.source or concept.placeholder
        size = concept.vectors.shape[-1]
        if size != width:
            raise ConceptError(
                f"{where}: {concept.placeholder} has vectors of size {size}, but the text encoder's embeddings have size {width}; "
                "it was made for another text encoder (Stable Diffusion's CLIP uses 768/1024/1280, Infinity's flan-T5-XL 2048)"
            )
        if concept.vectors.dim() != 2 or concept.vectors.shape[0] != len(concept.tokens):
            raise ConceptError(f"{where}: {len(concept.tokens)} tokens for vectors of shape {tuple(concept.vectors.shape)}")
        for token in concept.tokens:
            if not token.strip() or any(c.isspace() for c in token):
                raise ConceptError(f"{where}: token {token!r} must be one word without spaces, e.g. <my-dog>")
            if token in seen:
                raise ConceptError(f"{token!r} is loaded twice ({seen[token]} and {where}); give one of them another name (--token)")
            if token in vocab or SPACE_PIECE + token in vocab:
                raise ConceptError(f"{token!r} from {where} is already in the tokenizer's vocabulary; load it under a new name (--token <{token.strip('<>')}-concept>)")
            seen[token] = where
    ids = {}
    for concept in concepts:
        ids[concept.placeholder] = add_placeholder_tokens(tokenizer, concept.tokens)
    ensure_embedding_rows(text_encoder, len(tokenizer))
    for concept in concepts:
        write_rows(text_encoder, ids[concept.placeholder], concept.vectors)
    return ids


def mean_embedding_norm(embedding_weight: torch.Tensor, num_tokens: int) -> float:
    """Mean l2 norm of the vocabulary's rows: the scale a learned vector should stay near."""
    return embedding_weight[:num_tokens].float().norm(dim=-1).mean().item()
