"""Dynamic-resolution tables: aspect-ratio templates, their scale schedules and pixel sizes.

Every aspect ratio (h/w) has one list of 13 token grids; a total pixel count ("pn") uses a prefix
of it: 0.06M the first 7 grids (256x256 for 1:1), 0.25M 10 (512x512), 0.60M 12, 1M all 13
(1024x1024). A token stands for 16x16 pixels. RoPE positions are always measured on the last grid
of the template's 1M schedule, so a lower pn sees the same positions as the first scales of 1M.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

TOKEN_STRIDE = 16  # image pixels per transformer token, per side, for every released model

# Token grids (h, w) for the aspect ratios h/w >= 1; the transposed grids serve w/h.
_GRIDS_BY_RATIO: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: (
        (1, 1),
        (2, 2),
        (4, 4),
        (6, 6),
        (8, 8),
        (12, 12),
        (16, 16),
        (20, 20),
        (24, 24),
        (32, 32),
        (40, 40),
        (48, 48),
        (64, 64),
    ),
    1.250: (
        (1, 1),
        (2, 2),
        (3, 3),
        (5, 4),
        (10, 8),
        (15, 12),
        (20, 16),
        (25, 20),
        (30, 24),
        (35, 28),
        (45, 36),
        (55, 44),
        (70, 56),
    ),
    1.333: (
        (1, 1),
        (2, 2),
        (4, 3),
        (8, 6),
        (12, 9),
        (16, 12),
        (20, 15),
        (24, 18),
        (28, 21),
        (36, 27),
        (48, 36),
        (60, 45),
        (72, 54),
    ),
    1.500: (
        (1, 1),
        (2, 2),
        (3, 2),
        (6, 4),
        (9, 6),
        (15, 10),
        (21, 14),
        (27, 18),
        (33, 22),
        (39, 26),
        (48, 32),
        (63, 42),
        (78, 52),
    ),
    1.750: (
        (1, 1),
        (2, 2),
        (3, 3),
        (7, 4),
        (11, 6),
        (14, 8),
        (21, 12),
        (28, 16),
        (35, 20),
        (42, 24),
        (56, 32),
        (70, 40),
        (84, 48),
    ),
    2.000: (
        (1, 1),
        (2, 2),
        (4, 2),
        (6, 3),
        (10, 5),
        (16, 8),
        (22, 11),
        (30, 15),
        (38, 19),
        (46, 23),
        (60, 30),
        (74, 37),
        (90, 45),
    ),
    2.500: (
        (1, 1),
        (2, 2),
        (5, 2),
        (10, 4),
        (15, 6),
        (20, 8),
        (25, 10),
        (30, 12),
        (40, 16),
        (50, 20),
        (65, 26),
        (80, 32),
        (100, 40),
    ),
    3.000: (
        (1, 1),
        (2, 2),
        (6, 2),
        (9, 3),
        (15, 5),
        (21, 7),
        (27, 9),
        (36, 12),
        (45, 15),
        (54, 18),
        (72, 24),
        (90, 30),
        (111, 37),
    ),
}

# Template keys in the official order. The transposed keys are truncated, not rounded
# (0.666, 0.571, 0.333), and the nearest-template search uses these exact values.
TEMPLATE_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {}
for _ratio, _grids in _GRIDS_BY_RATIO.items():
    TEMPLATE_GRIDS[_ratio] = _grids
    if _ratio != 1.0:
        TEMPLATE_GRIDS[int(1 / _ratio * 1000) / 1000] = tuple((w, h) for h, w in _grids)
H_DIV_W_TEMPLATES: tuple[float, ...] = tuple(TEMPLATE_GRIDS)

PN_NUM_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


@dataclass(frozen=True)
class ScaleSchedule:
    """The token grids of one generation, coarse to fine, and the grid RoPE positions refer to."""

    grids: tuple[tuple[int, int], ...]  # (h, w) per scale
    rope_grid: tuple[int, int]  # last grid of the template's 1M schedule

    def __post_init__(self):
        object.__setattr__(self, "grids", tuple((int(h), int(w)) for h, w in self.grids))
        object.__setattr__(self, "rope_grid", (int(self.rope_grid[0]), int(self.rope_grid[1])))

    def __len__(self) -> int:
        return len(self.grids)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Index of the first token of each scale in the flattened sequence."""
        out, total = [], 0
        for n in self.lengths:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total_len(self) -> int:
        return sum(self.lengths)

    def image_size(self, token_stride: int = TOKEN_STRIDE) -> tuple[int, int]:
        """(H, W) in pixels of images generated or trained with this schedule."""
        h, w = self.grids[-1]
        return h * token_stride, w * token_stride

    def vae_grids(self, spatial_patchify: bool) -> tuple[tuple[int, int], ...]:
        """Latent grids of the VAE: with spatial patchify a token covers 2x2 latent positions."""
        f = 2 if spatial_patchify else 1
        return tuple((h * f, w * f) for h, w in self.grids)

    def prefix(self, num_scales: int) -> ScaleSchedule:
        return ScaleSchedule(self.grids[:num_scales], self.rope_grid)


def nearest_template(h_div_w: float) -> float:
    """The template aspect ratio (h/w) closest to `h_div_w` (first one on a tie, as officially)."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio h/w must be positive, got {h_div_w}")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def get_schedule(h_div_w: float = 1.0, pn: str = "1M") -> ScaleSchedule:
    """The official schedule for the template nearest to `h_div_w` at total pixel count `pn`."""
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"pn must be one of {sorted(PN_NUM_SCALES)}, got {pn!r}")
    grids = TEMPLATE_GRIDS[nearest_template(h_div_w)]
    return ScaleSchedule(grids[: PN_NUM_SCALES[pn]], rope_grid=grids[-1])
