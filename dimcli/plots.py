"""Figures for `dim report`, drawn with Pillow alone (no plotting library needed).

Three kinds of figure, each returned as an RGB `PIL.Image`:

- `line_chart`: one or more series against a shared x axis, with nice ticks, grid, axis
  labels and a legend (training curves);
- `confusion_heatmap`: a confusion matrix, cells shaded by the row share, counts written in;
- `retrieval_grid`: query images, each followed by its nearest neighbours with captions.

Charts are drawn at twice their size and shrunk with a Lanczos filter, which gives smooth
(anti-aliased) lines and text; Pillow's own line drawing has no anti-aliasing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

RGB = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

CHART_SIZE: tuple[int, int] = (880, 360)
_SCALE = 2  # supersampling factor of charts

# Colour-blind-safe qualitative palette (Okabe and Ito), black moved last.
PALETTE: tuple[RGB, ...] = (
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (213, 94, 0),
    (204, 121, 167),
    (86, 180, 233),
    (240, 228, 66),
    (60, 60, 60),
)
_INK: RGB = (33, 37, 41)
_MUTED: RGB = (108, 117, 125)
_GRID: RGB = (230, 232, 235)
_AXIS: RGB = (150, 156, 162)
_WHITE: RGB = (255, 255, 255)
_GOOD: RGB = (0, 135, 75)
_BAD: RGB = (200, 45, 45)


@lru_cache(maxsize=16)
def font(size: int) -> Font:
    """Pillow's bundled scalable font at `size` pixels (a bitmap font on very old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no sizes, one small bitmap font
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, f: Font) -> int:
    """Width in pixels of `text` drawn in `f`."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=f)
    return math.ceil(right - left)


def fit_text(draw: ImageDraw.ImageDraw, text: str, f: Font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    if text_width(draw, text, f) <= width:
        return text
    while len(text) > 1 and text_width(draw, text + "…", f) > width:
        text = text[:-1]
    return text + "…"


# ==== axes ====


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Evenly spaced round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi].

    The first tick is at or below `lo` and the last at or above `hi`, so the ticks can serve
    as the axis limits. A degenerate range (lo == hi) is widened around its value.
    """
    assert math.isfinite(lo) and math.isfinite(hi), "tick range must be finite"
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = tick_step(lo, hi, target)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_step(lo: float, hi: float, target: int = 5) -> float:
    """The round step that gives about `target` intervals over [lo, hi]."""
    raw = (hi - lo) / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for mantissa in (1.0, 2.0, 2.5, 5.0, 10.0):
        if mantissa * magnitude >= raw * (1 - 1e-9):
            return mantissa * magnitude
    return 10.0 * magnitude


def format_tick(value: float, step: float) -> str:
    """A tick label with just enough decimals for `step` (and k/M for large round values)."""
    if value == 0:
        return "0"
    if step >= 1000 and abs(value) >= 10_000 and value % 1000 == 0:
        if step >= 1_000_000 and value % 1_000_000 == 0:
            return f"{value / 1_000_000:g}M"
        return f"{value / 1000:g}k"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    scaled = step * 10**decimals
    if abs(scaled - round(scaled)) > 1e-6:  # 2.5, 0.25, ...: one digit more
        decimals += 1
    return f"{value:.{decimals}f}"


# ==== line charts ====


