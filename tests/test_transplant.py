"""Defect transplant (training/transplant.py): a masked defect moved onto good inputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training.transplant import MAX_DEFECT_SHARE, defect_layer, donors, transplant

SIDE = 32


def _textured(rng: np.random.Generator, level: float) -> np.ndarray:
    return np.clip(rng.normal(level, 4.0, (SIDE, SIDE, 1)), 0, 255).astype(np.uint8)


def _set(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two defect inputs (a dark bar at 60 % of a mid-grey part; the second without a
    mask), one shading defect, and three good inputs of different brightness."""
    x = np.stack([_textured(rng, 120), _textured(rng, 120), _textured(rng, 120),
                  _textured(rng, 60), _textured(rng, 120), _textured(rng, 200)])
    masks = np.zeros((6, SIDE, SIDE), np.float32)
    masks[0, 10:12, 5:20] = 1.0
    x[0, 10:12, 5:20] = (x[0, 10:12, 5:20] * 0.6).astype(np.uint8)
    masks[2, :, :] = 1.0  # shading across the whole part: nothing to lift it from
    y = np.array([1, 1, 1, 0, 0, 0])
    known = np.array([True, False, True, True, True, True])
    return x, y, masks, known


def test_only_masked_local_defects_give_their_defect() -> None:
    x, y, masks, known = _set(np.random.default_rng(0))
    assert list(donors(y, masks, known, pass_class=0)) == [0]
    masks[2, :, :] = 0.0
    masks[2, :SIDE // 2, :] = 1.0  # half the part is more than MAX_DEFECT_SHARE
    assert MAX_DEFECT_SHARE < 0.5 and list(donors(y, masks, known, pass_class=0)) == [0]


def test_a_transplant_is_the_donors_mark_in_its_place_on_a_good_input() -> None:
    x, y, masks, known = _set(np.random.default_rng(1))
    out = transplant(x, y, masks, known, 0, per_donor=12, seed=3)
    assert len(out) == 12 and out.x.dtype == np.uint8 and out.x.shape == (12, SIDE, SIDE, 1)
    assert set(out.y.tolist()) == {1}
    goods = x[3:].astype(np.float32)
    defect = masks[0] >= 0.25
    far = cv2.dilate(defect.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
    hosts = set()
    for pixels, mask in zip(out.x.astype(np.float32), out.masks, strict=True):
        assert np.array_equal(mask, masks[0])  # the bar where it was on its part
        # it sits on one of the good inputs: equal to that host away from the bar
        host = int(np.argmin([np.abs(pixels[far] - g[far]).mean() for g in goods]))
        assert np.abs(pixels[far] - goods[host][far]).max() <= 1.0
        hosts.add(host)
        # and the bar is darker than its host by about the donor's 60 %, whatever the host's level
        ratio = pixels[defect].mean() / goods[host][defect].mean()
        assert 0.5 < ratio < 0.7
    assert hosts == {0, 1, 2}  # dark, mid-grey and bright parts alike


def test_transplant_is_seeded_and_keeps_float_inputs_in_range() -> None:
    x, y, masks, known = _set(np.random.default_rng(2))
    a = transplant(x, y, masks, known, 0, per_donor=4, seed=0)
    b = transplant(x, y, masks, known, 0, per_donor=4, seed=0)
    c = transplant(x, y, masks, known, 0, per_donor=4, seed=1)
    assert np.array_equal(a.x, b.x) and not np.array_equal(a.x, c.x)
    floats = transplant(x.astype(np.float32) / 255.0, y, masks, known, 0, per_donor=4, seed=0)
    assert floats.x.dtype == np.float32 and floats.x.min() >= 0.0 and floats.x.max() <= 1.0
    assert np.abs(floats.x * 255.0 - a.x).max() <= 0.5 + 1e-3


def test_nothing_to_transplant_gives_nothing() -> None:
    x, y, masks, known = _set(np.random.default_rng(3))
    assert len(transplant(x, y, masks, known, 0, per_donor=0, seed=0)) == 0
    assert len(transplant(x, y, masks, np.zeros(6, bool), 0, per_donor=2, seed=0)) == 0  # no masks
    assert len(transplant(x[:3], y[:3], masks[:3], known[:3], 0, per_donor=2, seed=0)) == 0  # no good input


@pytest.mark.parametrize("shape", [(SIDE, SIDE, 1), (SIDE, SIDE, 3)])
def test_the_defect_layer_is_one_on_clean_surface(shape: tuple[int, int, int]) -> None:
    image = np.full(shape, 100.0, np.float32)
    mask = np.zeros(shape[:2], np.float32)
    mask[5:7, 5:25] = 1.0
    image[5:7, 5:25] = 50.0
    layer = defect_layer(image, mask)
    assert layer.gain.shape == shape
    assert np.allclose(layer.gain[20:], 1.0) and np.allclose(layer.alpha[20:], 0.0)
    assert np.all(layer.alpha[5:7, 5:25] == 1.0) and np.allclose(layer.gain[5:7, 5:25], 51 / 101, atol=0.02)
