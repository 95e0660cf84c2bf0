"""Tiled bundles: the grid, the training crops and their labels, a real tiny tiled bundle
through the edge classifier, and the one-line errors of bad tilings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.exceptions import ImageError
from edge.inference import Classifier, check_golden
from edge.preprocess import read_image
from edge.protocol import Tiling
from edge.tiling import cut, grid_for, parse_tile, part_score, positions, rule_scores
from tests.conftest import run_cli, shared_bundle
from training.dataset import scan_dataset
from training.tiles import COVERAGE, RULE_MIN_GAIN, choose_rule, crop_label, training_crops
from training.tiny import draw_line_pictures


def test_positions_cover_the_side_with_the_overlap() -> None:
    for length, tile, overlap in [(100, 100, 0.0), (101, 100, 0.0), (1920, 128, 0.25), (330, 96, 0.5), (500, 64, 0.0)]:
        starts = positions(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        gaps = np.diff(starts)
        assert np.all(gaps >= 1)
        assert np.all(gaps <= tile * (1 - overlap) + 1), (length, tile, overlap, starts)
    with pytest.raises(ValueError):
        positions(50, 64, 0.0)


def test_grid_boxes_are_in_frame_pixels_with_scale_and_roi() -> None:
    tiling = Tiling(width=64, height=64, scale=0.5, overlap=0.0, roi=(100, 50, 512, 256), whole_frame=True)
    grid = grid_for(800, 400, tiling)
    assert grid.scaled_size == (256, 128)
    assert len(grid.offsets) == 4 * 2 and grid.count == 9
    # tiles cover 128x128 frame pixels inside the ROI; the whole view is the ROI itself
    assert grid.boxes[0] == (100, 50, 128, 128)
    assert grid.boxes[-2] == (100 + 384, 50 + 128, 128, 128)
    assert grid.boxes[-1] == (100, 50, 512, 256)
    frame = np.zeros((400, 800, 3), np.uint8)
    frame[50 + 128 + 10, 100 + 384 + 10] = 255  # one bright pixel inside the last tile
    inputs, same = cut(frame, tiling, "gray")
    assert inputs.shape == (9, 64, 64, 1) and same == grid
    assert inputs[7].max() > 0 and inputs[:7].max() == 0


def test_bad_frames_and_tiles_are_one_line_errors() -> None:
    tiling = Tiling(width=64, height=64, scale=1.0, roi=(0, 0, 300, 200))
    with pytest.raises(ImageError, match="smaller than the model's ROI"):
        grid_for(200, 200, tiling)
    with pytest.raises(ImageError, match="smaller than one 64x64 tile"):
        grid_for(50, 300, Tiling(width=64, height=64, scale=1.0))
    assert parse_tile("256x128") == (256, 128) and parse_tile("96") == (96, 96)
    for bad in ("8x8", "axb", "1x2x3"):
        with pytest.raises(ValueError):
            parse_tile(bad)


def test_crop_label_rule() -> None:
    clean = np.zeros((32, 32), np.float32)
    assert crop_label(clean, 200) == "good"
    line = clean.copy()
    line[10, :20] = 1.0
    assert crop_label(line, 200) == "defect"  # 20 defect pixels >= 16
    corner = clean.copy()
    corner[0, :3] = 1.0
    assert crop_label(corner, 200) == "skip"  # 3 of a long scratch's pixels: neither
    assert crop_label(corner, 6) == "defect"  # ...but half of a tiny defect is the defect
    faint = clean.copy()
    faint[5, 5] = COVERAGE / 2
    assert crop_label(faint, 10) == "skip"


def test_training_crops_follow_the_masks(tmp_path: Path) -> None:
    made = draw_line_pictures(tmp_path, count=24, seed=3)
    data = scan_dataset(tmp_path, min_per_class=1)
    classes = np.array([0 if s.label == "ok" else 1 for s in data.samples])
    tiling = Tiling(width=48, height=48, scale=1.0, overlap=0.25)
    crops = training_crops(data.samples, classes, 0, data.masks, tiling, "gray", seed=0)
    masks_of = {p: m for p, m in made}
    assert len(crops) > 0 and crops.x.shape[1:] == (48, 48, 1)
    for i in range(len(crops)):
        sample = data.samples[int(crops.owner[i])]
        if sample.label == "ok":
            assert crops.y[i] == 0 and crops.masks[i].max() == 0
        elif not crops.whole[i]:
            defect_pixels = int(np.sum(crops.masks[i] >= COVERAGE))
            # defect crops hold the scratch, good crops cut from a scratched picture hold none of it
            assert (defect_pixels > 0) == (crops.y[i] == 1), (sample.path, defect_pixels, crops.y[i])
            assert masks_of[sample.path] is not None
    scratched = crops.y == 1
    assert scratched.sum() >= 12 * 4  # focus crops: several per scratched picture
    # the dark scratch is in the defect crops' pixels where their masks say
    x = crops.x[scratched & ~crops.whole, :, :, 0].astype(float)
    m = crops.masks[scratched & ~crops.whole] >= COVERAGE
    assert x[m].mean() < x[~m].mean() - 25


def test_fused_rule_adds_the_whole_views_logit_and_names_the_deciding_input() -> None:
    fused = Tiling(width=32, height=32, scale=1.0, rule="fused", whole_weight=1.0)
    scores = np.array([0.1, 0.6, 0.2, 0.7])  # three tiles, then the whole view
    score, decider = part_score(scores, fused)
    assert score == pytest.approx(0.6 * 0.7 / (0.6 * 0.7 + 0.4 * 0.3))  # logits add: odds multiply
    assert decider == 3  # the whole view's weighted logit is the larger: its box goes with the result
    score, decider = part_score(np.array([0.1, 0.9, 0.2, 0.6]), fused)
    assert decider == 1 and score > 0.9
    # saturated scores count as half an int8 step from 0 or 1, not as infinite logits
    assert 0.0 < part_score(np.array([0.999, 0.0]), fused)[0] < 1.0
    plain = Tiling(width=32, height=32, scale=1.0)
    assert part_score(scores, plain) == (0.7, 3)
    assert rule_scores(np.array([[0.6, 0.7], [0.9, 0.2]]), plain).tolist() == [0.7, 0.9]
    with pytest.raises(ValueError, match="needs whole_frame"):
        Tiling(width=32, height=32, scale=1.0, whole_frame=False, rule="fused", whole_weight=1.0)


def test_the_rule_is_fused_only_when_the_whole_view_ranks_held_out_parts_better() -> None:
    rng = np.random.default_rng(0)
    n = 400
    is_defect = np.arange(n) < 120
    local = is_defect & (np.arange(n) < 60)  # half the defects show in a tile, half only as shading
    # shading defects: tiles a little off, the whole view a little off; neither alone decides
    tile = np.where(local, rng.uniform(0.6, 0.95, n), np.where(is_defect, rng.uniform(0.3, 0.7, n), rng.uniform(0.05, 0.7, n)))
    whole = np.where(is_defect & ~local, rng.uniform(0.3, 0.6, n), rng.uniform(0.02, 0.4, n))
    base = Tiling(width=32, height=32, scale=1.0)
    choice = choose_rule(np.stack([tile, whole], 1), is_defect, base)
    assert choice.tiling.rule == "fused" and choice.tiling.whole_weight > 0
    assert max(v for k, v in choice.auc.items() if k != "max") >= choice.auc["max"] + RULE_MIN_GAIN  # type: ignore[operator]
    # a whole view that carries nothing: the max rule stays
    noise = rng.uniform(0.02, 0.3, n)
    tile_only = np.where(is_defect, rng.uniform(0.5, 0.95, n), rng.uniform(0.05, 0.6, n))
    assert choose_rule(np.stack([tile_only, noise], 1), is_defect, base).tiling.rule == "max"
    # without a whole view there is nothing to fuse
    no_whole = Tiling(width=32, height=32, scale=1.0, whole_frame=False)
    assert choose_rule(np.stack([tile, whole], 1), is_defect, no_whole).tiling.rule == "max"


@pytest.fixture(scope="session")
def tiled_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory, "tiny-tiled-1", seed=0, tile=(48, 48), count=80)


def test_tiled_bundle_decides_frames_by_their_worst_tile(tiled_bundle: Path, tmp_path: Path) -> None:
    manifest = json.loads((tiled_bundle / "manifest.json").read_text())
    assert manifest["tiling"]["width"] == 48
    chosen = manifest["training"]["tiles"]["decision_rule"]
    assert manifest["tiling"]["rule"] == chosen["rule"] and "max" in chosen["held_out_auc"]
    assert manifest["input"]["shape"] == [1, 48, 48, 1]
    assert manifest["training"]["tiles"]["crops_train"] > 0
    clf = Classifier(tiled_bundle)
    golden = check_golden(clf)
    assert golden.ok, golden.failures
    assert all(g.expected_tiles for g in clf.manifest.golden)

    made = draw_line_pictures(tmp_path / "frames", count=30, seed=11)
    hits, scratched = 0, 0
    for path, mask_path in made:
        image = read_image(path)
        pred = clf.predict(image)
        inputs, grid = cut(image, clf.manifest.tiling, "gray")
        assert pred.box in grid.boxes and len(pred.tile_raws or ()) == grid.count
        scores = clf.scores(np.array(pred.tile_raws))
        assert pred.score == pytest.approx(part_score(scores, clf.manifest.tiling)[0], abs=1e-6)
        if mask_path is not None:
            scratched += 1
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            x, y, w, h = pred.box
            hits += int(mask[y : y + h, x : x + w].max() > 0)
    # the deciding tile holds the scratch on most scratched frames
    assert scratched >= 8 and hits >= 0.7 * scratched, (hits, scratched)

    with pytest.raises(ImageError, match="smaller than one 48x48 tile"):
        clf.predict(np.zeros((40, 200), np.uint8))


def test_tiled_golden_frames_must_match_on_the_box(tiled_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiled_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    tiles = manifest["golden"][0]["expected_tiles"]
    tiles[0] = [v + 40 if v < 0 else v - 40 for v in tiles[0]]  # one tile's expected output moved
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = check_golden(Classifier(copy))
    assert not result.ok and "differs" in result.failures[0]

    manifest["tiling"]["roi"] = [0, 0, 4000, 3000]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageError, match="smaller than the model's ROI"):
        Classifier(copy).predict(np.zeros((120, 160), np.uint8))


def test_train_eval_scores_a_tiled_bundle(tiled_bundle: Path, tmp_path: Path) -> None:
    draw_line_pictures(tmp_path / "held_out", count=24, seed=5)
    shutil.rmtree(tmp_path / "held_out" / "masks")
    out = run_cli("train", "eval", str(tiled_bundle), "--data", str(tmp_path / "held_out"), "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["n"] == 24 and metrics["unreadable"] == 0
    assert metrics["roc_auc"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tile", "8x8"], "smaller than 16x16"),
        (["--tile", "64x64", "--scale", "0.2"], "is a 13x13 model input"),
        (["--tile", "200x200"], "smaller than one 200x200 tile"),
    ],
)
def test_bad_tilings_fail_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    draw_line_pictures(tmp_path / "data", count=44, seed=1)
    out = run_cli("train", "fit", str(tmp_path / "data"), "--out", str(tmp_path / "b"), *args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_agent_runs_a_tiled_bundle_on_a_video_and_keeps_the_box(tiled_bundle: Path, tmp_path: Path) -> None:
    """The real agent process, the real tiled bundle, a video of the pictures it was made for:
    every row carries its deciding tile's box, failed samples and the operator page show it."""
    import sqlite3
    import urllib.request

    from tests.helpers import agent_config, assert_outline, decode, read_decisions, start_agent, stop

    made = draw_line_pictures(tmp_path / "frames", count=30, seed=21, scratch_share=0.5)
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 25, (160, 120))
    for path, _ in made:
        writer.write(cv2.cvtColor(read_image(path), cv2.COLOR_GRAY2BGR))
    writer.release()
    proc = start_agent(agent_config(tmp_path, tiled_bundle, str(video), "sampling.max_side = 160"))
    try:
        decisions = read_decisions(proc, len(made))
        assert len(decisions) == len(made)
        live = json.loads((tmp_path / "buffer.status.json").read_text())
        url = live["operator_url"]
        status = json.loads(urllib.request.urlopen(url + "api/status", timeout=5).read())
        failed_box = (status.get("last_failure") or {}).get("box")
        if failed_box is not None:
            with urllib.request.urlopen(url + "api/last-fail.jpg", timeout=5) as resp:
                assert_outline(decode(resp.read()), tuple(failed_box))
    finally:
        stop(proc)
    assert proc.returncode == 0, proc.stderr_text  # type: ignore[attr-defined]
    con = sqlite3.connect(tmp_path / "buffer.db")
    got = con.execute("SELECT seq, passed, box_x, box_y, box_w, box_h FROM results ORDER BY seq").fetchall()
    grid = grid_for(160, 120, Classifier(tiled_bundle).manifest.tiling)
    assert len(got) == len(made)
    assert all(tuple(r[2:]) in grid.boxes for r in got), "every decision keeps a box of the bundle's grid"
    failed = [r for r in got if not r[1]]
    assert failed, "a scratched line fails some parts"
    samples = dict(con.execute("SELECT result_seq, jpeg FROM samples WHERE reason = 'fail'").fetchall())
    seq, _, x, y, w, h = failed[-1]
    assert_outline(decode(samples[seq]), (x, y, w, h))
