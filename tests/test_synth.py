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
    _VISIBLE_ATTEMPTS,
    CLASSES,
    FIBRE_MIN_TORTUOSITY,
    RELABELLED,
    SURFACES,
    VISIBILITY_FLOOR,
    _fibre_path,
    _scratch_path,
    generate_dataset,
    recall_by_visibility,
    render_frames,
    render_part,
    render_part_and_mask,
    render_surface,
    render_video,
    scratch_visibility,
    tortuosity,
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


def test_fibres_are_curly_and_scratches_straight() -> None:
    """A good part must not carry a stroke drawn like a scratch: every fibre winds at least
    FIBRE_MIN_TORTUOSITY, which no scratch reaches."""
    rng = np.random.default_rng(3)
    fibres = [tortuosity(_fibre_path(rng, length, max(6, int(length / 0.7)))) for length in rng.uniform(8, 160, 400)]
    scratches = [tortuosity(_scratch_path(rng, 160, length)) for length in rng.uniform(24, 144, 400)]
    assert min(fibres) >= FIBRE_MIN_TORTUOSITY
    assert max(scratches) < 1.2 < FIBRE_MIN_TORTUOSITY
    assert tortuosity(np.array([[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]])) == pytest.approx(1.0)


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


# --------------------------------------------------------------------------- visibility


def _noisy_flat(sigma: float, seed: int = 0) -> np.ndarray:
    """A flat grey 128 px picture (no resize at the model size) with white noise, float."""
    return 100.0 + sigma * np.random.default_rng(seed).standard_normal((128, 128))


