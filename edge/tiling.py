"""Frames cut into a tiled bundle's model inputs, the same way in training and on the box.

A tiled bundle (manifest ``tiling``, :class:`edge.protocol.Tiling`) looks at native pixels:
the frame's ROI is resized by ``scale`` (1.0 keeps the camera's pixels) and covered by a
grid of model-size tiles, plus, with ``whole_frame``, the whole ROI squeezed to one tile
for defects that are about the whole part. Training cuts its crops and its evaluation
frames with these functions, so the box sees exactly what the model was scored on.

Grid rule: along a side of L scaled pixels, n = 1 + ceil((L - T) / (T * (1 - overlap)))
tiles of T pixels, spread evenly from 0 to L - T (rounded to whole pixels), so the first
and last tiles touch the edges and neighbours overlap by at least ``overlap`` of a tile.

Decision rule (manifest ``tiling.rule``): ``max``, the part's score is its worst input's;
``fused``, the part's defect logit is the worst tile's plus ``whole_weight`` times the whole
view's, so a part whose tiles look slightly off and whose whole view looks slightly off
together outranks one with a single odd tile. Training chooses the rule and the weight on
held-out scores (docs/training.md, "Decision rule").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge.exceptions import ImageError
from edge.preprocess import to_color_mode
from edge.protocol import Tiling

# Smallest tile side a model can learn from (three 2x2 poolings leave a 2x2 map).
MIN_TILE = 16

Box = tuple[int, int, int, int]  # x, y, width, height in frame pixels

# The fused rule takes logits of scores clipped to half an int8 output step (1/256) from 0
# and 1: a saturated input counts as what the int8 model can tell apart, not as infinity.
SCORE_CLIP = 1.0 / 512.0


def positions(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one side (see the module docstring)."""
    if length < tile:
        raise ValueError(f"side {length} is shorter than the tile {tile}")
    if length == tile:
        return [0]
    stride = max(1.0, tile * (1.0 - overlap))
    n = 1 + math.ceil((length - tile) / stride)
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one frame size lie: in scaled pixels and as frame boxes."""

    scaled_size: tuple[int, int]  # width, height of the scaled ROI
    offsets: tuple[tuple[int, int], ...]  # each tile's x, y in scaled pixels
    boxes: tuple[Box, ...]  # each input's box in frame pixels; the whole view last when present
    whole_frame: bool

    @property
    def count(self) -> int:
        """Model inputs per frame: the tiles, plus the whole view."""
        return len(self.offsets) + int(self.whole_frame)


def roi_box(frame_width: int, frame_height: int, tiling: Tiling) -> Box:
    """The ROI in frame pixels (the whole frame without one); :class:`ImageError` when the
    frame is smaller than the ROI."""
    if tiling.roi is None:
        return (0, 0, frame_width, frame_height)
    x, y, w, h = tiling.roi
    if x + w > frame_width or y + h > frame_height:
        raise ImageError(
            f"the {frame_width}x{frame_height} frame is smaller than the model's ROI {list(tiling.roi)} "
            "(x, y, width, height); use the camera resolution the model was trained for"
        )
    return (x, y, w, h)


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A width x height ROI's size after scaling (at least one pixel each way)."""
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def grid_for(frame_width: int, frame_height: int, tiling: Tiling) -> TileGrid:
    """The tiles of a frame of this size; :class:`ImageError` when a tile does not fit."""
    rx, ry, rw, rh = roi_box(frame_width, frame_height, tiling)
    sw, sh = scaled_size(rw, rh, tiling.scale)
    if sw < tiling.width or sh < tiling.height:
        raise ImageError(
            f"a {rw}x{rh} picture at scale {tiling.scale:g} is {sw}x{sh}, smaller than one "
            f"{tiling.width}x{tiling.height} tile; use a smaller --tile or a larger --scale"
        )
    xs = positions(sw, tiling.width, tiling.overlap)
    ys = positions(sh, tiling.height, tiling.overlap)
    fx, fy = rw / sw, rh / sh  # frame pixels per scaled pixel
    offsets = tuple((x, y) for y in ys for x in xs)
    boxes = [
        (rx + int(round(x * fx)), ry + int(round(y * fy)), int(round(tiling.width * fx)), int(round(tiling.height * fy)))
        for x, y in offsets
    ]
    if tiling.whole_frame:
        boxes.append((rx, ry, rw, rh))
    return TileGrid((sw, sh), offsets, tuple(boxes), tiling.whole_frame)


