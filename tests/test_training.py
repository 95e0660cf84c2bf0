"""The trainer's parts: data check, split, metrics, threshold, bundle contents, pack/unpack.

Fast tests use images and tar files they make in tmp_path; the bundle tests use the real
tiny int8 bundle that the trainer makes once per run (conftest's ``tiny_bundle``).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.bundle import pack_bundle, unpack_bundle
from edge.exceptions import BundleError, LinewatchError
from edge.fsutil import sha256_file
from edge.inference import Classifier, check_golden
from edge.protocol import read_manifest
from tests.helpers import write_images
from training.dataset import (
    Sample,
    content_groups,
    dataset_fingerprint,
    label_indices,
    load_arrays,
    load_masks,
    number_groups,
    scan_dataset,
    split_dataset,
)
from training.evaluate import average_precision, compute_metrics, roc_auc
from training.exceptions import DataError, TrainingError

# --------------------------------------------------------------------------- helpers


def make_samples(counts: dict[str, int]) -> list[Sample]:
    out = []
    for label, n in counts.items():
        for i in range(n):
            digest = f"{label}-{i}".encode().hex().ljust(64, "0")[:64]
            out.append(Sample(Path(f"/data/{label}/{label}_{i:05d}.png"), label, digest))
    return out


# --------------------------------------------------------------------------- data check


def test_scan_counts_classes_and_fingerprints(tmp_path: Path) -> None:
    write_images(tmp_path / "ok", 12, seed=1)
    write_images(tmp_path / "scratch", 11, seed=2, color=True)
    (tmp_path / "ok" / "notes.txt").write_text("not an image")
    report = scan_dataset(tmp_path)
    assert report.labels == ("ok", "scratch")
    assert report.pass_label == "ok"
    assert dict(report.class_counts) == {"ok": 12, "scratch": 11}
    assert report.ignored == 1
    assert report.unreadable == () and report.duplicates == () and report.warnings == ()
    assert len(report.fingerprint) == 64


def test_fingerprint_ignores_names_and_order(tmp_path: Path) -> None:
    write_images(tmp_path / "a" / "ok", 10, seed=1)
    write_images(tmp_path / "a" / "scratch", 10, seed=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for i, p in enumerate(sorted((tmp_path / "b" / "ok").iterdir())):
        p.rename(p.with_name(f"renamed_{99 - i}.png"))
    fa = scan_dataset(tmp_path / "a").fingerprint
    assert fa == scan_dataset(tmp_path / "b").fingerprint
    # A changed label changes the fingerprint.
    moved = sorted((tmp_path / "b" / "ok").iterdir())[0]
    moved.rename(tmp_path / "b" / "scratch" / moved.name)
    assert scan_dataset(tmp_path / "b", min_per_class=5).fingerprint != fa
    samples = scan_dataset(tmp_path / "a").samples
    assert dataset_fingerprint(reversed(samples)) == fa


def test_scan_reports_and_skips_unreadable_and_duplicates(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "ok", 12, seed=1)
    write_images(tmp_path / "scratch", 12, seed=2)
    (tmp_path / "ok" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "scratch" / "empty.jpg").write_bytes(b"")
    shutil.copy(paths[0], tmp_path / "ok" / "copy_of_first.png")
    report = scan_dataset(tmp_path)
    bad = {p.name: reason for p, reason in report.unreadable}
    assert set(bad) == {"broken.png", "empty.jpg"}
    assert "empty" in bad["empty.jpg"]
    assert [(d.name, k.name) for d, k in report.duplicates] == [("img_0000.png", "copy_of_first.png")]
    assert dict(report.class_counts) == {"ok": 12, "scratch": 12}
    assert any("unreadable" in w for w in report.warnings)
    text = "\n".join(report.summary_lines())
    assert "broken.png" in text and "duplicate" in text


def test_same_image_in_two_classes_is_dropped(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "ok", 12, seed=1)
    write_images(tmp_path / "scratch", 12, seed=2)
    shutil.copy(paths[3], tmp_path / "scratch" / "mislabelled.png")
    report = scan_dataset(tmp_path)
    assert {p.name for p in report.conflicts} == {"img_0003.png", "mislabelled.png"}
    assert dict(report.class_counts) == {"ok": 11, "scratch": 12}


def test_scan_warns_on_extreme_imbalance(tmp_path: Path) -> None:
    write_images(tmp_path / "ok", 42, seed=1, size=8)
    write_images(tmp_path / "scratch", 10, seed=2, size=8)
    assert scan_dataset(tmp_path, max_imbalance=20).warnings == ()
    report = scan_dataset(tmp_path, max_imbalance=4)
    assert any("imbalanced" in w and "class weighting" in w for w in report.warnings)


@pytest.mark.parametrize(
    ("layout", "pass_label", "expected"),
    [
        (None, None, "does not exist"),
        ({}, None, "no class folders"),
        ({"ok": 12}, None, "single class"),
        ({"ok": 0, "scratch": 0}, None, "no jpg/png/bmp images"),
        ({"ok": 12, "scratch": 12}, "good", "'good' is not a class folder"),
        ({"good": 12, "scratch": 12}, None, "pass --pass-label"),
        ({"ok": 12, "scratch": 4}, None, "'scratch' has 4"),
    ],
)
def test_scan_refuses_bad_data_with_one_line(tmp_path: Path, layout: dict[str, int] | None, pass_label: str | None, expected: str) -> None:
    data = tmp_path / "data"
    if layout is not None:
        data.mkdir()
        for i, (label, n) in enumerate(layout.items()):
            (data / label).mkdir()
            write_images(data / label, n, seed=i)
    with pytest.raises(DataError) as info:
        scan_dataset(data, pass_label=pass_label)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert isinstance(info.value, TrainingError) and isinstance(info.value, LinewatchError)


def test_scan_names_the_classes_found_for_a_wrong_pass_label(tmp_path: Path) -> None:
    write_images(tmp_path / "good", 10, seed=1)
    write_images(tmp_path / "dent", 10, seed=2)
    with pytest.raises(DataError, match=r"found: dent, good"):
        scan_dataset(tmp_path, pass_label="ok")
    assert scan_dataset(tmp_path, pass_label="good").defect_labels == ("dent",)


def test_all_unreadable_is_an_error(tmp_path: Path) -> None:
    for label in ("ok", "scratch"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"x{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 6 image files"):
        scan_dataset(tmp_path)


def test_load_arrays_uses_edge_preprocessing(tmp_path: Path) -> None:
    from edge.preprocess import read_image, resize_uint8
    from edge.protocol import Preprocessing

    write_images(tmp_path / "ok", 10, seed=1, color=True)
    write_images(tmp_path / "scratch", 10, seed=2)
    report = scan_dataset(tmp_path)
    prep = Preprocessing(width=16, height=12)
    arrays = load_arrays(report.samples, prep)
    assert arrays.shape == (20, 12, 16, 1) and arrays.dtype == np.uint8
    np.testing.assert_array_equal(arrays[0], resize_uint8(read_image(report.samples[0].path), prep))
    assert label_indices(report.samples, report.labels).tolist() == [0] * 10 + [1] * 10


def test_masks_are_paired_by_name_and_resized_with_their_image(tmp_path: Path) -> None:
    """DATA_DIR/masks/<class>/<name> (same name, or .png for a .jpg) is the mask of a defect
    image; masks is not a class; pass images count as known-clean; a defect image without
    a mask is unknown. A wrong-size mask is a one-line error naming both files."""
    from edge.protocol import Preprocessing

    write_images(tmp_path / "ok", 10, seed=1)
    defects = write_images(tmp_path / "scratch", 10, seed=2)
    masks = tmp_path / "masks" / "scratch"
    masks.mkdir(parents=True)
    mask = np.zeros((24, 27), np.uint8)
    mask[:, 9:12] = 255  # a vertical band, columns 9-11 of 27
    for path in defects[:4]:
        assert cv2.imwrite(str(masks / path.name), mask)
    (masks / "stray.png").write_bytes(b"not read")
    report = scan_dataset(tmp_path)
    assert report.labels == ("ok", "scratch")
    assert report.masks_dir == tmp_path / "masks" and len(report.masks) == 4
    assert any("defect masks: 4 of 10" in line for line in report.summary_lines())
    assert report.to_dict()["masks"] == 4

    prep = Preprocessing(width=9, height=8)
    images = load_arrays(report.samples, prep)
    cover, known = load_masks(report.samples, report.masks, images, "ok")
    assert cover.shape == (20, 8, 9) and known.tolist() == [True] * 10 + [True] * 4 + [False] * 6
    assert not cover[:10].any() and not cover[14:].any()
    # 27 -> 9 columns: the band lands on column 3, fully, and nowhere else
    np.testing.assert_allclose(cover[10, :, 3], 1.0)
    assert cover[10].sum() == pytest.approx(8.0)

    assert cv2.imwrite(str(masks / defects[0].name), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"mask .*scratch/img_0000.png is 10x10 but its image .* is 27x24"):
        load_masks(scan_dataset(tmp_path).samples, scan_dataset(tmp_path).masks, images, "ok")
    with pytest.raises(DataError, match="masks folder .*nowhere does not exist"):
        scan_dataset(tmp_path, masks_dir=tmp_path / "nowhere")


def test_masks_move_with_their_images_and_become_map_cells() -> None:
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    from training.model import Augmentation, augment_batch, map_cells

    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 32, 1)).astype(np.float32)
    m = np.zeros((32, 32, 32, 1), np.float32)
    m[:, 2, 5] = 1.0  # one defect pixel, in cell (0, 0)
    x[:, 2, 5, 0] = 5.0  # and the image marks the same pixel (clipped to 1 by augment)
    aug = Augmentation(brightness=0.0, contrast=0.0, noise=0.0)
    seed = tf.constant([1, 7], tf.int64)
    xa, ma = augment_batch(tf.constant(x), tf.constant(m), aug, seed)
    xa, ma = xa.numpy(), ma.numpy()
    for i in range(32):
        assert np.argwhere(ma[i, :, :, 0] == 1.0).tolist() == np.argwhere(xa[i, :, :, 0] == 1.0).tolist()
    cells = map_cells(tf.constant(ma), 4, 4).numpy()
    assert cells.shape == (32, 4, 4, 1) and cells.sum() == 32
    corners = {tuple(np.argwhere(c[:, :, 0])[0]) for c in cells}
    assert corners == {(0, 0), (0, 3), (3, 0), (3, 3)}  # flips and turns moved it everywhere
    # deterministic for a seed, different for another
    again = augment_batch(tf.constant(x), tf.constant(m), aug, seed)[0].numpy()
    other = augment_batch(tf.constant(x), tf.constant(m), aug, tf.constant([1, 8], tf.int64))[0].numpy()
    assert np.array_equal(again, xa) and not np.array_equal(other, xa)
    # photometric changes keep the image in [0, 1] and leave masks alone
    noisy, same = augment_batch(tf.constant(x), tf.constant(m), Augmentation(), seed)
    assert float(tf.reduce_min(noisy)) >= 0.0 and float(tf.reduce_max(noisy)) <= 1.0
    assert sorted(np.unique(same.numpy()).tolist()) == [0.0, 1.0]
    weak = np.full((1, 16, 16, 1), 0.2, np.float32)  # under MAP_CELL_COVERAGE everywhere
    assert float(tf.reduce_sum(map_cells(tf.constant(weak), 2, 2))) == 0


def test_the_float_level_is_the_int8_kernels_level_grey_for_grey() -> None:
    """The map head's level (4x4 average, bilinear back to full size) runs as int8 kernels
    on the box, which break rounding ties their own way; the float network it was trained
    as must see the very same grey levels, or int8 draws faint lines it never saw."""
    pytest.importorskip("tensorflow")
    import keras

    from edge.inference import load_runtime
    from training.export import convert_int8
    from training.model import _local_level

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (24, 32, 32, 1))
    grey[0], grey[1] = 0, 255  # calibration sees the full range: the level keeps scale 1/255
    x = (grey / 255.0).astype(np.float32)
    inputs = keras.Input((32, 32, 1))
    model = keras.Model(inputs, _local_level(inputs, 32, 32))
    _, interpreter_cls = load_runtime()
    interp = interpreter_cls(model_content=convert_int8(model, x[:8]))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert out["quantization"][1] == -128 and abs(out["quantization"][0] - 1 / 255) < 1e-9
    int8_levels, float_levels = [], []
    for g, image in zip(grey, x, strict=True):
        interp.set_tensor(inp["index"], (g - 128).astype(np.int8)[None])
        interp.invoke()
        int8_levels.append(interp.get_tensor(out["index"])[0].astype(int) + 128)
        float_levels.append(np.asarray(model(image[None]))[0] * 255.0)
    float_grey = np.concatenate(float_levels)
    assert np.abs(float_grey - np.round(float_grey)).max() < 1e-3  # whole grey levels
    # 1/16 of the pooled sums are ties: tf.round's half-to-even missed about 3 % of them
    assert np.array_equal(np.round(float_grey).astype(int), np.concatenate(int8_levels))


def test_masks_choose_the_map_head_which_sees_local_contrast() -> None:
    """With masks that show defects the network reads its decision off the defect map, on
    an input whose local level is taken away; without, it is the plain features network."""
    pytest.importorskip("tensorflow")
    from training.model import Augmentation, TrainConfig, build_networks, train_model

    rng = np.random.default_rng(3)
    x = rng.random((48, 32, 32, 1)).astype(np.float32)
    y = np.repeat([0, 1], 24)
    masks = np.zeros((48, 32, 32), np.float32)
    masks[24:, 10:12, 4:20] = 1.0
    x[24:, 10:12, 4:20, 0] = 1.0
    config = TrainConfig(epochs=2, min_epochs=1, augmentation=Augmentation(brightness=0.0, noise=0.0))
    with_masks = train_model(x, y, x[:8], y[:8], 2, config, masks_train=masks, mask_known=np.ones(48, bool))
    assert with_masks.used_masks and with_masks.masked_images == 24 and with_masks.head == "map"
    assert all(log.map_loss is not None for log in with_masks.history)
    names = {layer.name for layer in with_masks.model.layers}
    assert {"local_contrast", "map_max"} <= names and "sep5_dw" not in names

    # transplant: one more defect input per masked defect, on training inputs only
    import dataclasses

    grown = train_model(x, y, x[:8], y[:8], 2, dataclasses.replace(config, transplant=1.0, epochs=1),
                        masks_train=masks, mask_known=np.ones(48, bool))
    assert grown.transplants == 24 and len(x) == 48

    without = train_model(x, y, x[:8], y[:8], 2, config)
    assert not without.used_masks and without.head == "features"
    assert all(log.map_loss is None for log in without.history)
    names = {layer.name for layer in without.model.layers}
    assert "sep5_dw" in names and "local_contrast" not in names

    # the level is resized back to any input size, 4:3 and odd ones included, and the
    # cells' context pools to the map's own grid
    for context in (False, True):
        classifier, trainer = build_networks(2, height=30, width=42, head="map", context=context)
        probs, cells = trainer(np.full((2, 30, 42, 1), 0.5, np.float32))
        assert probs.shape == (2, 2) and cells.shape == (2, 3, 5, 1)
        assert ("ctx_conv" in {layer.name for layer in classifier.layers}) == context
    # the strided stem keeps the map's 8x8-pixel cells, with one pooling fewer
    classifier, trainer = build_networks(2, height=32, width=48, head="map", stem="strided")
    probs, cells = trainer(np.full((2, 32, 48, 1), 0.5, np.float32))
    assert probs.shape == (2, 2) and cells.shape == (2, 4, 6, 1)
    names = {layer.name for layer in classifier.layers}
    assert "pool1" not in names and classifier.get_layer("conv1_conv").strides == (2, 2)
    with pytest.raises(ValueError, match="stem"):
        build_networks(2, stem="sideways")
    # without the context a flat picture has no local contrast: brightness alone does not
    # move the decision (the context gives the map head the level on purpose: edges). The
    # levels are whole grey levels, as a camera's are: the level is rounded to them
    classifier, _ = build_networks(2, height=30, width=42, head="map", context=False)
    levels = (26 / 255, 230 / 255)
    flat = classifier(np.stack([np.full((30, 42, 1), v, np.float32) for v in levels]), training=False)
    np.testing.assert_allclose(flat[0], flat[1], atol=1e-5)
    # the shading branch starts silent: at first the decision is the map's alone, whatever
    # the picture's level
    plain, _ = build_networks(2, height=32, width=32, head="map", context=False)
    shaded, _ = build_networks(2, height=32, width=32, head="map", context=False, shading=True)
    assert shaded.get_layer("probabilities").get_weights()[0].shape == (2, 2)
    pictures = np.stack([np.full((32, 32, 1), v, np.float32) for v in levels])
    probs = shaded(pictures, training=False)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)
    assert "shade_logit" in {layer.name for layer in shaded.layers} - {layer.name for layer in plain.layers}


def test_bounded_activations_and_map_clip_fix_the_int8_ranges() -> None:
    """ReLU6 everywhere and the map's clip give every int8 activation a range set by the
    network, not by the calibration images' outliers (ReLU outputs were calibrated up to 30)."""
    pytest.importorskip("tensorflow")
    from ai_edge_litert.interpreter import Interpreter

    from training.export import convert_int8
    from training.model import build_networks

    rng = np.random.default_rng(0)
    classifier, _ = build_networks(2, height=32, width=32, filters=4, head="map", relu_max=6.0, map_clip=6.0)
    # big weights: without the bounds, these activations would reach far beyond 6
    classifier.set_weights([w * 8 if w.ndim == 4 else w for w in classifier.get_weights()])
    model = convert_int8(classifier, rng.random((40, 32, 32, 1)).astype(np.float32))
    interpreter = Interpreter(model_content=model)
    ranges = {}
    for t in interpreter.get_tensor_details():
        scale, zero = t["quantization"]
        if scale > 0 and len(t["shape"]) == 4:
            ranges[t["name"]] = ((-128 - zero) * scale, (127 - zero) * scale, scale)
    relus = [r for name, r in ranges.items() if "relu" in name.lower() and "map_clip" not in name]
    assert len(relus) >= 5 and all(hi <= 6.0 + step for _, hi, step in relus), relus
    clipped = [r for name, r in ranges.items() if "map_clip_down" in name]
    assert clipped, ranges
    lo, hi, step = clipped[0]
    assert -6.0 - 2 * step <= lo <= -5.0 and 5.0 <= hi <= 6.0 + 2 * step, clipped  # the clip, to a step


