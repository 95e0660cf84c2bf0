"""``linewatch train``: synthetic data, training to an int8 bundle, evaluation.

Loaded lazily by ``edge.cli`` as ``training.cli:train``. Nothing heavy is imported at
module level (no TensorFlow, no OpenCV): ``linewatch --help`` must stay fast, and each
command imports what it needs when it runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from edge.cli import LinewatchGroup

logger = logging.getLogger(__name__)

# Before TensorFlow is ever imported by a command: keep its C++ logging to errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SYNTH_COUNT = 8000

class InputSize(click.ParamType):
    """``N`` (square) or ``WxH`` -> (width, height), each 8-1024 pixels."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        text = str(value).lower().replace(" ", "")
        try:
            w, h = (int(v) for v in text.split("x")) if "x" in text else (int(text), int(text))
        except ValueError:
            self.fail(f"{value!r} is not N or WxH (for example 128 or 128x96)", param, ctx)
        if not (8 <= w <= 1024 and 8 <= h <= 1024):
            self.fail(f"{value!r}: width and height must be 8-1024 pixels", param, ctx)
        return w, h


class TileSize(click.ParamType):
    """``WxH`` (or ``N`` for a square) tile in picture pixels."""

    name = "tile"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        from edge.tiling import parse_tile

        try:
            return parse_tile(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class TransplantCount(click.ParamType):
    """``auto`` or a number of transplants per masked defect, 0-16."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if value == "auto" or isinstance(value, float):
            return value
        try:
            count = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)
        if not 0.0 <= count <= 16.0:
            self.fail(f"{count:g} is outside 0-16", param, ctx)
        return count


class TrainGroup(LinewatchGroup):
    """``linewatch train``: the option dataclasses refuse bad option combinations with ValueError."""

    one_line_errors = (*LinewatchGroup.one_line_errors, ValueError)


def _quiet_tensorflow() -> None:
    """TensorFlow and absl log to stderr on their own; keep only real errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("tensorflow", "absl", "keras", "h5py", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=TrainGroup)
def train() -> None:
    """Make datasets, train int8 model bundles and evaluate them.

    Example:

        linewatch train synth data/ && linewatch train fit data/ --out bundle/
    """


@train.command("synth")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--count",
    default=DEFAULT_SYNTH_COUNT,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images to generate (half scratched).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same images.")
@click.option("--size", default="160", show_default=True, metavar="N|WxH",
              help="N: square close-ups of a part's surface, N px a side. WxH: high-resolution line frames "
              "(a part on the belt, scratches 1-3 px wide at native resolution, visibility measured there), "
              "at least 64x64.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Render in this many processes.")
def synth(out_dir: Path, count: int, seed: int, size: str, workers: int) -> None:
    """Write a synthetic dataset: OUT_DIR/ok/*.png, OUT_DIR/scratch/*.png, and each
    scratched image's defect mask under the same name in OUT_DIR/masks/scratch/.

    With --size WxH the pictures are whole camera frames for a tiled model: thin
    scratches a model that squeezes the frame to 128 px cannot see.

    Examples:

        linewatch train synth data/ --count 2000 --seed 1

        linewatch train synth frames/ --size 1920x1080 --count 1000 --workers 2
    """
    from training.synth import generate_dataset, parse_size

    picture_size = parse_size(size)
    t0 = time.perf_counter()
    counts = generate_dataset(out_dir, count=count, seed=seed, size=picture_size, workers=workers)
    click.echo(
        f"wrote {sum(counts.values())} images to {out_dir} ("
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f") in {time.perf_counter() - t0:.1f}s"
    )


@train.command("fit")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle folder to write (replaced if it holds a bundle).",
)
@click.option("--epochs", default=None, type=click.IntRange(min=1),
              help="Maximum epochs (early stopping may end sooner).  [default: about 112,000 training-image passes: "
              "20 for 5600 training images, 10 to 60]")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for split, weights, augmentation.")