def scaled_roi(image: np.ndarray, tiling: Tiling, color_mode: str) -> np.ndarray:
    """The frame's ROI, colour-converted and resized by ``scale``: uint8 (H, W, C)."""
    x, y, w, h = roi_box(image.shape[1], image.shape[0], tiling)
    out = to_color_mode(image[y : y + h, x : x + w], color_mode)
    sw, sh = scaled_size(w, h, tiling.scale)
    if (sw, sh) != (w, h):
        # INTER_AREA averages when shrinking (a thin line fades instead of vanishing
        # between samples); enlarging uses bilinear.
        interp = cv2.INTER_AREA if tiling.scale < 1.0 else cv2.INTER_LINEAR
        out = cv2.resize(out, (sw, sh), interpolation=interp)
    return out if out.ndim == 3 else out[:, :, None]


def whole_view(scaled: np.ndarray, tiling: Tiling) -> np.ndarray:
    """The whole scaled ROI squeezed to one tile: uint8 (tile H, tile W, C)."""
    out = cv2.resize(scaled, (tiling.width, tiling.height), interpolation=cv2.INTER_AREA)
    return out if out.ndim == 3 else out[:, :, None]


def cut(image: np.ndarray, tiling: Tiling, color_mode: str, out: np.ndarray | None = None) -> tuple[np.ndarray, TileGrid]:
    """A frame -> (uint8 batch (N, tile H, tile W, C) of every model input, its grid).

    ``out`` may be a batch from an earlier frame of the same size; it is reused to spare
    an allocation per frame.
    """
    scaled = scaled_roi(image, tiling, color_mode)
    grid = grid_for(image.shape[1], image.shape[0], tiling)
    th, tw, c = tiling.height, tiling.width, scaled.shape[2]
    if out is None or out.shape != (grid.count, th, tw, c):
        out = np.empty((grid.count, th, tw, c), dtype=np.uint8)
    for i, (x, y) in enumerate(grid.offsets):
        out[i] = scaled[y : y + th, x : x + tw]
    if grid.whole_frame:
        out[-1] = whole_view(scaled, tiling)
    return out, grid


def score_logits(scores: np.ndarray) -> np.ndarray:
    """Defect scores -> their logits, clipped by SCORE_CLIP."""
    s = np.clip(np.asarray(scores, dtype=np.float64), SCORE_CLIP, 1.0 - SCORE_CLIP)
    return np.log(s) - np.log1p(-s)


def rule_scores(parts: np.ndarray, tiling: Tiling) -> np.ndarray:
    """Each part's score by the tiling's rule, from (N, 2) rows of (worst tile's score,
    whole view's score); without a whole view the second column is ignored."""
    parts = np.asarray(parts, dtype=np.float64).reshape(-1, 2)
    if not tiling.whole_frame:
        return parts[:, 0].copy()
    if tiling.rule == "max":
        return parts.max(axis=1)
    z = score_logits(parts[:, 0]) + tiling.whole_weight * score_logits(parts[:, 1])
    return 1.0 / (1.0 + np.exp(-z))


def part_score(scores: np.ndarray, tiling: Tiling) -> tuple[float, int]:
    """A part's score from all its inputs' scores (in :func:`cut`'s order), and the input
    that decided it (its box goes with the result): the worst tile, or the whole view when
    it counts for more."""
    scores = np.asarray(scores, dtype=np.float64)
    if not tiling.whole_frame:
        worst = int(np.argmax(scores))
        return float(scores[worst]), worst
    worst = int(np.argmax(scores[:-1]))
    score = float(rule_scores(np.array([scores[worst], scores[-1]]), tiling)[0])
    if tiling.rule == "max":
        whole_counts = scores[-1] > scores[worst]
    else:
        whole_counts = tiling.whole_weight * score_logits(scores[-1:])[0] > score_logits(scores[worst : worst + 1])[0]
    return score, len(scores) - 1 if whole_counts else worst


def parse_tile(text: str) -> tuple[int, int]:
    """'WxH' (or one number for a square) -> (width, height); ValueError when malformed."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        if len(parts) == 1:
            w = h = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"tile {text!r} is not WIDTHxHEIGHT, e.g. 128x128") from None
    if w < MIN_TILE or h < MIN_TILE:
        raise ValueError(f"tile {w}x{h} is smaller than {MIN_TILE}x{MIN_TILE} pixels")
    return w, h


__all__ = [
    "MIN_TILE",
    "SCORE_CLIP",
    "Box",
    "TileGrid",
    "cut",
    "grid_for",
    "parse_tile",
    "part_score",
    "positions",
    "roi_box",
    "rule_scores",
    "scaled_roi",
    "score_logits",
    "whole_view",
]