def test_training_sees_the_level_as_int8_computes_it() -> None:
    """The float network rounds the local-contrast level as the int8 model does on the box
    (whole grey levels after the pool and after the resize), in training and at inference;
    the int8 export leaves the rounding to the int8 kernels (no ROUND op)."""
    pytest.importorskip("tensorflow")
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from training.export import convert_int8
    from training.model import build_networks

    # a lighting gradient: where int8 rounding of the level draws its steps
    yy, xx = np.mgrid[0:32, 0:32]
    ramp = ((40 + 3.3 * xx + 1.7 * yy) / 255.0).astype(np.float32)[None, :, :, None]
    classifier, _ = build_networks(2, height=32, width=32, filters=4, head="map")
    level = keras.Model(classifier.input, classifier.get_layer("level_int8").output)
    trained_on = level(ramp, training=True).numpy()
    assert np.allclose(trained_on * 255, np.round(trained_on * 255), atol=1e-3)  # whole grey levels
    np.testing.assert_array_equal(level(ramp, training=False).numpy(), trained_on)  # float inference too
    plain = keras.Model(classifier.input, classifier.get_layer("level").output)(ramp).numpy()

    model = convert_int8(classifier, np.random.default_rng(0).random((20, 32, 32, 1)).astype(np.float32))
    interpreter = Interpreter(model_content=model, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    assert "ROUND" not in {op["op_name"] for op in interpreter._get_ops_details()}
    inp = interpreter.get_input_details()[0]
    scale, zero = inp["quantization"]
    interpreter.set_tensor(inp["index"], np.round(ramp / scale + zero).astype(np.int8))
    interpreter.invoke()
    resized = [t for t in interpreter.get_tensor_details()
               if "level" in t["name"] and "pool" not in t["name"] and list(t["shape"]) == [1, 32, 32, 1]]
    assert resized, [t["name"] for t in interpreter.get_tensor_details()]
    t = resized[0]
    on_box = (interpreter.get_tensor(t["index"]).astype(np.float32) - t["quantization"][1]) * t["quantization"][0]
    # what training saw is what the box computes, but for ties and the fixed-point
    # resize, which round some pixels the other way (never by more than a grey level);
    # the float level is off by fractions of a grey level nearly everywhere
    assert np.abs(on_box - trained_on).max() <= 1.01 / 255
    assert np.mean(np.abs(on_box - trained_on) < 0.01 / 255) > 0.8
    assert np.mean(np.abs(on_box - plain) < 0.01 / 255) < 0.2


# --------------------------------------------------------------------------- split


def test_split_is_stratified_and_reproducible() -> None:
    samples = make_samples({"ok": 200, "scratch": 60, "dent": 20})
    split = split_dataset(samples, seed=3)
    sizes = split.class_sizes()
    assert sizes["train"] == {"dent": 14, "ok": 140, "scratch": 42}
    assert sizes["val"] == {"dent": 3, "ok": 30, "scratch": 9}
    assert sizes["test"] == {"dent": 3, "ok": 30, "scratch": 9}
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(samples)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    again = split_dataset(list(reversed(samples)), seed=3)
    assert again == split
    other = split_dataset(samples, seed=4)
    assert set(other.test) != set(split.test)


def test_split_gives_small_classes_a_val_and_test_image() -> None:
    split = split_dataset(make_samples({"ok": 50, "rare": 4}), seed=0)
    sizes = split.class_sizes()
    assert sizes["val"]["rare"] == 1 and sizes["test"]["rare"] == 1 and sizes["train"]["rare"] == 2


def test_group_split_never_straddles_and_stays_stratified() -> None:
    # Tiles shot under 6 exposures: files numbered n, n+15, n+30 ... belong together.
    samples = []
    for tile in range(60):
        label = "ok" if tile < 45 else "crack"
        for exposure in range(6):
            number = tile * 1000 + exposure * 15
            samples.append(Sample(Path(f"/d/{label}/exp{exposure}_num_{number}.jpg"), label, f"{tile:04d}{exposure:02d}".ljust(64, "0")))
    groups = number_groups(samples, gap=100)
    assert len({groups(s) for s in samples}) == 60
    split = split_dataset(samples, seed=1, groups=groups)
    assert split.method == "stratified-group"
    where: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for s in getattr(split, name):
            where.setdefault(groups(s), set()).add(name)
    assert all(len(v) == 1 for v in where.values())
    sizes = split.class_sizes()
    for name, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        for label, total in (("ok", 270), ("crack", 90)):
            assert abs(sizes[name][label] - share * total) <= 6, (name, label, sizes)
    assert split_dataset(samples, seed=1, groups=groups) == split


def test_number_groups_cluster_across_classes() -> None:
    samples = [
        Sample(Path("/d/ok/exp1_num_100.jpg"), "ok", "a" * 64),
        Sample(Path("/d/crack/exp2_num_130.jpg"), "crack", "b" * 64),
        Sample(Path("/d/ok/exp1_num_900.jpg"), "ok", "c" * 64),
        Sample(Path("/d/ok/no_number.jpg"), "ok", "d" * 64),
    ]
    g = number_groups(samples, gap=100)
    assert g(samples[0]) == g(samples[1]) != g(samples[2])
    assert g(samples[3]) not in {g(s) for s in samples[:3]}


def test_content_groups_find_one_part_under_several_exposures(tmp_path: Path) -> None:
    # 12 parts, each shot 3 times with another gain, offset and sensor noise, under names that
    # say nothing; and a 13th part that is the 12th plus a mark: similar, yet no exposure of it.
    rng = np.random.default_rng(0)
    samples: list[Sample] = []
    part_of: dict[Path, int] = {}
    for part in range(13):
        if part < 12:
            texture = cv2.GaussianBlur(rng.normal(0, 1, (60, 80)), (0, 0), 3)
            surface = 128 + 30 * texture / texture.std()
        else:
            surface = surface.copy()
            surface[10:50, 20:60] += 25
        for _shot in range(3 if part < 12 else 1):
            image = np.clip(surface * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30) + rng.normal(0, 1.5, surface.shape), 0, 255)
            label = "ok" if part % 2 else "scratch"
            path = tmp_path / label / f"{rng.integers(10**6):06d}.png"
            path.parent.mkdir(exist_ok=True)
            assert cv2.imwrite(str(path), image.astype(np.uint8))
            samples.append(Sample(path, label, path.name.ljust(64, "0")))
            part_of[path] = part
    flat = tmp_path / "ok" / "flat.png"  # no texture: correlates with nothing, not even itself twice
    assert cv2.imwrite(str(flat), np.full((60, 80), 90, np.uint8))
    samples.append(Sample(flat, "ok", "f" * 64))
    groups = content_groups(samples)
    for a in samples[:36]:
        for b in samples[:36]:
            assert (groups(a) == groups(b)) == (part_of[a.path] == part_of[b.path]), (a.path, b.path)
    assert groups(samples[36]) not in {groups(s) for s in samples[:36]}
    assert groups(samples[37]) not in {groups(s) for s in samples[:37]}
    split = split_dataset(samples, seed=0, groups=groups)
    for part in range(12):
        homes = {name for name in ("train", "val", "test") for s in getattr(split, name) if part_of.get(s.path) == part}
        assert len(homes) == 1


