"""``linewatch train``: the real command end to end, and every bad input it must refuse.

Bad inputs must give one ``Error: ...`` line, exit code 1 and no traceback. The
end-to-end test runs the installed ``linewatch`` as a user would (synth -> fit -> eval).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.protocol import read_manifest
from tests.helpers import invoke_train, write_images
from training.cli import train

LINEWATCH = str(Path(sys.executable).parent / "linewatch")


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# --------------------------------------------------------------------------- help and import cost


def test_every_command_has_help_with_an_example() -> None:
    code, output = invoke_train("--help")
    assert code == 0
    for name in ("synth", "fit", "eval", "check", "pack", "threshold"):
        assert name in output
        sub_code, sub_output = invoke_train(name, "--help")
        assert sub_code == 0 and ("Example:" in sub_output or "Examples:" in sub_output), name
        assert "    linewatch train " + name in sub_output, name  # the example is a runnable command


def test_cli_module_does_not_import_tensorflow() -> None:
    code = "import sys, training.cli; sys.exit(1 if 'tensorflow' in sys.modules or 'keras' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0



def test_tensorflow_loads_without_its_start_up_lines() -> None:
    """`train fit` imports TensorFlow through import_quietly: its absl and oneDNN notices
    (printed from C++ whatever TF_CPP_MIN_LOG_LEVEL says) stay out of the command's output."""
    pytest.importorskip("tensorflow")
    code = "from training.native import import_quietly; import_quietly('tensorflow'); print('loaded')"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout == "loaded\n" and proc.stderr == "", proc.stderr
    from training.native import import_quietly

    with pytest.raises(ModuleNotFoundError):
        import_quietly("linewatch_no_such_module")


def test_cli_defaults_are_the_pipelines() -> None:
    from training.pipeline import DEFAULT_FILTERS, FitOptions

    fit_params = {p.name: p.default for p in train.commands["fit"].params}
    assert fit_params["filters"] == DEFAULT_FILTERS == FitOptions().filters

def test_auto_size_is_192_only_for_small_sets_of_large_pictures() -> None:
    from training.pipeline import DEFAULT_SIZE, LARGE_SIZE, auto_size

    assert (DEFAULT_SIZE, LARGE_SIZE) == (128, 192)
    assert auto_size(541, 256) == 192  # a magnetic-tile split
    assert auto_size(829, 192) == 192
    assert auto_size(830, 256) == 128  # 60 epochs of 830 at 192 px cost more than the 128 px budget
    assert auto_size(5600, 160) == 128  # the synthetic default
    assert auto_size(5600, 1080) == 128
    assert auto_size(300, 191) == 128  # pictures smaller than the input: nothing to gain


def test_fit_without_size_learns_small_sets_of_large_pictures_at_192(tmp_path: Path) -> None:
    from training.pipeline import FitOptions, prepare_data

    for label, seed in (("ok", 1), ("scratch", 2)):
        for i, img in enumerate(np.random.default_rng(seed).integers(0, 256, (12, 200, 230), dtype=np.uint8)):
            (tmp_path / "large" / label).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(tmp_path / "large" / label / f"{i}.png"), img)
    lines: list[str] = []
    prepared = prepare_data(tmp_path / "large", FitOptions(size_from_data=True, folds=0), lines.append)
    assert prepared.options.size == 192 and prepared.raw_x["train"].shape[1:3] == (192, 192)
    assert any("model input 192x192 px (auto: " in line for line in lines)
    # Given (the Python API's default, or --size): kept.
    assert prepare_data(tmp_path / "large", FitOptions(folds=0), lines.append).raw_x["train"].shape[1:3] == (128, 128)
    small = tmp_path / "small"
    write_images(small / "ok", 12, seed=3, size=64)
    write_images(small / "scratch", 12, seed=4, size=64)
    assert prepare_data(small, FitOptions(size_from_data=True, folds=0), lines.append).options.size == 128


# --------------------------------------------------------------------------- bad data for fit


def test_fit_missing_folder(tmp_path: Path) -> None:
    code, out = invoke_train("fit", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, out, "does not exist", "linewatch train synth")
    assert not (tmp_path / "b").exists()


def test_fit_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    code, out = invoke_train("fit", str(tmp_path / "data"), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, out, "no class folders")


def test_fit_single_class(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 12, seed=1)
    code, out = invoke_train("fit", str(tmp_path / "data"), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, out, "single class", "defect")


def test_fit_all_unreadable(tmp_path: Path) -> None:
    for label in ("ok", "scratch"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / label / f"bad{i}.png").write_bytes(b"\x89PNG\r\n garbage")
    code, out = invoke_train("fit", str(tmp_path / "data"), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, out, "none of the 8 image files", "can be decoded")


def test_fit_wrong_pass_label(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 12, seed=1)
    write_images(tmp_path / "data" / "scratch", 12, seed=2)
    code, out = invoke_train("fit", str(tmp_path / "data"), "--out", str(tmp_path / "b"), "--pass-label", "good")
    assert_one_line_error(code, out, "'good'", "found: ok, scratch")


