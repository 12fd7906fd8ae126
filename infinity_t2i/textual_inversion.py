"""Textual inversion on flan-T5: placeholder tokens, their learned vectors, and the file format.

A concept is one placeholder (`<my-dog>`) with one or more vectors; vector i > 0 gets its own
token `<my-dog>_i`, and prompts name only the placeholder, which `expand_placeholders` turns into
all its tokens. New tokens take flan-T5's spare embedding rows (32128 rows for 32100 tokens); the
matrix only ever grows. A concept lives in one of two places (`TI_MODES`):

- input: the vectors are the tokens' rows of T5's input embedding; T5's 24 layers mix them with
  the prompt. Generation writes them into their rows (`write_rows`).
- output: the vectors are T5's output features at the tokens' positions, written over
  `last_hidden_state` before Infinity reads it (ARBooth's choice). T5 reads fixed rows there
  (`t5_input`: the initializer word's), so the rest of the prompt encodes as with that word.
  Generation installs them with `set_output_rows` (a forward hook on the encoder).

During training the vectors live outside the frozen model as a float32 parameter
(`LearnedVectors`); inference loads a file and `apply_concepts` puts each concept in its place
(`InfinityPipeline.load_textual_inversion` does that, remembers the concepts and undoes it all on
`unload_textual_inversion`).

Prompts name placeholders as the tokenizer finds its added tokens: leftmost first, and the longest
placeholder at a position (`<pc>x` is never `<pc>` followed by "x" when both are loaded). A
placeholder may carry a weight, `<my-dog>:0.8`: a number (`1`, `.5`, `-0.25`, `2e-1`) from
WEIGHT_RANGE, -1 to 2 (1 = as learned; 0 = the initializer word in output mode, a zero vector in
input mode; above 1 exaggerates, below 0 pushes away); anything else written right after `<tok>:`
(`<tok>:abc`, `<tok>:1e3`, `<tok>:nan`) is refused, while `<tok>: text` and a full stop
(`<tok>:2.`) stay text.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from .files import save_safetensors
from .loading import CheckpointError, ModelFilesNotFound, read_state_dict, resolve_model_file
from .text import SPACE_PIECE

FORMAT = "infinity-textual-inversion/1"
LEARNED_EMBEDS_NAME = "learned_embeds.safetensors"
TI_MODES = ("input", "output")
T5_INPUT_SUFFIX = ".t5_input"  # file key of an output-mode concept's fixed T5 input rows
WEIGHT_RANGE = (-1.0, 2.0)  # of `<tok>:w` in a prompt and of load_textual_inversion(weight=...)
FINGERPRINT_KEY = "base_model_fingerprint"  # metadata: InfinityPipeline.fingerprint() of the model trained on


class ConceptError(ValueError):
    """A placeholder or initializer token that cannot be used, or an embedding that does not fit."""


class ConceptMismatch(ConceptError):
    """An embedding trained for another model; `what` says which and for what."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}; {fix}")
        self.what = what


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


def placeholder_pattern(placeholder: str, suffix: str = "") -> re.Pattern:
    """The placeholder as written in a prompt, not as the start of one of its own extra tokens
    (`<my-dog>_1`); `suffix`, a regular expression, must follow it."""
    return re.compile(re.escape(placeholder) + r"(?!_\d)" + suffix)


def replace_placeholder(text: str, placeholder: str, replacement: str) -> str:
    return placeholder_pattern(placeholder).sub(lambda _: replacement, text)  # a function: no escapes read


WEIGHT_CHARS = r"[0-9A-Za-z_.+-]+"  # what follows `<tok>:` when a weight is meant
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?")