# --------------------------------------------------------------------------- metrics and threshold


def test_metrics_on_a_hand_computed_example() -> None:
    labels = ["ok", "ok", "ok", "ok", "scratch", "scratch", "dent", "dent"]
    scores = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.4, 0.7, 0.25])
    m = compute_metrics(labels, scores, "ok", threshold=0.5)
    # fail when score >= 0.5: ok fails 1 of 4 (0.6); defects fail 0.9 and 0.7 -> 2 of 4.
    assert m["counts"] == {"tp": 2, "fn": 2, "fp": 1, "tn": 3}
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["defect_recall"] == pytest.approx(0.5)
    assert m["false_reject_rate"] == pytest.approx(0.25)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
    assert m["defect_precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["confusion"] == {
        "ok": {"pass": 3, "fail": 1},
        "dent": {"pass": 1, "fail": 1},
        "scratch": {"pass": 1, "fail": 1},
    }
    assert m["per_class_recall"] == {"ok": 0.75, "dent": 0.5, "scratch": 0.5}
    # AUC: of the 16 (defect, ok) pairs the defect scores higher in 4 + 3 + 4 + 2 = 13.
    assert m["roc_auc"] == pytest.approx(13 / 16)
    # Decision at the threshold itself fails (>=), as edge.inference.Classifier.decide does.
    assert compute_metrics(["ok"], np.array([0.5]), "ok", 0.5)["counts"]["fp"] == 1