def test_fit_too_few_images(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 12, seed=1)
    write_images(tmp_path / "data" / "scratch", 3, seed=2)
    code, out = invoke_train("fit", str(tmp_path / "data"), "--out", str(tmp_path / "b"))
    assert_one_line_error(code, out, "'scratch' has 3", "at least 10")


def test_check_reports_unreadable_and_duplicates(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 12, seed=1)
    write_images(tmp_path / "data" / "scratch", 12, seed=2)
    (tmp_path / "data" / "ok" / "torn.jpg").write_bytes(b"\xff\xd8\xff truncated")
    shutil.copy(tmp_path / "data" / "ok" / "img_0000.png", tmp_path / "data" / "ok" / "again.png")
    code, out = invoke_train("check", str(tmp_path / "data"), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["class_counts"] == {"ok": 12, "scratch": 12}
    assert [Path(p).name for p in report["unreadable"]] == ["torn.jpg"]
    assert report["duplicates_removed"] == 1


def test_real_invocation_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([LINEWATCH, "train", "fit", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- eval on damaged bundles


def test_eval_missing_model_file(bundle_copy: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 2, seed=1)
    (bundle_copy / "model.tflite").unlink()
    code, out = invoke_train("eval", str(bundle_copy), "--data", str(tmp_path / "data"), "--json")
    assert_one_line_error(code, out, "model.tflite is missing")


def test_eval_altered_model_file(bundle_copy: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 2, seed=1)
    model = bundle_copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    code, out = invoke_train("eval", str(bundle_copy), "--data", str(tmp_path / "data"), "--json")
    assert_one_line_error(code, out, "does not match the manifest", "re-export")


def test_eval_not_a_bundle_and_missing_data(tiny_bundle: Path, tmp_path: Path) -> None:
    code, out = invoke_train("eval", str(tmp_path), "--data", str(tmp_path))
    assert_one_line_error(code, out, "manifest.json is missing")
    code, out = invoke_train("eval", str(tiny_bundle), "--data", str(tmp_path / "nope"), "--json")
    assert_one_line_error(code, out, "does not exist")


def test_eval_wrong_pass_label(tiny_bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ok", 2, seed=1)
    write_images(tmp_path / "data" / "scratch", 2, seed=2)
    code, out = invoke_train("eval", str(tiny_bundle), "--data", str(tmp_path / "data"), "--pass-label", "good")
    assert_one_line_error(code, out, "'good'", "found: ok, scratch")


# --------------------------------------------------------------------------- quantization gate


def test_quantization_gate_refuses_and_can_be_overridden(tmp_path: Path) -> None:
    """Forces the gate by asking for an impossible margin (int8 would have to beat float by
    more than 100 points). This proves the comparison is wired to the exit code and the
    manifest, not that this particular model loses accuracy in int8."""
    from training.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, count=60, seed=5, size=32)
    common = ["fit", str(data), "--epochs", "1", "--size", "32", "--seed", "5", "--max-quantization-drop", "-101"]
    code, out = invoke_train(*common, "--out", str(tmp_path / "refused"))
    assert_one_line_error(code, out, "loses too much balanced accuracy", "--allow-quantization-drop")
    manifest = read_manifest(tmp_path / "refused")  # written for inspection, marked as failing
    assert manifest.metrics["quantization_gate"]["passed"] is False
    code, out = invoke_train(*common, "--out", str(tmp_path / "accepted"), "--allow-quantization-drop")
    assert code == 0, out
    accepted = read_manifest(tmp_path / "accepted")
    gate = accepted.metrics["quantization_gate"]
    assert gate["passed"] is True and gate["allowed_by_flag"] is True
    # both models are judged at the threshold the bundle ships, not each at its own
    assert gate["threshold"] == accepted.threshold and f"at threshold {accepted.threshold:.4f}" in gate["message"]


def test_gate_decision() -> None:
    from training.pipeline import quantization_gate

    assert quantization_gate(0.97, 0.965, 1.0, allow=False)["passed"] is True  # 0.5 points
    failed = quantization_gate(0.97, 0.95, 1.0, allow=False)  # 2 points
    assert failed["passed"] is False and failed["drop_points"] == pytest.approx(2.0)
    assert quantization_gate(0.97, 0.95, 1.0, allow=True)["passed"] is True
    assert quantization_gate(0.90, 0.95, 1.0, allow=False)["passed"] is True  # int8 better
    # exactly the limit is not "more than" it (0.705 - 0.695 is 1.0000000000000009 in floats)
    assert quantization_gate(0.705, 0.695, 1.0, allow=False)["passed"] is True
    assert quantization_gate(0.705, 0.6949, 1.0, allow=False)["passed"] is False
    # ROC AUC too: equal balanced accuracy at the cut, but int8 ranks parts worse
    auc = quantization_gate(0.97, 0.97, 1.0, allow=False, float_auc=0.990, int8_auc=0.984)
    assert auc["passed"] is False and "loses too much ROC AUC" in auc["message"]
    assert quantization_gate(0.97, 0.97, 1.0, allow=False, float_auc=0.990, int8_auc=0.985)["passed"] is True


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_synth_fit_eval_end_to_end(tmp_path: Path) -> None:
    data, bundle = tmp_path / "data", tmp_path / "bundle"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LINEWATCH, "train", *args], capture_output=True, text=True, timeout=300)

    proc = run("synth", str(data), "--count", "100", "--seed", "3", "--size", "48")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["masks", "ok", "scratch"]
    (data / "ok" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    proc = run("fit", str(data), "--out", str(bundle), "--epochs", "2", "--size", "48", "--seed", "3",
               "--version", "e2e-1", "--allow-quantization-drop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in ("data check: 100 images", "corrupt.png", "defect masks: 50 of 50", "map_loss",
                   "epoch   1/2", "epoch   2/2", "quantized: int8",
                   "balanced_accuracy", "quantization gate", f"bundle: {bundle}"):
        assert needle in out, (needle, out)
    assert "Traceback" not in proc.stderr
    assert "Saved artifact" not in out  # converter chatter is kept out of the progress output

    manifest = read_manifest(bundle)
    assert manifest.version == "e2e-1" and manifest.input.shape == (1, 48, 48, 1)
    assert manifest.dataset["unreadable_skipped"] == 1
    assert manifest.training["masks"]["used"] is True
    assert manifest.training["architecture"]["head"] == "map"
    assert 30 <= manifest.training["masks"]["train_images_with_defect_mask"] <= 35  # of 35 training defects
    # a few dozen masked defects: "auto" moves each onto good parts up to four times
    masks = manifest.training["masks"]
    assert masks["transplant"] == "auto" and 0 < masks["transplanted"] <= 4 * masks["train_images_with_defect_mask"]
    assert f"{masks['transplanted']} more defects transplanted onto good training inputs" in out

    proc = run("eval", str(bundle), "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("n", "accuracy", "balanced_accuracy", "defect_recall", "defect_precision",
                "false_reject_rate", "roc_auc", "threshold", "confusion"):
        assert key in result, key
    assert result["n"] == 100 and result["unreadable"] == 1
    assert result["threshold"] == manifest.threshold
    assert result["runtime"] == "litert"
    assert sum(c["pass"] + c["fail"] for c in result["confusion"].values()) == 100


def test_several_defect_classes_train_merged_or_separate(tmp_path: Path) -> None:
    """Three class folders: by default the network learns pass vs defect (two outputs) and the
    report still gives recall per defect folder; --defects separate keeps one output per folder."""
    from training.synth import generate_dataset

    data = tmp_path / "data"
    # at 32 px a few scratches stay below the visibility floor and their parts land in ok/
    counts = generate_dataset(data, count=60, seed=7, size=32)
    more = generate_dataset(tmp_path / "more", count=40, seed=8, size=32)
    shutil.move(str(tmp_path / "more" / "scratch"), str(data / "dent"))  # other images: a second defect class
    common = ["fit", str(data), "--epochs", "1", "--size", "32", "--seed", "7", "--allow-quantization-drop"]

    code, out = invoke_train(*common, "--out", str(tmp_path / "merged"))
    assert code == 0, out
    assert "ok / defect (defect classes merged)" in out
    merged = read_manifest(tmp_path / "merged")
    assert merged.labels == ("ok", "defect") and merged.output.shape == (1, 2)
    assert set(merged.metrics["int8"]["per_class_recall"]) == {"ok", "scratch", "dent"}
    assert merged.dataset["class_counts"] == {"dent": more["scratch"], **counts}
    assert {g.label for g in merged.golden} == {"ok", "scratch", "dent"}

    code, out = invoke_train(*common, "--out", str(tmp_path / "separate"), "--defects", "separate")
    assert code == 0, out
    separate = read_manifest(tmp_path / "separate")
    assert separate.labels == ("dent", "ok", "scratch") and separate.output.shape == (1, 3)


def test_non_square_input_keeps_the_cameras_aspect(tmp_path: Path) -> None:
    """`--size WxH`: the bundle's input is H x W, and the edge classifier takes a 4:3 frame."""
    from edge.inference import Classifier
    from training.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, count=40, seed=9, size=48)
    code, out = invoke_train("fit", str(data), "--out", str(tmp_path / "b"), "--epochs", "1", "--size", "40x30",
                       "--allow-quantization-drop")  # fmt: skip
    assert code == 0, out
    assert "training: 40x30 gray" in out
    manifest = read_manifest(tmp_path / "b")
    assert (manifest.preprocessing.width, manifest.preprocessing.height) == (40, 30)
    assert manifest.input.shape == (1, 30, 40, 1)
    clf = Classifier(tmp_path / "b")
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pred = clf.predict(frame)
    assert pred.label in manifest.labels and 0.0 <= pred.score <= 1.0


@pytest.mark.parametrize("size", ["40y30", "x30", "4x2000", "0"])
def test_bad_input_size_is_one_line(tmp_path: Path, size: str) -> None:
    code, out = invoke_train("fit", str(tmp_path), "--out", str(tmp_path / "b"), "--size", size)
    assert code == 2 and "Invalid value for '--size'" in out and "Traceback" not in out
