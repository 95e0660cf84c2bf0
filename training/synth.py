"""Synthetic part surfaces, with and without scratches, deterministic for a seed.

What it draws, per image (gray, ``size`` x ``size``, 160 by default):

- a surface: brushed metal (linear or circular/turned streaks), glossy screen glass
  (smooth, with reflections and glare) or matte plastic (fine grain, mottling);
- lighting: a linear and/or radial gain gradient, specular glare blobs (elongated
  across the brushing on metal, saturating on glass), an exposure gain;
- part geometry in both classes: nothing, a straight edge, a corner or a round edge
  against the background (conveyor or backlit fixture), with a chamfer and a shadow,
  sometimes a hole;
- debris in both classes: dust specks (small dark or bright dots) and fibres (short,
  thin, low-contrast, curly strokes: they must not be what tells the classes apart);
- scratches (scratch class only): 1-3 thin low-curvature strokes (cubic Bezier or a
  random walk), 1-3 px wide at 160 px, 15-90 % of the image long, dark or bright,
  tapered, sometimes broken, sometimes with a bright lip beside the groove; about 15 %
  of scratched images are faint (drawn at 2.5-4.5 sigmas of the sensor noise and texture
  detail they sit on, at least ~6 grey levels: visible to a person, hard for a model);
  every scratch kept is at or above the visibility floor (below);
- optics and sensor: a slight defocus, Gaussian read noise plus shot noise.

Scratch visibility (SYNTH_VERSION 4): every scratch's contrast-to-noise ratio (CNR) is
measured in the rendered picture, where the model looks, at its default input of 128 px:

1. The part is rendered with and without its scratches: same texture, edges, dust,
   lighting, defocus and sensor-noise draw, so the difference is the scratch alone.
   Both uint8 pictures are area-resized to 128x128 (cv2.INTER_AREA, as training and the
   edge resize them).
2. Path: the pixels the scratch (with its lip) covers by at least a quarter at 128 px
   (its coverage, area-resized).
3. Signal: the mean absolute grey-level difference of the two pictures over the path's
   32 most changed pixels (about a 16-24 px stretch of a thin scratch). A path of fewer
   pixels counts the missing ones as unchanged: a person finds a long faint line sooner
   than a short one of the same contrast, and a speck of a scratch is not a scratch.
4. Noise: the fine detail of the clean picture at 128 px, i.e. the picture minus its
   Gaussian blur (sigma 2 px), which holds the sensor noise left after resizing and the
   texture's grain and brush streaks; its robust standard deviation (1.4826 x the median
   absolute deviation, so that a part edge, hole ring or dust speck beside the path does
   not count as noise) over the pixels within 6 px of the path (a 13x13 square around
   each), and at least 0.5 grey levels.
5. CNR = signal / noise. Where two scratches cross, the crossing counts for both.

VISIBILITY_FLOOR is 2.5, where a viewer starts to find nearly every scratch: in a blind
check by the implementer on 128 px pictures shown at 2x (about half of them the same part
without its scratch), 0 of 3 scratches with CNR 1.5-2 were found, 4 of 6 at 2-2.5, 8 of
9 at 2.5-3 and 6 of 7 at 3-3.5 (the miss under glare), with 1 false alarm in 35 clean
pictures (docs/training.md, Scratch visibility). First draws of the default set (seed 0,
2000 images, 1000 scratched): CNR of each image's most visible scratch 1st / 5th / 50th
/ 90th percentile 1.8 / 3.0 / 9.3 / 21.7, and 28 images below 2.5 (19 of them faint).
A scratch below the floor is left out of the picture (it was drawn with the others, so
the part is rendered again without it); a part none of whose scratches reaches it is
drawn again, up to _VISIBLE_ATTEMPTS times, then written as the clean picture into the
pass class and marked ``"relabelled"``. In that set 29 parts were drawn again, 34
scratches left out, none relabelled. synth.json gives each scratched image its
``visibility`` (its most visible scratch's CNR) and each scratch its own; its top-level
``visibility`` holds the floor and the counts; ``train eval`` reports recall per band of
it (:func:`recall_by_visibility`).

High-resolution frames (``train synth --size WxH``, :func:`render_frame_and_mask`): whole
camera frames for a model that looks at native-resolution tiles. A part (a plate with
rounded corners and mounting holes, or a disc with a bore and bolt holes; 27-72 % of a
16:9 frame, turned a little) lies on a conveyor belt (rubber or PVC grain, streaks along the
travel, seams, sometimes guide rails), with a chamfer at its edge and a soft shadow; the
same three surfaces at native scale (fine brushing or turned rings, glass with glare and
haze, matte grain); a lighting gradient, ring-light fall-off and glare; harmless marks in
both classes: dust specks, curly fibres, faint smudges and sometimes an etched part
number (thin strokes, but letters). Scratches are 1-3 px wide at the frame's own
resolution (groove and lip together), FRAME_SCRATCH_LENGTH (40-400 px at 1920x1080,
scaled with the shorter side), dark or bright, each drawn for a CNR between 2 (faint) and
40 (clear). Visibility follows the same definition and floor, measured at scale 1.0 (no
resize: what a tiled model sees; the 6 px noise band, sigma-2 detail and 32 signal pixels
are native pixels). Squeezed to 128 px, 78 of 80 scratched 1920x1080 frames (seed 7)
have no scratch at or above the floor. The mask marks pixels the scratch covers by at
least half (FRAME_MASK_COVERAGE), where the picture shows it. A frame is rendered once;
each draw of its scratches is finished (defocus, sensor noise) on a crop around them,
which gives the whole frame's values bit for bit. About 0.15 s of one core per
1920x1080 frame plus 20 ms of PNG writing.

Strokes are drawn at 4x on a small canvas around them and area-downsampled (that is
the anti-aliasing, and widths below a pixel come out right); dust specks come from
precomputed anti-aliased sprites. Scratches draw from their own random stream, so the
same generator state renders the same part with or without its scratches.

Everything is numpy + OpenCV (no TensorFlow) so the demo can render videos quickly.
Each image ``i`` of a dataset is drawn from its own generator,
``numpy.random.default_rng([seed, i])``, so one image can be regenerated alone. Files
are byte-identical for a seed with a given OpenCV/numpy install (PNG encoding and
numpy's generators are stable, but a different libpng may pack bytes differently).

Videos: :func:`render_video` writes an inspection video of parts passing on a conveyor.
The container is chosen from the file suffix: ``.avi`` and ``.mkv`` use MJPG, ``.mp4``
uses ``mp4v``; these three write and read back frame-exact with opencv-python-headless
here (its FFmpeg has no H.264 encoder, so ``avc1`` is not offered).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from edge.exceptions import CameraError, ImageError
from training.dataset import MASKS_FOLDER

logger = logging.getLogger(__name__)

SYNTH_VERSION = 5  # 2: defect masks in masks/<class>/; 3: every scratch visible in the picture;
# 4: every scratch at or above VISIBILITY_FLOOR (CNR at 128 px), visibility in synth.json;
# 5: every fibre at least FIBRE_MIN_TORTUOSITY (no good part carries a scratch-like stroke)
PASS_LABEL = "ok"
DEFECT_LABEL = "scratch"
CLASSES = (PASS_LABEL, DEFECT_LABEL)
SURFACES = ("brushed_metal", "glass", "matte_plastic")
FAINT_FRACTION = 0.15
# Fibres are curly, scratches nearly straight: a fibre's path is at least this many times the
# distance between its ends. Drawn scratches stay under 1.08 (99th percentile) and never
# reach 1.2; before this rule 12 % of fibres were under 1.2, short straight strokes that
# no viewer can tell from a short scratch (docs/training.md, "Fibres are curly").
FIBRE_MIN_TORTUOSITY = 1.3
_FIBRE_ATTEMPTS = 50
# A mask pixel is a defect pixel where the scratch covers at least this much of it.
MASK_COVERAGE = 0.1
# A part whose scratches all stay below the visibility floor is drawn up to this many times.
_VISIBLE_ATTEMPTS = 6
# Scratch visibility (module docstring, "Scratch visibility"): a scratch's CNR at the
# default model input, measured on its path; below the floor it is not kept.
VISIBILITY_SIZE = 128
VISIBILITY_FLOOR = 2.5
RELABELLED = "scratch below visibility floor"
VISIBILITY_BAND_EDGES = (3.0, 5.0, 10.0)  # train eval's recall bands above the floor
_PATH_COVERAGE = 0.25  # a path pixel is covered this much by the scratch at 128 px
_SIGNAL_PIXELS = 32  # the signal: mean |difference| of the scratch's 32 most changed path pixels
_NOISE_RADIUS = 6  # px at 128 around the path where the noise is measured
_DETAIL_SIGMA = 2.0  # px at 128: the fine detail is the picture minus this Gaussian blur
_MIN_NOISE = 0.5  # grey levels: no scratch is measured against less than this
VIDEO_FOURCC = {".avi": "MJPG", ".mkv": "MJPG", ".mp4": "mp4v"}
# High-resolution frames (``--size WxH``, module docstring "High-resolution frames").
FRAME_MIN_SIDE = 64
FRAME_MAX_SIDE = 8192
FRAME_MAX_PIXELS = 40_000_000
FRAME_SCRATCH_LENGTH = (40.0, 400.0)  # px at 1920x1080; scaled with the frame's shorter side
FRAME_MASK_COVERAGE = 0.5  # a frame's mask pixel: its centre is (about) inside the scratch
FRAME_FAINT_CNR = 5.0  # a frame is "faint" when its most visible scratch is below this
FRAME_VISIBILITY_SCALE = 1.0  # frames: visibility measured at native resolution
_FRAME_REF_SIDE = 1080  # the shorter side FRAME_SCRATCH_LENGTH and other lengths are given at
_FRAME_PAD = 16  # px around a frame's scratches: defocus, noise band and detail blur stay inside
_FRAME_INNER = 8  # px around them the crop's own result is used (beyond: the clean frame's)

_SS = 4  # supersampling factor for strokes and dots
_SHIFT = 4  # cv2 fixed-point bits for sub-pixel coordinates
# Sensor noise leaves little for LZ matching: Huffman-only coding behind the AVG filter is
# 3x faster than zlib's default here and the files are smaller (~15 KB at 160 px).
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1,
               cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
# Masks of high-resolution frames are nearly all zero, which Huffman-only coding cannot
# shrink (260 KB at 1920x1080, 13 ms); zlib level 1 without a filter: 10 KB in 3 ms.
_MASK_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # recent OpenCV only; older ones use adaptive filters
    _PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG]
    _MASK_PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
_FILE_RE = re.compile(r"^(ok|scratch)_\d+\.png$")

Rng = np.random.Generator


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), float32, read-only (shared between calls)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to the image centre in image widths (about -0.5..0.5)."""
    xx, yy = _grid(size)
    u, v = (xx - np.float32(size / 2)) / np.float32(size), (yy - np.float32(size / 2)) / np.float32(size)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def _lowfreq(rng: Rng, size: int, cells: int) -> np.ndarray:
    """Smooth noise with unit std and about ``cells`` blobs across."""
    coarse = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    coarse = (coarse - coarse.mean()) * np.float32(1.25 / (coarse.std() + 1e-6))
    # cubic upsampling keeps about 0.8 of the knots' std. Cubic to a quarter size, then
    # linear: as smooth to the eye, and a full-size cubic resize costs 8x more here.
    quarter = max(cells + 1, size // 4)
    mid = cv2.resize(coarse, (quarter, quarter), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(mid, (size, size), interpolation=cv2.INTER_LINEAR)


def _noise1d(rng: Rng, n: int, knots: int) -> np.ndarray:
    """Smooth 1-D noise of length ``n`` through ``knots`` random values."""
    xs = np.linspace(0.0, 1.0, knots)
    return np.interp(np.linspace(0.0, 1.0, n), xs, rng.standard_normal(knots)).astype(np.float32)


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)], dtype=np.float64)


def _stroke_box(pts: np.ndarray, widths: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) a :func:`_stroke` of these points and widths can
    touch, clipped to a ``width`` x ``height`` picture (empty when it lies outside)."""
    pad = float(widths.max()) + 2.0
    x0 = max(0, int(math.floor(pts[:, 0].min() - pad)))
    y0 = max(0, int(math.floor(pts[:, 1].min() - pad)))
    x1 = min(width, int(math.ceil(pts[:, 0].max() + pad)) + 1)
    y1 = min(height, int(math.ceil(pts[:, 1].max() + pad)) + 1)
    return x0, y0, x1, y1


def _stroke_in_box(box: tuple[int, int, int, int], pts: np.ndarray, widths: np.ndarray,
                   values: np.ndarray) -> np.ndarray:
    """:func:`_stroke` drawn on the pixels of ``box`` (x0, y0, x1, y1) only: an array of
    the box's size (the stroke must lie inside the box, see :func:`_stroke_box`)."""
    x0, y0, x1, y1 = box
    canvas = np.zeros(((y1 - y0) * _SS, (x1 - x0) * _SS), np.uint8)
    # pixel centres are at integers at 1x; a 4x pixel k has its centre at 1x (k + 0.5)/4 - 0.5
    q = np.round(((pts - (x0, y0)) * _SS + (_SS - 1) / 2) * (1 << _SHIFT))
    q = np.clip(q, -(1 << 26), 1 << 26).astype(np.int32)  # cv2 clips far-off points itself
    m = len(pts) - 1
    run = max(1, m // 12)
    starts = np.arange(0, m, run)
    counts = np.diff(np.append(starts, m))
    value = np.minimum(255, np.round(np.add.reduceat(values, starts) / counts * 255)).astype(int)
    thick = np.maximum(1, np.round(np.add.reduceat(widths, starts) / counts * _SS)).astype(int)
    for a, n, v, t in zip(starts.tolist(), counts.tolist(), value.tolist(), thick.tolist(), strict=True):
        if v > 0:
            cv2.polylines(canvas, [q[a:a + n + 1]], False, v, t, cv2.LINE_8, _SHIFT)
    small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) * np.float32(1 / 255)


