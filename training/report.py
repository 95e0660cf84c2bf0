"""The bundle's human report: confusion matrix, ROC and PR curves as PNGs, metrics.json and a model card.

matplotlib runs with the Agg backend (no display needed); it comes with the training extra.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge.protocol import REPORT_DIR
from training.bundle import FLOAT_MODEL_FILE
from training.dataset import DataReport, Split
from training.evaluate import Evaluation, pr_curve, roc_curve
from training.operating_point import (
    SCORES_FILE,
    OperatingPoint,
    OperatingScores,
    smoothed_tail,
    to_logit,
)

SCORES_PLOT = "scores.png"
OPERATING_PLOT = "operating_point.png"

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: Mapping[str, Mapping[str, int]], pass_label: str, out: Path, title: str) -> Path:
    """Rows: true class; columns: the decision (pass / fail); cells: image counts."""
    plt = _pyplot()
    classes = list(confusion)
    matrix = np.array([[confusion[c]["pass"], confusion[c]["fail"]] for c in classes])
    fig, ax = plt.subplots(figsize=(4.2, 1.2 + 0.5 * len(classes)), dpi=110)
    ax.imshow(matrix, cmap="Blues", aspect="auto")
    ax.set_xticks([0, 1], ["pass", "fail"])
    ax.set_yticks(range(len(classes)), [f"{c} (pass)" if c == pass_label else c for c in classes])
    ax.set_xlabel("decision")
    ax.set_ylabel("true class")
    peak = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        good = (classes[i] == pass_label) == (j == 0)
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else ("black" if good else "crimson"))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _save_rate_plot(plt: Any, fig: Any, ax: Any, out: Path, title: str, xlabel: str, ylabel: str, legend: str) -> Path:
    """Label a plot of two rates (both axes [0, 1]), add its legend and title, save it to
    ``out`` and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc=legend, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold_points: Mapping[str, tuple[float, float]],
    out: Path,
    title: str,
) -> Path:
    """ROC curves (name -> (is_defect, scores)), with each model's operating point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        (line,) = ax.plot(fpr, tpr, label=name, drawstyle="steps-post")
        if name in threshold_points:
            ax.plot(*threshold_points[name], "o", ms=5, color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    return _save_rate_plot(plt, fig, ax, out, title, "false reject rate (good parts failed)", "defect recall", "lower right")


def plot_pr(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], out: Path, title: str) -> Path:
    """Precision-recall curves with defects as the positive class."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    for name, (y, s) in curves.items():
        precision, recall, _ = pr_curve(y, s)
        ax.plot(recall, precision, label=name, drawstyle="steps-post")
    return _save_rate_plot(plt, fig, ax, out, title, "defect recall", "defect precision", "lower left")