@dataclass(frozen=True)
class Series:
    """One line of a chart: its legend name and its points (non-finite y values break it)."""

    name: str
    x: Sequence[float]
    y: Sequence[float]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = CHART_SIZE,
    include_zero: bool = False,
) -> Image.Image:
    """Draw `series` as lines on shared axes; returns an RGB image of exactly `size`.

    `include_zero` extends the y axis down (or up) to 0, for quantities such as throughput
    whose variation should not look larger than it is.
    """
    s = _SCALE
    width, height = size[0] * s, size[1] * s
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    f_title, f_label, f_tick = font(15 * s), font(12 * s), font(11 * s)

    points = [
        (float(x), float(y))
        for ser in series
        for x, y in zip(ser.x, ser.y, strict=True)
        if math.isfinite(float(x)) and math.isfinite(float(y))
    ]
    draw.text((16 * s, 10 * s), title, font=f_title, fill=_INK)

    # ---- legend: one row of swatches under the title, wrapping when needed ----
    legend_top = 34 * s
    cursor_x, cursor_y = 16 * s, legend_top
    row_h = 18 * s
    for i, ser in enumerate(series):
        label_w = text_width(draw, ser.name, f_label)
        entry_w = 22 * s + label_w + 18 * s
        if cursor_x + entry_w > width - 16 * s and cursor_x > 16 * s:
            cursor_x, cursor_y = 16 * s, cursor_y + row_h
        colour = PALETTE[i % len(PALETTE)]
        mid = cursor_y + 8 * s
        draw.line([(cursor_x, mid), (cursor_x + 16 * s, mid)], fill=colour, width=3 * s)
        draw.text((cursor_x + 22 * s, cursor_y), ser.name, font=f_label, fill=_INK)
        cursor_x += entry_w
    top = cursor_y + row_h + 10 * s

    if not points:
        draw.text((16 * s, top + 20 * s), "no finite values to plot", font=f_label, fill=_MUTED)
        return img.resize(size, Image.Resampling.LANCZOS)

    # ---- axis ranges and ticks ----
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs), target=8)
    y_min, y_max = min(ys), max(ys)
    if include_zero:
        y_min, y_max = min(y_min, 0.0), max(y_max, 0.0)
    y_ticks = nice_ticks(y_min, y_max, target=5)
    x_step = x_ticks[1] - x_ticks[0]
    y_step = y_ticks[1] - y_ticks[0]
    x_lo, x_hi = x_ticks[0], x_ticks[-1]
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    y_labels = [format_tick(v, y_step) for v in y_ticks]

    left = 16 * s + 18 * s + max(text_width(draw, t, f_tick) for t in y_labels) + 10 * s
    right = width - 24 * s
    bottom = height - 46 * s

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    # ---- grid, axes, tick labels ----
    for v, label in zip(y_ticks, y_labels, strict=True):
        y = py(v)
        draw.line([(left, y), (right, y)], fill=_GRID, width=s)
        tw = text_width(draw, label, f_tick)
        draw.text((left - 8 * s - tw, y - 7 * s), label, font=f_tick, fill=_MUTED)
    for v in x_ticks:
        x = px(v)
        draw.line([(x, top), (x, bottom)], fill=_GRID, width=s)
        draw.line([(x, bottom), (x, bottom + 4 * s)], fill=_AXIS, width=s)
        label = format_tick(v, x_step)
        tw = text_width(draw, label, f_tick)
        draw.text((x - tw / 2, bottom + 7 * s), label, font=f_tick, fill=_MUTED)
    draw.line([(left, bottom), (right, bottom)], fill=_AXIS, width=s)
    draw.line([(left, top), (left, bottom)], fill=_AXIS, width=s)

    xw = text_width(draw, xlabel, f_label)
    draw.text(((left + right) / 2 - xw / 2, height - 22 * s), xlabel, font=f_label, fill=_INK)
    _vertical_text(img, ylabel, f_label, centre=(16 * s + 7 * s, (top + bottom) / 2), fill=_INK)

    # ---- the lines (split at non-finite values) ----
    for i, ser in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        segment: list[tuple[float, float]] = []
        segments = [segment]
        for x, y in zip(ser.x, ser.y, strict=True):
            if math.isfinite(float(x)) and math.isfinite(float(y)):
                segment.append((px(float(x)), py(float(y))))
            elif segment:
                segment = []
                segments.append(segment)
        for seg in segments:
            if len(seg) == 1:
                (cx, cy) = seg[0]
                r = 3 * s
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif len(seg) > 1:
                draw.line(seg, fill=colour, width=2 * s, joint="curve")

    return img.resize(size, Image.Resampling.LANCZOS)


