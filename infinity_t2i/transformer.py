"""The Infinity transformer: text conditioning, blocks with shared AdaLN, and the bitwise head.

Sequence: one start token (the pooled prompt + `pos_start`) followed by the tokens of every scale
after the first, each the accumulated codes of the coarser scales resized to that scale's grid
(see `multiscale.py`). Token t of scale s predicts the d bits of the residual at its position, as
2d logits: `logits[..., 2k]` / `[2k+1]` are bit k being 0 / 1. Attention is block-causal across
scales and full inside a scale.

Precision follows the official model: the residual stream, AdaLN modulation, q/k normalisation
and RoPE, the text path (`text_norm`, pool, MLP), `shared_ada_lin`, embeddings and the head run
in float32; the blocks' matmuls and attention kernels run in the blocks' dtype (bf16 after
`set_block_dtype(torch.bfloat16)`, which is what the official inference does to its blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import InfinityConfig
from .resolution import ScaleSchedule
from .rope import apply_rope, rope_table
from .text import TextCondition

MAX_SCALE_MUL = math.log(100)  # cap of the per-head logit scale of the cosine attention
NUM_LEVEL_EMBEDDINGS = 15  # rows of lvl_embed in the released checkpoints


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then AdaLN: LN(x) * (1 + scale) + shift, in float32."""
    x = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return x.mul(scale.add(1)).add_(shift)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight).to(x.dtype)


class TextCrossAttention(nn.Module):
    """Softmax attention from queries to the rows of each sample's prompt (scale 1/sqrt(head_dim)).

    With `learned_query` there is one learned query per head instead of a projection of x: the
    attentive pool that turns a prompt into one vector.
    """

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, learned_query: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        if learned_query:
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
            nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / embed_dim / 3))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)  # K then V; there is no K bias
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor | None, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # x: B, Lq, C or None (pool) | text: B, Lt, kv_dim | text_mask: B, Lt -> B, Lq, C
        dtype = self.mat_kv.weight.dtype
        B, Lt, _ = text.shape
        kv = F.linear(text.to(dtype), self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = kv.view(B, Lt, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # B, H, Lt, c
        if isinstance(self.mat_q, nn.Linear):
            q = self.mat_q(x.to(dtype)).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        else:
            q = self.mat_q.to(dtype).unsqueeze(2).expand(B, -1, -1, -1)  # B, H, 1, c
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).flatten(2))


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.ca = TextCrossAttention(embed_dim, text_channels, num_heads, learned_query=True)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:  # -> B, C
        return self.ca(None, text, text_mask).squeeze(1)


class KVCache:
    """Keys and values of the scales generated so far, for one self-attention layer."""

    def __init__(self, batch: int, num_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, num_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_lengths: Sequence[int]
) -> torch.Tensor:
    """Softmax attention (scale 1) where the queries of each scale see every key up to the end of
    their own scale: the block-causal mask, computed without a mask, so that every call can run
    a dense (flash) kernel and no masked-out score is ever computed. q, k, v: B, H, L, c."""
    outs, end = [], 0
    for n in scale_lengths:
        start, end = end, end + n
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=1.0))
    return torch.cat(outs, dim=2)