def test_auc_and_average_precision_with_ties() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert average_precision(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx((1 + 2 / 3) / 2)
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None
    assert roc_auc(y, np.array([0.0, 0.1, 0.9, 1.0])) == pytest.approx(1.0)


def test_edge_rule_is_the_largest_threshold_that_reaches_target_recall() -> None:
    """The rule before the operating point read both classes, kept for comparison."""
    from training.operating_point import choose_operating_point

    rng = np.random.default_rng(0)
    defect = rng.uniform(0.3, 1.0, 200)
    good = rng.uniform(0.0, 0.6, 300)
    y = np.r_[np.ones(200, bool), np.zeros(300, bool)]
    s = np.r_[defect, good]
    choice = choose_operating_point(y, s, 0.99, rule="edge")
    assert choice.recall >= 0.99
    # 99 % of 200 -> 198 defects must fail: the threshold is the 198th highest defect score.
    assert choice.threshold == pytest.approx(np.sort(defect)[::-1][197])
    above = np.nextafter(choice.threshold, 1.0)
    assert np.mean(defect >= above) < 0.99
    assert choice.false_reject_rate == pytest.approx(np.mean(good >= choice.threshold))
    assert choose_operating_point(y, s, 1.0, rule="edge").threshold == pytest.approx(defect.min())
    assert math.isclose(choose_operating_point(y, s, 0.5, rule="edge").recall, 0.5)


# --------------------------------------------------------------------------- packed bundle


def _tar_with(path: Path, name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", linkname: str = "") -> Path:
    with tarfile.open(path, "w") as tar:
        manifest = tarfile.TarInfo("manifest.json")
        manifest.size = 2
        tar.addfile(manifest, io.BytesIO(b"{}"))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "linkname", "expected"),
    [
        ("/etc/evil", tarfile.REGTYPE, "", "absolute path"),
        ("golden/../../evil", tarfile.REGTYPE, "", "outside the bundle"),
        ("golden/link", tarfile.SYMTYPE, "/etc/passwd", "a link"),
        ("golden/hard", tarfile.LNKTYPE, "manifest.json", "a link"),
        ("golden/fifo", tarfile.FIFOTYPE, "", "special file"),
    ],
)
def test_unpack_refuses_unsafe_entries(tmp_path: Path, name: str, kind: bytes, linkname: str, expected: str) -> None:
    packed = _tar_with(tmp_path / "evil.lwb", name, kind=kind, linkname=linkname)
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match=expected):
        unpack_bundle(packed, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil").exists()


def test_unpack_refuses_non_bundles(tmp_path: Path) -> None:
    (tmp_path / "junk.lwb").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a valid packed bundle"):
        unpack_bundle(tmp_path / "junk.lwb", tmp_path / "a")
    with tarfile.open(tmp_path / "empty.lwb", "w"):
        pass
    with pytest.raises(BundleError, match="no manifest.json"):
        unpack_bundle(tmp_path / "empty.lwb", tmp_path / "b")
    with pytest.raises(BundleError, match="does not exist"):
        unpack_bundle(tmp_path / "missing.lwb", tmp_path / "c")


# --------------------------------------------------------------------------- the real tiny bundle


def test_tiny_bundle_manifest_describes_the_model_file(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    assert m.version == "tiny-1"
    assert m.labels == ("ok", "scratch") and m.pass_label == "ok"
    assert m.input.shape == (1, 64, 64, 1) and m.input.dtype == "int8"
    assert m.output.shape == (1, 2) and m.output.dtype == "int8"
    assert m.input.scale > 0 and -128 <= m.input.zero_point <= 127
    assert m.model.sha256 == sha256_file(tiny_bundle / "model.tflite")
    assert m.model.bytes == (tiny_bundle / "model.tflite").stat().st_size
    assert m.latency_budget_ms >= 20


def test_tiny_bundle_manifest_has_metrics_and_its_operating_point(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    assert 0.0 <= m.threshold <= 1.0
    keys = ("n", "accuracy", "balanced_accuracy", "defect_recall", "defect_precision", "false_reject_rate",
            "roc_auc", "pr_auc", "threshold", "confusion", "per_class_recall")
    for part in ("float", "int8"):
        assert set(keys) <= set(m.metrics[part]), part
    op = m.operating_point
    assert op is not None and op.threshold == m.threshold and op.target_recall == 0.99 and op.max_false_reject == 0.02
    assert m.metrics["int8"]["threshold"] == m.threshold
    assert "passed" in m.metrics["quantization_gate"]


def test_tiny_bundle_manifest_records_the_data_and_the_training(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    assert len(m.dataset["fingerprint"]) == 64
    assert m.dataset["class_counts"] == {"ok": 60, "scratch": 60}
    assert sum(m.dataset["split"]["sizes"].values()) == 120
    assert m.dataset["split"]["method"] == "stratified"
    assert {"epochs_run", "seed", "batch_size", "learning_rate", "augmentation", "durations_s", "tf_version"} <= set(m.training)


def test_tiny_bundle_manifest_has_the_drift_reference_and_golden_images(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    ref = m.reference
    assert 0 < ref["input"]["pixel_mean"] < 255 and ref["input"]["pixel_std"] > 0
    assert sum(ref["input"]["histogram"]["fraction"]) == pytest.approx(1.0, abs=1e-4)
    for label in m.labels:
        per = ref["scores"]["per_class"][label]
        assert per["n"] > 0 and len(per["quantiles"]) == len(ref["scores"]["quantile_levels"])
    assert {g.label for g in m.golden} == {"ok", "scratch"} and len(m.golden) == 16
    for g in m.golden:
        assert (tiny_bundle / g.file).is_file() and len(g.expected) == 2


def test_tiny_bundle_golden_outputs_reproduce(tiny_bundle: Path) -> None:
    clf = Classifier(tiny_bundle)
    result = check_golden(clf)
    assert result.ok, result.failures
    assert result.checked == 16
    assert result.max_deviation == 0  # same runtime, same bytes: exact
    golden = read_manifest(tiny_bundle).golden[0]
    assert clf.predict_file(tiny_bundle / golden.file).raw == golden.expected


def test_tiny_bundle_report(tiny_bundle: Path) -> None:
    report = tiny_bundle / "report"
    for name in ("confusion.png", "roc.png", "pr.png"):
        image = cv2.imread(str(report / name))
        assert image is not None and image.shape[0] > 100, name
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["metrics"]["int8"]["n"] == read_manifest(tiny_bundle).metrics["int8"]["n"]
    card = (report / "model_card.md").read_text()
    for heading in ("Intended use", "Data", "Metrics", "Operating point", "Limitations"):
        assert f"## {heading}" in card
    assert (report / "model_float32.tflite").stat().st_size > (tiny_bundle / "model.tflite").stat().st_size


def test_pack_is_deterministic_and_round_trips(tiny_bundle: Path, tmp_path: Path) -> None:
    a = pack_bundle(tiny_bundle, tmp_path / "a.lwb")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    (copy / "manifest.json").touch()  # a new mtime must not change the packed bytes
    b = pack_bundle(copy, tmp_path / "b.lwb")
    assert a.read_bytes() == b.read_bytes()
    out = unpack_bundle(a, tmp_path / "unpacked")
    before = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert before == after
    assert sha256_file(out / "model.tflite") == read_manifest(out).model.sha256
    assert check_golden(Classifier(out)).ok
    with pytest.raises(BundleError, match="not an empty folder"):
        unpack_bundle(a, out)


@pytest.mark.slow
def test_same_seed_gives_the_same_model_and_metrics(tiny_bundle: Path, tmp_path: Path) -> None:
    from training.tiny import make_tiny_bundle

    again = make_tiny_bundle(tmp_path / "again", seed=0, version="tiny-1")
    first, second = read_manifest(tiny_bundle), read_manifest(again)
    assert second.metrics["int8"] == first.metrics["int8"]
    assert second.metrics["float"] == first.metrics["float"]
    assert second.threshold == first.threshold
    assert second.dataset["fingerprint"] == first.dataset["fingerprint"]
    assert [h["val_loss"] for h in second.training["history"]] == [h["val_loss"] for h in first.training["history"]]
    assert second.model.sha256 == first.model.sha256


def test_out_dir_holding_other_files_is_refused(tmp_path: Path) -> None:
    from training.bundle import check_out_dir

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not a model bundle"):
        check_out_dir(tmp_path)
    check_out_dir(tmp_path / "new")  # fine: does not exist
