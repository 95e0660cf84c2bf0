"""Synthetic dataset and inspection video: layout, determinism, realism checks, video I/O."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.synth import (
    CLASSES,
    SURFACES,
    generate_dataset,
    render_frames,
    render_part,
    render_surface,
    render_video,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _line_response(img: np.ndarray) -> float:
    """Strongest thin, straight-ish structure: top-hat + black-hat (removes lighting,
    edges and anything wider than ~5 px), then averaged along 25 px lines at 25
    orientations: dust dots and short curly fibres average away, a scratch does not."""
    f = img.astype(np.float32)
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    thin = cv2.morphologyEx(f, cv2.MORPH_TOPHAT, ker) + cv2.morphologyEx(f, cv2.MORPH_BLACKHAT, ker)
    best = np.zeros_like(f)
    length, c = 25, 12
    for ang in np.radians(np.arange(0, 180, 180 / length)):
        k = np.zeros((length, length), np.float32)
        dx, dy = np.cos(ang) * c, np.sin(ang) * c
        cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
        best = np.maximum(best, cv2.filter2D(thin, -1, k / k.sum()))
    return float(best.max())


def _auc(pos: list[float], neg: list[float]) -> float:
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((p > n).mean() + 0.5 * (p == n).mean())


@pytest.fixture(scope="module")
def samples() -> tuple[list[tuple[np.ndarray, dict]], list[tuple[np.ndarray, dict]]]:
    ok = [render_part(np.random.default_rng([11, 0, i]), 160, False) for i in range(40)]
    scratch = [render_part(np.random.default_rng([11, 1, i]), 160, True) for i in range(40)]
    return ok, scratch


def test_layout_counts_and_metadata(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    counts = generate_dataset(tmp_path, count=11, seed=3, scratch_fraction=0.3,
                              progress=lambda done, total: calls.append((done, total)))
    assert counts == {"ok": 8, "scratch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks", "ok", "scratch", "synth.json"]
    for cls in CLASSES:
        files = sorted((tmp_path / cls).iterdir())
        assert len(files) == counts[cls]
        assert all(re.fullmatch(rf"{cls}_\d{{5}}\.png", f.name) for f in files)
    # every index is used once across the two classes
    images = [p for cls in CLASSES for p in (tmp_path / cls).glob("*.png")]
    indices = sorted(int(p.stem.split("_")[1]) for p in images)
    assert indices == list(range(11))
    # one mask per scratched image, under the same name, and none for good parts
    masks = sorted(p.name for p in (tmp_path / "masks" / "scratch").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "scratch").iterdir())
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["scratch"]
    assert calls[-1] == (11, 11) and [d for d, _ in calls] == list(range(1, 12))
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["counts"] == counts and meta["seed"] == 3 and meta["count"] == 11
    assert meta["size"] == 160 and meta["pass_label"] == "ok"
    assert {m["file"] for m in meta["images"]} == {str(p.relative_to(tmp_path)) for p in images}
    for m in meta["images"]:
        assert (m["scratches"] > 0) == m["file"].startswith("scratch/")


def test_images_are_gray_uint8_of_the_asked_size(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", count=6, size=160)
    generate_dataset(tmp_path / "b", count=4, size=96)
    for root, size in ((tmp_path / "a", 160), (tmp_path / "b", 96)):
        files = list(root.rglob("*.png"))
        assert files
        for f in files:
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            assert img is not None and img.dtype == np.uint8 and img.shape == (size, size)
            assert img.std() > 2  # a surface, not a flat fill


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", count=8, seed=7)
    generate_dataset(tmp_path / "b", count=8, seed=7)
    generate_dataset(tmp_path / "c", count=8, seed=8)
    a, b, c = (_hashes(tmp_path / d) for d in "abc")
    assert a == b
    assert len(a) == 13  # 8 images, the 4 scratched ones' masks and synth.json
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c.get(k) for k in pngs)


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    calls: list[int] = []
    generate_dataset(tmp_path / "one", count=9, seed=5)
    generate_dataset(tmp_path / "two", count=9, seed=5, workers=2,
                     progress=lambda done, total: calls.append(done))
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")
    assert calls[-1] == 9 and calls == sorted(calls)


def test_rerun_replaces_an_earlier_dataset(tmp_path: Path) -> None:
    generate_dataset(tmp_path, count=10, seed=1)
    (tmp_path / "ok" / "notes.txt").write_text("keep me")
    counts = generate_dataset(tmp_path, count=4, seed=2)
    assert sum(counts.values()) == 4
    assert len(list(tmp_path.glob("[os]*/*.png"))) == 4
    # the old masks went with their images: one mask per scratched image of the new set
    assert len(list((tmp_path / "masks" / "scratch").glob("*.png"))) == counts["scratch"]
    assert (tmp_path / "ok" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs", [{"count": 0}, {"scratch_fraction": 1.5}, {"size": 16},
                                    {"workers": 0}])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, **kwargs)


def test_scratches_raise_a_line_detector_response(samples) -> None:
    ok, scratch = samples
    ok_r = [_line_response(img) for img, _ in ok]
    sc_r = [_line_response(img) for img, _ in scratch]
    # part edges and chamfers respond in both classes, so the gap is on average, not per image
    assert np.mean(sc_r) > 1.15 * np.mean(ok_r)
    assert _auc(sc_r, ok_r) > 0.6


def test_mean_intensity_does_not_give_the_class_away(samples) -> None:
    ok, scratch = samples
    ok_m = [float(img.mean()) for img, _ in ok]
    sc_m = [float(img.mean()) for img, _ in scratch]
    assert 0.3 < _auc(sc_m, ok_m) < 0.7
    # the ranges overlap broadly, both ways
    assert min(sc_m) < np.median(ok_m) < max(sc_m)
    assert min(ok_m) < np.median(sc_m) < max(ok_m)


def test_distractors_and_variety_in_both_classes(samples) -> None:
    ok, scratch = samples
    for group in (ok, scratch):
        descs = [d for _, d in group]
        assert any(d["dust"] > 0 for d in descs)
        assert any(d["fibres"] > 0 for d in descs)
        assert any(d["edge"] != "none" for d in descs)
        assert {d["surface"] for d in descs} == set(SURFACES)
    assert all(d["scratches"] == 0 for _, d in ok)
    sc = [d for _, d in scratch]
    assert all(1 <= d["scratches"] <= 3 for d in sc)
    assert {s["polarity"] for d in sc for s in d["scratch"]} == {"dark", "bright"}
    lengths = [s["length_px"] for d in sc for s in d["scratch"]]
    assert min(lengths) < 0.35 * 160 and max(lengths) > 0.6 * 160


def test_faint_scratches_are_a_minority() -> None:
    descs = [render_part(np.random.default_rng([5, i]), 96, True)[1] for i in range(120)]
    faint = sum(d["faint"] for d in descs)
    assert 6 <= faint <= 36


def test_scratch_is_the_only_difference_for_the_same_generator_state() -> None:
    for i in range(5):
        a, da = render_part(np.random.default_rng([9, i]), 160, True)
        b, db = render_part(np.random.default_rng([9, i]), 160, False)
        assert da["surface"] == db["surface"] and da["edge"] == db["edge"]
        changed = np.abs(a.astype(int) - b.astype(int)) > 0
        assert 0 < changed.mean() < 0.1  # thin strokes, not a different picture


def test_render_surface_kinds() -> None:
    for kind in SURFACES:
        img = render_surface(np.random.default_rng(1), 64, kind)
        assert img.shape == (64, 64) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown surface"):
        render_surface(np.random.default_rng(1), 64, "wood")


def test_render_video_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "parts.avi"
    truth = render_video(out, parts=5, frames_per_part=2, size=(320, 240), scratch_fraction=0.4,
                         seed=4)
    assert len(truth) == 10
    assert [t["frame"] for t in truth] == list(range(10))
    assert [t["part"] for t in truth] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sum(t["scratched"] for t in truth) == 2 * 2  # round(5 * 0.4) parts, 2 frames each
    cap = cv2.VideoCapture(str(out))
    try:
        assert cap.isOpened()
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    assert len(frames) == 10
    assert all(f.shape == (240, 320, 3) for f in frames)
    # the file holds the frames render_frames yields (up to MJPG loss)
    expected = [f for f, _ in render_frames(parts=5, frames_per_part=2, size=(320, 240),
                                            scratch_fraction=0.4, seed=4)]
    for got, want in zip(frames, expected, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 4


def test_render_frames_matches_truth_and_is_deterministic() -> None:
    first = list(render_frames(parts=3, frames_per_part=1, size=(200, 120), seed=2))
    second = list(render_frames(parts=3, frames_per_part=1, size=(200, 120), seed=2))
    assert len(first) == 3
    for (fa, ta), (fb, tb) in zip(first, second, strict=True):
        assert ta == tb and np.array_equal(fa, fb)
        assert fa.shape == (120, 200, 3) and fa.dtype == np.uint8
        x, y, w, h = ta["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 200 and y + h <= 120


def test_render_video_mp4_and_bad_suffix(tmp_path: Path) -> None:
    truth = render_video(tmp_path / "parts.mp4", parts=2, size=(160, 120))
    cap = cv2.VideoCapture(str(tmp_path / "parts.mp4"))
    try:
        n = 0
        while cap.read()[0]:
            n += 1
    finally:
        cap.release()
    assert n == len(truth) == 2
    with pytest.raises(ValueError, match="suffix"):
        render_video(tmp_path / "parts.gif", parts=1)


def test_the_mask_marks_where_the_scratches_are() -> None:
    """The mask of a scratched part covers the pixels where it differs from the same part
    rendered without scratches, and little else; an unscratched part's mask is empty."""
    from training.synth import render_part_and_mask

    checked = 0
    for i in range(30):
        a, mask, desc = render_part_and_mask(np.random.default_rng([21, i]), 160, True)
        b, empty, _ = render_part_and_mask(np.random.default_rng([21, i]), 160, False)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert not empty.any()
        assert np.array_equal(a, render_part(np.random.default_rng([21, i]), 160, True)[0])
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        if desc["faint"] or diff.max() < 20:
            continue  # faint strokes sit in the noise; the comparison needs a clear one
        strong = diff >= 20
        near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0  # defocus spreads a stroke by a pixel or two
        assert strong[near].sum() >= 0.95 * strong.sum(), i
        assert mask.mean() / 255 < 0.2
        checked += 1
    assert checked >= 15