def _stroke(size: int, pts: np.ndarray, widths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Anti-aliased polyline mask in [0, 1]: segment i has width ``widths[i]`` px and
    strength ``values[i]``.

    Drawn at 4x on the stroke's bounding box only and area-downsampled (that is the
    anti-aliasing); segments go in about a dozen runs of one width and strength, one
    ``cv2.polylines`` call each, since per-segment calls cost more than the drawing.
    """
    x0, y0, x1, y1 = box = _stroke_box(pts, widths, size, size)
    out = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    out[y0:y1, x0:x1] = _stroke_in_box(box, pts, widths, values)
    return out


@functools.lru_cache(maxsize=1)
def _dot_sprites() -> dict[tuple[int, int, int], np.ndarray]:
    """Anti-aliased discs, radius in 0.1 px steps, centre offset in 0.25 px steps (7x7)."""
    sprites: dict[tuple[int, int, int], np.ndarray] = {}
    yy, xx = np.mgrid[-3:4, -3:4].astype(np.float32)
    for r10 in range(3, 21):
        radius = r10 / 10
        for ox in range(4):
            for oy in range(4):
                dist = np.sqrt((xx - ox / 4) ** 2 + (yy - oy / 4) ** 2)
                cov = np.clip(np.float32(radius + 0.5) - dist, 0, 1)
                # discs under a pixel get their true area: tiny specks stay faint, not bloated
                area, total = math.pi * radius * radius, float(cov.sum())
                if area < total:
                    cov *= np.float32(area / total)
                cov.setflags(write=False)
                sprites[(r10, ox, oy)] = cov
    return sprites


def _dot(center: np.ndarray, radius: float, value: float, out: np.ndarray) -> None:
    """Max-combine an anti-aliased disc (radius 0.3-2 px) of strength ``value`` into
    ``out``, in place, from a precomputed sprite."""
    r10 = min(20, max(3, int(round(radius * 10))))
    fx, fy = math.floor(center[0] * 4 + 0.5) / 4, math.floor(center[1] * 4 + 0.5) / 4
    ix, iy = math.floor(fx), math.floor(fy)
    sprite = _dot_sprites()[(r10, int((fx - ix) * 4), int((fy - iy) * 4))]
    x0, y0 = ix - 3, iy - 3
    height, width = out.shape  # size x size for the square pictures
    sx0, sy0 = max(0, -x0), max(0, -y0)
    sx1, sy1 = min(7, width - x0), min(7, height - y0)
    if sx1 <= sx0 or sy1 <= sy0:
        return
    patch = out[y0 + sy0:y0 + sy1, x0 + sx0:x0 + sx1]
    np.maximum(patch, sprite[sy0:sy1, sx0:sx1] * np.float32(value), out=patch)


def _gauss_blob(size: int, center: np.ndarray, sx: float, sy: float, angle: float) -> np.ndarray:
    """Elliptical Gaussian (peak 1) with std ``sx`` along ``angle`` and ``sy`` across.

    Glare is smooth, so it is computed at half resolution and upsampled (4x fewer exps).
    """
    half = min(sx, sy) >= 4.0 and size % 2 == 0
    n = size // 2 if half else size
    scale = 2.0 if half else 1.0
    xx, yy = _grid(n)
    # half-resolution pixel centres sit at 2i + 0.5 in full-resolution pixels
    cx = (center[0] - (0.5 if half else 0.0)) / scale
    cy = (center[1] - (0.5 if half else 0.0)) / scale
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = (dx * c + dy * s) * np.float32(scale / sx)
    v = (dy * c - dx * s) * np.float32(scale / sy)
    blob = np.exp(np.float32(-0.5) * (u * u + v * v))
    return cv2.resize(blob, (size, size), interpolation=cv2.INTER_LINEAR) if half else blob


# --------------------------------------------------------------------------- surfaces


def _streaks(rng: Rng, size: int, angle: float) -> np.ndarray:
    """Brushing streaks along ``angle``, unit std.

    The streaks live in a small table (knots along x one value per pixel across); one
    inverse affine warp stretches it along the streaks and rotates it, so nothing is
    drawn at full size before the warp.
    """
    k = size / 160.0
    n = int(math.ceil(size * 1.45)) + 2  # the image diagonal, across
    rows = max(4, n // 14)
    # long fine streaks (6 knots along), short segments (one knot per 14 px), wide bands
    table: np.ndarray = cv2.resize(rng.standard_normal((6, n), dtype=np.float32), (n, rows),
                                   interpolation=cv2.INTER_LINEAR)
    table = table + 0.6 * rng.standard_normal((rows, n), dtype=np.float32)
    table = cv2.GaussianBlur(table, (2 * int(math.ceil(1.35 * k)) + 1, 1), 0.45 * k)  # soft across
    table = table + 0.8 * cv2.resize(rng.standard_normal((3, max(2, n // 8)), dtype=np.float32), (n, rows),
                              interpolation=cv2.INTER_CUBIC)
    c = (size - 1) / 2
    ca, sa = math.cos(angle), math.sin(angle)
    ax, ay = 1.0, (rows - 1) / (n - 1)
    # destination pixel -> table coordinates (across, along), both centred
    m = np.array([[-sa * ax, ca * ax, (n - 1) / 2 * ax - c * (ca - sa) * ax],
                  [ca * ay, sa * ay, (n - 1) / 2 * ay - c * (ca + sa) * ay]])
    tex = cv2.warpAffine(table, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    return tex * np.float32(1.0 / (tex.std() + 1e-6))



def _texture(rng: Rng, size: int, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Flat-lit surface texture in [0, 1] (float32) and what was drawn."""
    k = size / 160.0
    info: dict[str, Any] = {"surface": kind}
    if kind == "brushed_metal":
        base = rng.uniform(0.4, 0.72)
        angle = rng.uniform(0.0, math.pi)
        info["brush_angle"] = angle
        if rng.random() < 0.25:  # turned (lathe) finish: concentric arcs from an off-image centre
            info["brush"] = "circular"
            xx, yy = _grid(size)
            dist = rng.uniform(0.7, 3.0) * size
            cx, cy = size / 2 + dist * math.cos(angle), size / 2 + dist * math.sin(angle)
            r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            n = int(r.max()) + 3
            prof = rng.standard_normal(n, dtype=np.float32)
            prof = 0.7 * prof + 0.3 * cv2.GaussianBlur(prof[None, :], (0, 0), 2.0)[0] * 2.0
            prof += 0.8 * _noise1d(rng, n, max(3, n // 12))
            streaks = np.interp(r, np.arange(n, dtype=np.float32), prof).astype(np.float32)
            streaks *= 1.0 + 0.35 * _lowfreq(rng, size, 3)
            tex = streaks / (streaks.std() + 1e-6)
            info["brush_angle"] = angle + math.pi / 2  # highlights run along the radius
        else:
            info["brush"] = "linear"
            tex = _streaks(rng, size, angle)
        amp = rng.uniform(0.02, 0.055)
        surface = base * (1.0 + amp * tex) + 0.02 * _lowfreq(rng, size, 3)
    elif kind == "glass":
        base = rng.uniform(0.06, 0.4)
        surface = np.full((size, size), base, np.float32)
        surface += rng.uniform(0.004, 0.015) * _lowfreq(rng, size, int(rng.integers(3, 7)))
        # a smudge or two: low, blotchy haze
        for _ in range(int(rng.integers(0, 3))):
            haze = np.clip(_lowfreq(rng, size, 5) - 0.8, 0, None)
            surface += rng.uniform(0.01, 0.04) * haze
        surface += 0.003 * rng.standard_normal((size, size), dtype=np.float32)
    elif kind == "matte_plastic":
        base = rng.uniform(0.15, 0.7)
        # uniform noise is 4x cheaper to draw than normal, and blurred it is as good as normal
        grain: np.ndarray = cv2.GaussianBlur(rng.random((size, size), dtype=np.float32), (0, 0),
                                             rng.uniform(0.6, 1.2) * k)
        grain = (grain - grain.mean()) * np.float32(1 / (grain.std() + 1e-6))
        mottle = _lowfreq(rng, size, int(rng.integers(5, 12)))
        surface = base * (1.0 + rng.uniform(0.025, 0.07) * grain + rng.uniform(0.01, 0.035) * mottle)
    else:
        raise ValueError(f"unknown surface kind {kind!r}; use one of {', '.join(SURFACES)}")
    info["base"] = round(float(base), 3)
    return surface.astype(np.float32), info


def _lighting(rng: Rng, size: int, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Multiplicative gain map and additive glare map."""
    u, v = _unit_grid(size)
    kind = info["surface"]
    gain = np.ones((size, size), np.float32)
    mode = rng.choice(["linear", "radial", "both"], p=[0.5, 0.3, 0.2])
    if mode in ("linear", "both"):
        d = _unit(rng.uniform(0, 2 * math.pi))
        gain += np.float32(rng.uniform(0.1, 0.5)) * (u * np.float32(d[0]) + v * np.float32(d[1]))
    if mode in ("radial", "both"):
        c = rng.uniform(-0.4, 0.4, 2)
        r2 = (u - np.float32(c[0])) ** 2 + (v - np.float32(c[1])) ** 2
        gain *= 1.0 + np.float32(rng.uniform(0.15, 0.5)) * (np.float32(0.25) - r2)
    gain *= np.float32(rng.uniform(0.85, 1.15))  # exposure
    gain = np.clip(gain, 0.3, None)

    glare = np.zeros((size, size), np.float32)
    if kind == "glass":
        n = int(rng.choice([0, 1, 1, 2]))
        band_dir = rng.uniform(0, math.pi)
        d = _unit(band_dir)
        off = rng.uniform(-0.4, 0.4)
        width = rng.uniform(0.12, 0.45)
        t = (u * np.float32(d[0]) + v * np.float32(d[1]) - np.float32(off)) * np.float32(1 / width)
        glare += np.float32(rng.uniform(0.04, 0.22)) * np.exp(-t * t)
        if rng.random() < 0.35:  # soft reflection of a window or lamp panel
            c = rng.uniform(0.15, 0.85, 2) * size
            rect: np.ndarray = np.zeros((size, size), np.float32)
            w, h = rng.uniform(0.15, 0.5, 2) * size
            box = ((float(c[0]), float(c[1])), (float(w), float(h)), float(rng.uniform(0, 180)))
            cv2.fillPoly(rect, [cv2.boxPoints(box).astype(np.int32)], 1.0)
            rect = cv2.GaussianBlur(rect, (0, 0), rng.uniform(3, 9) * size / 160)
            glare += np.float32(rng.uniform(0.04, 0.14)) * rect
        amp_range, s_range = (0.25, 0.9), (0.04, 0.14)
    elif kind == "brushed_metal":
        n = int(rng.choice([0, 1, 1, 2]))
        amp_range, s_range = (0.08, 0.45), (0.03, 0.1)
    else:
        n = int(rng.choice([0, 0, 1]))
        amp_range, s_range = (0.03, 0.12), (0.12, 0.3)
    for _ in range(n):
        c = rng.uniform(-0.1, 1.1, 2) * size
        s = rng.uniform(*s_range) * size
        if kind == "brushed_metal":  # anisotropic reflection: stretched across the brushing
            blob = _gauss_blob(size, c, s, s * rng.uniform(3, 8), info["brush_angle"])
        else:
            blob = _gauss_blob(size, c, s, s * rng.uniform(1, 2.5), rng.uniform(0, math.pi))
        glare += np.float32(rng.uniform(*amp_range)) * blob
    return gain, glare, n


# --------------------------------------------------------------------------- geometry


def _coverage(d: np.ndarray) -> float:
    return float((d[::4, ::4] > 0).mean())


def _geometry(rng: Rng, size: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Signed distance in px to the part's outline (positive on the part), or None when
    the whole view is the part's face."""
    xx, yy = _grid(size)
    kind = rng.choice(["none", "straight", "corner", "round"], p=[0.45, 0.25, 0.15, 0.15])
    info: dict[str, Any] = {"edge": str(kind), "hole": False}
    d: np.ndarray | None = None
    centre = np.array([size / 2, size / 2])
    if kind == "straight":
        n = _unit(rng.uniform(0, 2 * math.pi))
        proj = xx * np.float32(n[0]) + yy * np.float32(n[1])
        cover = rng.uniform(0.55, 0.88)
        d = proj - np.float32(np.quantile(proj[::4, ::4], 1.0 - cover))
    elif kind == "corner":
        psi = rng.uniform(0, 2 * math.pi)
        half = math.radians(rng.uniform(38, 52))
        bis = _unit(psi)
        dist = rng.uniform(0.2, 0.5) * size
        for _ in range(6):
            q = centre - bis * dist
            e1, e2 = _unit(psi + half), _unit(psi - half)
            n1 = bis - bis.dot(e1) * e1
            n2 = bis - bis.dot(e2) * e2
            n1, n2 = n1 / np.linalg.norm(n1), n2 / np.linalg.norm(n2)
            d1 = (xx - np.float32(q[0])) * np.float32(n1[0]) + (yy - np.float32(q[1])) * np.float32(n1[1])
            d2 = (xx - np.float32(q[0])) * np.float32(n2[0]) + (yy - np.float32(q[1])) * np.float32(n2[1])
            d = np.minimum(d1, d2)
            if _coverage(d) >= 0.5:
                break
            dist *= 1.3
    elif kind == "round":
        u = _unit(rng.uniform(0, 2 * math.pi))
        radius = rng.uniform(0.6, 3.0) * size
        b = rng.uniform(0.12, 0.42) * size
        for _ in range(6):
            c = centre - u * (radius - b)
            d = np.float32(radius) - np.sqrt((xx - np.float32(c[0])) ** 2 + (yy - np.float32(c[1])) ** 2)
            if _coverage(d) >= 0.5:
                break
            b *= 1.25
    if rng.random() < 0.2:  # a hole (through or blind) in the face
        rh = rng.uniform(4, 15) * size / 160
        face = (d if d is not None else np.full((size, size), 1e4, np.float32)) > rh + 8 * size / 160
        idx = np.flatnonzero(face[::2, ::2])
        if idx.size:
            j = int(idx[rng.integers(idx.size)])
            hy, hx = divmod(j, (size + 1) // 2)
            dh = np.sqrt((xx - np.float32(hx * 2)) ** 2 + (yy - np.float32(hy * 2)) ** 2) - np.float32(rh)
            d = dh if d is None else np.minimum(d, dh)
            info["hole"] = True
    return d, info


def _compose_geometry(rng: Rng, face: np.ndarray, d: np.ndarray | None, size: int) -> np.ndarray:
    """Put the face into the part outline: chamfer band, shadow, background."""
    if d is None:
        return face
    k = size / 160
    chamfer = rng.uniform(1.5, 6.0) * k
    part = np.clip(d + 0.5, 0, 1)
    flat = np.clip(d - chamfer + 0.5, 0, 1)
    mean = float(face.mean())
    # mostly a dark conveyor or fixture, sometimes a backlit or light one
    bg_level = rng.uniform(0.03, 0.16) if rng.random() < 0.75 else rng.uniform(0.6, 0.88)
    bg = bg_level * (1 + 0.15 * _lowfreq(rng, size, 4))  # its grain comes from the sensor noise
    shadow_w = rng.uniform(2, 7) * k
    bg *= 1 - rng.uniform(0.2, 0.6) * np.exp(np.minimum(d, 0) / np.float32(shadow_w))
    # the chamfer faces another way, so it catches the light differently: brighter or darker
    level = mean * rng.uniform(0.35, 1.9)
    ramp = np.clip(d / np.float32(chamfer), 0, 1)
    cham = np.float32(level) * (1 + np.float32(rng.uniform(-0.3, 0.3)) * ramp)
    cham = np.minimum(cham, 1.0) + 0.2 * (face - mean)
    img = bg * (1 - part) + part * (cham * (1 - flat) + face * flat)
    return img.astype(np.float32)


# --------------------------------------------------------------------------- strokes


def _scratch_path(rng: Rng, size: int, length: float) -> np.ndarray:
    """Points (N, 2) of a low-curvature stroke of about ``length`` px, centred at 0."""
    n = max(8, int(length / 1.5))  # _scratches relies on this count
    theta = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.6:  # cubic Bezier with control points near the chord
        d, perp = _unit(theta), _unit(theta + math.pi / 2)
        p0, p3 = -d * length / 2, d * length / 2
        o1, o2 = rng.normal(0, 0.12, 2) * length
        p1 = p0 + (p3 - p0) / 3 + perp * o1
        p2 = p0 + 2 * (p3 - p0) / 3 + perp * o2
        t = np.linspace(0, 1, n)[:, None]
        pts = ((1 - t) ** 3) * p0 + 3 * ((1 - t) ** 2) * t * p1 + 3 * (1 - t) * t * t * p2 + t ** 3 * p3
    else:  # random walk whose heading drifts slowly
        step = length / (n - 1)
        turn = rng.normal(0, 0.5) / n + rng.normal(0, 0.06, n - 1) * math.sqrt(8 / n)
        heading = theta + np.concatenate([[0.0], np.cumsum(turn)])
        steps = np.stack([np.cos(heading), np.sin(heading)], 1) * step
        pts = np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], 0)])
        pts -= pts.mean(0)
    return pts


