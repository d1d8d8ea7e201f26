"""The long-range glyph generator: deterministic, balanced, glyphs where and as far apart as asked."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from gsa_cli.longrange import GLYPH_SIZE, draw_samples, glyph_bank, make_longrange, render


def test_same_seed_same_data_and_another_seed_other_data() -> None:
    first = make_longrange(64, seed=3)
    again = make_longrange(64, seed=3)
    other = make_longrange(64, seed=4)
    assert np.array_equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_labels_are_balanced_and_mean_same_shape() -> None:
    samples = draw_samples(101, img_size=32, distance=(5, 27), shapes=4, seed=0)
    labels = [s.label for s in samples]
    assert Counter(labels) == {1: 51, 0: 50}
    for sample in samples:
        assert sample.label == (sample.first_shape == sample.second_shape)


def test_each_glyph_alone_says_nothing_about_the_label() -> None:
    samples = draw_samples(4000, img_size=32, distance=(5, 27), shapes=4, seed=1)
    for label in (0, 1):
        shapes = Counter(s.first_shape for s in samples if s.label == label)
        frequencies = np.array([shapes[k] for k in range(4)]) / sum(shapes.values())
        assert np.all(np.abs(frequencies - 0.25) < 0.04)


@pytest.mark.parametrize("distance", [(5, 5), (8, 12), (20, 27)])
def test_glyph_distance_is_within_the_range(distance: tuple[int, int]) -> None:
    samples = draw_samples(300, img_size=32, distance=distance, shapes=4, seed=2)
    distances = {s.distance for s in samples}
    assert min(distances) >= distance[0]
    assert max(distances) <= distance[1]
    if distance[1] - distance[0] >= 4:
        assert len(distances) > 2  # drawn across the range, not stuck at one value


def test_glyphs_are_drawn_inside_the_image_at_their_corners() -> None:
    samples = draw_samples(50, img_size=24, distance=(5, 19), shapes=5, seed=5)
    images, labels = render(samples, img_size=24, shapes=5, noise=0.0, seed=5)
    bank = glyph_bank(5)
    assert images.shape == (50, 1, 24, 24)
    assert labels.dtype == np.int64
    for image, sample in zip(images, samples, strict=True):
        (r1, c1), (r2, c2) = sample.first_corner, sample.second_corner
        np.testing.assert_array_equal(
            image[0, r1 : r1 + GLYPH_SIZE, c1 : c1 + GLYPH_SIZE], bank[sample.first_shape]
        )
        np.testing.assert_array_equal(
            image[0, r2 : r2 + GLYPH_SIZE, c2 : c2 + GLYPH_SIZE], bank[sample.second_shape]
        )
        # Nothing else is drawn.
        assert image.sum() == bank[sample.first_shape].sum() + bank[sample.second_shape].sum()


def test_noise_has_the_requested_scale() -> None:
    images, _ = make_longrange(200, img_size=32, noise=0.5, seed=0)
    glyph_free = images[images < 0.9]  # mostly background pixels
    assert 0.4 < glyph_free.std() < 0.55


def test_glyphs_differ_from_each_other() -> None:
    bank = glyph_bank(8)
    for i in range(8):
        for j in range(i + 1, 8):
            assert np.abs(bank[i] - bank[j]).sum() >= 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distance": (3, 10)}, "distance range 3-10"),
        ({"distance": (5, 40)}, "distance range 5-40"),
        ({"shapes": 1}, "shapes must be between 2 and 8"),
    ],
)
def test_impossible_requests_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_longrange(4, **kwargs)  # type: ignore[arg-type]


def test_the_preset_builds_balanced_data_sets_of_its_size() -> None:
    from gsa_cli import load_preset
    from gsa_cli.data import build_datasets

    config = load_preset("longrange", overrides=["data.train_samples=40", "data.val_samples=20"])
    train, val = build_datasets(config, None)
    assert (len(train), len(val)) == (40, 20)
    image, _ = train[0]
    assert tuple(image.shape) == (1, 24, 24)
    labels = [val[i][1] for i in range(len(val))]
    assert labels.count(1) == labels.count(0) == 10
    # Training and validation images are drawn from different seeds.
    assert not torch.equal(train[0][0], val[0][0])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.distance=[3, 10]", "data.distance: must be [min, max] with 5 <= min <= max <= 19"),
        ("data.distance=[20, 10]", "data.distance: must be [min, max]"),
        ("data.distance=[10]", "data.distance: must be [min, max]"),
        ("data.shapes=9", "data.shapes: must be between 2 and 8"),
        ("data.noise=-1", "data.noise: must not be negative"),
        ("data.noise=null", "data.noise: the longrange data set needs it"),
        ("data.num_classes=3", "data: longrange images have 1 channel and 2 classes"),
    ],
)
def test_bad_longrange_settings_name_the_key(override: str, message: str) -> None:
    from gsa_cli import ConfigError, load_preset

    with pytest.raises(ConfigError) as caught:
        load_preset("longrange", overrides=[override])
    assert f"--set {override}: {message}" in str(caught.value)


def test_longrange_options_are_refused_for_other_data_sets() -> None:
    from gsa_cli import ConfigError, load_preset

    with pytest.raises(ConfigError, match=r"data\.distance: only the longrange data set takes it"):
        load_preset("smoke", overrides=["data.distance=[5, 9]"])