@click.option("--pass-label", default=None, help="Class folder of good parts.  [default: ok]")
@click.option("--target-recall", default=0.99, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Defect recall the operating point must reach.")
@click.option("--max-false-reject", default=0.02, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of good parts the operating point may fail. When no threshold meets both budgets, the cut leans towards recall.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=0),
              help="With fewer than 300 validation defects, train this many fold models so every training defect "
              "scores out of fold for the threshold; 0: validation alone.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0.0, 0.5, max_open=True),
              help="Class targets e/2 and 1 - e/2: keeps scores off int8's end steps.")
@click.option("--size", default=None, type=InputSize(), metavar="N|WxH",
              help="Model input in pixels: N for N x N, or WxH to keep the camera's aspect (e.g. 128x96 for 640x480: "
              "an integer ratio also resizes 4x faster on the box).  [default: 192 for up to about 830 training "
              "pictures of at least 192 px (thin defects keep their pixels), else 128]")
@click.option(
    "--color",
    "color_mode",
    type=click.Choice(["gray", "rgb"]),
    default="gray",
    show_default=True,
    help="Model input colour mode.",
)
@click.option("--tile", default=None, type=TileSize(), metavar="WxH",
              help="Learn on WxH-pixel tiles of the pictures instead of the whole picture squeezed to --size; "
              "the box cuts each frame into such tiles and fails the part on its worst tile (e.g. 128x128).")
@click.option("--scale", default=1.0, show_default=True, type=click.FloatRange(0.0, 4.0, min_open=True),
              help="With --tile: resize pictures by this much first (1.0 = the camera's own pixels); the model input is the tile x scale.")
@click.option("--overlap", default=0.25, show_default=True, type=click.FloatRange(0.0, 0.9, max_open=True),
              help="With --tile: least overlap of neighbouring tiles, as a share of a tile.")
@click.option("--whole-frame/--no-whole-frame", default=True, show_default=True,
              help="With --tile: also show the model the whole picture squeezed to one tile (shading, large defects).")
@click.option("--version", "version", default=None, help="Bundle version.  [default: UTC date.time]")
@click.option("--name", default=None, help="Bundle name.  [default: linewatch-<DATA_DIR name>]")
# default = training.pipeline.DEFAULT_FILTERS, written out so --help needs no pipeline import (a test checks)
@click.option("--filters", default=16, show_default=True, type=click.IntRange(2, 128),
              help="Filters of the first conv layer (later layers 2x-16x): wider learns faster, costs inference time.")
@click.option("--stem", type=click.Choice(["pool", "strided"]), default="pool", show_default=True,
              help="First layer: 'pool' (full-resolution conv, then max pool) or 'strided' (a stride-2 conv, "
              "about half the inference time per input).")
@click.option("--shading/--no-shading", default=False, show_default=True,
              help="Beside the defect map, a coarse view of the picture's level, for defects that are shading "
              "across a region rather than a mark (needs many defect pictures: see docs/training.md, Tiles).")
@click.option("--transplant", default="auto", show_default=True, type=TransplantCount(),
              help="Per defect picture with a mask, this many more training examples: its defect moved onto "
              "good parts (docs/training.md, Defect transplant); 0 = off, 'auto' tops a few dozen up to 200.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", "learning_rate", default=3e-3, show_default=True, type=float, help="Initial learning rate (cosine decay).")
@click.option("--patience", default=8, show_default=True, type=click.IntRange(min=1), help="Early-stopping patience in epochs.")
@click.option("--no-augment", is_flag=True, help="Train without augmentation.")
@click.option("--masks", "masks_dir", default=None, type=click.Path(path_type=Path),
              help="Defect masks, <class>/<image name> (white = defect); any number of defect images may have one.  "
              "[default: DATA_DIR/masks if it exists]")
@click.option("--group-by", type=click.Choice(["none", "number", "content"]), default="none", show_default=True,
              help="Keep near-duplicates in one split and one fold: 'number' groups files whose last file-name numbers are "
                   "within --group-gap; 'content' groups pictures that show the same thing (thumbnail correlation >= 0.98).")
