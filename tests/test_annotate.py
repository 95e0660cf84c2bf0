"""The deciding tile's box on pictures of failed parts: JPEG samples and the operator page."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.agent import Sampler, frame_box
from edge.annotate import LastFailure, draw_box, to_bgr
from edge.config import load_config
from edge.operator import OperatorPage
from tests.helpers import assert_outline, decode, red

ROI_ORIGIN = (40, 20)  # where the pictures below lie in the camera frame
FRAME_BOX = (140, 80, 64, 48)  # camera-frame pixels: (100, 60, 64, 48) inside the ROI picture


def roi_picture(width: int = 240, height: int = 200, gray: bool = False) -> np.ndarray:
    """A noisy grey part surface, as the ROI crop of a camera frame."""
    rng = np.random.default_rng(0)
    img = (110 + rng.integers(0, 30, (height, width))).astype(np.uint8)
    return img if gray else cv2.merge([img, img, img])


def test_roi_offset_puts_the_box_in_camera_frame_pixels() -> None:
    assert frame_box((100, 60, 64, 48), ROI_ORIGIN) == FRAME_BOX
    assert frame_box(None, ROI_ORIGIN) is None


def test_failed_sample_jpeg_has_the_box_where_the_tile_was(write_config: Callable[..., Path]) -> None:
    cfg = load_config(write_config(
        'device_id = "cam"\ncamera.source = "parts.mp4"\nmodel.path = "models"\nbuffer.path = "buffer.db"\n'
        '[sampling]\nmax_side = 120\n'
    ))
    sampler = Sampler(cfg, lambda: 0.5)
    picture = roi_picture()
    before = picture.copy()
    jpeg, w, h = sampler.encode(picture, FRAME_BOX, ROI_ORIGIN)
    assert (w, h) == (120, 100)  # 240x200 scaled by 0.5 to fit max_side
    assert_outline(decode(jpeg), (50, 30, 32, 24))  # (100, 60, 64, 48) at half scale
    assert np.array_equal(picture, before), "the agent's frame is never drawn on"
    plain, _, _ = sampler.encode(picture)  # no box: nothing red anywhere
    assert not any(red(decode(plain), x, y) for y in range(0, 100, 2) for x in range(0, 120, 2))


def test_box_on_a_gray_picture_is_red_and_clipped_to_the_picture() -> None:
    gray = roi_picture(gray=True)
    out = draw_box(gray, (200, 150, 100, 100))  # reaches past the right and bottom edges
    assert out.shape == (200, 240, 3)
    assert_outline(out, (200, 150, 40, 50))
    assert np.array_equal(draw_box(gray, (300, 10, 20, 20)), to_bgr(gray)), "a box off the picture draws nothing"


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def page(tmp_path: Path) -> tuple[OperatorPage, LastFailure]:
    held = LastFailure()
    op = OperatorPage("127.0.0.1", 0, lambda: {"last_failure": held.info()}, tmp_path / "buffer.db", last_failure=held)
    op.start()
    yield op, held
    op.close()


def test_operator_page_serves_the_last_failed_picture_with_its_box(page: tuple[OperatorPage, LastFailure]) -> None:
    op, held = page
    base = f"http://127.0.0.1:{op.port}"
    code, _, _ = get(base + "/api/last-fail.jpg")
    assert code == 404  # no failure yet, no buffer either
    picture = roi_picture()
    before = picture.copy()
    for seq, box in ((6, (40, 20, 32, 32)), (7, FRAME_BOX)):  # only the newest one is kept
        held.set(picture, origin=ROI_ORIGIN, info={"seq": seq, "part_id": seq, "label": "scratch", "score": 0.973, "box": list(box)})
    code, ctype, body = get(base + "/api/last-fail.jpg?seq=7")
    assert (code, ctype) == (200, "image/jpeg")
    shown = decode(body)
    assert shown.shape == (200, 240, 3)  # the ROI picture, under the page's size limit: not scaled
    assert_outline(shown, (100, 60, 64, 48))
    assert not red(shown, 1, 1), "the older failure's box is gone"
    assert np.array_equal(picture, before)
    status = json.loads(get(base + "/api/status")[2])
    assert status["last_failure"] == {"seq": 7, "part_id": 7, "label": "scratch", "score": 0.973, "box": list(FRAME_BOX)}
    html = get(base + "/")[2].decode()
    assert "/api/last-fail.jpg?seq=" in html and "lastfailinfo" in html and "score" in html
