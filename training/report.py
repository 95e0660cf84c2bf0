"""The bundle's human report: confusion matrix, ROC and PR curves as PNGs, and a model card.

matplotlib runs with the Agg backend (no display needed); it comes with the training extra.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import pr_curve, roc_curve

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


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], threshold_points: Mapping[str, tuple[float, float]], out: Path, title: str) -> Path:
    """ROC curves (name -> (is_defect, scores)), with each model's operating point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        (line,) = ax.plot(fpr, tpr, label=name, drawstyle="steps-post")
        if name in threshold_points:
            ax.plot(*threshold_points[name], "o", ms=5, color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set_xlabel("false reject rate (good parts failed)")
    ax.set_ylabel("defect recall")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_pr(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], out: Path, title: str) -> Path:
    """Precision-recall curves with defects as the positive class."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    for name, (y, s) in curves.items():
        precision, recall, _ = pr_curve(y, s)
        ax.plot(recall, precision, label=name, drawstyle="steps-post")
    ax.set_xlabel("defect recall")
    ax.set_ylabel("defect precision")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


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


def model_card(manifest: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    """A short model card in Markdown: intended use, data, metrics, threshold, limitations."""
    m = manifest
    metrics = m["metrics"]
    sel = metrics["threshold_selection"]
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
    for w in extra.get("warnings", []):
        lines.append(f"- Data check warning: {w}")
    lines += [
        "",
        "## Metrics (test split)",
        "",
        *metrics_table(flt, int8),
        "",
        f"int8 is evaluated through `edge.inference.Classifier` ({extra.get('runtime', '?')} runtime), the code the "
        "edge agent runs. Each model is evaluated at the threshold chosen for it on the validation split.",
        "",
        "## Threshold",
        "",
        f"Chosen on the validation split ({sel['n_defect']} defect, {sel['n_pass']} pass images) as the largest "
        f"threshold reaching the target defect recall {sel['target_recall']:.2%}: threshold {sel['threshold']:.4f} "
        f"reached recall {sel['recall']:.2%} at a false reject rate of **{sel['false_reject_rate']:.2%}** "
        f"(good parts scrapped). On test it costs {_pct(int8.get('false_reject_rate'))} of good parts for "
        f"{_pct(int8.get('defect_recall'))} defect recall.",
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
        "- The threshold comes from a validation split of a few hundred images at most: recall close to the "
        "target is an estimate with real uncertainty, and defects unlike the training ones may pass.",
        "- Lighting, camera, focus or part changes shift the inputs; the agent compares live inputs and scores "
        "with the reference statistics in the manifest to flag drift, which calls for new labelled images and "
        "retraining.",
        "- Images are downscaled to the model size: defects much thinner than one model pixel may be lost.",
    ]
    if extra.get("gate_message"):
        lines += ["", "## Quantization gate", "", str(extra["gate_message"])]
    return "\n".join(lines) + "\n"


__all__ = ["metrics_table", "model_card", "plot_confusion", "plot_pr", "plot_roc"]