class SelfAttention(nn.Module):
    """Cosine attention: q and k are l2-normalised, q is scaled per head by a learned factor
    (at most 100), then 2D RoPE; the softmax scale is 1."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, rope, scale_lengths: Sequence[int] | None = None, kv_cache: KVCache | None = None):
        # x: B, n, C (block dtype) | rope: 2, n, c/2
        # Teacher forcing passes the tokens of every scale with their `scale_lengths`; sampling
        # passes one scale at a time with a cache of the earlier scales (no mask needed).
        B, n, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B, H, n, c
        scale = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp()
        q = apply_rope(F.normalize(q.float(), dim=-1, eps=1e-12) * scale, rope).to(v.dtype)
        k = apply_rope(F.normalize(k.float(), dim=-1, eps=1e-12), rope).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            out = block_causal_attention(q, k, v, scale_lengths)
        return self.proj(out.transpose(1, 2).reshape(B, n, C))


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class Conditioning:
    """What every block and the head read from the prompt."""

    cond: torch.Tensor  # B, C   pooled prompt: start token and AdaLN input
    ada: torch.Tensor  # B, 1, 6, C   shared AdaLN table (gamma1, gamma2, scale1, scale2, shift1, shift2)
    text_kv: torch.Tensor  # B, Lt, C   cross-attention inputs
    text_mask: torch.Tensor  # B, Lt


class CrossAttnBlock(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)  # added to the shared table
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = TextCrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)

    def forward(self, x, c: Conditioning, rope, scale_lengths=None, kv_cache=None):
        # x: B, n, C float32 residual stream
        dtype = self.ffn.fc1.weight.dtype
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss.float() + c.ada).unbind(2)  # B, 1, C each
        x = x + self.sa(modulate(x, scale1, shift1, self.eps).to(dtype), rope, scale_lengths, kv_cache).float() * gamma1
        ca_in = F.layer_norm(x, x.shape[-1:], self.ca_norm.weight.float(), self.ca_norm.bias.float(), self.eps)
        x = x + self.ca(ca_in.to(dtype), c.text_kv, c.text_mask).float()
        return x + self.ffn(modulate(x, scale2, shift2, self.eps).to(dtype)).float() * gamma2


class BlockChunk(nn.Module):
    """A group of consecutive blocks; exists only for the state-dict names block_chunks.{i}.module.{j}."""

    def __init__(self, blocks: Sequence[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond.float()).unflatten(-1, (1, 2, -1)).unbind(2)  # B, 1, C each
        return modulate(x, scale, shift, self.eps)


class InfinityTransformer(nn.Module):
    def __init__(self, config: InfinityConfig):
        super().__init__()
        self.config = cfg = config
        C, Ct = cfg.embed_dim, cfg.text_channels
        init_std = math.sqrt(1 / C / 3)
        # Unconditional "prompt" rows in raw T5 space, for CFG and condition dropout.
        self.cfg_uncond = nn.Parameter(torch.empty(cfg.text_maxlen, Ct))
        nn.init.trunc_normal_(self.cfg_uncond, std=1.2)
        self.cfg_uncond.data /= Ct**0.5
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        self.text_norm = RMSNorm(Ct, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C, cfg.pool_num_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(NUM_LEVEL_EMBEDDINGS, C)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.word_embed = nn.Linear(cfg.bits_per_token, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.bits_per_token)
        blocks = [CrossAttnBlock(cfg) for _ in range(cfg.depth)]
        n = cfg.blocks_per_chunk
        self.block_chunks = nn.ModuleList(BlockChunk(blocks[i : i + n]) for i in range(0, cfg.depth, n))
        self.gradient_checkpointing = False
        self._tables: dict = {}  # rope tables and scale indices per (schedule, device)

    # ---- structure -----------------------------------------------------------------------------
    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [block for chunk in self.block_chunks for block in chunk.module]

    def set_block_dtype(self, dtype: torch.dtype) -> InfinityTransformer:
        """Casts the blocks only; the float32 parts stay float32 (the official bf16 inference)."""
        self.block_chunks.to(dtype)
        return self

    # ---- conditioning ---------------------------------------------------------------------------
    def uncond_text(self, text: TextCondition) -> TextCondition:
        """The unconditional prompt of the same lengths: the first rows of `cfg_uncond`."""
        rows = self.cfg_uncond[: text.features.shape[1]]
        return TextCondition(rows.unsqueeze(0).expand(text.batch_size, -1, -1), text.mask)

    def drop_condition(
        self, text: TextCondition, rate: float, generator: torch.Generator | None = None
    ) -> TextCondition:
        """Replaces each sample's prompt by the unconditional one with probability `rate`."""
        if rate <= 0:
            return text
        drop = torch.rand(text.batch_size, generator=generator, device=generator.device if generator else "cpu") < rate
        drop = drop.to(text.features.device)[:, None, None]
        uncond = self.uncond_text(text).features.to(text.features.dtype)
        return TextCondition(torch.where(drop, uncond, text.features), text.mask)

    def condition(self, text: TextCondition) -> Conditioning:
        features = self.text_norm(text.features.float())
        cond = self.text_proj_for_sos(features, text.mask).float()
        text_kv = self.text_proj_for_ca(features)
        ada = self.shared_ada_lin(cond).unflatten(-1, (1, 6, -1))
        return Conditioning(cond, ada, text_kv, text.mask)

    def scale_conditions(self, texts: Sequence[TextCondition], num_scales: int) -> list[Conditioning]:
        """One Conditioning per scale from one prompt condition per scale (the last serves the
        scales past the list: the same object, so a change of prompt is `is not`)."""
        conditions = [self.condition(t) for t in texts[:num_scales]]
        return conditions + conditions[-1:] * (num_scales - len(conditions))

    # ---- pieces shared by teacher forcing and sampling -------------------------------------------
    def start_tokens(self, c: Conditioning) -> torch.Tensor:  # -> B, 1, C
        return c.cond.unsqueeze(1) + self.pos_start

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:  # B, n, d_token -> B, n, C
        return self.word_embed(x.float())

    def rope(self, schedule: ScaleSchedule, device) -> torch.Tensor:
        key = ("rope", schedule.grids, schedule.rope_grid, str(device))
        if key not in self._tables:
            self._tables[key] = rope_table(schedule, self.config.head_dim).to(device)
        return self._tables[key]

    def scale_index(self, schedule: ScaleSchedule, device) -> torch.Tensor:
        """(L,) the scale each token belongs to (which level embedding it gets)."""
        key = ("scale", schedule.grids, str(device))
        if key not in self._tables:
            self._tables[key] = torch.cat([torch.full((n,), s) for s, n in enumerate(schedule.lengths)]).to(device)
        return self._tables[key]

    def run_blocks(
        self,
        x: torch.Tensor,
        c: Conditioning,
        rope: torch.Tensor,
        scale_lengths: Sequence[int] | None = None,
        kv_caches: Sequence[KVCache] | None = None,
        after_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            cache = kv_caches[i] if kv_caches is not None else None
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, c, rope, scale_lengths, cache, use_reentrant=False)
            else:
                x = block(x, c, rope, scale_lengths, cache)
            if after_block is not None:
                x = after_block(i, x)
        return x

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head in float32: (B, n, C) -> (B, n, 2 * bits_per_token)."""
        return F.linear(self.head_nm(x, cond), self.head.weight.float(), self.head.bias.float())

    # ---- teacher-forced forward (training, validation loss) --------------------------------------
    def forward(
        self,
        text: TextCondition | Sequence[TextCondition],
        x_tokens: torch.Tensor,
        schedule: ScaleSchedule,
        cond_drop_rate: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, 2d) for every scale of `schedule`, given the inputs of the scales after
        the first, x_tokens (B, L - 1, d_token). `text`: the prompts, or one condition per scale
        (per-scale concept vectors). With one per scale, scale s is predicted by the model reading
        text[s] everywhere, the coarser scales' tokens included, as the sampler re-reads them; the
        scales past the list read its last. `cond_drop_rate` swaps prompts for the unconditional
        rows (the official trainer uses 0.1; this package never does unless asked)."""
        L = schedule.total_len
        if x_tokens.shape[1] != L - 1:
            raise ValueError(f"x_tokens has {x_tokens.shape[1]} tokens, the schedule needs {L - 1}")
        if isinstance(text, TextCondition):
            return self._forward(
                self.condition(self.drop_condition(text, cond_drop_rate, generator)), x_tokens, schedule
            )
        if cond_drop_rate > 0:
            raise ValueError("condition dropout takes one prompt condition, not one per scale")
        texts = list(text)[: len(schedule)]
        logits = []
        for s, t in enumerate(texts):  # the scales up to s under text[s]; the last text reads on to the end
            upto = schedule if s == len(texts) - 1 else schedule.prefix(s + 1)
            out = self._forward(self.condition(t), x_tokens[:, : upto.total_len - 1], upto)
            logits.append(out[:, schedule.offsets[s] :])
        return torch.cat(logits, dim=1)

    def _forward(self, c: Conditioning, x_tokens: torch.Tensor, schedule: ScaleSchedule) -> torch.Tensor:
        x = torch.cat([self.start_tokens(c), self.embed_tokens(x_tokens)], dim=1)  # B, L, C
        x = x + self.lvl_embed(self.scale_index(schedule, x.device))
        x = self.run_blocks(x, c, self.rope(schedule, x.device), scale_lengths=schedule.lengths)
        return self.logits(x, c.cond)