@click.option("--group-gap", default=100, show_default=True, type=click.IntRange(min=0))
@click.option("--defects", type=click.Choice(["merged", "separate"]), default="merged", show_default=True,
              help="With several defect classes: 'merged' trains pass vs defect (the decision), 'separate' one output per class.")
@click.option("--max-quantization-drop", default=1.0, show_default=True, type=float,
              help="Largest allowed int8 balanced-accuracy drop against float, in points.")
@click.option("--allow-quantization-drop", is_flag=True, help="Write and accept the bundle even when the quantization gate fails.")
def fit_command(
    data_dir: Path,
    out_dir: Path,
    size: tuple[int, int] | None,
    no_augment: bool,
    masks_dir: Path | None,
    **options: Any,
) -> None:
    """Train on DATA_DIR (one folder per class) and write an int8 model bundle to --out.

    Checks the data, splits it 70/15/15 (stratified, seeded), trains a small CNN,
    quantizes it to int8, chooses the operating point for --target-recall and
    --max-false-reject on scores of images the scoring model never trained on
    (validation, or out-of-fold when validation has few defects), evaluates float and
    int8 on test and writes the bundle with its report. Exits non-zero when int8 loses
    more than --max-quantization-drop points of balanced accuracy at the shipped
    threshold, or 0.005 ROC AUC, against float, unless --allow-quantization-drop.

    With --tile, the model learns on tiles of the pictures at --scale (native pixels by
    default) and the box decides each frame by the rule the fit chose (its worst tile, or
    that fused with the whole view), keeping the deciding input's box: for cameras of
    several megapixels and thin defects (docs/training.md, "Tiles").

    Examples:

        linewatch train fit data/ --out bundle/ --epochs 30 --seed 0 --version 1.0.0

        linewatch train fit frames/ --out bundle/ --tile 256x256 --scale 0.5
    """
    from training.pipeline import DEFAULT_SIZE, FitOptions

    # Every other option is a FitOptions field of the same name.
    fit_options = FitOptions(
        **options,
        size=size[0] if size else DEFAULT_SIZE,
        height=size[1] if size else None,
        size_from_data=size is None,
        augment=not no_augment,
        masks=masks_dir,
    )
    # fit() checks the data before it imports TensorFlow, so bad data fails in a second.
    _quiet_tensorflow()
    from training.pipeline import fit

    t0 = time.perf_counter()
    result = fit(data_dir, out_dir, fit_options, echo=lambda line: click.echo(line))
    click.echo(f"done in {time.perf_counter() - t0:.0f}s: {result.bundle_dir}")


@train.command("threshold")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="New bundle folder to write.")
@click.option("--recall", default=None, type=float, help="Defect recall to reach: the highest threshold that does.")
@click.option("--max-false-reject", default=None, type=float,
              help="Share of good parts that may fail: the lowest threshold within it.  With --recall too: the fit's rule for both.")
@click.option("--version", default=None, help="New bundle version.  [default: <old version>.t<UTC timestamp>]")
def threshold_command(bundle_dir: Path, out_dir: Path, recall: float | None, max_false_reject: float | None, version: str | None) -> None:
    """Move a bundle's operating point without retraining, from the scores stored with it.

    Writes a new bundle version (same model file, new threshold, manifest, report and
    model card) that `cloud models add` and `cloud push` take as usual.

    Example:

        linewatch train threshold bundle/ --out bundle-r95/ --recall 0.95
    """
    if recall is not None and not 0.0 < recall <= 1.0:
        raise click.BadParameter(f"{recall} is not in (0, 1]", param_hint="--recall")
    if max_false_reject is not None and not 0.0 <= max_false_reject < 1.0:
        raise click.BadParameter(f"{max_false_reject} is not in [0, 1)", param_hint="--max-false-reject")
    if recall is None and max_false_reject is None:
        raise click.UsageError("give --recall R or --max-false-reject F (or both)")
    from training.report import operating_point_lines
    from training.threshold import move_threshold

    moved = move_threshold(bundle_dir, out_dir, recall=recall, max_false_reject=max_false_reject, version=version)
    click.echo(f"{moved.bundle_dir}: version {moved.version} (from {moved.previous_version})")
    for line in operating_point_lines(moved.operating_point):
        click.echo(line)
    if moved.test_metrics is not None:
        t = moved.test_metrics
        click.echo(
            f"on the fit's test split (int8): recall {100 * (t['defect_recall'] or 0):.2f} %, "
            f"false rejects {100 * (t['false_reject_rate'] or 0):.2f} %, balanced accuracy {100 * (t['balanced_accuracy'] or 0):.2f} %"
        )


