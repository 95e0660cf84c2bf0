"""Defect transplant: more defect examples from the masked defects a set already has.

A plant starts with tens of defect pictures. Where a defect has a mask, its defect can be
moved onto good parts (CutPaste-style), so the network sees the same kind of mark on many
backgrounds instead of learning the few pictures it came on (docs/training.md, "Defect
transplant").

How one input is made:

- The donor is a defect input whose known mask covers some, but at most
  MAX_DEFECT_SHARE, of it (a shading defect that covers the whole part has no background
  to lift it from, so it does not move).
- Its defect layer is the donor divided by the donor with the defect painted out
  (``cv2.inpaint`` over the mask grown by GROW_PX): a gain per pixel, 1 on clean surface.
  A gain, not a difference, so a dark crack stays as dark relative to a brighter part.
- The layer multiplies a random good input, at the defect's own place, under a feathered
  edge (FEATHER_PX). The place is kept: a break or a fray sits at the part's edge, and a
  mark moved into the middle of the face is a defect no line shows (moving it measured
  worse; docs/benchmarks.md, "Defect transplant"). Turns come from the training step's
  augmentation, which moves every input and its mask alike.
- The new input has the donor's class and mask, which trains the defect map.

Only the training inputs are used, donors and hosts alike; validation is never touched.
The same inputs and seed give the same transplants.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# A mask pixel at this coverage or more is defect (as training/tiles.py COVERAGE).
COVERAGE = 0.25
# Donors whose defect covers more of the input than this do not move (shading).
MAX_DEFECT_SHARE = 0.25
GROW_PX = 2  # the painted-out region reaches this far past the mask
INPAINT_RADIUS = 3
FEATHER_PX = 1.0  # sigma of the layer's edge blend
GAIN_RANGE = (0.1, 10.0)  # a dark background must not turn a faint mark into a glare
# "auto": top the masked defects up to AUTO_DEFECTS, at most AUTO_MAX_PER_DONOR new per donor.
# It measured best where a set has a few dozen (docs/benchmarks.md, "Defect transplant");
# a set with hundreds gains nothing from it and would only train longer.
AUTO_DEFECTS = 200
AUTO_MAX_PER_DONOR = 4


@dataclass(frozen=True)
class Transplants:
    """New training inputs: pixels like the inputs given, classes, masks."""

    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DefectLayer:
    """One donor's defect as a gain over its background, with the blend weight and mask."""

    gain: np.ndarray  # float32 (H, W, C)
    alpha: np.ndarray  # float32 (H, W): 1 on the defect, feathered to 0 around it
    mask: np.ndarray  # float32 (H, W) coverage, as given

    def onto(self, host: np.ndarray) -> np.ndarray:
        """The host (H, W, C) pixel levels 0-255, float, with this defect."""
        weight = self.alpha[..., None]
        return np.clip(host * (1.0 + weight * (self.gain - 1.0)), 0.0, 255.0)


def _levels(x: np.ndarray) -> np.ndarray:
    """Inputs as float32 pixel levels 0-255 (uint8 pixels, or floats in [0, 1])."""
    return x.astype(np.float32) if x.dtype == np.uint8 else x.astype(np.float32) * 255.0


def _like(levels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.round(levels).astype(np.uint8)
    return (levels / 255.0).astype(dtype)


def defect_layer(image: np.ndarray, mask: np.ndarray) -> DefectLayer:
    """The defect layer of one donor: ``image`` (H, W, C) levels 0-255, ``mask`` (H, W) coverage."""
    defect = (mask >= COVERAGE).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * GROW_PX + 1, 2 * GROW_PX + 1))
    grown = cv2.dilate(defect, kernel)
    pixels = np.round(image).astype(np.uint8)
    background = cv2.inpaint(pixels, grown, INPAINT_RADIUS, cv2.INPAINT_TELEA).reshape(pixels.shape)
    gain = np.clip((image + 1.0) / (background.astype(np.float32) + 1.0), *GAIN_RANGE).astype(np.float32)
    alpha = np.maximum(cv2.GaussianBlur(grown.astype(np.float32), (0, 0), FEATHER_PX), defect.astype(np.float32))
    return DefectLayer(gain=gain, alpha=np.clip(alpha, 0.0, 1.0), mask=mask.astype(np.float32))


def donors(y: np.ndarray, masks: np.ndarray, known: np.ndarray, pass_class: int) -> np.ndarray:
    """Indices of the inputs that can give their defect (see the module docstring)."""
    share = (masks >= COVERAGE).reshape(len(y), -1).mean(axis=1)
    return np.flatnonzero((y != pass_class) & known & (share > 0) & (share <= MAX_DEFECT_SHARE))


def auto_count(n_donors: int) -> int:
    """How many transplants "auto" makes for ``n_donors`` donors."""
    return min(AUTO_MAX_PER_DONOR * n_donors, max(0, AUTO_DEFECTS - n_donors))


def transplant(
    x: np.ndarray,
    y: np.ndarray,
    masks: np.ndarray,
    known: np.ndarray,
    pass_class: int,
    *,
    per_donor: float | str,
    seed: int,
) -> Transplants:
    """``round(per_donor x donors)`` new defect inputs (``per_donor`` "auto": :func:`auto_count`),
    each a donor's defect on a random good input. ``x`` (N, H, W, C) uint8 or float in
    [0, 1]; ``masks`` (N, H, W); ``known`` (N,)."""
    given = donors(y, masks, known, pass_class)
    hosts = np.flatnonzero(y == pass_class)
    count = auto_count(len(given)) if per_donor == "auto" else int(round(float(per_donor) * len(given)))
    if count == 0 or len(hosts) == 0:
        return Transplants(x[:0].copy(), y[:0].copy(), masks[:0].copy())
    rng = np.random.default_rng([seed, 7411])
    layers: dict[int, DefectLayer] = {}
    out_x, out_y, out_m = [], [], []
    for k in range(count):
        donor = int(given[k % len(given)])
        if donor not in layers:
            layers[donor] = defect_layer(_levels(x[donor]), masks[donor])
        layer = layers[donor]
        host = int(hosts[int(rng.integers(len(hosts)))])
        out_x.append(_like(layer.onto(_levels(x[host])), x.dtype))
        out_y.append(y[donor])
        out_m.append(layer.mask)
    return Transplants(np.stack(out_x), np.array(out_y, dtype=y.dtype), np.stack(out_m).astype(masks.dtype))
