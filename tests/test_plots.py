"""Tests for dimcli.plots: tick maths, figure sizes, and pixels where they should be."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from dimcli import plots


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0, 790), (-1.34, 1.41), (0.001, 0.0042), (3, 3), (-5, -5), (0, 1e6), (0.5, 0.51)],
)
def test_nice_ticks_cover_the_range_with_round_even_steps(lo: float, hi: float) -> None:
    ticks = plots.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi
    assert 2 <= len(ticks) <= 12
    steps = np.diff(ticks)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 2.5, 5, 10)) < 1e-6


def test_format_tick() -> None:
    assert [plots.format_tick(v, 0.25) for v in (0, 0.25, 0.5)] == ["0", "0.25", "0.50"]
    assert plots.format_tick(200, 100) == "200"
    assert plots.format_tick(20_000, 10_000) == "20k"
    assert plots.format_tick(3_000_000, 1_000_000) == "3M"
    assert plots.format_tick(-1.5, 0.5) == "-1.5"


def test_line_chart_size_and_line_colour() -> None:
    series = [plots.Series("a", [0, 1, 2], [0.0, 1.0, 2.0]), plots.Series("b", [0, 2], [2, 0])]
    img = plots.line_chart(series, title="t", xlabel="x", ylabel="y")
    assert img.size == plots.CHART_SIZE and img.mode == "RGB"
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    for colour in plots.PALETTE[:2]:  # each series is drawn in its own colour
        distance = np.abs(pixels - np.array(colour)).sum(axis=1)
        assert (distance < 40).sum() > 100


def test_line_chart_survives_non_finite_and_empty_data() -> None:
    nan = [plots.Series("a", [0, 1, 2, 3], [1.0, math.nan, math.inf, 2.0])]
    assert plots.line_chart(nan, title="t", xlabel="x", ylabel="y").size == plots.CHART_SIZE
    empty = [plots.Series("a", [0], [math.nan])]
    assert plots.line_chart(empty, title="t", xlabel="x", ylabel="y").size == plots.CHART_SIZE


def test_include_zero_extends_the_axis() -> None:
    # 300 -> 310 fills the frame's height on its own axis, but is nearly flat next to 0.
    series = [plots.Series("a", [0, 1], [300.0, 310.0])]
    a = np.asarray(plots.line_chart(series, title="", xlabel="", ylabel=""))
    b = np.asarray(plots.line_chart(series, title="", xlabel="", ylabel="", include_zero=True))
    blue = np.array(plots.PALETTE[0])

    def line_height(img: np.ndarray) -> int:
        rows = np.nonzero((np.abs(img.astype(int) - blue).sum(axis=2) < 40).any(axis=1))[0]
        rows = rows[rows > 60]  # below the legend swatch
        return int(rows.max() - rows.min())

    assert line_height(b) * 5 < line_height(a)


def test_heat_colour_ends() -> None:
    assert plots.heat_colour(0.0) == plots._BLUES[0]
    assert plots.heat_colour(1.0) == plots._BLUES[-1]
    assert plots.heat_colour(2.0) == plots._BLUES[-1]  # clamped


@pytest.mark.parametrize("n", [2, 10, 40])
def test_confusion_heatmap_size_and_diagonal(n: int) -> None:
    confusion = np.eye(n, dtype=int) * 5
    img = plots.confusion_heatmap(confusion.tolist(), [f"c{i}" for i in range(n)], title="t")
    assert img.size == plots.heatmap_size(n)
    cell = plots.heatmap_cell(n)
    x0 = plots._HEAT_PAD + 22 + plots._HEAT_LABEL_W
    y0 = plots._HEAT_TOP
    # A diagonal cell (share 1) is dark; an off-diagonal cell (share 0) is near white.
    # Sample a corner pixel, clear of the written count.
    assert img.getpixel((x0 + 2, y0 + 2)) == plots.heat_colour(1.0)
    assert img.getpixel((x0 + cell + 2, y0 + 2)) == plots.heat_colour(0.0)


def test_retrieval_grid_size_and_frames() -> None:
    photo = Image.new("RGB", (32, 32), (200, 10, 10))
    query = plots.Tile(photo, "cat", "query")
    neighbours = [
        plots.Tile(photo, "cat", "cos 0.9", match=True),
        plots.Tile(None, "dog", "cos 0.8", match=False),
    ]
    img = plots.retrieval_grid([(query, neighbours)] * 3, k=2)
    assert img.size == plots.retrieval_size(3, 2)
    x = plots._PAD + plots.TILE + plots._SEP
    assert img.getpixel((x, plots._HEADER)) == plots._GOOD  # frame of a matching neighbour
    assert img.getpixel((x + plots.TILE // 2, plots._HEADER + 20)) == (200, 10, 10)


def test_thumbnail_is_square_and_sharp_for_small_images() -> None:
    checker = Image.fromarray((np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8))
    thumb = plots.thumbnail(checker, 96)
    assert thumb.size == (96, 96)
    assert set(np.unique(np.asarray(thumb))) <= {0, 255}  # pixel repetition, no blur