@dataclass(frozen=True)
class _Stroke:
    """One drawn scratch: its dark and bright (absolute) deltas to apply to the face (None
    when it has none), its footprint (coverage in [0, 1], lip included) and its
    description."""

    dark: np.ndarray | None
    bright: np.ndarray | None
    footprint: np.ndarray
    desc: dict[str, Any]


def _taper_and_pressure(rng: Rng, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Along a scratch ``length`` px long, one value per segment (1.5 px each): the taper
    of its ends (0-1) and the tool's uneven pressure, which a skipping tool breaks up."""
    m = max(8, int(length / 1.5)) - 1
    s = (np.arange(m) + 0.5) / m
    taper = np.clip(np.minimum(s, 1 - s) / rng.uniform(0.05, 0.25), 0, 1) ** 0.7
    mod = np.clip(1 + 0.3 * _noise1d(rng, m, max(3, m // 10)), 0.3, 1.6)
    if rng.random() < 0.2:  # skipping tool: the scratch breaks up
        mod *= _noise1d(rng, m, max(4, m // 6)) > -0.6
    return taper, mod


def _ink_on_face(pts: np.ndarray, ink: np.ndarray, face_w: np.ndarray) -> float:
    """The share of a stroke's ink (``ink`` per segment of the path ``pts``) that lands on
    the face (``face_w``), not off the picture, on the chamfer or on the background:
    sampled at the segment midpoints, before drawing anything."""
    height, width = face_w.shape
    mid = np.round((pts[1:] + pts[:-1]) / 2).astype(int)
    inside = (mid[:, 0] >= 0) & (mid[:, 0] < width) & (mid[:, 1] >= 0) & (mid[:, 1] < height)
    on_face = np.zeros(ink.size, np.float32)
    on_face[inside] = face_w[mid[inside, 1], mid[inside, 0]]
    return float((ink * on_face).sum() / max(float(ink.sum()), 1e-6))


def _scratches(rng: Rng, size: int, face_w: np.ndarray, faint: bool, noise_sigma: float,
               kind: str, mean: float) -> list[_Stroke]:
    """1-3 scratches, one :class:`_Stroke` each (kept apart so that one too faint to see
    can be left out of the picture)."""
    k = size / 160
    count = int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1]))
    idx = np.flatnonzero(face_w.ravel() > 0.99)
    strokes: list[_Stroke] = []
    for _ in range(count):
        width = float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0], p=[0.3, 0.3, 0.2, 0.12, 0.08]))
        width *= rng.uniform(0.9, 1.1) * k
        length = size * (0.15 + 0.75 * rng.random() ** 1.3)
        p_bright = 0.7 if kind == "glass" else 0.4
        polarity = "bright" if rng.random() < p_bright else "dark"
        if faint:  # a few noise sigmas: at the limit of what an inspector sees
            contrast = max(0.025, rng.uniform(2.5, 4.5) * noise_sigma)
        elif polarity == "bright":
            contrast = rng.uniform(0.06, 0.3)
        else:
            contrast = min(max(mean * rng.uniform(0.15, 0.6), 0.05), 0.8 * mean)
        # the ink profile along the stroke: tapered ends, uneven pressure, sometimes broken
        taper, mod = _taper_and_pressure(rng, length)
        m = taper.size
        profile = taper * mod
        widths = width * (0.45 + 0.55 * taper) * np.clip(1 + 0.15 * _noise1d(rng, m, 5), 0.7, 1.3)
        ink = widths * profile
        best: tuple[float, np.ndarray] | None = None
        for _attempt in range(8):
            pts = _scratch_path(rng, size, length)
            j = int(idx[rng.integers(idx.size)]) if idx.size else int(rng.integers(size * size))
            cy, cx = divmod(j, size)
            pts = pts + (cx + rng.uniform(-0.5, 0.5), cy + rng.uniform(-0.5, 0.5))
            visible = _ink_on_face(pts, ink, face_w)
            if best is None or visible > best[0]:
                best = (visible, pts)
            if visible >= 0.75:
                break
        assert best is not None
        pts = best[1]
        mask = _stroke(size, pts, widths, profile) * face_w
        footprint, dark, bright = mask, None, None
        highlight = (not faint) and polarity == "dark" and rng.random() < 0.35
        if highlight:  # light catches the raised lip on one side of the groove
            tang = np.gradient(pts, axis=0)
            normal = np.stack([-tang[:, 1], tang[:, 0]], 1) / (np.linalg.norm(tang, axis=1)[:, None] + 1e-9)
            side = rng.choice([-1.0, 1.0])
            lip_pts = pts + normal * side * (width * 0.5 + 0.6 * k)
            lip = _stroke(size, lip_pts, np.maximum(0.5 * k, widths * 0.5), profile * 0.9) * face_w
            bright = np.float32(contrast * rng.uniform(0.4, 0.9)) * lip
            footprint = np.maximum(mask, lip)
        if polarity == "dark":
            dark = np.float32(contrast) * mask
        else:  # bright scratches have no lip
            bright = np.float32(contrast) * mask
        desc = {"polarity": polarity, "width_px": round(width, 2), "length_px": round(length, 1),
                "contrast": round(float(contrast), 4), "highlight": bool(highlight)}
        strokes.append(_Stroke(dark, bright, footprint, desc))
    return strokes


def tortuosity(path: np.ndarray) -> float:
    """A stroke's length along its points over the distance between its ends (1 = straight)."""
    along = float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum())
    return along / max(float(np.linalg.norm(path[-1] - path[0])), 1e-9)


def _fibre_path(rng: Rng, length: float, n: int) -> np.ndarray:
    """A fibre's n points relative to its start: strong, changing curvature (curly, not a
    scratch), ``length`` pixels long, at least FIBRE_MIN_TORTUOSITY (drawn again when
    straighter, so no good part carries a mark drawn like a scratch)."""
    for _ in range(_FIBRE_ATTEMPTS):
        curl = rng.normal(0, 2.5) / n * 4
        turn = curl + rng.normal(0, 0.35, n - 1)
        heading = rng.uniform(0, 2 * math.pi) + np.concatenate([[0.0], np.cumsum(turn)])
        steps = np.stack([np.cos(heading), np.sin(heading)], 1) * (length / n)
        path = np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], 0)])
        if tortuosity(path) >= FIBRE_MIN_TORTUOSITY:
            break
    return path


def _debris(rng: Rng, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Dust specks and fibres, as dark and bright absolute deltas (both classes)."""
    k = size / 160
    dark = np.zeros((size, size), np.float32)
    bright = np.zeros((size, size), np.float32)
    n_dust = int(min(25, rng.geometric(0.12) - 1))
    for _ in range(n_dust):
        target = dark if rng.random() < 0.7 else bright
        c = rng.uniform(0, size, 2)
        r = rng.uniform(0.35, 1.6) * k
        _dot(c, r, rng.uniform(0.05, 0.35), target)
    n_fibres = int(rng.choice([0, 1, 1, 2, 3], p=[0.35, 0.3, 0.0, 0.25, 0.1]))
    for _ in range(n_fibres):
        length = rng.uniform(0.05, 0.15) * size
        n = max(6, int(length / 0.7))
        path = _fibre_path(rng, length, n)
        pts = rng.uniform(0, size, 2) + path
        widths = np.full(n - 1, rng.uniform(0.5, 1.0) * k)
        vals = np.clip(0.7 + 0.3 * _noise1d(rng, n - 1, 4), 0.2, 1.0)
        target = dark if rng.random() < 0.6 else bright
        np.maximum(target, np.float32(rng.uniform(0.05, 0.14)) * _stroke(size, pts, widths, vals),
                   out=target)
    return dark, bright, n_dust, n_fibres


# --------------------------------------------------------------------------- visibility


def _model_view(img: np.ndarray) -> np.ndarray:
    """A uint8 picture as the default model input gets it: area-resized to
    VISIBILITY_SIZE (uint8, as ``edge.preprocess.resize_uint8`` does), as float32."""
    side = (VISIBILITY_SIZE, VISIBILITY_SIZE)
    view = img if img.shape[:2] == side else cv2.resize(img, side, interpolation=cv2.INTER_AREA)
    return view.astype(np.float32)


@dataclass(frozen=True)
class _Backdrop:
    """The clean picture at VISIBILITY_SIZE and its fine detail (the picture minus its
    Gaussian blur): what every scratch drawn on it competes with."""

    view: np.ndarray
    detail: np.ndarray

    @classmethod
    def of(cls, clean: np.ndarray) -> _Backdrop:
        view = _model_view(clean)
        return cls(view, view - cv2.GaussianBlur(view, (0, 0), _DETAIL_SIGMA))

    @classmethod
    def native(cls, clean: np.ndarray) -> _Backdrop:
        """The same at the picture's own resolution (scale 1.0: high-resolution frames)."""
        view = clean.astype(np.float32)
        return cls(view, view - cv2.GaussianBlur(view, (0, 0), _DETAIL_SIGMA))


@functools.lru_cache(maxsize=1)
def _band_kernel() -> np.ndarray:
    # a square: OpenCV dilates with a rectangle in two 1-D passes
    return np.ones((2 * _NOISE_RADIUS + 1, 2 * _NOISE_RADIUS + 1), np.uint8)


def scratch_visibility(picture: np.ndarray, clean: np.ndarray, footprint: np.ndarray) -> float:
    """The contrast-to-noise ratio (CNR) of one scratch at the default model input
    (128 px), as defined in the module docstring ("Scratch visibility").

    ``picture`` and ``clean`` are the same part rendered with and without the scratch
    (uint8, same size, same sensor noise), ``footprint`` the scratch's coverage in
    [0, 1] at that size. 0 when the scratch covers no pixel at 128 px by a quarter.
    """
    return _cnr(_model_view(picture), _Backdrop.of(clean), footprint)


def _cnr(view: np.ndarray, backdrop: _Backdrop, footprint: np.ndarray) -> float:
    """:func:`scratch_visibility` on a picture already at VISIBILITY_SIZE."""
    side = (VISIBILITY_SIZE, VISIBILITY_SIZE)
    cover = footprint if footprint.shape == side else cv2.resize(footprint, side, interpolation=cv2.INTER_AREA)
    return _cnr_on(view, backdrop, cover)


def _cnr_on(view: np.ndarray, backdrop: _Backdrop, cover: np.ndarray) -> float:
    """The CNR of a scratch covering ``cover`` of each pixel of ``view`` (the picture,
    float32, at the size the visibility is measured at), against ``backdrop`` (the clean
    picture at that size): steps 2-5 of "Scratch visibility"."""
    path = cover >= _PATH_COVERAGE
    n = int(np.count_nonzero(path))
    if n == 0:
        return 0.0
    diff = np.abs(view[path] - backdrop.view[path])
    # the mean of the _SIGNAL_PIXELS largest differences; a shorter path counts its
    # missing pixels as 0: a person sees a long faint line sooner than a short one
    top = diff if n <= _SIGNAL_PIXELS else np.partition(diff, n - _SIGNAL_PIXELS)[n - _SIGNAL_PIXELS:]
    signal = float(top.sum()) / _SIGNAL_PIXELS
    band = cv2.dilate(path.view(np.uint8), _band_kernel()).view(bool)
    detail = backdrop.detail[band]
    # a robust std (1.4826 x the median absolute deviation): the grain and sensor noise
    # around the path, not the part edge, hole ring or dust speck that may sit beside it
    noise = 1.4826 * float(np.median(np.abs(detail - np.median(detail))))
    return signal / max(noise, _MIN_NOISE)


# --------------------------------------------------------------------------- public API


def _finish(rng: Rng, img: np.ndarray, size: int, noise: tuple[float, float]) -> np.ndarray:
    """Optics and sensor: slight defocus, read + shot noise, 8-bit quantisation."""
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.75) * size / 160)
    read, shot = noise
    sigma = np.sqrt(np.float32(read * read) + np.float32(shot * shot) * np.clip(img, 0, 1))
    img = img + sigma * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _pick_kind(rng: Rng, kind: str | None) -> str:
    if kind is None:
        return str(rng.choice(SURFACES))
    if kind not in SURFACES:
        raise ValueError(f"unknown surface kind {kind!r}; use one of {', '.join(SURFACES)}")
    return kind


