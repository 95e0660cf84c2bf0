"""Frames cut into a tiled bundle's model inputs, the same way in training and on the box.

A tiled bundle (manifest ``tiling``, :class:`edge.protocol.Tiling`) looks at native pixels:
the frame's ROI is resized by ``scale`` (1.0 keeps the camera's pixels) and covered by a
grid of model-size tiles, plus, with ``whole_frame``, the whole ROI squeezed to one tile
for defects that are about the whole part. Training cuts its crops and its evaluation
frames with these functions, so the box sees exactly what the model was scored on.

Grid rule: along a side of L scaled pixels, n = 1 + ceil((L - T) / (T * (1 - overlap)))
tiles of T pixels, spread evenly from 0 to L - T (rounded to whole pixels), so the first
and last tiles touch the edges and neighbours overlap by at least ``overlap`` of a tile.
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


__all__ = ["MIN_TILE", "Box", "TileGrid", "cut", "grid_for", "parse_tile", "positions", "roi_box", "scaled_roi", "whole_view"]
