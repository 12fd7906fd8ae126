"""Textual inversion on flan-T5: placeholder tokens, their learned vectors, and the file format.

A concept is one placeholder (`<my-dog>`) with `num_vectors` vectors; vector i > 0 gets its own
token `<my-dog>_i`, and prompts name only the placeholder, which `expand_placeholders` turns into
all its tokens. New tokens take flan-T5's spare embedding rows (32128 rows for 32100 tokens); the
matrix only ever grows. During training the vectors live outside the frozen matrix as a float32
parameter (`LearnedEmbeddings`); generation writes them into their rows (`write_rows`), which is
what inference does after loading a file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .loading import CheckpointError, read_state_dict
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


def load_learned_embeds(path: str, token: str | None = None) -> list[LearnedConcept]:
    """Reads this project's file, a diffusers file ({token: (C,) or (n, C)}) or an A1111
    embedding (`string_to_param`). `token` renames the placeholder."""
    if os.path.isdir(path):
        path = os.path.join(path, LEARNED_EMBEDS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a .safetensors file, a folder with {LEARNED_EMBEDS_NAME}, or a hub repo id")
    metadata = {}
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            metadata = _decode_metadata(f.metadata())
    state = read_state_dict(path)
    if "string_to_param" in state:  # A1111: {"string_to_param": {"*": (n, C)}, "name": ...}
        vectors = next(iter(state["string_to_param"].values()))
        name = state.get("name") if isinstance(state.get("name"), str) else os.path.splitext(os.path.basename(path))[0]
        state = {f"<{name}>" if not name.startswith("<") else name: vectors}
    concepts = []
    for name, vectors in state.items():
        if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2):
            raise CheckpointError(f"{path}: entry {name!r} is not an embedding of shape (C,) or (num_vectors, C)")
        vectors = vectors.float().reshape(-1, vectors.shape[-1])
        placeholder = token or name
        tokens = placeholder_tokens(placeholder, vectors.shape[0])
        concepts.append(LearnedConcept(placeholder, tokens, vectors, metadata, source=path))
    if token is not None and len(concepts) > 1:
        raise ConceptError(f"{path} holds {len(concepts)} embeddings; a single --token cannot rename them all")
    return concepts


def mean_embedding_norm(embedding_weight: torch.Tensor, num_tokens: int) -> float:
    """Mean l2 norm of the vocabulary's rows: the scale a learned vector should stay near."""
    return embedding_weight[:num_tokens].float().norm(dim=-1).mean().item()