def _vertical_text(
    img: Image.Image, text: str, f: Font, *, centre: tuple[float, float], fill: RGB
) -> None:
    """Paste `text` rotated 90 degrees counter-clockwise, centred on `centre`."""
    probe = ImageDraw.Draw(img)
    left, top, right, bottom = probe.textbbox((0, 0), text, font=f)
    w, h = int(right - left) + 2, int(bottom - top) + 2
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((-left + 1, -top + 1), text, font=f, fill=255)
    mask = mask.rotate(90, expand=True)
    x = int(centre[0] - mask.width / 2)
    y = int(centre[1] - mask.height / 2)
    img.paste(Image.new("RGB", mask.size, fill), (x, y), mask)


# ==== confusion heat map ====

# Sequential blues from near-white to navy; the share of a row picks the shade.
_BLUES: tuple[RGB, ...] = (
    (247, 251, 255),
    (198, 219, 239),
    (107, 174, 214),
    (33, 113, 181),
    (8, 48, 107),
)
_HEAT_LABEL_W = 120
_HEAT_TOP = 120
_HEAT_PAD = 16


def heat_colour(share: float) -> RGB:
    """Colour of a cell holding `share` (0..1) of its row."""
    share = min(max(share, 0.0), 1.0)
    pos = share * (len(_BLUES) - 1)
    i = min(int(pos), len(_BLUES) - 2)
    t = pos - i
    a, b = _BLUES[i], _BLUES[i + 1]
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def heatmap_cell(n_classes: int) -> int:
    """Cell side in pixels for `n_classes` rows: large for few classes, at least 12."""
    return max(12, min(44, 480 // max(n_classes, 1)))


def heatmap_size(n_classes: int) -> tuple[int, int]:
    """The (width, height) `confusion_heatmap` returns for `n_classes` classes."""
    cell = heatmap_cell(n_classes)
    grid = cell * n_classes
    return (
        _HEAT_PAD + 22 + _HEAT_LABEL_W + grid + _HEAT_PAD,
        _HEAT_TOP + grid + 30 + _HEAT_PAD,
    )


def confusion_heatmap(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], *, title: str
) -> Image.Image:
    """Draw a confusion matrix (rows: true class, columns: predicted), shaded by row share."""
    n = len(classes)
    assert n > 0 and len(confusion) == n, "one confusion row per class"
    assert all(len(row) == n for row in confusion), "confusion must be square"
    width, height = heatmap_size(n)
    cell = heatmap_cell(n)
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    f_title, f_label = font(15), font(11)
    f_count = font(max(8, min(12, cell // 3)))

    draw.text((_HEAT_PAD, 10), title, font=f_title, fill=_INK)
    x0 = _HEAT_PAD + 22 + _HEAT_LABEL_W
    y0 = _HEAT_TOP
    grid = cell * n

    # ---- cells: shade by the share of the true class, count written inside ----
    for i, row in enumerate(confusion):
        total = sum(row)
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            colour = heat_colour(share)
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour)
            if n <= 30 and count:
                text = str(count)
                tw = text_width(draw, text, f_count)
                ink = _WHITE if share > 0.45 else _INK
                draw.text(
                    (box[0] + (cell - tw) / 2, box[1] + cell / 2 - 7), text, font=f_count, fill=ink
                )
        # Diagonal cells get an outline so the correct predictions are easy to find.
        draw.rectangle(
            (x0 + i * cell, y0 + i * cell, x0 + (i + 1) * cell - 1, y0 + (i + 1) * cell - 1),
            outline=_INK,
        )

    # ---- class names: rows on the left, columns on top (rotated) ----
    label_font = f_label if cell >= 14 else font(9)
    for i, name in enumerate(classes):
        text = fit_text(draw, name, label_font, _HEAT_LABEL_W - 8)
        tw = text_width(draw, text, label_font)
        draw.text((x0 - 6 - tw, y0 + i * cell + cell / 2 - 7), text, font=label_font, fill=_INK)
    _column_labels(img, classes, label_font, x0=x0, cell=cell, bottom=y0 - 6, room=_HEAT_TOP - 48)
    draw.text((x0, 36), "predicted class", font=f_label, fill=_MUTED)
    _vertical_text(img, "true class", f_label, centre=(_HEAT_PAD + 7, y0 + grid / 2), fill=_MUTED)
    caption = "shade: share of the true class's test images; counts in cells"
    draw.text((_HEAT_PAD, y0 + grid + 10), caption, font=f_label, fill=_MUTED)
    return img


def _column_labels(
    img: Image.Image, classes: Sequence[str], f: Font, *, x0: int, cell: int, bottom: int, room: int
) -> None:
    """Column names rotated 90 degrees, their ends on the line y = `bottom`."""
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(classes):
        text = fit_text(draw, name, f, room)
        left, top, right, bot = draw.textbbox((0, 0), text, font=f)
        w, h = int(right - left) + 2, int(bot - top) + 2
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((-left + 1, -top + 1), text, font=f, fill=255)
        mask = mask.rotate(90, expand=True)
        x = int(x0 + j * cell + cell / 2 - mask.width / 2)
        img.paste(Image.new("RGB", mask.size, _INK), (x, bottom - mask.height), mask)


# ==== retrieval grid ====

TILE = 96
_GAP = 8
_SEP = 28  # gap between the query column and the neighbours
_CAPTION = 34
_HEADER = 30
_PAD = 14


@dataclass(frozen=True)
class Tile:
    """One picture of the retrieval grid: the image (None if unreadable) and two caption lines.

    `match` colours the frame: True green (same label as the query), False red, None grey.
    """

    image: Image.Image | None
    line1: str
    line2: str = ""
    match: bool | None = None


def retrieval_size(queries: int, k: int) -> tuple[int, int]:
    """The (width, height) `retrieval_grid` returns for `queries` rows of 1 + `k` tiles."""
    width = _PAD + TILE + _SEP + k * (TILE + _GAP) - _GAP + _PAD
    height = _HEADER + queries * (TILE + _CAPTION + _GAP) + _PAD
    return width, height


def thumbnail(image: Image.Image, side: int = TILE) -> Image.Image:
    """A square `side` x `side` thumbnail: centre crop, then resize.

    Small images are enlarged by pixel repetition (sharp pixels, nothing invented); larger
    ones are reduced with a Lanczos filter.
    """
    small = min(image.size) * 2 <= side
    method = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
    return ImageOps.fit(image.convert("RGB"), (side, side), method=method)


def retrieval_grid(rows: Sequence[tuple[Tile, Sequence[Tile]]], *, k: int) -> Image.Image:
    """Draw one row per query: the query tile, a gap, then up to `k` neighbour tiles."""
    width, height = retrieval_size(len(rows), k)
    img = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(img)
    f_head, f_cap = font(13), font(11)

    nx0 = _PAD + TILE + _SEP
    draw.text((_PAD, 8), "query", font=f_head, fill=_INK)
    draw.text((nx0, 8), f"{k} nearest neighbours (cosine similarity)", font=f_head, fill=_INK)
    for r, (query, neighbours) in enumerate(rows):
        y = _HEADER + r * (TILE + _CAPTION + _GAP)
        _draw_tile(img, draw, query, (_PAD, y), f_cap)
        for j, tile in enumerate(neighbours[:k]):
            _draw_tile(img, draw, tile, (nx0 + j * (TILE + _GAP), y), f_cap)
    line_x = _PAD + TILE + _SEP // 2
    draw.line([(line_x, _HEADER), (line_x, height - _PAD)], fill=_GRID, width=2)
    return img


def _draw_tile(
    img: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, at: tuple[int, int], f: Font
) -> None:
    x, y = at
    if tile.image is None:
        draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=(235, 235, 235))
        draw.text((x + 8, y + TILE / 2 - 7), "unreadable", font=f, fill=_MUTED)
    else:
        img.paste(thumbnail(tile.image), (x, y))
    if tile.match is not None:
        colour = _GOOD if tile.match else _BAD
        draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), outline=colour, width=3)
    ink = _INK if tile.match is None else (_GOOD if tile.match else _BAD)
    draw.text((x, y + TILE + 3), fit_text(draw, tile.line1, f, TILE), font=f, fill=ink)
    if tile.line2:
        draw.text((x, y + TILE + 17), fit_text(draw, tile.line2, f, TILE), font=f, fill=_MUTED)