class Placeholders:
    """Finds placeholders in prompts as the tokenizer finds added tokens: leftmost first, and at
    one position the longest one (`<pc>x`, not `<pc>` and "x"); never the start of a concept's own
    extra token (`<pc>_1`). `concepts`: {placeholder: its tokens}, or just the placeholders."""

    def __init__(self, concepts: Sequence[str] | Mapping[str, Sequence[str]]):
        if isinstance(concepts, Mapping):
            self.tokens = {p: list(tokens) for p, tokens in concepts.items()}
        else:
            self.tokens = {p: [p] for p in concepts}
        self.names = sorted(self.tokens, key=len, reverse=True)

    def pattern(self, suffix: str = "", with_tokens: bool = False) -> re.Pattern:
        """A placeholder (named group p0, p1, ...: `which` tells which), then `suffix`. With
        `with_tokens`, a placeholder already followed by the rest of its tokens matches with them."""
        if not self.names:
            return re.compile(r"(?!)")  # matches nothing
        alternatives = []
        for k, name in enumerate(self.names):
            tail = "".join(r"\s*" + re.escape(t) for t in self.tokens[name][1:]) if with_tokens else ""
            alternatives.append(f"(?P<p{k}>{re.escape(name)})" + (f"(?:{tail})?" if tail else ""))
        return re.compile("(?:" + "|".join(alternatives) + r")(?!_\d)" + suffix)

    def which(self, match: re.Match) -> str:
        return next(self.names[k] for k in range(len(self.names)) if match.group(f"p{k}") is not None)

    def named(self, *texts: str | None) -> list[str]:
        """The placeholders the texts name, in the order the concepts were given."""
        pattern = self.pattern()
        found = {self.which(m) for text in texts if text for m in pattern.finditer(text)}
        return [p for p in self.tokens if p in found]

    def split(self, text: str) -> list[str]:
        """[words, placeholder, words, placeholder, ..., words]: odd items are placeholders."""
        parts, last = [], 0
        for match in self.pattern().finditer(text):
            parts += [text[last : match.start()], self.which(match)]
            last = match.end()
        return [*parts, text[last:]]

    def expand(self, text: str) -> str:
        """Each placeholder replaced by all its tokens ("a <my-dog>" -> "a <my-dog> <my-dog>_1");
        text that already names all of them stays as it is."""
        return self.pattern(with_tokens=True).sub(lambda m: " ".join(self.tokens[self.which(m)]), text)

    def replace(self, text: str, replacements: Mapping[str, str]) -> str:
        """Each placeholder of `replacements` replaced by its text (the others stay)."""
        return self.pattern().sub(lambda m: replacements.get(self.which(m), m.group(0)), text)

    def take_weights(self, text: str, weights: Mapping[str, float] | None = None) -> tuple[str, dict[str, float]]:
        """Takes `:w` from after placeholders: "a <my-dog>:0.8" -> ("a <my-dog>", {"<my-dog>": 0.8}).
        w is a number in WEIGHT_RANGE; one placeholder gets one weight per text. A sentence's full
        stop stays ("<my-dog>:2." -> "<my-dog>."); "<my-dog>: a dog" and "<my-dog>:-)" are text."""
        weights, given = dict(weights or {}), text
        low, high = WEIGHT_RANGE

        def take(match: re.Match) -> str:
            placeholder, raw = self.which(match), match.group("weight")
            core = raw.rstrip(".")
            if not any(c.isalnum() for c in core):  # ":-)", ":..." are not weights
                return match.group(0)
            form = f"write a weight as {placeholder}:0.8, a number from {low:g} to {high:g}"
            if not NUMBER.fullmatch(core):
                raise ConceptError(f"{placeholder}:{core} in {given!r} is not a weight; {form}")
            value = float(core)
            if not (math.isfinite(value) and low <= value <= high):
                raise ConceptError(f"{placeholder}:{core} in {given!r} is out of range; {form}")
            if weights.get(placeholder, value) != value:
                raise ConceptError(
                    f"{placeholder} has two weights ({weights[placeholder]:g} and {value:g}) in {given!r}; give it one"
                )
            weights[placeholder] = value
            return placeholder + raw[len(core) :]

        return self.pattern(f"(?::(?P<weight>{WEIGHT_CHARS}))?").sub(
            lambda m: take(m) if m.group("weight") else m.group(0), text
        ), weights


def expand_placeholders(prompt: str, concepts: Mapping[str, Sequence[str]]) -> str:
    """Replaces each placeholder by all its tokens: "a <my-dog>" -> "a <my-dog> <my-dog>_1"."""
    return Placeholders(concepts).expand(prompt)


def check_weight(weight: float, what: str = "weight") -> float:
    low, high = WEIGHT_RANGE
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not low <= weight <= high:
        raise ConceptError(f"{what} {weight!r} is out of range; give a number from {low:g} to {high:g} (1: as learned)")
    return float(weight)