def _with_line(base: np.ndarray, contrast: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(picture, clean, footprint): a horizontal 1 px line on row 64, columns x0..x1-1,
    ``contrast`` grey levels darker, on the same noise."""
    clean = np.clip(np.round(base), 0, 255).astype(np.uint8)
    footprint = np.zeros((128, 128), np.float32)
    footprint[64, x0:x1] = 1.0
    picture = np.clip(np.round(base - contrast * footprint), 0, 255).astype(np.uint8)
    return picture, clean, footprint


def test_visibility_is_contrast_over_the_local_noise() -> None:
    """A 12-level line on noise of std 4 is CNR 3 (the noise minus its sigma-2 blur keeps
    about 0.98 of its std); twice the noise halves it, a line shorter than the 32 pixels
    the signal averages over counts its missing pixels as unchanged."""
    long_line = scratch_visibility(*_with_line(_noisy_flat(4.0), 12, 20, 100))
    assert 2.8 < long_line < 3.4
    assert 1.4 < scratch_visibility(*_with_line(_noisy_flat(8.0), 12, 20, 100)) < 1.7
    short = scratch_visibility(*_with_line(_noisy_flat(4.0), 12, 50, 58))  # 8 of 32 pixels
    assert short == pytest.approx(long_line * 8 / 32, rel=0.1)
    # no line, no visibility; a footprint the picture does not show is not visible either
    picture, clean, footprint = _with_line(_noisy_flat(4.0), 0, 20, 100)
    assert scratch_visibility(picture, clean, footprint) == 0.0
    # the noise is measured around the path, not over the whole picture
    base = _noisy_flat(4.0)
    base[:32] += 40.0 * np.random.default_rng(1).standard_normal((32, 128))  # busy far away
    assert scratch_visibility(*_with_line(base, 12, 20, 100)) == pytest.approx(long_line, rel=0.05)


def test_synth_json_carries_visibility_for_every_scratched_image(tmp_path: Path) -> None:
    counts = generate_dataset(tmp_path, count=24, seed=4, scratch_fraction=0.75)
    meta = json.loads((tmp_path / "synth.json").read_text())
    assert meta["version"] >= 4
    assert meta["visibility"]["floor"] == VISIBILITY_FLOOR and meta["visibility"]["size"] == 128
    relabelled = [m for m in meta["images"] if m.get("relabelled")]
    assert meta["visibility"]["relabelled"] == len(relabelled)
    assert counts["scratch"] + len(relabelled) == 18
    for m in meta["images"]:
        if m["file"].startswith("scratch/"):
            assert m["scratched"] and m["visibility"] >= VISIBILITY_FLOOR
            per = [s["visibility"] for s in m["scratch"]]
            assert len(per) == m["scratches"] >= 1
            assert min(per) >= VISIBILITY_FLOOR and m["visibility"] == max(per)
        else:
            assert "visibility" not in m and m["scratch"] == []


def test_the_recorded_visibility_is_measured_on_the_picture() -> None:
    """The figure in the description is the CNR of the drawn picture against the same
    part without scratches, not a parameter of the drawing."""
    for i in range(8):
        img, mask, desc = render_part_and_mask(np.random.default_rng([31, i]), 160, True)
        clean, _, _ = render_part_and_mask(np.random.default_rng([31, i]), 160, False)
        assert desc["scratched"], i
        # the mask (where the picture shows the footprint) stands in for the footprint
        measured = scratch_visibility(img, clean, mask.astype(np.float32) / 255)
        assert measured == pytest.approx(desc["visibility"], rel=0.35, abs=0.5), i
        assert scratch_visibility(clean, clean, mask.astype(np.float32) / 255) == 0.0


def test_scratches_below_the_floor_are_redrawn_dropped_or_relabelled(tmp_path: Path) -> None:
    """With a high floor some parts keep only their clear scratches and some keep none:
    those are written to ok/ as the clean picture, without a mask, and marked."""
    floor = 12.0
    counts = generate_dataset(tmp_path, count=30, seed=2, scratch_fraction=1.0, visibility_floor=floor)
    meta = json.loads((tmp_path / "synth.json").read_text())
    images = {m["file"]: m for m in meta["images"]}
    relabelled = [f for f, m in images.items() if m.get("relabelled")]
    assert counts["ok"] == len(relabelled) == meta["visibility"]["relabelled"] > 0
    assert counts["scratch"] > 0 and meta["visibility"]["floor"] == floor
    assert meta["visibility"]["redrawn"] > 0
    for f in relabelled:
        m = images[f]
        assert f.startswith("ok/") and m["relabelled"] == RELABELLED
        assert not m["scratched"] and m["scratches"] == 0 and m["best_visibility"] < floor
        assert m["redrawn"] == _VISIBLE_ATTEMPTS - 1
        assert not (tmp_path / "masks" / "scratch" / Path(f).name).exists()
        assert not (tmp_path / "masks" / f).exists()
        # the picture is the part without scratches, drawn from the same generator
        i = int(Path(f).stem.split("_")[1])
        clean, _ = render_part(np.random.default_rng([2, i]), 160, False)
        assert np.array_equal(cv2.imread(str(tmp_path / f), cv2.IMREAD_UNCHANGED), clean)
    for f, m in images.items():
        if f.startswith("scratch/"):
            assert min(s["visibility"] for s in m["scratch"]) >= floor
            assert (tmp_path / "masks" / f).exists()
    assert sorted(p.name for p in (tmp_path / "masks" / "scratch").iterdir()) == sorted(
        p.name for p in (tmp_path / "scratch").iterdir())
    # a part that kept fewer scratches than it drew says so
    assert meta["visibility"]["dropped_scratches"] == sum(m.get("dropped", 0) for m in images.values())


def test_video_parts_shown_scratched_have_a_visible_scratch() -> None:
    truth = [t for _, t in render_frames(parts=8, frames_per_part=1, size=(200, 120), seed=6,
                                        scratch_fraction=0.5)]
    scratched = [t for t in truth if t["scratched"]]
    assert scratched
    assert all(t["visibility"] >= VISIBILITY_FLOOR for t in scratched)
    assert all(t["visibility"] is None for t in truth if not t["scratched"])


def test_recall_by_visibility_bands() -> None:
    vis = {"scratch/a.png": 2.6, "scratch/b.png": 2.9, "scratch/c.png": 3.0, "scratch/d.png": 4.9,
           "scratch/e.png": 5.0, "scratch/f.png": 10.0, "scratch/g.png": 55.0}
    files = ["ok/x.png", *vis]
    failed = [True, False, True, True, True, False, True, True]
    out = recall_by_visibility(2.5, vis, files, failed)
    assert out["floor"] == 2.5 and out["n"] == 7
    assert [(b["band"], b["n"], b["caught"], b["recall"]) for b in out["bands"]] == [
        ("[2.5, 3)", 2, 1, 0.5), ("[3, 5)", 2, 2, 1.0), ("[5, 10)", 1, 0, 0.0), ("[10, inf)", 2, 2, 1.0)]
    assert out["bands"][-1]["high"] is None and out["bands"][0]["low"] == 2.5
    # an image below the floor (an older or hand-made set) gets its own band first
    low = recall_by_visibility(2.5, {**vis, "scratch/h.png": 1.0}, [*files, "scratch/h.png"], [*failed, False])
    assert low["bands"][0] == {"band": "[0, 2.5)", "low": 0.0, "high": 2.5, "n": 1, "caught": 0, "recall": 0.0}
    # a floor above 3 starts the bands there; an empty band has no recall
    assert [b["band"] for b in recall_by_visibility(4.0, vis, files, failed)["bands"]][:2] == ["[0, 4)", "[4, 5)"]
    assert recall_by_visibility(2.5, {}, files, failed)["bands"][0]["recall"] is None


def test_evaluate_bundle_reports_recall_by_visibility(tmp_path: Path, tiny_bundle: Path) -> None:
    import shutil

    from training.evaluate import evaluate_bundle

    data = tmp_path / "data"
    generate_dataset(data, count=30, seed=9, size=64)
    meta = json.loads((data / "synth.json").read_text())
    result = evaluate_bundle(tiny_bundle, data)
    by_vis = result["recall_by_visibility"]
    n_scratch = sum(1 for m in meta["images"] if m["scratched"])
    assert by_vis["n"] == n_scratch == result["n_defect"]
    assert by_vis["floor"] == VISIBILITY_FLOOR
    assert sum(b["n"] for b in by_vis["bands"]) == n_scratch
    # every band's catches add up to the scratched images the bundle failed
    assert sum(b["caught"] for b in by_vis["bands"]) == result["confusion"]["scratch"]["fail"]
    assert by_vis["false_reject_rate"] == result["false_reject_rate"]
    # without synth.json (any other folder) there is no such key
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "synth.json").unlink()
    assert "recall_by_visibility" not in evaluate_bundle(tiny_bundle, other)


# --------------------------------------------------------------------------- high-resolution frames


def _frames(root: Path, size: tuple[int, int], count: int, seed: int) -> dict:
    counts = generate_dataset(root, count=count, seed=seed, size=size)
    meta = json.loads((root / "synth.json").read_text())
    assert meta["counts"] == counts
    return meta


@pytest.fixture(scope="module")
def frame_sets(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, tuple[int, int], dict]]:
    """Two small frame sets of different sizes (about a second together)."""
    out = []
    for size, count, seed in (((640, 480), 6, 1), ((960, 540), 4, 2)):
        root = tmp_path_factory.mktemp(f"frames{size[0]}")
        out.append((root, size, _frames(root, size, count, seed)))
    return out


def test_frames_and_masks_have_the_asked_size(frame_sets) -> None:
    for root, (w, h), meta in frame_sets:
        images = [m for m in meta["images"]]
        assert len(images) == meta["count"]
        assert sum(m["scratched"] for m in images) == meta["counts"]["scratch"] > 0
        for m in images:
            img = cv2.imread(str(root / m["file"]), cv2.IMREAD_UNCHANGED)
            assert img is not None and img.dtype == np.uint8 and img.shape == (h, w)
            assert img.std() > 5  # a part on a belt, not a flat fill
            mask_path = root / "masks" / m["file"]
            assert mask_path.exists() == m["scratched"]
            if m["scratched"]:
                mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                assert mask.shape == (h, w) and set(np.unique(mask)) == {0, 255}
            # the part fills much of the frame
            bx, by, bw, bh = m["bbox"]
            assert bw * bh > 0.3 * w * h and bx >= 0 and by >= 0 and bx + bw <= w and by + bh <= h


def test_frame_scratches_are_thin_at_native_resolution(frame_sets) -> None:
    """A mask's width, its area over the drawn length, is 1-3 px (tapered ends pull it
    lower, a curve's arc longer than its chord higher), and no 5x5 square fits in any
    mask; lengths are 40-400 px at 1920x1080, scaled with the frame's shorter side."""
    widths = []
    for root, (w, h), meta in frame_sets:
        k = min(w, h) / 1080
        for m in meta["images"]:
            if not m["scratched"]:
                continue
            mask = (cv2.imread(str(root / "masks" / m["file"]), cv2.IMREAD_UNCHANGED) > 0).astype(np.uint8)
            widths.append(mask.sum() / sum(s["length_px"] for s in m["scratch"]))
            assert not cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)).any(), m["file"]
            for s in m["scratch"]:
                assert 1.0 <= s["width_px"] <= 3.0
                assert max(16, 40 * k) - 0.1 <= s["length_px"] <= 400 * k + 0.1
                x, y, bw, bh = s["box"]
                assert mask[y:y + bh, x:x + bw].any()  # every kept scratch is in the mask
    assert all(0.5 <= x <= 3.2 for x in widths), widths
    assert 1.0 <= float(np.median(widths)) <= 3.0, widths


