"""`linewatch demo --size WxH` (issue 19): the whole loop on high-resolution frames with a
tiled model, at tiny numbers (320x240 frames, 64x64 tiles, 60 training frames, 30 parts,
one epoch). The verdict rates of such a model mean nothing; the steps and the boxes do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli


def test_demo_help_shows_the_high_resolution_example() -> None:
    proc = run_cli("demo", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "linewatch demo --size 1920x1080" in proc.stdout
    assert "--tile" in proc.stdout and "--scale" in proc.stdout


def test_demo_tile_without_size_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("demo", "--tile", "64x64", "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "--tile and --scale go with --size" in proc.stderr
    proc = run_cli("demo", "--size", "160", "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "WxH" in proc.stderr
    assert not (tmp_path / "out" / "data").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_on_high_resolution_frames_with_a_tiled_model(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_cli(
        "demo", "--size", "320x240", "--tile", "64x64", "--count", "60", "--parts", "30", "--epochs", "1",
        "--out", str(out), timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout

    for step in range(1, 7):
        assert f"==> {step}/6" in text
    assert "60 frames of 320x240, tiles of 64x64 at scale 1" in text
    assert "30 frames of 320x240" in text
    assert "every decision reached the cloud exactly once" in text
    assert re.search(r"^  model 1\.0\.0: [\d.]+% of \d+ good parts passed, [\d.]+% of \d+ scratched parts failed$", text, re.M)
    assert re.search(r"^verdicts: [\d.]+% of \d+ good parts passed, [\d.]+% of \d+ scratched parts failed", text, re.M)
    boxed = re.search(r"^failed results with a box: (\d+) of (\d+)", text, re.M)
    assert boxed, text[-3000:]
    assert boxed[1] == boxed[2]  # every failed result of a tiled model carries its deciding tile

    # Both bundles are tiled: v2 is v1 with its operating point moved.
    for name, version in (("bundle-v1", "1.0.0"), ("bundle-v2", "2.0.0")):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["version"] == version
        assert manifest["tiling"]["width"] == 64 and manifest["tiling"]["height"] == 64
        assert manifest["tiling"]["scale"] == 1.0
    agent_cfg = (out / "run" / "agent.toml").read_text()
    assert "roi" not in agent_cfg  # a tiled model covers the whole frame

    rows = json.loads(run_cli("cloud", "results", "--config", str(out / "run" / "cloud.toml"), "--device", "line1-cam1",
                              "--limit", "1000", "--json", timeout=60).stdout)
    assert len(rows) == 30
    boxes = [r["box"] for r in rows if r["box"]]
    assert len(boxes) == 30
    for x, y, w, h in boxes:
        assert x >= 0 and y >= 0 and x + w <= 320 and y + h <= 240 and w >= 64 and h >= 64