def check_new_token(
    token: str, vocab: dict[str, int] | None = None, where: str = "", fix: str = "choose a new placeholder token"
) -> None:
    """Refuses a token that cannot be added as a new one: not one word, or (given the tokenizer's
    vocabulary) a word or word piece the tokenizer already has. `where` names its source, `fix`
    what to do about a known word."""
    prefix = f"{where}: " if where else ""
    if not token.strip() or any(c.isspace() for c in token):
        raise ConceptError(f"{prefix}token {token!r} must be one word without spaces, e.g. <my-dog>")
    if vocab is not None and (token in vocab or SPACE_PIECE + token in vocab):
        raise ConceptError(
            f"{prefix}{token!r} is already in the tokenizer's vocabulary; {fix} such as <{token.strip('<>')}-concept>"
        )


def add_placeholder_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Adds the tokens to the tokenizer (refusing words it already knows) and returns their ids."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    for token in tokens:
        check_new_token(token, vocab)
    tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in tokens])
    return tokenizer.convert_tokens_to_ids(tokens)


def ensure_embedding_rows(text_encoder, num_tokens: int) -> None:
    """Grows the embedding matrix if the tokens outnumber its rows; never shrinks it (flan-T5
    has 28 spare rows that `resize_token_embeddings(len(tokenizer))` would cut)."""
    if text_encoder.get_input_embeddings().num_embeddings < num_tokens:
        text_encoder.resize_token_embeddings(num_tokens)


def initializer_pieces(tokenizer, initializer: str) -> list[int]:
    """Token ids of the initializer word, without bare word-boundary pieces."""
    space = tokenizer.convert_tokens_to_ids(SPACE_PIECE)
    ids = [i for i in tokenizer(initializer, add_special_tokens=False).input_ids if i != space]
    if not ids:
        raise ConceptError(f"initializer token {initializer!r} is empty after tokenization; give a word such as 'dog'")
    if tokenizer.unk_token_id in ids:
        raise ConceptError(
            f"initializer token {initializer!r} is unknown to the tokenizer (it maps to <unk>); give a word it knows"
        )
    return ids


