"""Prompt encoding with flan-T5 and the text condition the transformer consumes.

The official code packs the T5 rows of a batch into one (sum(lens), C) tensor with cu_seqlens
for flash-attn varlen kernels. Here a condition is the padded (B, Lt, C) tensor plus its mask:
every consumer (RMSNorm, the attentive pool, the cross-attention MLP and attention) works per row
or per sample with the mask, so the two forms give the same numbers. `from_packed`/`packed`
convert between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

T5_MAX_LENGTH = 512  # prompts are truncated to this many tokens (EOS included), as officially


@dataclass
class TextCondition:
    features: torch.Tensor  # B, Lt, C   T5 last_hidden_state rows (padding rows are ignored)
    mask: torch.Tensor  # B, Lt bool True on real tokens, EOS included

    def __post_init__(self):
        if self.features.shape[:2] != self.mask.shape:
            raise ValueError(f"features {tuple(self.features.shape)} and mask {tuple(self.mask.shape)} disagree")
        self.mask = self.mask.bool()

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def lens(self) -> list[int]:
        return self.mask.sum(-1).tolist()

    @classmethod
    def from_packed(cls, kv_compact: torch.Tensor, lens: Sequence[int]) -> TextCondition:
        """From the official (kv_compact (sum(lens), C), lens) format."""
        lens = [int(n) for n in lens]
        rows = kv_compact.split(lens)
        features = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = (
            torch.arange(max(lens), device=kv_compact.device)[None, :]
            < torch.tensor(lens, device=kv_compact.device)[:, None]
        )
        return cls(features, mask)

    def packed(self) -> tuple[torch.Tensor, list[int], torch.Tensor, int]:
        """The official 4-tuple (kv_compact, lens, cu_seqlens_k int32, max_seqlen_k)."""
        lens = self.lens
        kv_compact = self.features[self.mask]
        cu_seqlens = F.pad(
            torch.tensor(lens, dtype=torch.int32, device=self.features.device).cumsum(0, dtype=torch.int32), (1, 0)
        )
        return kv_compact, lens, cu_seqlens, max(lens)

    def cat(self, other: TextCondition) -> TextCondition:
        """Stacks two conditions along the batch, padding both to the longer prompt."""
        length = max(self.features.shape[1], other.features.shape[1])

        def pad(c: TextCondition):
            extra = length - c.features.shape[1]
            return F.pad(c.features, (0, 0, 0, extra)), F.pad(c.mask, (0, extra))

        (fa, ma), (fb, mb) = pad(self), pad(other)
        return TextCondition(torch.cat([fa, fb.to(fa.dtype)]), torch.cat([ma, mb]))

    def repeat(self, n: int) -> TextCondition:
        return TextCondition(self.features.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    def to(self, device) -> TextCondition:
        return TextCondition(self.features.to(device), self.mask.to(device))


SPACE_PIECE = "\u2581"  # SentencePiece's word-boundary marker


def learned_token_ids(tokenizer) -> set[int]:
    """Ids of tokens added for textual inversion (added tokens that are not special)."""
    return {i for i, token in tokenizer.added_tokens_decoder.items() if not token.special}


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = T5_MAX_LENGTH):
    """Token ids and attention mask, padded to the longest prompt of the batch, not to 512:
    T5 masks padding, so real-token features are the same and the encoder does less work.

    The T5 tokenizer splits text at added tokens and puts a word-boundary piece in front of
    every segment, so "a <my-dog>, running" would get a bare "\u2581" between the token and the
    comma. Bare boundary pieces next to learned tokens are dropped, the same way in training,
    validation and inference; prompts without learned tokens tokenize exactly as before.
    """
    learned = learned_token_ids(tokenizer)
    if not learned or not any(tokenizer.added_tokens_decoder[i].content in p for p in prompts for i in learned):
        tokens = tokenizer(
            list(prompts), max_length=max_length, padding="longest", truncation=True, return_tensors="pt"
        )
        return tokens.input_ids, tokens.attention_mask
    space = tokenizer.convert_tokens_to_ids(SPACE_PIECE)
    rows = []
    for ids in tokenizer(list(prompts), max_length=max_length, truncation=True).input_ids:
        rows.append(
            [
                t
                for k, t in enumerate(ids)
                if not (
                    t == space and ({ids[k - 1] if k else None, ids[k + 1] if k + 1 < len(ids) else None} & learned)
                )
            ]
        )
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return input_ids, mask


def encode_prompt(
    tokenizer, text_encoder, prompts: Sequence[str], embed_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> TextCondition:
    """T5 features of the prompts (the official `encode_prompt`, without the 512 padding).

    `embed_tokens(input_ids) -> (B, Lt, C)` replaces the embedding lookup; textual inversion
    passes one that writes its learned vectors over the placeholder rows.
    """
    device = text_encoder.device
    input_ids, mask = tokenize(tokenizer, prompts)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if embed_tokens is None:
        out = text_encoder(input_ids=input_ids, attention_mask=mask)
    else:
        out = text_encoder(inputs_embeds=embed_tokens(input_ids), attention_mask=mask)
    return TextCondition(out.last_hidden_state.float(), mask)