def test_frames_synth_json_records_size_and_native_visibility(frame_sets) -> None:
    from training.synth import read_visibility

    for root, (w, h), meta in frame_sets:
        assert meta["mode"] == "frame" and meta["size"] == [w, h]
        vis = meta["visibility"]
        assert vis["size"] == [w, h] and vis["scale"] == 1.0 and vis["floor"] == VISIBILITY_FLOOR
        assert "native resolution" in vis["measure"]
        for m in meta["images"]:
            if m["scratched"]:
                per = [s["visibility"] for s in m["scratch"]]
                assert min(per) >= VISIBILITY_FLOOR and m["visibility"] == max(per)
                assert m["faint"] == (m["visibility"] < 5)
        # train eval's recall by visibility reads it as it reads the default sets'
        floor, by_file = read_visibility(root)
        assert floor == VISIBILITY_FLOOR
        assert set(by_file) == {m["file"] for m in meta["images"] if m["scratched"]}


def test_frame_visibility_is_measured_natively_and_lost_when_squeezed() -> None:
    """The recorded CNR is the picture's against the same part without scratches at
    native resolution; a 1920x1080 frame squeezed to the default 128 px model input
    loses most of it, and most scratches fall below the floor there (what tiles are for)."""
    from training.synth import _Backdrop, _cnr_on, render_frame_and_mask

    pairs = []
    for i in range(4):
        img, mask, desc = render_frame_and_mask(np.random.default_rng([41, i]), (1920, 1080), True)
        clean, empty, _ = render_frame_and_mask(np.random.default_rng([41, i]), (1920, 1080), False)
        assert desc["scratched"] and not empty.any()
        changed = img != clean
        assert changed.any() and changed.mean() < 0.002  # only around the thin scratches
        cover = (mask > 0).astype(np.float32)
        native = _cnr_on(img.astype(np.float32), _Backdrop.native(clean), cover)
        assert native == pytest.approx(desc["visibility"], rel=0.35, abs=0.5), i
        pairs.append((native, scratch_visibility(img, clean, cover)))
    assert all(squeezed < native / 3 for native, squeezed in pairs), pairs
    assert sum(squeezed < VISIBILITY_FLOOR for _, squeezed in pairs) >= 3, pairs