def render_surface(rng: Rng, size: int, kind: str | None = None) -> np.ndarray:
    """A clean surface (texture, lighting, glare, sensor noise; no edges, debris or
    scratches) as a uint8 gray ``size`` x ``size`` image. ``kind`` is one of
    :data:`SURFACES`, random when None."""
    kind = _pick_kind(rng, kind)
    face, info = _texture(rng, size, kind)
    gain, glare, _ = _lighting(rng, size, info)
    noise = (rng.uniform(0.004, 0.018), rng.uniform(0.005, 0.02))
    return _finish(rng, face * gain + glare, size, noise)


def render_part(rng: Rng, size: int, scratched: bool, kind: str | None = None
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """One close-up view of a part surface: uint8 gray ``size`` x ``size`` and a
    JSON-able description (surface, edge, hole, dust, fibres, glare, scratches, faint,
    and per scratch its polarity, width, length and contrast).

    Two generators in the same state give the same part for ``scratched`` True and
    False, differing only by the scratches (handy for paired checks).
    """
    img, _mask, desc = render_part_and_mask(rng, size, scratched, kind)
    return img, desc


@dataclass(frozen=True)
class _Part:
    """A close-up's part before scratches, edges, debris and the sensor: the surface
    ``face`` and what was drawn on it (``info``), the lighting (``gain``, ``glare``,
    ``n_glare``), the outline's signed distance ``d`` (None: the face fills the picture)
    and its description ``geo``, the sensor ``noise`` (read, shot), the face's ``mean``,
    what a faint scratch competes with (``sigma``, in face units) and where a scratch may
    lie (``face_w``)."""

    kind: str
    face: np.ndarray
    info: dict[str, Any]
    gain: np.ndarray
    glare: np.ndarray
    n_glare: int
    d: np.ndarray | None
    geo: dict[str, Any]
    noise: tuple[float, float]
    mean: float
    sigma: float
    face_w: np.ndarray


def _part(rng: Rng, size: int, kind: str | None) -> _Part:
    """Draw a close-up's part (surface, lighting, outline, sensor noise)."""
    kind = _pick_kind(rng, kind)
    face, info = _texture(rng, size, kind)
    gain, glare, n_glare = _lighting(rng, size, info)
    d, geo = _geometry(rng, size)
    noise = (rng.uniform(0.004, 0.018), rng.uniform(0.005, 0.02))
    mean = float(face.mean())
    # what a faint scratch competes with, in face units: sensor noise seen after lighting
    # and the texture's own fine detail (brush streaks, grain)
    sensor = math.sqrt(noise[0] ** 2 + noise[1] ** 2 * min(1.0, mean)) / max(0.3, float(gain.mean()))
    detail = float((face - cv2.GaussianBlur(face, (0, 0), 2.0 * size / 160)).std())
    sigma = math.sqrt(sensor**2 + detail**2)
    face_w = np.ones_like(face) if d is None else np.clip(d - 8 * size / 160, 0, 1)
    return _Part(kind, face, info, gain, glare, n_glare, d, geo, noise, mean, sigma, face_w)


def _paint_part(rng: Rng, rest: Mapping[str, Any], part: _Part, size: int, strokes: list[_Stroke]
                ) -> tuple[np.ndarray, int, int]:
    """(the picture of ``part`` with these strokes, dust specks, fibres). ``rng`` is set
    to ``rest`` first, so every call draws the same edges, dust and noise."""
    rng.bit_generator.state = rest
    face_in = part.face
    darks = [st.dark for st in strokes if st.dark is not None]
    brights = [st.bright for st in strokes if st.bright is not None]
    if darks:  # where scratches overlap, the stronger one shows
        face_in = face_in * (1 - functools.reduce(np.maximum, darks) / max(part.mean, 1e-3))
    if brights:
        face_in = face_in + functools.reduce(np.maximum, brights)
    img = _compose_geometry(rng, face_in, part.d, size)
    dust_dark, dust_bright, n_dust, n_fibres = _debris(rng, size)
    img = img * (1 - np.minimum(2 * dust_dark, 0.9)) + dust_bright
    return _finish(rng, img * part.gain + part.glare, size, part.noise), n_dust, n_fibres


_S = TypeVar("_S")
_P = TypeVar("_P")


def _visible_scratches(draw: Callable[[], list[_S]], paint: Callable[[list[_S]], tuple[_P, list[float]]],
                       floor: float, extra: dict[str, Any]) -> tuple[list[_S], list[float], float, _P | None]:
    """The scratches a picture keeps: (kept, each one's CNR, the best CNR seen, the last
    picture painted).

    ``draw()`` draws a part's scratches, ``paint(strokes)`` paints them and measures each
    one's CNR. Under saturated glare, on the background or off the image, or as faint as
    the noise, a scratch can vanish from the picture; a label the camera cannot show is
    noise, so a scratch below ``floor`` is left out, and a part with none left is drawn
    again, up to _VISIBLE_ATTEMPTS times. ``extra`` gets ``dropped`` (scratches left out
    of the draw kept) and ``redrawn`` (draws after the first)."""
    best = 0.0
    picture: _P | None = None
    kept: list[_S] = []
    cnr: list[float] = []
    draws = 0
    while draws < _VISIBLE_ATTEMPTS:
        draws += 1
        kept = draw()
        cnr = []
        if kept:
            picture, cnr = paint(kept)
            best = max(best, *cnr)
        # leaving one out changes the picture where it crossed another: measure again
        while kept and min(cnr) < floor:
            kept = [st for st, c in zip(kept, cnr, strict=True) if c >= floor]
            extra["dropped"] = extra.get("dropped", 0) + len(cnr) - len(kept)
            cnr = []
            if kept:
                picture, cnr = paint(kept)
        if kept:
            break
        extra.pop("dropped", None)
    if draws > 1:
        extra["redrawn"] = draws - 1
    return kept, cnr, best, picture


def _shown(picture: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Where a scratch changed the picture: by 2 grey levels or more, dilated by a pixel
    (the blur spreads a stroke by one), not where glare or the background swallowed it."""
    changed = np.abs(picture.astype(np.int16) - clean.astype(np.int16))
    return cv2.dilate((changed >= 2).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def render_part_and_mask(rng: Rng, size: int, scratched: bool, kind: str | None = None, *,
                         floor: float = VISIBILITY_FLOOR) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`render_part` plus the defect mask: uint8 ``size`` x ``size``, 255 where a
    scratch (or its lip) covers at least a tenth of a pixel and the picture shows it, 0
    elsewhere and on every unscratched part. The same generator state gives the same
    image as render_part.

    Every scratch a part keeps is visible: the picture is rendered with and without the
    scratches (same edges, dust, lighting and sensor noise) and each scratch's
    :func:`scratch_visibility` is measured. A scratch below ``floor`` is left out of the
    picture; when none reaches it, all are drawn again, up to _VISIBLE_ATTEMPTS
    times. If still none does, the part comes back unscratched (the clean picture, an
    empty mask) with ``"relabelled"`` in its description. The description of a scratched
    part carries ``visibility`` (its most visible scratch's CNR) and each scratch its own."""
    part = _part(rng, size, kind)
    faint = False
    mask = np.zeros((size, size), np.uint8)
    # scratches draw from their own stream, so the rest of the picture is the same part
    # whether or not it is scratched: render_part(rng_a, s, True) and (rng_b, s, False)
    # with equal generators differ only by the scratches
    scratch_rng = np.random.default_rng(int(rng.integers(2**63)))
    rest = rng.bit_generator.state  # what edges, debris, lighting and the sensor draw from
    out, n_dust, n_fibres = _paint_part(rng, rest, part, size, [])
    kept: list[_Stroke] = []
    cnr: list[float] = []
    extra: dict[str, Any] = {}
    if scratched:
        faint = bool(scratch_rng.random() < FAINT_FRACTION)
        clean = out
        backdrop = _Backdrop.of(clean)

        def paint(strokes: list[_Stroke]) -> tuple[np.ndarray, list[float]]:
            picture = _paint_part(rng, rest, part, size, strokes)[0]
            view = _model_view(picture)
            return picture, [_cnr(view, backdrop, st.footprint) for st in strokes]

        kept, cnr, best, picture = _visible_scratches(
            lambda: _scratches(scratch_rng, size, part.face_w, faint, part.sigma, part.kind, part.mean),
            paint, floor, extra)
        if not kept or picture is None:
            out, scratched, faint = clean, False, False
            extra.update({"relabelled": RELABELLED, "best_visibility": round(best, 2)})
        else:
            out = picture
            footprint = kept[0].footprint
            for st in kept[1:]:
                footprint = np.maximum(footprint, st.footprint)
            # the mask is the footprint where the picture shows it
            mask[(footprint >= MASK_COVERAGE) & _shown(out, clean)] = 255
            extra["visibility"] = round(max(cnr), 2)
    scratches = [{**st.desc, "visibility": round(c, 2)} for st, c in zip(kept, cnr, strict=True)]
    desc: dict[str, Any] = {
        "surface": part.kind,
        "brush": part.info.get("brush"),
        "edge": part.geo["edge"],
        "hole": part.geo["hole"],
        "glare": part.n_glare,
        "dust": n_dust,
        "fibres": n_fibres,
        "scratched": bool(scratched),
        "scratches": len(scratches),
        "faint": faint,
        "scratch": scratches,
        **extra,
    }
    return out, mask, desc


# --------------------------------------------------------------------------- high-resolution frames


@dataclass(frozen=True)
class _Scene:
    """A clean frame before optics and sensor, and what a scratch needs to be drawn in it.

    ``pre`` is the lit picture (float32, [0, 1]-ish), ``face`` the part's surface texture,
    ``keep`` the share of the face left visible by dust (1 - dust), ``gain`` the lighting,
    ``face_w`` where a scratch may lie (the flat face, away from its edges and holes),
    ``z`` the sensor's standard normal draw, ``blur`` the defocus sigma and ``noise``
    (read, shot) the sensor noise. The clean uint8 frame is ``clean``.
    """

    pre: np.ndarray
    face: np.ndarray
    keep: np.ndarray
    gain: np.ndarray
    face_w: np.ndarray
    z: np.ndarray
    blur: float
    noise: tuple[float, float]
    mean: float
    clean: np.ndarray


@dataclass(frozen=True)
class _FrameStroke:
    """One scratch of a frame, drawn on the pixels of ``box`` (x0, y0, x1, y1) only:
    dark and bright face deltas (None when it has none), footprint, description."""

    box: tuple[int, int, int, int]
    dark: np.ndarray | None
    bright: np.ndarray | None
    footprint: np.ndarray
    desc: dict[str, Any]


def _frame_scale(width: int, height: int) -> float:
    """Lengths of a frame's features are given at 1920x1080 and scale with the shorter
    side; widths of thin things (scratches, fibres, dust) stay in native pixels."""
    return min(width, height) / _FRAME_REF_SIDE


def _frame_grid(width: int, height: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame coordinates (x, y) of the pixel centres of the frame resized to 1/step
    (what ``cv2.resize`` to (width, height) interpolates from), float32."""
    w, h = max(2, -(-width // step)), max(2, -(-height // step))
    xs = ((np.arange(w, dtype=np.float32) + 0.5) * np.float32(width / w) - 0.5)
    ys = ((np.arange(h, dtype=np.float32) + 0.5) * np.float32(height / h) - 0.5)
    return np.meshgrid(xs, ys)


def _lowfreq_wh(rng: Rng, width: int, height: int, cells: int) -> np.ndarray:
    """:func:`_lowfreq` for a width x height frame: about ``cells`` blobs across the
    shorter side, unit std."""
    cw = max(2, int(round(cells * width / min(width, height))))
    ch = max(2, int(round(cells * height / min(width, height))))
    coarse = rng.standard_normal((ch + 1, cw + 1), dtype=np.float32)
    coarse = (coarse - coarse.mean()) * np.float32(1.25 / (coarse.std() + 1e-6))
    mid = cv2.resize(coarse, (max(cw + 1, width // 8), max(ch + 1, height // 8)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(mid, (width, height), interpolation=cv2.INTER_LINEAR)


def _streaks_wh(rng: Rng, width: int, height: int, angle: float, k: float) -> np.ndarray:
    """:func:`_streaks` for a width x height frame with streaks ``k`` px fine (the square
    pictures' version ties that to the picture size; kept apart so their bytes stay)."""
    n = int(math.ceil(math.hypot(width, height) / max(k, 0.5) * 1.02)) + 2  # the diagonal, across
    rows = max(4, n // 14)
    table: np.ndarray = cv2.resize(rng.standard_normal((6, n), dtype=np.float32), (n, rows),
                                   interpolation=cv2.INTER_LINEAR)
    table = table + 0.6 * rng.standard_normal((rows, n), dtype=np.float32)
    table = cv2.GaussianBlur(table, (5, 1), 0.6)  # soft across
    table = table + 0.8 * cv2.resize(rng.standard_normal((3, max(2, n // 8)), dtype=np.float32), (n, rows),
                                     interpolation=cv2.INTER_CUBIC)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    ca, sa = math.cos(angle), math.sin(angle)
    ax = 1.0 / max(k, 0.5)  # table columns per frame pixel, across the streaks
    ay = (rows - 1) / (n - 1) * ax * 0.35  # segments along the streaks are longer than wide
    # destination pixel -> table coordinates (across, along), both centred
    m = np.array([[-sa * ax, ca * ax, (n - 1) / 2 - (-sa * cx + ca * cy) * ax],
                  [ca * ay, sa * ay, (rows - 1) / 2 - (ca * cx + sa * cy) * ay]])
    tex = cv2.warpAffine(table, m, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    return tex * np.float32(1.0 / (tex.std() + 1e-6))


def _frame_texture(rng: Rng, width: int, height: int, kind: str, centre: tuple[float, float]
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """The part's surface at native resolution, in [0, 1], and what was drawn."""
    s = _frame_scale(width, height)
    info: dict[str, Any] = {"surface": kind}
    if kind == "brushed_metal":
        base = rng.uniform(0.38, 0.7)
        angle = rng.uniform(0.0, math.pi)
        info["brush_angle"] = round(angle, 3)
        if rng.random() < 0.3:  # turned finish: rings around the part's centre (or off it)
            info["brush"] = "circular"
            off = rng.uniform(0, 0.3) * min(width, height)
            cx, cy = centre[0] + off * math.cos(angle), centre[1] + off * math.sin(angle)
            xx, yy = np.meshgrid(np.arange(width, dtype=np.float32) - np.float32(cx),
                                 np.arange(height, dtype=np.float32) - np.float32(cy))
            r = cv2.magnitude(xx, yy)
            n = int(math.hypot(width, height)) + 4
            prof = rng.standard_normal(n, dtype=np.float32)
            prof = 0.6 * prof + 0.4 * cv2.GaussianBlur(prof[None, :], (0, 0), 2.0)[0] * 2.0
            prof += 0.7 * _noise1d(rng, n, max(3, n // 40))
            # the profile's value at each radius, linear between whole pixels
            streaks = cv2.remap(prof[None, :].astype(np.float32), r, np.zeros_like(r), cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
            streaks = streaks * (1.0 + 0.3 * _lowfreq_wh(rng, width, height, 3))
            tex = streaks * np.float32(1 / (streaks.std() + 1e-6))
        else:
            info["brush"] = "linear"
            tex = _streaks_wh(rng, width, height, angle, rng.uniform(0.8, 1.6))
        amp = rng.uniform(0.02, 0.05)
        surface = base * (1.0 + amp * tex) + 0.02 * _lowfreq_wh(rng, width, height, 3)
    elif kind == "glass":  # glossy coating or glass: smooth, with haze and smudges
        base = rng.uniform(0.08, 0.4)
        surface = base + rng.uniform(0.004, 0.015) * _lowfreq_wh(rng, width, height, int(rng.integers(3, 7)))
        for _ in range(int(rng.integers(0, 3))):
            haze = np.clip(_lowfreq_wh(rng, width, height, 5) - 0.8, 0, None)
            surface += rng.uniform(0.01, 0.03) * haze
    elif kind == "matte_plastic":
        base = rng.uniform(0.15, 0.65)
        grain: np.ndarray = cv2.GaussianBlur(rng.random((height, width), dtype=np.float32), (0, 0),
                                             rng.uniform(0.6, 1.3))
        grain = (grain - grain.mean()) * np.float32(1 / (grain.std() + 1e-6))
        mottle = _lowfreq_wh(rng, width, height, int(rng.integers(5, 12)))
        surface = base * (1.0 + rng.uniform(0.02, 0.06) * grain + rng.uniform(0.01, 0.03) * mottle)
    else:
        raise ValueError(f"unknown surface kind {kind!r}; use one of {', '.join(SURFACES)}")
    info["base"] = round(float(base), 3)
    info["scale"] = round(s, 3)
    return surface.astype(np.float32), info


def _rounded_rect_sd(xx: np.ndarray, yy: np.ndarray, centre: tuple[float, float], half: tuple[float, float],
                     radius: float, angle: float) -> np.ndarray:
    """Signed distance (px, positive inside) to a rotated rectangle with rounded corners."""
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    dx, dy = xx - np.float32(centre[0]), yy - np.float32(centre[1])
    qx = np.abs(dx * c + dy * s) - np.float32(half[0] - radius)
    qy = np.abs(dy * c - dx * s) - np.float32(half[1] - radius)
    outside = cv2.magnitude(np.maximum(qx, 0), np.maximum(qy, 0))
    return np.float32(radius) - outside - np.minimum(np.maximum(qx, qy), 0)


def _frame_part(rng: Rng, width: int, height: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Signed distance in px to the part's outline (positive on the part material, holes
    excluded), computed at half resolution (it is piecewise smooth) and resized."""
    xx, yy = _frame_grid(width, height, 2)
    short = min(width, height)
    centre = (width / 2 + rng.uniform(-0.05, 0.05) * width, height / 2 + rng.uniform(-0.05, 0.05) * height)
    shape = str(rng.choice(["plate", "disc"], p=[0.65, 0.35]))
    angle = rng.uniform(-0.2, 0.2)
    holes: list[tuple[float, float, float]] = []
    if shape == "plate":
        a, b = rng.uniform(0.3, 0.43) * width, rng.uniform(0.32, 0.44) * height
        # keep the rotated plate inside the frame (a margin of 2 % of it)
        ca, sa = abs(math.cos(angle)), abs(math.sin(angle))
        fit = min(1.0, (0.49 * width - abs(centre[0] - width / 2)) / (a * ca + b * sa),
                  (0.49 * height - abs(centre[1] - height / 2)) / (a * sa + b * ca))
        a, b = a * fit, b * fit
        radius = rng.uniform(0.03, 1.0) ** 2 * min(a, b)
        d = _rounded_rect_sd(xx, yy, centre, (a, b), radius, angle)
        info: dict[str, Any] = {"shape": "plate", "half_size": [round(a, 1), round(b, 1)],
                                "corner_radius": round(radius, 1)}
        if rng.random() < 0.6:  # mounting holes near the corners
            rh = rng.uniform(0.018, 0.04) * short
            inset = max(rh * 2.2, radius * 0.6 + rh * 1.5)
            c, s = math.cos(angle), math.sin(angle)
            corners = [(1, 1), (-1, -1), (1, -1), (-1, 1)][: int(rng.choice([2, 4]))]
            for sx, sy in corners:
                u, v = sx * (a - inset), sy * (b - inset)
                holes.append((centre[0] + u * c - v * s, centre[1] + u * s + v * c, rh))
    else:
        radius = rng.uniform(0.4, 0.47) * short
        radius = min(radius, 0.49 * width - abs(centre[0] - width / 2), 0.49 * height - abs(centre[1] - height / 2))
        d = np.float32(radius) - cv2.magnitude(xx - np.float32(centre[0]), yy - np.float32(centre[1]))
        info = {"shape": "disc", "radius": round(radius, 1)}
        if rng.random() < 0.6:  # a centre bore
            holes.append((centre[0], centre[1], rng.uniform(0.1, 0.25) * radius))
        if rng.random() < 0.4:  # a bolt circle
            n, ring, rh = int(rng.integers(3, 7)), rng.uniform(0.55, 0.75) * radius, rng.uniform(0.04, 0.07) * radius
            phase = rng.uniform(0, 2 * math.pi)
            holes += [(centre[0] + ring * math.cos(phase + 2 * math.pi * j / n),
                       centre[1] + ring * math.sin(phase + 2 * math.pi * j / n), rh) for j in range(n)]
    for hx, hy, rh in holes:
        d = np.minimum(d, cv2.magnitude(xx - np.float32(hx), yy - np.float32(hy)) - np.float32(rh))
    info.update({"angle": round(angle, 3), "holes": len(holes)})
    return cv2.resize(d, (width, height), interpolation=cv2.INTER_LINEAR), info


def _frame_belt(rng: Rng, width: int, height: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The conveyor under the part: rubber or PVC grain, streaks along the travel (x),
    seams; sometimes guide rails along the top and bottom."""
    s = _frame_scale(width, height)
    dark = rng.random() < 0.75
    level = rng.uniform(0.06, 0.18) if dark else rng.uniform(0.45, 0.7)
    along = cv2.resize(rng.standard_normal((max(2, height // 3), max(2, width // 150)), dtype=np.float32),
                       (width, height), interpolation=cv2.INTER_LINEAR)
    grain = cv2.GaussianBlur(rng.random((height, width), dtype=np.float32), (0, 0), rng.uniform(0.7, 1.4)) - 0.5
    belt = level * (1 + 0.05 * along + rng.uniform(0.3, 0.8) * grain + 0.08 * _lowfreq_wh(rng, width, height, 4))
    period = int(rng.uniform(0.3, 0.7) * width)
    seam = max(2, int(round(3 * s)))
    for x in range(int(rng.integers(0, period)), width, period):
        belt[:, x:x + seam] *= 0.7
    info: dict[str, Any] = {"belt": "dark" if dark else "light", "rails": False}
    if rng.random() < 0.5:
        rail = max(3, int(rng.uniform(0.03, 0.06) * height))
        ramp = np.linspace(-1, 1, rail, dtype=np.float32)[:, None]
        belt[:rail] = rng.uniform(0.4, 0.6) + 0.05 * ramp
        belt[-rail:] = rng.uniform(0.4, 0.6) - 0.05 * ramp
        info["rails"] = True
    return belt.astype(np.float32), info


def _frame_lighting(rng: Rng, width: int, height: int, kind: str, angle: float
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Gain (gradient, ring light fall-off, exposure) and glare, both smooth: computed at
    1/8 resolution and resized."""
    xx, yy = _frame_grid(width, height, 8)
    short = np.float32(min(width, height))
    u, v = (xx - np.float32(width / 2)) / short, (yy - np.float32(height / 2)) / short
    d = _unit(rng.uniform(0, 2 * math.pi))
    gain = 1 + np.float32(rng.uniform(0.05, 0.3)) * (u * np.float32(d[0]) + v * np.float32(d[1]))
    c = rng.uniform(-0.3, 0.3, 2)
    gain *= 1 - np.float32(rng.uniform(0.05, 0.35)) * ((u - np.float32(c[0])) ** 2 + (v - np.float32(c[1])) ** 2)
    gain = np.clip(gain * np.float32(rng.uniform(0.85, 1.15)), 0.3, None)
    glare = np.zeros_like(gain)
    n = int(rng.choice([0, 1, 1, 2])) if kind != "matte_plastic" else int(rng.choice([0, 0, 1]))
    amp_range = {"glass": (0.15, 0.7), "brushed_metal": (0.08, 0.4)}.get(kind, (0.03, 0.1))
    for _ in range(n):
        gc = (rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height)
        sx = rng.uniform(0.04, 0.15) * float(short)
        sy = sx * rng.uniform(1.5, 6)
        ga = angle + math.pi / 2 if kind == "brushed_metal" else rng.uniform(0, math.pi)
        cs, sn = np.float32(math.cos(ga)), np.float32(math.sin(ga))
        dx, dy = xx - np.float32(gc[0]), yy - np.float32(gc[1])
        p, q = (dx * cs + dy * sn) / np.float32(sx), (dy * cs - dx * sn) / np.float32(sy)
        glare += np.float32(rng.uniform(*amp_range)) * np.exp(np.float32(-0.5) * (p * p + q * q))
    size = (width, height)
    return (cv2.resize(gain, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(glare, size, interpolation=cv2.INTER_LINEAR), n)


def _frame_marks(rng: Rng, width: int, height: int, face: np.ndarray, face_w: np.ndarray, angle: float
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Harmless marks of both classes. Drawn into ``face`` in place: smudges (faint
    blotches) and sometimes an etched part number (thin strokes, like a scratch but
    letters). Returned as dark and bright deltas over the frame: dust specks and fibres."""
    s = _frame_scale(width, height)
    ys, xs = np.nonzero(face_w[::8, ::8] > 0.99)

    def on_face() -> tuple[float, float]:
        if xs.size == 0:
            return rng.uniform(0, width), rng.uniform(0, height)
        j = int(rng.integers(xs.size))
        return float(xs[j] * 8 + rng.uniform(0, 8)), float(ys[j] * 8 + rng.uniform(0, 8))

    n_smudges = int(rng.choice([0, 1, 2, 3], p=[0.35, 0.35, 0.2, 0.1]))
    for _ in range(n_smudges):
        r = max(6, int(rng.uniform(20, 120) * s))
        cx, cy = on_face()
        x0, y0 = max(0, int(cx) - r), max(0, int(cy) - r)
        x1, y1 = min(width, int(cx) + r), min(height, int(cy) + r)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        blob = cv2.resize(rng.standard_normal((6, 6), dtype=np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
        py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        fall = np.exp(-((px - np.float32(cx)) ** 2 + (py - np.float32(cy)) ** 2) / np.float32(0.5 * r * r))
        face[y0:y1, x0:x1] += np.float32(rng.choice([-1, 1]) * rng.uniform(0.006, 0.025)) * np.clip(blob + 0.6, 0, None) * fall
    marking = bool(rng.random() < 0.35)
    if marking:  # a laser-etched part number: thin, dark, straight strokes
        text = f"{rng.choice(['LW', 'PN', 'SN', 'A'])}-{int(rng.integers(1000, 99999))}-{rng.choice(list('ABCDEFG'))}"
        scale = max(0.35, rng.uniform(0.5, 1.1) * s)
        thick = int(rng.choice([1, 2]))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        pad = int(th + 4)
        canvas = np.zeros((th + base + 2 * pad, tw + 2 * pad), np.uint8)
        cv2.putText(canvas, text, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
        ch, cw = canvas.shape
        rot = cv2.getRotationMatrix2D((cw / 2, ch / 2), -math.degrees(angle), 1.0)
        turned = cv2.warpAffine(canvas, rot, (cw, ch))
        cx, cy = on_face()
        x0, y0 = int(cx) - cw // 2, int(cy) - ch // 2
        fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x0 + cw), min(height, y0 + ch)
        if fx1 > fx0 and fy1 > fy0:
            ink = turned[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0].astype(np.float32) * np.float32(1 / 255)
            face[fy0:fy1, fx0:fx1] *= 1 - np.float32(rng.uniform(0.08, 0.3)) * ink * face_w[fy0:fy1, fx0:fx1]
    dark = np.zeros((height, width), np.float32)
    bright = np.zeros((height, width), np.float32)
    n_dust = int(min(60, rng.geometric(0.06) - 1))
    for _ in range(n_dust):
        target = dark if rng.random() < 0.7 else bright
        c = np.array(on_face() if rng.random() < 0.7 else (rng.uniform(0, width), rng.uniform(0, height)))
        _dot(c, rng.uniform(0.4, 2.0), rng.uniform(0.05, 0.3), target)
    n_fibres = int(rng.choice([0, 1, 2, 3], p=[0.35, 0.3, 0.25, 0.1]))
    for _ in range(n_fibres):
        length = rng.uniform(30, 160) * s
        n = max(6, int(length / 1.5))
        path = _fibre_path(rng, length, n)
        pts = np.array(on_face()) + path
        widths = np.full(n - 1, rng.uniform(0.6, 1.4))
        vals = np.clip(0.7 + 0.3 * _noise1d(rng, n - 1, 4), 0.2, 1.0)
        target = dark if rng.random() < 0.6 else bright
        box = _stroke_box(pts, widths, width, height)
        if box[2] > box[0] and box[3] > box[1]:
            x0, y0, x1, y1 = box
            patch = target[y0:y1, x0:x1]
            np.maximum(patch, np.float32(rng.uniform(0.05, 0.14)) * _stroke_in_box(box, pts, widths, vals), out=patch)
    return dark, bright, {"smudges": n_smudges, "marking": marking, "dust": n_dust, "fibres": n_fibres}


def _clip01(a: np.ndarray) -> np.ndarray:
    """``a`` clipped to [0, 1] in place (np.clip's wrapper costs more than the work)."""
    np.minimum(a, 1, out=a)
    np.maximum(a, 0, out=a)
    return a


def _frame_finish(pre: np.ndarray, z: np.ndarray, blur: float, noise: tuple[float, float]) -> np.ndarray:
    """Optics and sensor for a frame or a crop of it: defocus, read + shot noise (from
    the standard normal draw ``z``), 8-bit quantisation. Pixel by pixel after the blur,
    so a crop gives the frame's values wherever the blur does not reach its border."""
    img: np.ndarray = cv2.GaussianBlur(pre, (0, 0), blur)
    read, shot = noise
    sigma = _clip01(img.copy())
    sigma *= np.float32(shot * shot)
    sigma += np.float32(read * read)
    cv2.sqrt(sigma, sigma)
    sigma *= z
    img += sigma
    img *= np.float32(255.0)
    np.rint(img, out=img)
    np.minimum(img, 255, out=img)
    np.maximum(img, 0, out=img)
    return img.astype(np.uint8)


def _frame_scene(rng: Rng, width: int, height: int, kind: str) -> tuple[_Scene, dict[str, Any]]:
    """Everything of a frame but its scratches."""
    s = _frame_scale(width, height)
    d, part = _frame_part(rng, width, height)
    ys, xs = np.nonzero(d[::4, ::4] > 0)
    centre = (float(xs.mean() * 4), float(ys.mean() * 4)) if xs.size else (width / 2, height / 2)
    face, info = _frame_texture(rng, width, height, kind, centre)
    belt, belt_info = _frame_belt(rng, width, height)
    chamfer = max(1.5, rng.uniform(3.0, 12.0) * s)
    face_w = _clip01(d - np.float32(chamfer + max(4.0, 8 * s)))
    dark, bright, marks = _frame_marks(rng, width, height, face, face_w, part["angle"])
    mean = float(face[face_w > 0.99].mean()) if (face_w > 0.99).any() else float(face.mean())
    # the part casts a soft shadow on the belt (smooth: drawn at 1/4 resolution)
    alpha = _clip01(d + np.float32(0.5))
    small = cv2.resize(alpha, (max(2, width // 4), max(2, height // 4)), interpolation=cv2.INTER_AREA)
    off = rng.uniform(3, 12, 2) * s / 4
    shift = np.array([[1, 0, off[0]], [0, 1, off[1]]], np.float32)
    small = cv2.GaussianBlur(cv2.warpAffine(small, shift, small.shape[::-1]), (0, 0), max(1.0, rng.uniform(2, 6) * s))
    belt *= 1 - np.float32(rng.uniform(0.25, 0.6)) * cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    # the chamfer faces another way, so it catches the light differently: brighter or darker
    # (in place, two megapixels at a time: this is most of a frame's time)
    flat = _clip01(d - np.float32(chamfer - 0.5))
    cham = _clip01(d * np.float32(1 / chamfer))  # the ramp across the chamfer
    cham *= np.float32(rng.uniform(-0.3, 0.3))
    cham += 1
    cham *= np.float32(mean * rng.uniform(0.4, 1.8))
    np.minimum(cham, 1, out=cham)
    cham += np.float32(0.2) * (face - np.float32(mean))
    # img = belt + alpha * (cham + flat * (face - cham) - belt)
    img = face - cham
    img *= flat
    img += cham
    img -= belt
    img *= alpha
    img += belt
    keep = np.minimum(2 * dark, np.float32(0.9))
    np.subtract(1, keep, out=keep)
    gain, glare, n_glare = _frame_lighting(rng, width, height, kind, info.get("brush_angle", 0.0))
    pre = img * keep
    pre += bright
    pre *= gain
    glare *= alpha
    pre += glare
    noise = (rng.uniform(0.003, 0.012), rng.uniform(0.004, 0.014))
    blur = rng.uniform(0.45, 0.85)
    z = rng.standard_normal((height, width), dtype=np.float32)
    clean = _frame_finish(pre, z, blur, noise)
    ys, xs = np.nonzero(alpha[::2, ::2] > 0.5)
    bbox = ([int(xs.min() * 2), int(ys.min() * 2), int(xs.max() * 2 - xs.min() * 2 + 2), int(ys.max() * 2 - ys.min() * 2 + 2)]
            if xs.size else [0, 0, width, height])
    desc = {"surface": kind, "brush": info.get("brush"), **part, "bbox": bbox, "chamfer_px": round(chamfer, 1),
            **belt_info, "glare": n_glare, **marks}
    return _Scene(pre, face, keep, gain, face_w, z, blur, noise, mean, clean), desc


def _frame_scratches(rng: Rng, scene: _Scene, width: int, height: int, kind: str) -> list[_FrameStroke]:
    """1-3 thin scratches on the part's face: 1-3 px wide (groove and lip together),
    FRAME_SCRATCH_LENGTH long, each with a target CNR from faint (2) to clear (40).
    A scratch whose box falls outside the frame is left out."""
    ys, xs = np.nonzero(scene.face_w[::4, ::4] > 0.99)
    count = int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1]))
    detail_sample = scene.face[height // 4:height // 4 + 256, width // 4:width // 4 + 256]
    texture = float((detail_sample - cv2.GaussianBlur(detail_sample, (0, 0), _DETAIL_SIGMA)).std())
    strokes: list[_FrameStroke] = []
    for _ in range(count):
        stroke = _frame_stroke(rng, scene, (xs, ys), texture, width, height, kind)
        if stroke is not None:
            strokes.append(stroke)
    return strokes


@dataclass(frozen=True)
class _FrameInk:
    """How one frame scratch is drawn along its path: width (px), length, the CNR aimed at,
    polarity, and per segment the ink profile (0-1) and width."""

    width_px: float
    length: float
    target: float
    polarity: str
    profile: np.ndarray
    widths: np.ndarray


def _frame_ink(rng: Rng, s: float, kind: str) -> _FrameInk:
    """Draw a frame scratch's width, length, target CNR, polarity and ink profile."""
    lo, hi = FRAME_SCRATCH_LENGTH
    width_px = float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0], p=[0.3, 0.3, 0.2, 0.12, 0.08]))
    width_px = min(3.0, max(1.0, width_px * rng.uniform(0.95, 1.05)))
    length = max(16.0, math.exp(rng.uniform(math.log(lo), math.log(hi))) * s)
    target = math.exp(rng.uniform(math.log(2.0), math.log(40.0)))  # CNR aimed at, faint to clear
    polarity = "bright" if rng.random() < (0.7 if kind == "glass" else 0.4) else "dark"
    taper, mod = _taper_and_pressure(rng, length)
    m = taper.size
    profile = np.clip(taper * mod, 0, 1)
    widths = width_px * (0.45 + 0.55 * taper) * np.clip(1 + 0.1 * _noise1d(rng, m, 5), 0.8, 1.0)
    return _FrameInk(width_px, length, target, polarity, profile, widths)


def _frame_path(rng: Rng, scene: _Scene, face_cells: tuple[np.ndarray, np.ndarray], ink: _FrameInk,
                width: int, height: int) -> np.ndarray:
    """The scratch's path: of up to 8 tries placed on the face (``face_cells``: the x and
    y of the face's 4x4 cells), the first with 90 % of its ink on the face, or the best."""
    xs, ys = face_cells
    best: tuple[float, np.ndarray] | None = None
    for _attempt in range(8):
        pts = _scratch_path(rng, 0, ink.length)
        j = int(rng.integers(xs.size)) if xs.size else 0
        cx = float(xs[j] * 4) if xs.size else width / 2
        cy = float(ys[j] * 4) if ys.size else height / 2
        pts = pts + (cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2))
        visible = _ink_on_face(pts, ink.widths * ink.profile, scene.face_w)
        if best is None or visible > best[0]:
            best = (visible, pts)
        if visible >= 0.9:
            break
    assert best is not None
    return best[1]


def _frame_stroke(rng: Rng, scene: _Scene, face_cells: tuple[np.ndarray, np.ndarray], texture: float,
                  width: int, height: int, kind: str) -> _FrameStroke | None:
    """One scratch of :func:`_frame_scratches`, its contrast set for its target CNR where
    it lies; None when its box falls outside the frame."""
    ink = _frame_ink(rng, _frame_scale(width, height), kind)
    width_px, profile, widths = ink.width_px, ink.profile, ink.widths
    pts = _frame_path(rng, scene, face_cells, ink, width, height)
    # a lip only beside a narrow groove: groove and lip together stay under 3 px
    highlight = ink.polarity == "dark" and width_px <= 1.6 and rng.random() < 0.35
    lip_w = min(1.0, 2.6 - width_px)
    if highlight:  # light catches the raised lip along one side of the groove
        tang = np.gradient(pts, axis=0)
        normal = np.stack([-tang[:, 1], tang[:, 0]], 1) / (np.linalg.norm(tang, axis=1)[:, None] + 1e-9)
        lip_pts = pts + normal * rng.choice([-1.0, 1.0]) * (widths.mean() + lip_w) / 2
        box = _stroke_box(np.concatenate([pts, lip_pts]), widths, width, height)
    else:
        box = _stroke_box(pts, widths, width, height)
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None
    fw = scene.face_w[y0:y1, x0:x1]
    # OpenCV's thick lines come out a quarter pixel (one 4x pixel) wider than asked:
    # asked for that much less, a stroke is as wide as its width says
    ink_w = np.maximum(widths - 0.25, 0.25)
    mask = _stroke_in_box(box, pts, ink_w, profile) * fw
    # the footprint is where the scratch lies, however faint it is drawn there
    drawn = (profile > 0.02).astype(np.float32)
    footprint = _stroke_in_box(box, pts, ink_w, drawn) * fw
    contrast = _frame_contrast(scene, pts, texture, ink, width, height)
    dark, bright = None, None
    if highlight:
        lip_widths = np.full_like(widths, lip_w - 0.25)
        lip = _stroke_in_box(box, lip_pts, lip_widths, profile * 0.9) * fw
        bright = np.float32(contrast * rng.uniform(0.4, 0.9)) * lip
        footprint = np.maximum(footprint, _stroke_in_box(box, lip_pts, lip_widths, drawn) * fw)
    if ink.polarity == "dark":
        dark = np.float32(min(contrast, 0.8 * scene.mean)) * mask
    else:
        bright = np.float32(contrast) * mask
    desc = {"polarity": ink.polarity, "width_px": round(width_px, 2), "length_px": round(ink.length, 1),
            "contrast": round(float(contrast), 4), "highlight": bool(highlight)}
    return _FrameStroke(box, dark, bright, footprint, desc)


def _frame_contrast(scene: _Scene, pts: np.ndarray, texture: float, ink: _FrameInk, width: int, height: int
                    ) -> float:
    """The face contrast that gives the scratch its target CNR where it lies (at least 3
    grey levels)."""
    # what the scratch competes with where it lies, in face units: sensor noise after
    # the lighting, and the texture's own fine detail
    gx, gy = int(min(max(pts[:, 0].mean(), 0), width - 1)), int(min(max(pts[:, 1].mean(), 0), height - 1))
    g = max(0.3, float(scene.gain[gy, gx]))
    level = min(1.0, float(scene.pre[gy, gx]))
    sensor = math.sqrt(scene.noise[0] ** 2 + scene.noise[1] ** 2 * level) / g
    sigma = math.hypot(sensor, texture)
    # a thin line loses peak contrast to the defocus: erf(w / (2 sqrt(2) sigma))
    peak = math.erf(ink.width_px / (2 * math.sqrt(2) * scene.blur))
    return max(3.0 / 255 / g, ink.target * sigma / peak)


def _paint_frame(scene: _Scene, strokes: list[_FrameStroke], width: int, height: int
                 ) -> tuple[tuple[tuple[int, int, int, int], np.ndarray], list[float]]:
    """((the crop, the picture on it), each stroke's CNR) with these strokes drawn: the
    scratches touch only the pixels around them, so a draw is finished on a crop."""
    x0 = min(st.box[0] for st in strokes)
    y0 = min(st.box[1] for st in strokes)
    x1 = max(st.box[2] for st in strokes)
    y1 = max(st.box[3] for st in strokes)
    # the crop reaches _FRAME_PAD beyond the strokes: the defocus (<= 4 px) and the
    # noise band (6 px) plus the detail blur (8 px) around the path stay inside it
    cx0, cy0 = max(0, x0 - _FRAME_PAD), max(0, y0 - _FRAME_PAD)
    cx1, cy1 = min(width, x1 + _FRAME_PAD), min(height, y1 + _FRAME_PAD)
    shape = (cy1 - cy0, cx1 - cx0)
    darkest, brightest = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for st in strokes:  # where scratches overlap, the stronger one shows
        bx0, by0, bx1, by1 = st.box
        sl = np.s_[by0 - cy0:by1 - cy0, bx0 - cx0:bx1 - cx0]
        if st.dark is not None:
            np.maximum(darkest[sl], st.dark, out=darkest[sl])
        if st.bright is not None:
            np.maximum(brightest[sl], st.bright, out=brightest[sl])
    crop = np.s_[cy0:cy1, cx0:cx1]
    delta = (brightest - scene.face[crop] * darkest * np.float32(1 / max(scene.mean, 1e-3)))
    drawn = _frame_finish(scene.pre[crop] + delta * scene.keep[crop] * scene.gain[crop],
                          scene.z[crop], scene.blur, scene.noise)
    # only the inner part of the crop is the frame's own result (the blur reads
    # across the crop's border); the scratch changes nothing beyond it
    picture = scene.clean[crop].copy()
    ix0, iy0 = (x0 - _FRAME_INNER - cx0 if cx0 > 0 else 0), (y0 - _FRAME_INNER - cy0 if cy0 > 0 else 0)
    ix1 = (x1 + _FRAME_INNER - cx0) if cx1 < width else cx1 - cx0
    iy1 = (y1 + _FRAME_INNER - cy0) if cy1 < height else cy1 - cy0
    picture[iy0:iy1, ix0:ix1] = drawn[iy0:iy1, ix0:ix1]
    backdrop = _Backdrop.native(scene.clean[crop])
    view = picture.astype(np.float32)
    values = []
    for st in strokes:
        cover = np.zeros(shape, np.float32)
        bx0, by0, bx1, by1 = st.box
        cover[by0 - cy0:by1 - cy0, bx0 - cx0:bx1 - cx0] = st.footprint
        values.append(_cnr_on(view, backdrop, cover))
    return ((cx0, cy0, cx1, cy1), picture), values


def render_frame_and_mask(rng: Rng, size: tuple[int, int], scratched: bool, kind: str | None = None, *,
                          floor: float = VISIBILITY_FLOOR) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One high-resolution line frame, ``size`` = (width, height): uint8 gray, its defect
    mask (255 where a scratch or its lip covers at least half a pixel and the picture
    shows it) and a JSON-able description.

    A part fills much of the frame on a conveyor belt (see the module docstring,
    "High-resolution frames"); scratches are 1-3 px wide at this resolution. Each
    scratch's visibility is its CNR measured here, at native resolution (scale 1.0,
    what a model trained on native-resolution tiles sees), with the rule of
    :func:`render_part_and_mask`: a scratch below ``floor`` is left out, a part with
    none left is drawn again, up to _VISIBLE_ATTEMPTS times, and then comes back clean
    and ``"relabelled"``. The scratches touch only the pixels around them, so the part
    is rendered once and each draw is finished on a crop around its scratches.
    """
    width, height = size
    _check_frame_size(width, height)
    kind = _pick_kind(rng, kind)
    scratch_rng = np.random.default_rng(int(rng.integers(2**63)))
    scene, desc = _frame_scene(rng, width, height, kind)
    mask = np.zeros((height, width), np.uint8)
    out = scene.clean
    kept: list[_FrameStroke] = []
    cnr: list[float] = []
    extra: dict[str, Any] = {}
    if scratched:
        kept, cnr, best, painted = _visible_scratches(
            lambda: _frame_scratches(scratch_rng, scene, width, height, kind),
            lambda strokes: _paint_frame(scene, strokes, width, height), floor, extra)
        if not kept or painted is None:
            scratched = False
            extra.update({"relabelled": RELABELLED, "best_visibility": round(best, 2)})
        else:
            (cx0, cy0, cx1, cy1), picture = painted
            out = scene.clean.copy()
            out[cy0:cy1, cx0:cx1] = picture
            footprint = np.zeros((cy1 - cy0, cx1 - cx0), np.float32)
            for st in kept:
                bx0, by0, bx1, by1 = st.box
                sl = np.s_[by0 - cy0:by1 - cy0, bx0 - cx0:bx1 - cx0]
                np.maximum(footprint[sl], st.footprint, out=footprint[sl])
            shown = _shown(picture, scene.clean[cy0:cy1, cx0:cx1])
            mask[cy0:cy1, cx0:cx1][(footprint >= FRAME_MASK_COVERAGE) & shown] = 255
            extra["visibility"] = round(max(cnr), 2)
    scratches = []
    for st, c in zip(kept, cnr, strict=True):
        bx0, by0, bx1, by1 = st.box
        scratches.append({**st.desc, "visibility": round(c, 2), "box": [bx0, by0, bx1 - bx0, by1 - by0]})
    visibility = extra.get("visibility")
    desc.update({
        "size": [width, height],
        "scratched": bool(scratched),
        "scratches": len(scratches),
        # faint: the part's most visible scratch is below CNR 5 (the lower two bands of train eval)
        "faint": bool(scratched and visibility is not None and visibility < FRAME_FAINT_CNR),
        "scratch": scratches,
        **extra,
    })
    return out, mask, desc


def render_frame(rng: Rng, size: tuple[int, int], scratched: bool, kind: str | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`render_frame_and_mask` without the mask."""
    img, _mask, desc = render_frame_and_mask(rng, size, scratched, kind)
    return img, desc


def _frame_size_problem(width: int, height: int) -> str | None:
    if not (FRAME_MIN_SIDE <= width <= FRAME_MAX_SIDE and FRAME_MIN_SIDE <= height <= FRAME_MAX_SIDE):
        return f"width and height must be {FRAME_MIN_SIDE}-{FRAME_MAX_SIDE} pixels"
    if width * height > FRAME_MAX_PIXELS:
        return f"at most {FRAME_MAX_PIXELS // 1_000_000} megapixels"
    return None


def _check_frame_size(width: int, height: int) -> None:
    problem = _frame_size_problem(width, height)
    if problem is not None:
        raise ValueError(f"frame size {width}x{height}: {problem}")


def parse_size(text: str) -> int | tuple[int, int]:
    """``train synth --size``: ``N`` -> N (square close-ups of a part's surface, the
    default kind) or ``WxH`` -> (W, H) (high-resolution line frames, at least
    FRAME_MIN_SIDE a side); :class:`ValueError` with a one-line reason otherwise."""
    raw = str(text)
    t = raw.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+", t):
        n = int(t)
        if n < 32:
            raise ValueError(f"--size {raw!r}: a square picture is at least 32 px (scratches are 1-3 px wide at 160)")
        return n
    match = re.fullmatch(r"(\d+)x(\d+)", t)
    if match is None:
        raise ValueError(f"--size {raw!r} is not N or WxH (for example 160 or 1920x1080)")
    w, h = int(match[1]), int(match[2])
    problem = _frame_size_problem(w, h)
    if problem is not None:
        raise ValueError(f"--size {raw!r}: {problem} (a frame is WxH, for example 1920x1080)")
    return w, h


def _check_args(count: int, size: int, scratch_fraction: float) -> None:
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px (scratches are 1-3 px wide at 160), got {size}")
    if not 0.0 <= scratch_fraction <= 1.0:
        raise ValueError(f"scratch_fraction must be between 0 and 1, got {scratch_fraction}")


def _assign(rng: Rng, count: int, scratch_fraction: float) -> np.ndarray:
    """Exactly round(count * fraction) scratched items, in a seeded random order."""
    n_scratch = int(round(count * scratch_fraction))
    flags = np.zeros(count, bool)
    flags[:n_scratch] = True
    return rng.permutation(flags)


def _png(img: np.ndarray, i: int, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(".png", img, _PNG_PARAMS if params is None else params)
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise ImageError(f"OpenCV could not encode image {i} as PNG; check the OpenCV install")
    return buf.tobytes()


def _write_images(out_dir: Path, seed: int, size: int | tuple[int, int], digits: int, floor: float,
                  items: list[tuple[int, bool]]) -> list[dict[str, Any]]:
    """Render, encode and write the images ``items`` = [(index, scratched)]; return
    their descriptions. Module-level so worker processes can run it. ``size`` N draws
    square close-ups, (W, H) high-resolution frames."""
    written: list[dict[str, Any]] = []
    for i, scratched in items:
        rng = np.random.default_rng([seed, i])
        if isinstance(size, tuple):
            img, mask, desc = render_frame_and_mask(rng, size, scratched, floor=floor)
            mask_params: list[int] | None = _MASK_PNG_PARAMS
        else:
            img, mask, desc = render_part_and_mask(rng, size, scratched, floor=floor)
            mask_params = None
        # a part drawn scratched whose scratches all stayed below the floor comes back
        # unscratched (desc "relabelled") and is a pass image
        cls = DEFECT_LABEL if desc["scratched"] else PASS_LABEL
        rel = f"{cls}/{cls}_{i:0{digits}d}.png"
        (out_dir / rel).write_bytes(_png(img, i))
        if desc["scratched"]:  # unscratched parts need no mask: the pass class has no defect pixels
            (out_dir / MASKS_FOLDER / rel).write_bytes(_png(mask, i, mask_params))
        written.append({"file": rel, **desc})
    return written


def generate_dataset(out_dir: Path, *, count: int = 1000, seed: int = 0, size: int | tuple[int, int] = 160,
                     scratch_fraction: float = 0.5,
                     progress: Callable[[int, int], None] | None = None,
                     workers: int = 1, visibility_floor: float = VISIBILITY_FLOOR) -> dict[str, int]:
    """Write ``count`` synthetic images to OUT_DIR/ok/ and OUT_DIR/scratch/ and a
    OUT_DIR/synth.json (parameters, counts, a description per file); return the counts.

    Files are named ``<class>_<index>.png`` where index is the image's position in the
    dataset; image i is drawn from ``default_rng([seed, i])``, and the same arguments
    give byte-identical files, whatever ``workers`` is. Exactly
    ``round(count * scratch_fraction)`` images are drawn scratched; each scratch is kept
    only at or above ``visibility_floor`` (its CNR, see "Scratch visibility" above), and
    a part none of whose scratches reaches it after redrawing is written to ok/ as the
    clean picture, marked ``"relabelled"`` in synth.json (rare: none of 1000 in the
    default set's first 2000). Each scratched image gets its defect mask (see :func:`render_part_and_mask`) at OUT_DIR/masks/scratch/ under
    the same name: `train fit` uses masks to tell the network where the defects are.
    Old ``ok_*.png`` and ``scratch_*.png`` files in those folders are removed first so a
    rerun never mixes two datasets; other files are left alone.

    ``size`` (W, H) draws high-resolution line frames instead of square close-ups
    (:func:`render_frame_and_mask`; module docstring, "High-resolution frames"): thin
    scratches at native resolution, visibility measured there; synth.json then gives
    ``"mode": "frame"``, ``size`` [W, H] and, in ``visibility``, ``size`` [W, H] and
    ``scale`` 1.0.

    ``workers`` > 1 renders in that many spawned processes (worth it from a few thousand
    images on an otherwise idle machine, or for frames); ``progress(done, total)`` is
    then called per batch instead of per image.

    Example::

        generate_dataset(Path("data"), count=2000, seed=1)  # {'ok': 1000, 'scratch': 1000}
    """
    size = _checked_dataset_args(count, size, scratch_fraction, workers, visibility_floor)
    out_dir = Path(out_dir)
    flags = _assign(np.random.default_rng([seed, 2**31]), count, scratch_fraction)
    _remove_old_images(out_dir)
    digits = max(5, len(str(count - 1)))
    items = [(i, bool(flags[i])) for i in range(count)]
    job = functools.partial(_write_images, out_dir, seed, size, digits, visibility_floor)
    images = _render_all(job, items, workers, isinstance(size, tuple), progress)
    counts = {cls: sum(1 for m in images if m["file"].startswith(cls + "/")) for cls in CLASSES}
    meta = _synth_meta(seed, count, size, scratch_fraction, visibility_floor, counts, images)
    (out_dir / "synth.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    logger.info("wrote %s synthetic images to %s: %s", count, out_dir, counts)
    return counts


def _checked_dataset_args(count: int, size: int | tuple[int, int], scratch_fraction: float, workers: int,
                          visibility_floor: float) -> int | tuple[int, int]:
    """:func:`generate_dataset`'s size, (W, H) as ints; ValueError for an argument out of range."""
    if isinstance(size, tuple):
        _check_args(count, 160, scratch_fraction)
        _check_frame_size(*size)
        size = (int(size[0]), int(size[1]))
    else:
        _check_args(count, size, scratch_fraction)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not visibility_floor >= 0:
        raise ValueError(f"visibility_floor must be 0 or more, got {visibility_floor}")
    return size


def _remove_old_images(out_dir: Path) -> None:
    """Make the class and mask folders and remove the images of an earlier dataset from them."""
    removed = 0
    for folder in [out_dir / cls for cls in CLASSES] + [out_dir / MASKS_FOLDER / DEFECT_LABEL]:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if _FILE_RE.match(old.name):
                old.unlink()
                removed += 1
    if removed:
        logger.info("removed %s images of an earlier dataset in %s", removed, out_dir)


def _render_all(job: Callable[[list[tuple[int, bool]]], list[dict[str, Any]]], items: list[tuple[int, bool]],
                workers: int, frames: bool, progress: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    """Run ``job`` (:func:`_write_images` bound to its dataset) on every item, in
    ``workers`` processes, and return the descriptions in item order."""
    count = len(items)
    images: list[dict[str, Any]] = []
    if workers == 1:
        for item in items:
            images += job([item])
            if progress is not None:
                progress(len(images), count)
        return images
    batch = max(1, min(10 if frames else 100, count // (workers * 4)))
    batches = [items[a:a + batch] for a in range(0, count, batch)]
    # spawn, not fork: forking a process that holds OpenCV's thread pool can deadlock
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for done in pool.map(job, batches):  # in order, so synth.json is the same
            images += done
            if progress is not None:
                progress(len(images), count)
    return images


def _synth_meta(seed: int, count: int, size: int | tuple[int, int], scratch_fraction: float,
                visibility_floor: float, counts: dict[str, int], images: list[dict[str, Any]]) -> dict[str, Any]:
    """synth.json: the parameters, counts, visibility bookkeeping and a description per file."""
    meta: dict[str, Any] = {
        "generator": "training.synth",
        "version": SYNTH_VERSION,
        "seed": seed,
        "count": count,
        "size": size,
        "scratch_fraction": scratch_fraction,
        "faint_fraction": FAINT_FRACTION,
        "classes": list(CLASSES),
        "pass_label": PASS_LABEL,
        "counts": counts,
        "visibility": {
            "measure": "contrast-to-noise ratio of each scratch at the default model input (training.synth)",
            "size": VISIBILITY_SIZE,
            "floor": visibility_floor,
            "redrawn": sum(1 for m in images if m.get("redrawn")),
            "dropped_scratches": sum(m.get("dropped", 0) for m in images),
            "relabelled": sum(1 for m in images if m.get("relabelled")),
        },
        "images": images,
    }
    if isinstance(size, tuple):
        del meta["faint_fraction"]
        w, h = size
        s = _frame_scale(w, h)
        meta.update({
            "mode": "frame",
            "size": [w, h],
            "faint_cnr": FRAME_FAINT_CNR,
            "scratch_width_px": [1.0, 3.0],
            "scratch_length_px": [round(max(16.0, v * s), 1) for v in FRAME_SCRATCH_LENGTH],
        })
        meta["visibility"].update({
            "measure": "contrast-to-noise ratio of each scratch along its path at native resolution "
                       "(scale 1.0: what a model on native-resolution tiles sees; training.synth)",
            "size": [w, h],
            "scale": FRAME_VISIBILITY_SCALE,
        })
    return meta


def read_visibility(data_dir: Path) -> tuple[float, dict[str, float]] | None:
    """(the floor, {file: visibility}) of the scratched images DATA_DIR/synth.json
    describes, files as ``"scratch/scratch_00012.png"``; None when DATA_DIR has no
    synth.json or one written before visibility was measured (SYNTH_VERSION < 4)."""
    path = Path(data_dir) / "synth.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        floor = float(meta["visibility"]["floor"])
        images = meta["images"]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("%s has no visibility figures (made by an older train synth?): no recall by visibility", path)
        return None
    return floor, {m["file"]: float(m["visibility"]) for m in images
                   if m.get("scratched") and m.get("visibility") is not None}


def recall_by_visibility(floor: float, visibility: dict[str, float], files: Sequence[str],
                         failed: Sequence[bool]) -> dict[str, Any]:
    """Recall of the scratched images among ``files`` (``"<class>/<name>"``, each with the
    decision ``failed``) per visibility band: [floor, 3), [3, 5), [5, 10), [10, inf),
    leaving out the edges at or below the floor, and [0, floor) first should an image
    sit below it. A band's ``high`` is None when open; ``recall`` is None when it is empty.
    """
    edges = [floor] + [e for e in VISIBILITY_BAND_EDGES if e > floor] + [math.inf]
    decided = {f: bool(x) for f, x in zip(files, failed, strict=True) if f in visibility}
    if any(visibility[f] < floor for f in decided):
        edges.insert(0, 0.0)
    bands: list[dict[str, Any]] = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = [x for f, x in decided.items() if low <= visibility[f] < high]
        bands.append({
            "band": f"[{low:g}, {high:g})",
            "low": low,
            "high": None if math.isinf(high) else high,
            "n": len(inside),
            "caught": sum(inside),
            "recall": round(sum(inside) / len(inside), 6) if inside else None,
        })
    return {"floor": floor, "n": len(decided), "bands": bands}


# --------------------------------------------------------------------------- video


def _rounded_alpha(side: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    half = (side - 1) / 2
    qx = np.abs(xx - half) - (half - radius)
    qy = np.abs(yy - half) - (half - radius)
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    d = outside + np.minimum(np.maximum(qx, qy), 0) - radius
    return np.clip(0.5 - d, 0, 1)


def render_frames(*, parts: int = 40, seed: int = 0, size: tuple[int, int] = (640, 480),
                  frames_per_part: int = 1, scratch_fraction: float = 0.3, part_size: int = 160,
                  native: bool = False) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Yield (BGR uint8 frame of ``size`` = (width, height), ground truth) for an
    inspection video: each part is one :func:`render_part` image scaled up onto a
    moving conveyor belt, shown for ``frames_per_part`` frames while it drifts a little.

    Ground truth per frame: frame, part, scratched, surface, faint, visibility (the
    CNR of the part's most visible scratch, None when unscratched) and bbox [x, y, w, h]
    of the part in the frame (for a region of interest). The rule of the datasets
    holds: a part is "scratched" only with a scratch at or above VISIBILITY_FLOOR; one
    drawn scratched whose scratches all stayed below it is shown clean and is not.

    ``native=True`` draws each part at the frame's own resolution instead
    (:func:`render_frame_and_mask`, the frames of ``train synth --size WxH``): thin
    scratches 1-3 px wide in the video, visibility measured at native resolution, and
    each frame's truth also gives ``defects``, the box [x, y, w, h] of every scratch
    kept. The part rides the belt: with several frames per part the view moves along it
    by up to 8 % of the width. ``part_size`` is then not used.
    """
    width, height = size
    if parts < 1 or frames_per_part < 1:
        raise ValueError(f"parts and frames_per_part must be at least 1, got {parts}, {frames_per_part}")
    if native:
        yield from _native_frames(parts, seed, size, frames_per_part, scratch_fraction)
        return
    if width < 64 or height < 64:
        raise ValueError(f"frame size must be at least 64x64, got {width}x{height}")
    _check_args(1, part_size, scratch_fraction)
    rng = np.random.default_rng([seed, 2**31 + 1])
    flags = _assign(rng, parts, scratch_fraction)
    # belt: a fixed texture that scrolls by one step per frame; seams every `period` px
    period = max(32, width // 4)
    belt_w = width + period
    # rubber/fabric belt: fine grain plus faint streaks along the direction of travel
    along = cv2.resize(rng.standard_normal((height, max(2, belt_w // 40)), dtype=np.float32),
                       (belt_w, height), interpolation=cv2.INTER_LINEAR)
    grain = cv2.GaussianBlur(rng.standard_normal((height, belt_w), dtype=np.float32), (0, 0), 0.8)
    belt = 0.2 + 0.012 * along + 0.03 * grain
    for x in range(0, belt_w, period):
        belt[:, x:x + 3] *= 0.6
    rail = max(4, height // 16)
    belt[:rail] = 0.55 + 0.04 * np.linspace(-1, 1, rail, dtype=np.float32)[:, None]
    belt[-rail:] = 0.55 + 0.04 * np.linspace(1, -1, rail, dtype=np.float32)[:, None]
    side = int(min(height - 2 * rail - 8, 0.92 * width))
    alpha = _rounded_alpha(side, 0.05 * side)
    shadow = cv2.GaussianBlur(alpha, (0, 0), max(2.0, side / 50))
    step = period / max(4, frames_per_part * 2)
    frame_no = 0
    for p in range(parts):
        part_rng = np.random.default_rng([seed, 2**31 + 2, p])
        img, desc = render_part(part_rng, part_size, bool(flags[p]))
        plate = cv2.resize(img, (side, side), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        plate = plate * (0.97 + 0.03 * alpha)  # slight bevel darkening at the rim
        for f in range(frames_per_part):
            shift = int(round(width * 0.04 * ((f + 0.5) / frames_per_part - 0.5) * 2)) if frames_per_part > 1 else 0
            x0 = (width - side) // 2 + shift
            y0 = (height - side) // 2
            off = int(frame_no * step) % period
            frame = belt[:, off:off + width].copy()
            sx, sy = x0 + side // 40, y0 + side // 30
            sub = frame[sy:sy + side, sx:sx + side]
            sub *= 1 - 0.5 * shadow[:sub.shape[0], :sub.shape[1]]
            roi = frame[y0:y0 + side, x0:x0 + side]
            roi[:] = roi * (1 - alpha) + plate * alpha
            frame += 0.006 * part_rng.standard_normal(frame.shape, dtype=np.float32)
            gray = np.clip(np.round(frame * 255), 0, 255).astype(np.uint8)
            truth = {"frame": frame_no, "part": p, "scratched": desc["scratched"],
                     "surface": desc["surface"], "faint": desc["faint"],
                     "visibility": desc.get("visibility"),
                     "bbox": [int(x0), int(y0), int(side), int(side)]}
            yield cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), truth
            frame_no += 1


def _native_frames(parts: int, seed: int, size: tuple[int, int], frames_per_part: int,
                   scratch_fraction: float) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """:func:`render_frames` with ``native=True``."""
    width, height = size
    _check_frame_size(width, height)
    _check_args(1, 160, scratch_fraction)
    flags = _assign(np.random.default_rng([seed, 2**31 + 1]), parts, scratch_fraction)
    travel = int(round(0.08 * width)) if frames_per_part > 1 else 0
    frame_no = 0
    for p in range(parts):
        part_rng = np.random.default_rng([seed, 2**31 + 2, p])
        scene, _mask, desc = render_frame_and_mask(part_rng, (width + travel, height), bool(flags[p]))
        color = cv2.cvtColor(scene, cv2.COLOR_GRAY2BGR)
        for f in range(frames_per_part):
            # the part rides the belt to the right: the view's window moves back along it
            x0 = travel - int(round(travel * f / max(1, frames_per_part - 1)))
            bx, by, bw, bh = desc["bbox"]
            left, right = max(0, bx - x0), min(width, bx - x0 + bw)
            truth = {"frame": frame_no, "part": p, "scratched": desc["scratched"],
                     "surface": desc["surface"], "faint": desc["faint"],
                     "visibility": desc.get("visibility"),
                     "bbox": [int(left), int(by), int(max(0, right - left)), int(bh)],
                     "defects": [[s["box"][0] - x0, *s["box"][1:]] for s in desc["scratch"]]}
            yield np.ascontiguousarray(color[:, x0:x0 + width]), truth
            frame_no += 1


def render_video(out_path: Path, *, parts: int = 40, seed: int = 0, fps: int = 10,
                 size: tuple[int, int] = (640, 480), frames_per_part: int = 1,
                 scratch_fraction: float = 0.3, native: bool = False) -> list[dict[str, Any]]:
    """Write the :func:`render_frames` video to ``out_path`` and return its ground truth
    (one dict per frame: frame, part, scratched, surface, faint, visibility, bbox; with
    ``native``, parts drawn at the frame's resolution, and ``defects`` too).

    The codec follows the suffix: .avi and .mkv -> MJPG, .mp4 -> mp4v (what
    opencv-python-headless writes and reads back frame-exact without extra codecs).
    """
    out_path = Path(out_path)
    fourcc = VIDEO_FOURCC.get(out_path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"{out_path}: unsupported video suffix; use one of {', '.join(VIDEO_FOURCC)}")
    frames = render_frames(parts=parts, seed=seed, size=size, frames_per_part=frames_per_part,
                           scratch_fraction=scratch_fraction, native=native)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter.fourcc(*fourcc), float(fps), size, True)
    if not writer.isOpened():
        raise CameraError(f"{out_path}: OpenCV cannot write {fourcc} video here; "
                          f"try another suffix ({', '.join(VIDEO_FOURCC)}) or check the folder is writable")
    truth: list[dict[str, Any]] = []
    try:
        for frame, t in frames:
            writer.write(frame)
            truth.append(t)
    finally:
        writer.release()
    logger.info("wrote %s frames (%s parts) to %s", len(truth), parts, out_path)
    return truth


def preview_grid(out_path: Path, *, per_class: int = 16, seed: int = 0, size: int = 160,
                 columns: int = 8) -> np.ndarray:
    """Write a PNG grid: ``per_class`` ok images, a gap, then ``per_class`` scratched
    ones (each labelled with its surface and scratch count); returns the grid."""
    tiles: list[np.ndarray] = []
    for cls_i, scratched in enumerate((False, True)):
        for i in range(per_class):
            img, desc = render_part(np.random.default_rng([seed, cls_i, i]), size, scratched)
            tile = cv2.copyMakeBorder(img, 0, 14, 0, 2, cv2.BORDER_CONSTANT, value=255)
            label = f"{desc['surface'][:6]} {desc['edge'][:4]} s{desc['scratches']}{' F' if desc['faint'] else ''}"
            cv2.putText(tile, label, (2, size + 10), cv2.FONT_HERSHEY_PLAIN, 0.7, 0, 1, cv2.LINE_AA)
            tiles.append(tile)
    th, tw = tiles[0].shape
    rows_per_class = math.ceil(per_class / columns)
    gap = 16
    grid = np.full((2 * rows_per_class * th + gap, columns * tw), 255, np.uint8)
    for n, tile in enumerate(tiles):
        cls_i, i = divmod(n, per_class)
        r, c = divmod(i, columns)
        y = cls_i * (rows_per_class * th + gap) + r * th
        grid[y:y + th, c * tw:(c + 1) * tw] = tile
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_path), grid)
    return grid
