"""Grids of images a person can read: a title, a label per row and per column, small images
upscaled (nearest, so that pixels stay pixels)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 256  # images narrower than this are upscaled by a whole factor to reach it
LABEL_WORDS = 16  # row labels wrap at about this many average characters (but a word is never cut)
MARGIN = 8
GAP = 4  # white between cells, so that two images of the same background stay apart


def upscale_for_viewing(image: Image.Image, min_size: int = MIN_CELL) -> Image.Image:
    factor = math.ceil(min_size / image.width) if image.width < min_size else 1
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def label_font(size: int):
    """Pillow's own font at `size` pixels; its fixed-size bitmap font where Pillow has no FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _wrapped(text: str, font, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words (a longer word keeps a
    line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    title: str | None = None,
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """`rows[i][j]` in row i, column j, every image at the first one's size (upscaled to at least
    `min_cell` pixels wide); the title on top, then the column labels, the row labels on the left."""
    cell = upscale_for_viewing(rows[0][0], min_cell).size
    step_x, step_y = cell[0] + GAP, cell[1] + GAP
    font = label_font(min(40, max(14, cell[0] // 16)))
    line_height = font.size + 4 if hasattr(font, "size") else 15
    num_cols = max(len(r) for r in rows)
    labels = list(row_labels or [])
    widest_label = max((font.getlength(label) for label in labels), default=0)
    widest_word = max((font.getlength(word) for label in labels for word in label.split()), default=0)
    # as wide as the labels need, up to LABEL_WORDS characters, and never narrower than a word
    wrap_at = max(widest_word, LABEL_WORDS * font.getlength("n"))
    left = math.ceil(min(widest_label, wrap_at)) + 2 * MARGIN if labels else 0
    column_lines = [_wrapped(label, font, cell[0] - 2 * MARGIN) for label in column_labels or []]
    header = (max(map(len, column_lines)) * line_height + 2 * MARGIN) if column_lines else 0
    width = left + num_cols * step_x - GAP
    title_lines = _wrapped(title, font, width - 2 * MARGIN) if title else []
    top = len(title_lines) * line_height + (2 * MARGIN if title_lines else 0)

    grid = Image.new("RGB", (width, top + header + len(rows) * step_y - GAP), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + k * line_height), line, fill="black", font=font)
    for j, lines in enumerate(column_lines):
        for k, line in enumerate(lines):
            x = left + j * step_x + (cell[0] - font.getlength(line)) / 2
            draw.text((x, top + MARGIN + k * line_height), line, fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + header + i * step_y
        if row_labels:
            lines = _wrapped(row_labels[i], font, left - 2 * MARGIN)
            y_text = y + max(0, (cell[1] - len(lines) * line_height) // 2)
            for k, line in enumerate(lines):
                draw.text((MARGIN, y_text + k * line_height), line, fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image.resize(cell, Image.NEAREST), (left + j * step_x, y))
    return grid