def plot_operating_point(
    chosen_from: OperatingScores,
    point: OperatingPoint,
    test: tuple[np.ndarray, np.ndarray] | None,
    report_dir: Path,
) -> tuple[Path, Path]:
    """Two pictures: each class's score histogram with the threshold drawn (on the scores the
    point was chosen from, and on test), and recall and false-reject rate against the threshold."""
    plt = _pyplot()
    sets = [(f"{point.scores_from} ({chosen_from.model})", chosen_from.is_defect, chosen_from.scores)]
    if test is not None:
        sets.append(("test (int8)", np.asarray(test[0], bool), np.asarray(test[1], float)))
    bins = np.linspace(0.0, 1.0, 51)
    fig, axes = plt.subplots(len(sets), 1, figsize=(5.6, 2.3 * len(sets)), dpi=110, squeeze=False)
    for ax, (name, y, s) in zip(axes[:, 0], sets, strict=True):
        ax.hist(s[~y], bins=bins, color="tab:green", alpha=0.6, label=f"{chosen_from.pass_label} ({int((~y).sum())})")
        ax.hist(s[y], bins=bins, color="tab:red", alpha=0.6, label=f"defect ({int(y.sum())})")
        ax.axvline(point.threshold, color="black", lw=1.2, label=f"threshold {point.threshold:.3f}")
        ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_ylabel("images")
        ax.set_title(f"defect scores, {name}", fontsize=9)
        ax.legend(fontsize=7, loc="upper center")
    axes[-1, 0].set_xlabel("defect score (fail at or above the threshold)")
    fig.tight_layout()
    scores_png = report_dir / SCORES_PLOT
    fig.savefig(scores_png)
    plt.close(fig)

    y, s = chosen_from.is_defect, chosen_from.scores
    grid = np.linspace(0.0, 1.0, 401)
    z = to_logit(grid)
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    ax.plot(grid, [float(np.mean(s[y] >= t)) for t in grid], color="tab:red", drawstyle="steps-post", label="recall")
    ax.plot(grid, [float(np.mean(s[~y] >= t)) for t in grid], color="tab:green", drawstyle="steps-post", label="false rejects")
    ax.plot(grid, smoothed_tail(to_logit(s[y]), z), color="tab:red", ls=":", lw=1, label="recall, smoothed")
    ax.plot(grid, smoothed_tail(to_logit(s[~y]), z), color="tab:green", ls=":", lw=1, label="false rejects, smoothed")
    ax.axhline(point.target_recall, color="tab:red", lw=0.6, alpha=0.5)
    ax.axhline(point.max_false_reject, color="tab:green", lw=0.6, alpha=0.5)
    ax.axvline(point.threshold, color="black", lw=1.2, label=f"threshold {point.threshold:.3f} ({point.rule})")
    ax.set_xlabel("threshold")
    ax.set_ylabel("share of images failed")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title(f"recall and false rejects against the threshold ({point.scores_from})", fontsize=9)
    fig.tight_layout()
    curve_png = report_dir / OPERATING_PLOT
    fig.savefig(curve_png)
    plt.close(fig)
    return scores_png, curve_png


def operating_point_lines(point: OperatingPoint) -> list[str]:
    """The operating point for people: the summary, what it misses of its budgets, warnings."""
    lines = [point.summary()]
    if point.feasible:
        lines.append("  both budgets can be met on these scores; the threshold sits inside the interval that meets them")
    for shortfall in point.shortfalls():
        lines.append(f"  short of the budgets: {shortfall}")
    for warning in point.warnings:
        lines.append(f"  warning: {warning}")
    return lines


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f} %"


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def metrics_table(float_m: Mapping[str, Any], int8_m: Mapping[str, Any]) -> list[str]:
    """Markdown rows comparing float and int8 test metrics (also printed by the CLI)."""
    rows = [
        "| test metric | float32 | int8 |",
        "|---|---|---|",
    ]
    for key, fmt in (
        ("balanced_accuracy", _pct),
        ("accuracy", _pct),
        ("defect_recall", _pct),
        ("false_reject_rate", _pct),
        ("defect_precision", _pct),
        ("roc_auc", _num),
        ("pr_auc", _num),
        ("threshold", _num),
    ):
        rows.append(f"| {key} | {fmt(float_m.get(key))} | {fmt(int8_m.get(key))} |")
    return rows


