"""The ``longrange`` data set: are two distant glyphs the same shape?

Each image is a noisy background with two small glyphs, drawn from a handful of shapes, whose centres
lie a controlled distance apart; the label is 1 when the two glyphs are the same shape, else 0. Seen
one at a time, a glyph says nothing about the label: only a network that relates the two, which are
``distance`` pixels apart, can do better than chance. A convolutional net whose receptive field is
smaller than the distance cannot relate them before its global average pool, and a sum of per-glyph
features followed by a linear classifier cannot tell "same" from "different" (for shapes ``a != b``,
``g(a) + g(a) > t`` and ``g(b) + g(b) > t`` imply ``g(a) + g(b) > t``). A GSA block sees the whole
image.

Generation is deterministic in the seed (numpy's PCG64), in memory, of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gsa_cli.config import DataConfig

GLYPH_SIZE = 5

# 5x5 binary glyphs, chosen to differ from each other in several pixels.
_GLYPHS = [
    ["#####", "#...#", "#...#", "#...#", "#####"],  # square outline
    ["..#..", "..#..", "#####", "..#..", "..#.."],  # plus
    ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],  # cross
    ["#####", "..#..", "..#..", "..#..", "..#.."],  # T
    ["#....", "#....", "#....", "#....", "#####"],  # L
    ["..#..", ".#.#.", "#...#", ".#.#.", "..#.."],  # diamond
    ["#####", "#####", ".....", "#####", "#####"],  # bars
    ["#.#.#", ".#.#.", "#.#.#", ".#.#.", "#.#.#"],  # checker
]
MAX_SHAPES = len(_GLYPHS)


def check_data(data: DataConfig) -> tuple[str, str] | None:
    """The first problem of a longrange ``data`` section as ``(dotted key, message)``, or None.

    The config has already checked that every longrange key is present.
    """
    assert data.distance is not None
    assert data.shapes is not None
    assert data.noise is not None
    farthest = data.img_size - GLYPH_SIZE
    if len(data.distance) != 2 or not GLYPH_SIZE <= data.distance[0] <= data.distance[1] <= farthest:
        return (
            "data.distance",
            f"must be [min, max] with {GLYPH_SIZE} <= min <= max <= {farthest} (glyphs are {GLYPH_SIZE} px "
            f"and must fit a {data.img_size} px image), got {list(data.distance)}",
        )
    if not 2 <= data.shapes <= MAX_SHAPES:
        return "data.shapes", f"must be between 2 and {MAX_SHAPES}, got {data.shapes}"
    if data.noise < 0:
        return "data.noise", f"must not be negative, got {data.noise}"
    if data.channels != 1 or data.num_classes != 2:
        return "data", "longrange images have 1 channel and 2 classes (channels: 1, num_classes: 2)"
    return None


def glyph_bank(shapes: int) -> np.ndarray:
    """The first ``shapes`` glyphs as a ``(shapes, 5, 5)`` float32 array of 0s and 1s."""
    if not 2 <= shapes <= MAX_SHAPES:
        raise ValueError(f"shapes must be between 2 and {MAX_SHAPES}, got {shapes}")
    return np.array(
        [[[1.0 if c == "#" else 0.0 for c in row] for row in glyph] for glyph in _GLYPHS[:shapes]],
        dtype=np.float32,
    )


@dataclass(frozen=True)
class LongRangeSample:
    """What was drawn for one image: the shapes, the glyphs' top-left corners and their distance."""

    first_shape: int
    second_shape: int
    first_corner: tuple[int, int]
    second_corner: tuple[int, int]

    @property
    def distance(self) -> int:
        """Chebyshev distance between the glyph centres, in pixels."""
        return max(
            abs(self.first_corner[0] - self.second_corner[0]),
            abs(self.first_corner[1] - self.second_corner[1]),
        )

    @property
    def label(self) -> int:
        return int(self.first_shape == self.second_shape)


def _place(rng: np.random.Generator, img_size: int, distance: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two top-left corners whose Chebyshev distance is exactly ``distance``, both glyphs inside."""
    limit = img_size - GLYPH_SIZE  # largest top-left coordinate
    for _ in range(1000):
        # One axis carries the full distance, the other any offset up to it.
        major = int(rng.integers(0, 2))
        offsets = [0, 0]
        offsets[major] = distance * (1 if rng.integers(0, 2) else -1)
        offsets[1 - major] = int(rng.integers(-distance, distance + 1))
        low = [max(0, -o) for o in offsets]
        high = [min(limit, limit - o) for o in offsets]
        if all(lo <= hi for lo, hi in zip(low, high, strict=True)):
            first = (int(rng.integers(low[0], high[0] + 1)), int(rng.integers(low[1], high[1] + 1)))
            second = (first[0] + offsets[0], first[1] + offsets[1])
            return first, second
    raise ValueError(f"cannot place two glyphs {distance} px apart in a {img_size} px image")


def max_distance(img_size: int) -> int:
    """The largest glyph distance an image of this size can hold."""
    return img_size - GLYPH_SIZE


def draw_samples(
    count: int, *, img_size: int, distance: tuple[int, int], shapes: int, seed: int
) -> list[LongRangeSample]:
    """Draw ``count`` glyph layouts; labels alternate 1, 0, 1, ... so the classes are balanced."""
    low, high = distance
    if not 2 <= shapes <= MAX_SHAPES:
        raise ValueError(f"shapes must be between 2 and {MAX_SHAPES}, got {shapes}")
    if not GLYPH_SIZE <= low <= high <= max_distance(img_size):
        raise ValueError(
            f"distance range {low}-{high} must lie within {GLYPH_SIZE}-{max_distance(img_size)} px "
            f"for {img_size} px images (glyphs are {GLYPH_SIZE} px and must not overlap)"
        )
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        first = int(rng.integers(0, shapes))
        # Even indices: the same shape; odd: any other shape, uniformly.
        second = first if index % 2 == 0 else int((first + rng.integers(1, shapes)) % shapes)
        corners = _place(rng, img_size, int(rng.integers(low, high + 1)))
        samples.append(LongRangeSample(first, second, *corners))
    return samples


def render(
    samples: list[LongRangeSample], *, img_size: int, shapes: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(count, 1, img_size, img_size)`` float32 and labels ``(count,)`` int64.

    The background is Gaussian noise of standard deviation ``noise``; glyph pixels add 1.
    """
    bank = glyph_bank(shapes)
    rng = np.random.default_rng(seed + 1)
    images = (rng.standard_normal((len(samples), 1, img_size, img_size)) * noise).astype(np.float32)
    for image, sample in zip(images, samples, strict=True):
        for shape, (row, col) in (
            (sample.first_shape, sample.first_corner),
            (sample.second_shape, sample.second_corner),
        ):
            image[0, row : row + GLYPH_SIZE, col : col + GLYPH_SIZE] += bank[shape]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return images, labels


def make_longrange(
    count: int,
    *,
    img_size: int = 32,
    distance: tuple[int, int] = (5, 27),
    shapes: int = 4,
    noise: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``count`` images and labels (see the module docstring)."""
    samples = draw_samples(count, img_size=img_size, distance=distance, shapes=shapes, seed=seed)
    return render(samples, img_size=img_size, shapes=shapes, noise=noise, seed=seed)
