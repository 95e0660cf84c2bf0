"""A complete, real, tiny bundle in seconds, for tests and for making other versions.

Same pipeline as ``linewatch train fit`` (synthetic data -> data check -> training ->
int8 conversion -> evaluation through the edge classifier -> golden images -> manifest
-> report), only small: a 64x64 input, a hundred-odd images, two epochs. It is not an
accurate model; it is a valid one, with every manifest field, so agent, OTA and cloud
tests run against the real artefact. Other sizes or versions give incompatible bundles
(a different input shape, a different version string) for OTA tests.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def make_tiny_bundle(
    out_dir: Path,
    *,
    seed: int = 0,
    version: str = "tiny-1",
    size: int = 64,
    epochs: int = 2,
    count: int = 120,
    tile: tuple[int, int] | None = None,
) -> Path:
    """Generate ``count`` synthetic images, train ``epochs`` epochs at ``size`` px, write a bundle to ``out_dir``.

    ``out_dir`` must not exist or be empty (or hold an older bundle, which is replaced).
    The quantization gate is reported in the manifest but never fails here: a two-epoch
    model is allowed to be poor. With ``tile`` the bundle is tiled: it trains on tiles of
    larger pictures with thin scratches and masks (:func:`draw_line_pictures`). Returns
    ``out_dir``.
    """
    from training.pipeline import FitOptions, fit
    from training.synth import generate_dataset

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="linewatch-tiny-") as tmp:
        data_dir = Path(tmp) / "data"
        if tile is None:
            # Images at model size (at least the generator's 32 px minimum): nothing to resize.
            generate_dataset(data_dir, count=count, seed=seed, size=max(32, size))
        else:
            draw_line_pictures(data_dir, count=count, seed=seed)
        options = FitOptions(
            tile=tile,
            epochs=epochs,
            seed=seed,
            size=size,
            filters=8,  # small and quick: these bundles test the plumbing, not accuracy
            version=version,
            name="linewatch-tiny",
            patience=epochs,
            folds=2,  # the out-of-fold path, at the least cost
            allow_quantization_drop=True,
            golden_per_class=8,
            latency_samples=30,
        )
        fit(data_dir, out_dir, options, echo=lambda line: logger.debug("%s", line))
        shutil.rmtree(data_dir, ignore_errors=True)
    return out_dir


def draw_line_pictures(
    data_dir: Path, *, count: int, seed: int, size: tuple[int, int] = (160, 120), scratch_share: float = 0.5
) -> list[tuple[Path, Path | None]]:
    """Plain grey plates with a lighting gradient and noise, half with a thin dark scratch
    (1-2 px) and its mask: ``data_dir/ok``, ``data_dir/scratch``, ``data_dir/masks/scratch``.
    Returns (picture, mask or None) pairs."""
    import cv2
    import numpy as np

    rng = np.random.default_rng([seed, 31])
    width, height = size
    made: list[tuple[Path, Path | None]] = []
    for folder in ("ok", "scratch", "masks/scratch"):
        (Path(data_dir) / folder).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(count):
        level = 110 + 20 * rng.random() + 15 * (xx / width) + 10 * (yy / height)
        picture = np.clip(level + rng.normal(0, 3, (height, width)), 0, 255).astype(np.uint8)
        if rng.random() >= scratch_share:
            path = Path(data_dir) / "ok" / f"ok_{i:04d}.png"
            cv2.imwrite(str(path), picture)
            made.append((path, None))
            continue
        length = rng.uniform(20, 45)
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(25, width - 25), rng.uniform(25, height - 25)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p0, p1 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
        thickness = int(rng.integers(1, 3))
        mask = np.zeros((height, width), np.uint8)
        cv2.line(mask, p0, p1, 255, thickness)
        picture = np.where(mask > 0, np.clip(picture.astype(int) - 45, 0, 255), picture).astype(np.uint8)
        path = Path(data_dir) / "scratch" / f"scratch_{i:04d}.png"
        mask_path = Path(data_dir) / "masks" / "scratch" / path.name
        cv2.imwrite(str(path), picture)
        cv2.imwrite(str(mask_path), mask)
        made.append((path, mask_path))
    return made


__all__ = ["draw_line_pictures", "make_tiny_bundle"]
