"""The deciding tile's box drawn on pictures of failed parts, for the people who look at them.

A box is (x, y, width, height) in camera-frame pixels (``ResultRecord.box``). The pictures
are the frame's region of interest (``camera.roi``), often scaled down: ``origin`` is where
the picture's top-left pixel lies in the frame and ``scale`` its pixels per frame pixel
along x and y.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

BOX_BGR = (0, 0, 255)  # red
# Picture pixels. JPEG keeps colour at half resolution, so a 2 px red line on a busy
# background comes out pinkish; 3 px stays clearly red.
BOX_THICKNESS = 3
OPERATOR_MAX_SIDE = 640  # the operator's picture: enough for a third of a screen
OPERATOR_JPEG_QUALITY = 85

Box = tuple[int, int, int, int]


def to_bgr(image: np.ndarray) -> np.ndarray:
    """A BGR copy of a gray, BGR or BGRA picture (never the caller's array)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image.copy()


def draw_box(
    image: np.ndarray,
    box: Box,
    *,
    origin: tuple[int, int] = (0, 0),
    scale: tuple[float, float] = (1.0, 1.0),
    thickness: int = BOX_THICKNESS,
) -> np.ndarray:
    """A BGR copy of ``image`` with ``box`` (frame pixels) outlined in red.

    The line lies inside the box's edges, and a box reaching past the picture is clipped to
    it, so the outline is always whole on the picture; a box wholly outside draws nothing.
    """
    out = to_bgr(image)
    h, w = out.shape[:2]
    bx, by, bw, bh = box
    ox, oy = origin
    sx, sy = scale
    x0, x1 = max(0, round((bx - ox) * sx)), min(w, round((bx + bw - ox) * sx))
    y0, y1 = max(0, round((by - oy) * sy)), min(h, round((by + bh - oy) * sy))
    if x1 <= x0 or y1 <= y0:
        return out
    t = max(1, thickness)
    out[y0 : min(y1, y0 + t), x0:x1] = BOX_BGR
    out[max(y0, y1 - t) : y1, x0:x1] = BOX_BGR
    out[y0:y1, x0 : min(x1, x0 + t)] = BOX_BGR
    out[y0:y1, max(x0, x1 - t) : x1] = BOX_BGR
    return out


def shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` with its longest side at most ``max_side``, and the scale applied (x, y)."""
    h, w = image.shape[:2]
    factor = min(1.0, max_side / max(h, w))
    if factor >= 1.0:
        return image, (1.0, 1.0)
    nw, nh = max(1, int(w * factor)), max(1, int(h * factor))
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA), (nw / w, nh / h)


class LastFailure:
    """The newest failed part's picture for the operator page: one picture, in memory.

    The writer hands over the picture the agent already holds (no copy, no encoding, so the
    line pays nothing); the JPEG, with the box drawn, is made on the first request after a
    failure and kept until the next one. Thread-safe.
    """

    def __init__(self, max_side: int = OPERATOR_MAX_SIDE, jpeg_quality: int = OPERATOR_JPEG_QUALITY) -> None:
        self.max_side = max_side
        self.jpeg_quality = jpeg_quality
        self._lock = threading.Lock()
        self._image: np.ndarray | None = None
        self._origin = (0, 0)
        self._info: dict[str, Any] | None = None
        self._jpeg: bytes | None = None

    def set(self, image: np.ndarray, *, origin: tuple[int, int], info: dict[str, Any]) -> None:
        """Keep this failed part (``info``: seq, part_id, ts, label, score, box...), drop the last."""
        with self._lock:
            self._image, self._origin, self._info, self._jpeg = image, origin, dict(info), None

    def info(self) -> dict[str, Any] | None:
        """What is known about the kept part, or None before the first failure."""
        with self._lock:
            return None if self._info is None else dict(self._info)

    def jpeg(self) -> bytes | None:
        """The kept part's picture as JPEG with its box, or None (no failure yet, or it cannot be encoded)."""
        with self._lock:
            if self._jpeg is not None or self._image is None or self._info is None:
                return self._jpeg
            image, origin, info = self._image, self._origin, self._info
        try:
            small, scale = shrink(image, self.max_side)
            box = info.get("box")
            picture = to_bgr(small) if box is None else draw_box(small, tuple(box), origin=origin, scale=scale)
            ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                raise ValueError("JPEG encoding failed")
        except Exception as exc:  # noqa: BLE001 - the operator page must never take the agent down
            logger.warning("picture of failed part %s not shown: %s", info.get("part_id"), exc)
            return None
        jpeg = buf.tobytes()
        with self._lock:
            if self._info is info:  # no newer failure meanwhile
                self._jpeg = jpeg
        return jpeg