@train.command("eval")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="Folder with one sub-folder per class.")
@click.option("--pass-label", default=None, help="Pass folder in --data.  [default: the bundle's pass label]")
@click.option("--runtime", type=click.Choice(["litert", "tflite-runtime", "tensorflow"]), default=None, help="Force one TFLite runtime.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(bundle_dir: Path, data_dir: Path, pass_label: str | None, runtime: str | None, as_json: bool) -> None:
    """Score every image in --data with the bundle's int8 model, through the edge inference code.

    The model file is checked against the manifest's sha256 first. Unreadable images are
    counted and listed, not fatal.

    Example:

        linewatch train eval bundle/ --data holdout/ --json
    """
    if runtime is None or runtime == "tensorflow":
        _quiet_tensorflow()
    from training.evaluate import evaluate_bundle

    result = evaluate_bundle(bundle_dir, data_dir, pass_label, runtime=runtime)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    _print_eval(result)


def _print_eval(r: dict[str, Any]) -> None:
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f} %"

    click.echo(f"{r['bundle']['name']} {r['bundle']['version']} on {r['data_dir']} ({r['n']} images, runtime {r['runtime']})")
    for key in ("balanced_accuracy", "accuracy", "defect_recall", "false_reject_rate", "defect_precision"):
        click.echo(f"  {key:>18}: {pct(r[key])}")
    for key in ("roc_auc", "pr_auc", "threshold"):
        click.echo(f"  {key:>18}: {'n/a' if r[key] is None else f'{r[key]:.4f}'}")
    op = r.get("operating_point")
    if op:
        click.echo(
            f"  {'operating point':>18}: {op['rule']} rule on {op['scores_from']} scores, target recall "
            f"{pct(op['target_recall'])}, false-reject budget {pct(op['max_false_reject'])}"
        )
    click.echo(f"  {'invoke p50/p99':>18}: {r['invoke_ms_p50']} / {r['invoke_ms_p99']} ms")
    click.echo("  confusion (true class: passed / failed):")
    for label, cell in r["confusion"].items():
        click.echo(f"    {label:>16}: {cell['pass']:>6} / {cell['fail']:<6}")
    if r["unreadable"]:
        click.echo(f"  {r['unreadable']} unreadable image(s) skipped:", err=True)
        for item in r["unreadable_files"][:20]:
            click.echo(f"    {item['file']}", err=True)


@train.command("check")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--pass-label", default=None, help="Class folder of good parts.  [default: ok]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_command(data_dir: Path, pass_label: str | None, as_json: bool) -> None:
    """Run only the data check of `train fit`: counts, unreadable files, duplicates, imbalance.

    Example:

        linewatch train check data/ --pass-label good
    """
    from training.dataset import scan_dataset

    report = scan_dataset(data_dir, pass_label=pass_label)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    for line in report.summary_lines():
        click.echo(line)


@train.command("pack")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("out_file", type=click.Path(path_type=Path, dir_okay=False))
def pack_command(bundle_dir: Path, out_file: Path) -> None:
    """Pack a bundle folder into one deterministic .lwb file for transport.

    Example:

        linewatch train pack bundle/ model-1.0.0.lwb
    """
    from edge.bundle import pack_bundle
    from edge.fsutil import sha256_file
    from edge.protocol import read_manifest

    read_manifest(bundle_dir)
    path = pack_bundle(bundle_dir, out_file)
    click.echo(f"{path} ({path.stat().st_size} bytes, sha256 {sha256_file(path)})")


if __name__ == "__main__":  # pragma: no cover
    train(sys.argv[1:])
