"""Frame -> model input, exactly as the bundle's manifest says.

Training imports these same functions to build its float inputs, so the model sees
on the edge box what it saw in training (one code path, no drift by reimplementation).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.exceptions import ImageError
from edge.protocol import InputSpec, Preprocessing

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def read_image(path: Path) -> np.ndarray:
    """Read an image file as uint8 (gray or BGR), raising :class:`ImageError` when it cannot."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise ImageError(f"{path}: file not found")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt or not jpg/png/bmp); remove or replace it")
    if image.dtype != np.uint8:  # 16-bit PNGs from some industrial cameras
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(1, int(image.max())))
    return image


def to_color_mode(image: np.ndarray, color_mode: str) -> np.ndarray:
    """Convert gray, BGR or BGRA uint8 to 'gray' (H, W) or 'rgb' (H, W, 3)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if color_mode == "gray":
        if image.ndim == 2:
            return image
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(image, code)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def resize_uint8(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Colour-convert and resize to the model's size; returns uint8 (H, W, C)."""
    out = to_color_mode(image, prep.color_mode)
    if out.shape[:2] != (prep.height, prep.width):
        out = cv2.resize(out, (prep.width, prep.height), interpolation=_INTERPOLATION[prep.interpolation])
    if out.ndim == 2:
        out = out[:, :, None]
    return out


def to_float(image_uint8: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 -> float32 in [0, 1] ('divide_255'), the float model's input domain."""
    del prep  # one normalisation today; the parameter keeps call sites honest
    return image_uint8.astype(np.float32) / 255.0


def quantize_lut(prep: Preprocessing, spec: InputSpec) -> np.ndarray:
    """A 256-entry table mapping pixel value -> quantized input value.

    Normalisation is per pixel, so quantizing through a table is exact and costs one
    gather instead of float math on every pixel of every frame.
    """
    values = to_float(np.arange(256, dtype=np.uint8), prep)
    q = np.round(values / spec.scale + spec.zero_point)
    if spec.dtype == "int8":
        return np.clip(q, -128, 127).astype(np.int8)
    return np.clip(q, 0, 255).astype(np.uint8)


def to_model_input(image: np.ndarray, prep: Preprocessing, lut: np.ndarray) -> np.ndarray:
    """Frame -> quantized NHWC batch of one, ready for ``set_tensor``."""
    small = resize_uint8(image, prep)
    # cv2.LUT is the same table lookup as lut[small], bit for bit, ~7x faster than numpy's
    # fancy indexing; it drops a trailing channel axis of 1, hence the reshape.
    return cv2.LUT(small, lut).reshape(small.shape)[None, ...]
