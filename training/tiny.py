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
) -> Path:
    """Generate ``count`` synthetic images, train ``epochs`` epochs at ``size`` px, write a bundle to ``out_dir``.

    ``out_dir`` must not exist or be empty (or hold an older bundle, which is replaced).
    The quantization gate is reported in the manifest but never fails here: a two-epoch
    model is allowed to be poor. Returns ``out_dir``.
    """
    from training.pipeline import FitOptions, fit
    from training.synth import generate_dataset

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="linewatch-tiny-") as tmp:
        data_dir = Path(tmp) / "data"
        # Images at model size (at least the generator's 32 px minimum): nothing to resize.
        generate_dataset(data_dir, count=count, seed=seed, size=max(32, size))
        options = FitOptions(
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


__all__ = ["make_tiny_bundle"]