def operating_point_section(op: Mapping[str, Any], int8_test: Mapping[str, Any]) -> list[str]:
    """The model card's "Operating point" section, from the manifest's operating_point."""
    if not op:
        return ["## Operating point", "", "This bundle predates recorded operating points."]
    lines = [
        "## Operating point",
        "",
        f"Threshold **{op['threshold']:.4f}**, rule `{op['rule']}` on {op['scores_from']} scores of "
        f"{op['n_defect']} defect and {op['n_pass']} good images (none of them trained the model that scored them). "
        f"Budgets: defect recall at least {op['target_recall']:.2%}, false rejects at most {op['max_false_reject']:.2%}.",
        "",
        f"- There: recall **{op['recall']:.2%}** (one-sided 95 % lower bound **{op['recall_lower_95']:.2%}** for "
        f"{op['n_defect']} defects), false rejects **{op['false_reject_rate']:.2%}**.",
        f"- On the test split (int8): recall {_pct(int8_test.get('defect_recall'))}, false rejects "
        f"{_pct(int8_test.get('false_reject_rate'))}.",
    ]
    if op.get("recall", 1.0) < op["target_recall"]:
        lines.append(f"- Recall is {100 * (op['target_recall'] - op['recall']):.1f} points below the target.")
    if op.get("false_reject_rate", 0.0) > op["max_false_reject"]:
        lines.append(
            f"- False rejects are {100 * (op['false_reject_rate'] - op['max_false_reject']):.1f} points over the budget."
        )
    for warning in op.get("warnings", []):
        lines.append(f"- Warning: {warning}")
    lines += [
        "",
        f"`linewatch train threshold` moves the point without retraining. Pictures: `{SCORES_PLOT}`, `{OPERATING_PLOT}`.",
    ]
    return lines