def initializer_vectors(pieces: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Starting vectors from the k pieces (k, C) of the initializer word: max(num_vectors, k)
    vectors, vector i starting at piece i mod k. With k vectors the concept's tokens are the word's
    own pieces, so at step 0 a prompt draws exactly what the word draws (a mean of the pieces
    would not: it is no piece at all)."""
    count = max(num_vectors, pieces.shape[0])
    return pieces.float()[torch.arange(count) % pieces.shape[0]].clone()


def replace_rows(
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    token_ids: torch.Tensor,
    vectors: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """rows (B, L, C) with vector i wherever token_ids[i] occurs in input_ids (B, L); with
    `weights` (n,), w * vector + (1 - w) * the row it replaces."""
    match = input_ids.unsqueeze(-1) == token_ids  # B, L, n
    hit = match.any(-1, keepdim=True)
    which = match.float().argmax(-1)  # B, L
    new = vectors[which].to(rows.dtype)
    if weights is not None:
        w = weights.to(rows)[which].unsqueeze(-1)
        new = w * new + (1 - w) * rows
    return torch.where(hit, new, rows)


class LearnedVectors(nn.Module):
    """The learned vectors (num_tokens, C) in float32. `forward(input_ids, rows)` puts them over
    `rows` (B, L, C) where their tokens occur: T5's input embeddings in input mode, its output
    features in output mode.

    With `hold_norm` each vector keeps its starting norm and only its direction trains (as
    Directional Textual Inversion does against norm inflation). The parameter is then the
    direction at unit element RMS, so an Adam step of lr turns a vector by about lr radians,
    whatever the scale of the model's embeddings: one learning rate fits every model.

    With `ema_decay` > 0 the module also keeps an exponential moving average of the parameter
    (`update_ema_` after each optimizer step), a buffer, so checkpoints carry it; `saved_vectors`
    are then the average's vectors (back on the sphere with `hold_norm`), what a run validates and
    writes, while training reads `vectors`."""

    def __init__(self, token_ids: list[int], init: torch.Tensor, hold_norm: bool = False, ema_decay: float = 0.0):
        super().__init__()
        self.hold_norm, self.ema_decay = hold_norm, ema_decay
        init = init.detach().float()
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        if hold_norm:
            self.register_buffer("norms", init.norm(dim=-1, keepdim=True))
            self.weight = nn.Parameter(self._unit_rms(init))
            # only the direction moves: drop the gradient's radial part before the optimizer sees it
            self.weight.register_hook(
                lambda g: g - (g * self.weight).sum(-1, keepdim=True) * self.weight / init.shape[-1]
            )
        else:
            self.weight = nn.Parameter(init.clone())
        if ema_decay > 0:
            self.register_buffer("ema_weight", self.weight.detach().clone())

    @staticmethod
    def _unit_rms(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5

    def _vectors(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.hold_norm:
            return weight
        return weight * (self.norms / weight.shape[-1] ** 0.5)

    @property
    def vectors(self) -> torch.Tensor:
        return self._vectors(self.weight)

    @property
    def saved_vectors(self) -> torch.Tensor:
        """The vectors a run validates and saves: the moving average's with `ema_decay`."""
        if not self.ema_decay > 0:  # the same test as the buffer's
            return self.vectors
        return self._vectors(self._unit_rms(self.ema_weight) if self.hold_norm else self.ema_weight)

    @torch.no_grad()
    def project_(self) -> None:
        """Back onto the sphere after an optimizer step (a no-op without `hold_norm`)."""
        if self.hold_norm:
            self.weight.copy_(self._unit_rms(self.weight))

    @torch.no_grad()
    def update_ema_(self, step: int) -> None:
        """Folds the parameter after optimizer step `step` (1, 2, ...) into the average. The
        weight (1 - d) / (1 - d^step) is the bias-corrected EMA: step i's parameter counts d^(step - i)
        and the starting vectors not at all (a no-op without `ema_decay`)."""
        if self.ema_decay > 0:
            d = self.ema_decay
            self.ema_weight.lerp_(self.weight, (1 - d) / (1 - d**step))

    def forward(self, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, L, C) with the vectors in place; per scale (vectors (S, n, C)): (S, B, L, C)."""
        vectors = self.vectors
        if vectors.dim() == 3:
            return torch.stack([replace_rows(input_ids, rows, self.token_ids, v) for v in vectors])
        return replace_rows(input_ids, rows, self.token_ids, vectors)


@torch.no_grad()
def write_rows(text_encoder, token_ids: list[int], vectors: torch.Tensor) -> None:
    weight = text_encoder.get_input_embeddings().weight
    weight[torch.tensor(token_ids, device=weight.device)] = vectors.to(weight.device, weight.dtype)


class OutputRows:
    """Forward hook of a T5 encoder that writes output-mode vectors over `last_hidden_state` at
    their tokens, whether T5 returns a ModelOutput or (return_dict=False) a tuple. The features
    come out in float32 (the vectors' precision), as training used them."""

    def __init__(self):
        self.vectors: dict[int, torch.Tensor] = {}  # token id -> (C,)
        self.weights: dict[int, float] = {}  # token id -> w: w * vector + (1 - w) * T5's own feature

    def __call__(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or not self.vectors:
            return output
        ids = list(self.vectors)
        as_tuple = isinstance(output, tuple)
        features = (output[0] if as_tuple else output.last_hidden_state).float()
        token_ids = torch.tensor(ids, device=features.device)
        vectors = torch.stack([self.vectors[i] for i in ids]).to(features.device)
        weights = torch.tensor([self.weights.get(i, 1.0) for i in ids])
        features = replace_rows(input_ids, features, token_ids, vectors, weights)
        if as_tuple:
            return (features, *output[1:])
        output.last_hidden_state = features
        return output


def set_output_rows(text_encoder, token_ids: list[int], vectors: torch.Tensor, weight: float = 1.0) -> None:
    """Makes the encoder output `vectors` (n, C) at `token_ids` (installing the hook once;
    `remove_output_rows` takes it away)."""
    hook = getattr(text_encoder, "ti_output_rows", None)
    if hook is None:
        hook = text_encoder.ti_output_rows = OutputRows()
        text_encoder.ti_output_rows_handle = text_encoder.register_forward_hook(hook, with_kwargs=True)
    for token_id, vector in zip(token_ids, vectors.detach().float()):
        hook.vectors[token_id] = vector.clone()
        hook.weights[token_id] = weight


def remove_output_rows(text_encoder) -> None:
    """Takes away the hook `set_output_rows` installed: T5 outputs its own features again."""
    handle = getattr(text_encoder, "ti_output_rows_handle", None)
    if handle is not None:
        handle.remove()
    for name in ("ti_output_rows", "ti_output_rows_handle"):
        if hasattr(text_encoder, name):
            delattr(text_encoder, name)


@dataclass
class LearnedConcept:
    placeholder: str  # what prompts write
    tokens: list[str]  # one per vector
    vectors: torch.Tensor  # num_vectors, C   float32   (per scale, output mode: num_scales, num_vectors, C)
    metadata: dict = field(default_factory=dict)
    source: str = ""
    mode: str = "input"  # one of TI_MODES
    t5_input: torch.Tensor | None = None  # output mode: num_vectors, C   what T5 reads at the tokens

    @property
    def num_scales(self) -> int:
        """1 for one set of vectors; per scale, the scales with their own set (the last set
        serves the scales after them)."""
        return self.vectors.shape[0] if self.vectors.dim() == 3 else 1

    def at_scale(self, scale: int) -> LearnedConcept:
        """The concept as generation scale `scale` reads it: one set of vectors."""
        if self.vectors.dim() == 2:
            return self
        return replace(self, vectors=self.vectors[min(scale, self.vectors.shape[0] - 1)])


def save_learned_embeds(path: str, concept: LearnedConcept) -> None:
    """{placeholder: (num_vectors, C)} with string metadata, written atomically."""
    metadata = {
        "format": FORMAT,
        "placeholder_token": concept.placeholder,
        "tokens": json.dumps(concept.tokens),
        "ti_mode": concept.mode,
    }
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in concept.metadata.items()})
    tensors = {concept.placeholder: concept.vectors}
    if concept.mode == "output":
        tensors[concept.placeholder + T5_INPUT_SUFFIX] = concept.t5_input
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


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
        raise ModelFilesNotFound(
            f"{name_or_path} is a folder without {LEARNED_EMBEDS_NAME}; pass the embedding file itself or the folder "
            "the training script wrote"
        )
    if os.path.isfile(name_or_path):
        return name_or_path
    if is_hub_repo_id(name_or_path):
        return resolve_model_file(name_or_path, LEARNED_EMBEDS_NAME, revision)
    raise ModelFilesNotFound(
        f"{name_or_path} does not exist: pass a .safetensors file, a folder with {LEARNED_EMBEDS_NAME}, or a hub repo "
        "id"
    )


def load_learned_embeds(
    name_or_path: str, token: str | None = None, revision: str | None = None
) -> list[LearnedConcept]:
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
        except (SafetensorError, OSError):  # not readable: read_state_dict below names the problem
            metadata = {}
    try:
        state = read_state_dict(path)
    except CheckpointError as e:
        if "pickled objects" not in str(e):
            raise
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors and is refused (only what torch.load(weights_only=True) "
            "rebuilds is read); convert it to .safetensors where you trust it"
        ) from e
    stem = os.path.splitext(os.path.basename(path))[0]
    if "string_to_param" in state:  # A1111: {"string_to_param": {"*": (n, C)}, "name": ...}
        params = state["string_to_param"]
        vectors = next(iter(params.values())) if isinstance(params, dict) and params else params
        name = state.get("name") if isinstance(state.get("name"), str) and state.get("name") else stem
        metadata = {
            "format": "a1111",
            **{
                k: state[k]
                for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
                if isinstance(state.get(k), (str, int))
            },
        }
        state = {f"<{name}>" if not name.startswith("<") else name: vectors}
    elif set(state) == {"emb_params"}:  # A1111 safetensors: the name is the file's
        metadata = {"format": "a1111", **metadata}
        state = {f"<{stem}>": state["emb_params"]}
    if not state:
        raise CheckpointError(f"{path} holds no embedding")
    t5_inputs = {
        k.removesuffix(T5_INPUT_SUFFIX): state.pop(k) for k in [k for k in state if k.endswith(T5_INPUT_SUFFIX)]
    }
    # without metadata (a copy that lost it, a .bin) the T5 input rows still mark an output-mode concept
    mode = metadata.get("ti_mode", "output" if t5_inputs else "input")
    if mode not in TI_MODES:
        raise CheckpointError(
            f"{path}: unknown ti_mode {mode!r} in its metadata (known: {', '.join(TI_MODES)}); it was made by a newer "
            "version"
        )
    stray = sorted(t5_inputs.keys() - state.keys()) or (sorted(t5_inputs) if mode != "output" else [])
    if stray:
        name = stray[0]
        raise CheckpointError(
            f"{path}: {name + T5_INPUT_SUFFIX} belongs to no output-mode embedding {name!r}; the file was changed, use "
            "the one training wrote"
        )
    recorded = metadata.get("tokens")  # the placeholder first; placeholder_token itself may decode as JSON ("[1]")
    named = recorded[0] if metadata.get("format") == FORMAT and isinstance(recorded, list) and recorded else None
    if isinstance(named, str) and set(state) != {named}:  # this project's file holds its one concept
        raise CheckpointError(
            f"{path} holds {sorted(state)} where its metadata names {named!r} alone; the file was changed, use the "
            "one training wrote"
        )
    concepts = []
    per_scale = metadata.get("layout") == "per_scale"  # (num_scales, num_vectors, C), output mode
    for name, vectors in state.items():
        dims = (3,) if per_scale else (1, 2)
        if not isinstance(vectors, torch.Tensor) or vectors.dim() not in dims or not vectors.is_floating_point():
            shape = "(num_scales, num_vectors, C)" if per_scale else "(C,) or (num_vectors, C)"
            raise CheckpointError(f"{path}: entry {name!r} is not an embedding of shape {shape}")
        vectors = vectors.detach().float()
        vectors = vectors if per_scale else vectors.reshape(-1, vectors.shape[-1])
        num_vectors = vectors.shape[-2]
        if not torch.isfinite(vectors).all():
            raise CheckpointError(f"{path}: entry {name!r} holds non-finite values (NaN or inf); use an earlier save")
        placeholder = token or name
        stored = metadata.get("tokens")
        if token is None and isinstance(stored, list) and stored and stored[0] == name:
            if len(stored) != num_vectors or not all(isinstance(t, str) for t in stored):
                raise CheckpointError(
                    f"{path}: metadata names {len(stored)} tokens for {num_vectors} vectors of {name!r}"
                )
            tokens = list(stored)
        else:
            tokens = placeholder_tokens(placeholder, num_vectors)
        t5_input = t5_inputs.get(name)
        rows = tuple(vectors.shape[-2:])
        if mode == "output" and (t5_input is None or tuple(t5_input.shape) != rows):
            raise CheckpointError(f"{path}: output-mode entry {name!r} needs {name + T5_INPUT_SUFFIX} of shape {rows}")
        if per_scale and mode != "output":
            raise CheckpointError(f"{path}: entry {name!r} has vectors per scale, which only output mode has")
        if mode == "output" and not t5_input.is_floating_point():
            raise CheckpointError(f"{path}: {name + T5_INPUT_SUFFIX} is not a floating-point tensor")
        if mode == "output" and not torch.isfinite(t5_input).all():
            raise CheckpointError(
                f"{path}: {name + T5_INPUT_SUFFIX} holds non-finite values (NaN or inf); use an earlier save"
            )
        t5_input = t5_input.float() if mode == "output" else None
        concepts.append(
            LearnedConcept(placeholder, tokens, vectors, metadata, source=path, mode=mode, t5_input=t5_input)
        )
    if token is not None and len(concepts) > 1:
        raise ConceptError(f"{path} holds {len(concepts)} embeddings; a single --token cannot rename them all")
    return concepts


def check_concept_tokens(vocab: Mapping[str, int], concepts: Sequence[LearnedConcept]) -> None:
    """Every concept's tokens are new words to the tokenizer's `vocab`, and no token is loaded
    twice: what the tokenizer alone can tell, before a model loads."""
    seen: dict[str, str] = {}
    for concept in concepts:
        where = concept.source or concept.placeholder
        for token in concept.tokens:
            if token in seen:
                raise ConceptError(
                    f"{token!r} is loaded twice ({seen[token]} and {where}); give one of them another name (--token)"
                )
            check_new_token(token, vocab, where, fix="load it under a new name with --token,")
            seen[token] = where


def apply_concepts(tokenizer, text_encoder, concepts: Sequence[LearnedConcept]) -> dict[str, list[int]]:
    """Makes prompts use the concepts: adds every concept's tokens to the tokenizer as training
    added them, grows the embedding matrix if the spare rows run out, and puts the vectors in
    place: into the tokens' rows (input mode), or over T5's output there with the fixed `t5_input`
    in the rows (output mode). Returns the token ids per placeholder. Everything is checked before
    anything changes; rows of existing tokens are never touched, so prompts without a learned
    token encode exactly as before."""
    width = text_encoder.get_input_embeddings().embedding_dim
    for concept in concepts:
        where = concept.source or concept.placeholder
        size = concept.vectors.shape[-1]
        if size != width:
            raise ConceptError(
                f"{where}: {concept.placeholder} has vectors of size {size}, but the text encoder's embeddings have "
                f"size {width}; "
                "it was made for another text encoder (Stable Diffusion's CLIP uses 768/1024/1280, Infinity's "
                "flan-T5-XL 2048)"
            )
        if concept.vectors.dim() != 2 or concept.vectors.shape[0] != len(concept.tokens):
            raise ConceptError(
                f"{where}: {len(concept.tokens)} tokens for vectors of shape {tuple(concept.vectors.shape)}"
            )
    check_concept_tokens(tokenizer.get_vocab(), concepts)
    ids = {}
    for concept in concepts:
        ids[concept.placeholder] = add_placeholder_tokens(tokenizer, concept.tokens)
    ensure_embedding_rows(text_encoder, len(tokenizer))
    for concept in concepts:
        if concept.mode == "output":
            write_rows(text_encoder, ids[concept.placeholder], concept.t5_input)
            set_output_rows(text_encoder, ids[concept.placeholder], concept.vectors)
        else:
            write_rows(text_encoder, ids[concept.placeholder], concept.vectors)
    return ids


def put_concept(text_encoder, concept: LearnedConcept, token_ids: list[int], weight: float = 1.0) -> None:
    """The concept, weighted, where prompts read it. Input mode: its rows hold weight x vectors.
    Output mode (where a vector's scale means nothing: Infinity RMS-normalises each text row): its
    features are weight x vectors + (1 - weight) x T5's own output there, which is the initializer
    word's in context at weight 0."""
    if concept.mode == "output":
        set_output_rows(text_encoder, token_ids, concept.vectors, weight=weight)
    else:
        write_rows(text_encoder, token_ids, concept.vectors * weight if weight != 1 else concept.vectors)


@contextmanager
def scaled_vectors(
    text_encoder,
    concepts: Mapping[str, LearnedConcept],
    token_ids: Mapping[str, list[int]],
    scales: Mapping[str, float],
    rest: Mapping[str, float] | None = None,
) -> Iterator[None]:
    """Inside the block each concept of `scales` is weighted so (`put_concept`); after it, as it
    was: at its `rest` weight (default 1)."""
    rest = rest or {}
    changed = [p for p, s in scales.items() if s != rest.get(p, 1.0)]
    try:
        for placeholder in changed:
            put_concept(text_encoder, concepts[placeholder], token_ids[placeholder], scales[placeholder])
        yield
    finally:
        for placeholder in changed:
            put_concept(text_encoder, concepts[placeholder], token_ids[placeholder], rest.get(placeholder, 1.0))


def concept_mismatches(
    concept: LearnedConcept,
    model_type: str | None = None,
    base_model: str | None = None,
    text_encoder: str | None = None,
    fingerprint: str | None = None,
) -> list[str]:
    """What the file's metadata says it was trained for, where that differs from the model it is
    loaded into (None: unknown, not compared).

    model_type is always compared. A file that records the base model's fingerprint is compared by
    it (when `fingerprint` is given), never by the model's name; otherwise model and text encoder
    names are compared only when both are hub repo ids: a local path names the same files
    differently on every machine."""
    metadata, problems = concept.metadata, []
    stored_type = metadata.get("model_type")
    if model_type is not None and isinstance(stored_type, str) and stored_type != model_type:
        problems.append(f"model_type {stored_type} (this run: {model_type})")
    stored_fingerprint = metadata.get(FINGERPRINT_KEY)
    if isinstance(stored_fingerprint, str):
        if fingerprint is not None and stored_fingerprint != fingerprint:
            name = metadata.get("base_model")
            named = f"{name}, " if isinstance(name, str) and name else ""
            problems.append(
                f"another base model ({named}fingerprint {stored_fingerprint}; this model's: {fingerprint})"
            )
        names = (("text_encoder", text_encoder),)
    else:
        names = (("base_model", base_model), ("text_encoder", text_encoder))
    for key, loaded in names:
        stored = metadata.get(key)
        if (
            isinstance(stored, str)
            and isinstance(loaded, str)
            and is_hub_repo_id(stored)
            and is_hub_repo_id(loaded)
            and stored.lower() != loaded.lower()
        ):
            problems.append(f"{key} {stored} (this run: {loaded})")
    return problems


def mean_embedding_norm(embedding_weight: torch.Tensor, num_tokens: int) -> float:
    """Mean l2 norm of the vocabulary's rows: the scale a learned vector should stay near."""
    return embedding_weight[:num_tokens].float().norm(dim=-1).mean().item()
