"""2D rotary position embedding of the self-attention, positions normalised to the 1M grid.

A head of `c` channels is `c/2` interleaved pairs (2i, 2i+1); the first c/4 pairs rotate with
the row position, the last c/4 with the column position. A scale of (h, w) tokens takes its
positions from the last grid (H*, W*) of the template's 1M schedule: row i sits at
round(i * H*/h), column j at round(j * W*/w) (float32, half to even, as torch.round).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .resolution import ScaleSchedule

ROPE_BASE = 10000.0


@lru_cache(maxsize=64)
def _rope_table(grids: tuple, rope_grid: tuple, head_dim: int) -> torch.Tensor:
    half = head_dim // 2
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # c/4
    full_h, full_w = rope_grid
    per_scale = []
    for h, w in grids:
        rows = (torch.arange(h) * (full_h / h)).round()  # float32, like the official table lookup
        cols = (torch.arange(w) * (full_w / w)).round()
        row_angles = (rows[:, None] * inv_freq)[:, None, :].expand(h, w, -1)
        col_angles = (cols[:, None] * inv_freq)[None, :, :].expand(h, w, -1)
        per_scale.append(torch.cat([row_angles, col_angles], dim=-1).reshape(h * w, half))
    angles = torch.cat(per_scale)  # L, c/2
    return torch.stack([angles.cos(), angles.sin()])  # 2, L, c/2


def rope_table(schedule: ScaleSchedule, head_dim: int) -> torch.Tensor:
    """cos/sin of every token of `schedule`, shape (2, L, head_dim/2), float32 on the CPU."""
    return _rope_table(schedule.grids, schedule.rope_grid, head_dim)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotates x (B, H, n, c) by table (2, n, c/2): pair (a, b) -> (a cos - b sin, a sin + b cos)."""
    cos, sin = table[0], table[1]
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1).flatten(-2)