def model_card(manifest: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    """A short model card in Markdown: intended use, data, metrics, threshold, limitations."""
    m = manifest
    metrics = m["metrics"]
    op = m.get("operating_point") or {}
    ds = m["dataset"]
    tr = m["training"]
    prep = m["preprocessing"]
    int8 = metrics["int8"]
    flt = metrics["float"]
    defects = [label for label in m["labels"] if label != m["pass_label"]]
    lines = [
        f"# Model card: {m['name']} {m['version']}",
        "",
        f"Created {m['created']} by `linewatch train fit`. Full-integer int8 TFLite model, "
        f"{m['model']['bytes']} bytes, sha256 `{m['model']['sha256']}`.",
        "",
        "## Intended use",
        "",
        f"Pass/fail visual inspection of parts on one line: the edge agent fails a part when its defect score "
        f"(1 - P({m['pass_label']})) is at least **{m['threshold']:.4f}**. Classes: pass class "
        f"`{m['pass_label']}`, defect classes {', '.join(f'`{d}`' for d in defects)}. "
        "It is meant for the camera, lighting and parts it was trained on; it is not a general defect detector.",
        "",
        "## Data",
        "",
        f"- Source folder: `{extra.get('data_dir', '?')}`, fingerprint `{ds['fingerprint']}`.",
        f"- Images per class: {', '.join(f'{k}={v}' for k, v in ds['class_counts'].items())}.",
        f"- Split ({ds['split']['method']}, seed {ds['split']['seed']}): "
        + ", ".join(f"{k} {v}" for k, v in ds["split"]["sizes"].items())
        + ".",
        f"- Input: {prep['width']}x{prep['height']} {prep['color_mode']}, resized with `{prep['interpolation']}`, "
        f"pixels / 255; int8 input scale {m['input']['scale']:.6g}, zero point {m['input']['zero_point']}.",
    ]
    tiling = m.get("tiling")
    if tiling:
        lines.append(
            f"- Tiles: each frame{' (its ROI ' + str(list(tiling['roi'])) + ')' if tiling.get('roi') else ''} resized by "
            f"{tiling['scale']:g} and cut into {tiling['width']}x{tiling['height']} tiles overlapping by at least "
            f"{tiling['overlap']:g}{', plus the whole frame squeezed to one tile' if tiling.get('whole_frame') else ''}; "
            "the part's score is the worst input's, and its box goes with the result (docs/training.md, \"Tiles\")."
        )
    for w in extra.get("warnings", []):
        lines.append(f"- Data check warning: {w}")
    lines += [
        "",
        "## Metrics (test split)",
        "",
        *metrics_table(flt, int8),
        "",
        f"int8 is evaluated through `edge.inference.Classifier` ({extra.get('runtime', '?')} runtime), the code the "
        "edge agent runs. Each model is evaluated at the operating point chosen for it.",
        "",
        *operating_point_section(op, int8),
        "",
        "## Training",
        "",
        f"{tr['epochs_run']} epochs (best {tr['best_epoch']}), batch {tr['batch_size']}, learning rate "
        f"{tr['learning_rate']}, seed {tr['seed']}, TensorFlow {tr['tf_version']}; "
        f"{tr['parameters']} parameters ({tr.get('architecture', {}).get('head', 'features')} head); "
        f"trained in {tr['durations_s'].get('train', 0):.0f} s."
        + (
            f" Defect masks of {tr['masks']['train_images_with_defect_mask']} training images taught the defect map "
            "where the defects are."
            if tr.get("masks", {}).get("used")
            else ""
        ),
        "",
        "## Limitations",
        "",
        "- Recall near the target is an estimate from the defects behind it (see the lower bound above), and "
        "defects unlike the training ones may pass.",
        "- Lighting, camera, focus or part changes shift the inputs; the agent compares live inputs and scores "
        "with those of this model's first parts on the line, and reports how far they are from the reference "
        "statistics in the manifest, to flag drift, which calls for new labelled images and retraining.",
        "- Images are downscaled to the model size: defects much thinner than one model pixel may be lost.",
    ]
    if extra.get("gate_message"):
        lines += ["", "## Quantization gate", "", str(extra["gate_message"])]
    return "\n".join(lines) + "\n"


def write_report(report_dir: Path, manifest: Mapping[str, Any], evaluation: Evaluation, data: DataReport, split: Split) -> None:
    """A fit's report/ for people: the operating point's scores (what ``train threshold``
    moves the point on), the plots, metrics.json (with every test score) and the model card."""
    e = evaluation
    pass_label = manifest["pass_label"]
    (report_dir / SCORES_FILE).write_text(json.dumps(e.shipped_scores.to_json()) + "\n", encoding="utf-8")
    plot_confusion(e.int8_metrics["confusion"], pass_label, report_dir / "confusion.png",
                   f"int8 on test, threshold {e.point.threshold:.3f}")
    plot_operating_point(e.shipped_scores, e.point, (e.test_is_defect, e.int8_test), report_dir)
    curves = {"float32": (e.test_is_defect, e.float_test), "int8": (e.test_is_defect, e.int8_test)}
    points = {
        name: (m["false_reject_rate"] or 0.0, m["defect_recall"] or 0.0)
        for name, m in (("float32", e.float_metrics), ("int8", e.int8_metrics))
    }
    plot_roc(curves, points, report_dir / "roc.png", "ROC on test (dot: chosen threshold)")
    plot_pr(curves, report_dir / "pr.png", "Precision-recall on test (defects positive)")
    metrics = {
        "name": manifest["name"],
        "version": manifest["version"],
        "metrics": manifest["metrics"],
        "data_check": data.to_dict(),
        "split": split.to_dict(),
        "training": manifest["training"],
        "float_model": {"file": f"{REPORT_DIR}/{FLOAT_MODEL_FILE}", "bytes": (report_dir / FLOAT_MODEL_FILE).stat().st_size},
        "test_scores": {
            "pass_label": pass_label,
            "files": [str(s.path) for s in split.test],
            "labels": e.test_labels,
            "int8": [round(float(v), 6) for v in e.int8_test],
            "float": [round(float(v), 6) for v in e.float_test],
        },
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    extra = {"data_dir": str(data.data_dir), "warnings": list(data.warnings), "runtime": e.runtime,
             "gate_message": e.gate["message"]}
    (report_dir / "model_card.md").write_text(model_card(manifest, extra), encoding="utf-8")


__all__ = [
    "metrics_table",
    "model_card",
    "operating_point_lines",
    "operating_point_section",
    "plot_confusion",
    "plot_operating_point",
    "plot_pr",
    "plot_roc",
    "write_report",
]
