"""Helpers shared by several test modules: ports, polling, images and videos on disk.

Fixtures live in conftest.py; these are plain functions a test imports by name.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from click.testing import CliRunner


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "the condition", interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_images(folder: Path, n: int, *, seed: int, size: int = 24, prefix: str = "img", color: bool = False) -> list[Path]:
    """n distinct random images (png) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size, size + 3, 3) if color else (size, size + 3)
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        path = folder / f"{prefix}_{i:04d}.png"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def write_video(path: Path, frames: int, size: tuple[int, int] = (320, 240), fps: int = 25) -> None:
    """A video whose frame i shows part i (alternating clean and scratched surfaces)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(frames):
        img = np.full((size[1], size[0], 3), 120, np.uint8)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)
        if i % 3 == 0:
            cv2.line(img, (20, 20 + i % 50), (size[0] - 30, size[1] - 40), (30, 30, 30), 2, cv2.LINE_AA)
        writer.write(img)
    writer.release()


def invoke_train(*args: str) -> tuple[int, str]:
    """``linewatch train ARGS`` in-process: (exit code, output)."""
    from training.cli import (
        train,  # the trainer's CLI imports are heavy; only the tests that use it pay
    )

    result = CliRunner().invoke(train, list(args))
    return result.exit_code, result.output