def test_frames_are_deterministic(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", count=3, seed=4, size=(320, 200))
    generate_dataset(tmp_path / "b", count=3, seed=4, size=(320, 200))
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_native_video_frames_and_truth(tmp_path: Path) -> None:
    truth = render_video(tmp_path / "line.avi", parts=3, frames_per_part=2, size=(320, 240), seed=3,
                         scratch_fraction=0.67, native=True)
    assert [t["part"] for t in truth] == [0, 0, 1, 1, 2, 2]
    assert sum(t["scratched"] for t in truth) == 4
    for t in truth:
        x, y, w, h = t["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 320 and y + h <= 240 and w * h > 0
        if t["scratched"]:
            assert t["visibility"] >= VISIBILITY_FLOOR and t["defects"]
            assert all(dx >= 0 and dx + dw <= 320 + 1 for dx, _, dw, _ in t["defects"])
        else:
            assert t["visibility"] is None and t["defects"] == []
    frames = list(render_frames(parts=3, frames_per_part=2, size=(320, 240), seed=3,
                                scratch_fraction=0.67, native=True))
    assert all(f.shape == (240, 320, 3) for f, _ in frames)
    assert [t for _, t in frames] == truth
    # the part moves with the belt between its two frames
    assert truth[0]["bbox"][0] != truth[1]["bbox"][0]
    cap = cv2.VideoCapture(str(tmp_path / "line.avi"))
    try:
        ok, first = cap.read()
    finally:
        cap.release()
    assert ok and first.shape == (240, 320, 3)


@pytest.mark.parametrize("size", ["abc", "1920x", "12x12", "64x63", "20", "9000x100", "1920x1080x3"])
def test_train_synth_refuses_a_bad_size_in_one_line(tmp_path: Path, size: str) -> None:
    from click.testing import CliRunner

    from edge.cli import cli

    result = CliRunner().invoke(cli, ["train", "synth", str(tmp_path / "out"), "--count", "2", "--size", size])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --size"), result.output
    assert not (tmp_path / "out").exists()


def test_train_synth_size_frames_from_the_command_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edge.cli import cli

    runner = CliRunner()
    help_text = runner.invoke(cli, ["train", "synth", "--help"]).output
    assert "--size 1920x1080" in help_text
    result = runner.invoke(cli, ["train", "synth", str(tmp_path), "--count", "2", "--size", "320x180", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert cv2.imread(str(next((tmp_path / "ok").glob("*.png"))), cv2.IMREAD_UNCHANGED).shape == (180, 320)
    assert json.loads((tmp_path / "synth.json").read_text())["size"] == [320, 180]


def test_evaluate_bundle_reports_recall_by_visibility_on_frames(tmp_path: Path, tiny_bundle: Path) -> None:
    from training.evaluate import evaluate_bundle

    data = tmp_path / "frames"
    meta = _frames(data, (320, 240), 8, 6)
    by_vis = evaluate_bundle(tiny_bundle, data)["recall_by_visibility"]
    assert by_vis["floor"] == VISIBILITY_FLOOR
    assert by_vis["n"] == sum(b["n"] for b in by_vis["bands"]) == meta["counts"]["scratch"] > 0
