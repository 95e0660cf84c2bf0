"""``linewatch train threshold``: move a bundle's operating point without retraining.

The bundle keeps the scores its threshold was chosen from (``report/operating_scores.json``,
labelled, from images the scoring model never trained on). A new target recall or
false-reject budget re-picks the threshold from them in a second; the result is a new
bundle version with the same model file, its manifest, report pictures and model card
redone, which ``cloud models add`` and ``cloud push`` take as usual.

- ``recall`` alone: the highest threshold whose recall reaches it, smoothed and on the
  stored scores themselves.
- ``max_false_reject`` alone: the lowest threshold whose false-reject rate is within it,
  both ways.
- both: the fit's rule (:data:`training.operating_point.RULE_RISK`) with both budgets.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge.protocol import MANIFEST_FILE, REPORT_DIR, SIGNATURE_FILE, Manifest, read_manifest
from training import bundle as bundle_mod
from training import report
from training.evaluate import compute_metrics
from training.exceptions import TrainingError
from training.native import quiet_native_output
from training.operating_point import (
    DEFAULT_MAX_FALSE_REJECT,
    DEFAULT_TARGET_RECALL,
    RULE_FALSE_REJECT,
    RULE_RECALL,
    RULE_RISK,
    SCORES_FILE,
    OperatingPoint,
    OperatingScores,
    check_budgets,
)


@dataclass(frozen=True)
class MovedBundle:
    """Where the new bundle is and the point it ships."""

    bundle_dir: Path
    version: str
    previous_version: str
    operating_point: OperatingPoint
    test_metrics: dict[str, Any] | None


def moved_version(previous: str, now: datetime | None = None) -> str:
    """``<previous>.t<UTC timestamp>``, an earlier ``.t`` suffix replaced: unique and traceable."""
    base = re.sub(r"\.t\d{14}$", "", previous)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
    return f"{base}.t{stamp}"[:64]


def load_operating_scores(bundle_dir: Path) -> OperatingScores:
    """The stored scores of a bundle; TrainingError saying what to do when they are missing or damaged."""
    path = Path(bundle_dir) / REPORT_DIR / SCORES_FILE
    if not path.is_file():
        raise TrainingError(
            f"{bundle_dir} has no stored operating scores ({REPORT_DIR}/{SCORES_FILE}); it was trained before "
            "`train threshold` existed: retrain it with `linewatch train fit`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return OperatingScores.from_json(raw, source=str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise TrainingError(f"{path} cannot be read ({exc}); retrain the bundle with `linewatch train fit`") from exc


def move_threshold(
    bundle_dir: Path,
    out_dir: Path,
    *,
    recall: float | None = None,
    max_false_reject: float | None = None,
    version: str | None = None,
) -> MovedBundle:
    """Write a copy of ``bundle_dir`` to ``out_dir`` with the operating point re-picked; see the module docstring.

    Raises ValueError for budgets out of range or none given, :class:`TrainingError` for a
    bundle without stored scores, or a request the stored scores cannot meet.
    """
    if recall is None and max_false_reject is None:
        raise ValueError("give --recall or --max-false-reject (or both)")
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if out_dir.resolve() == bundle_dir.resolve():
        raise TrainingError("--out must be a new folder: the bundle it came from stays as it is")
    manifest = read_manifest(bundle_dir)
    scores = load_operating_scores(bundle_dir)
    point = _repick(scores, manifest, recall, max_false_reject)
    new_version = version or moved_version(manifest.version)
    bundle_mod.check_out_dir(out_dir)
    staging = bundle_mod.staging_dir(out_dir)
    try:
        shutil.rmtree(staging)
        # the old signature covers the old manifest: the new bundle is signed when it is registered
        shutil.copytree(bundle_dir, staging, ignore=shutil.ignore_patterns(SIGNATURE_FILE, ".*"))
        raw = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        test_metrics = _retest(staging, raw, point.threshold)
        raw.update(
            version=new_version,
            created=bundle_mod.utc_now(),
            threshold=point.threshold,
            operating_point=point.to_manifest(),
        )
        if test_metrics is not None:
            raw.setdefault("metrics", {})["int8"] = test_metrics
        raw.setdefault("training", {})["operating_point_moved"] = {
            "from_version": manifest.version,
            "from_threshold": manifest.threshold,
            "by": "linewatch train threshold",
        }
        bundle_mod.write_manifest(staging, raw)
        _redo_report(staging, raw, scores, point, test_metrics, manifest.pass_label)
        with quiet_native_output():
            bundle_mod.verify_bundle(staging)
        final = bundle_mod.install_bundle(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MovedBundle(final, new_version, manifest.version, point, test_metrics)


def _repick(scores: OperatingScores, manifest: Manifest, recall: float | None,
            max_false_reject: float | None) -> OperatingPoint:
    """The new operating point: a budget not given keeps the bundle's (or the default);
    :class:`TrainingError` when the stored scores cannot meet the one given."""
    previous = manifest.operating_point
    target = recall if recall is not None else (previous.target_recall if previous else DEFAULT_TARGET_RECALL)
    budget = (
        max_false_reject
        if max_false_reject is not None
        else (previous.max_false_reject if previous else DEFAULT_MAX_FALSE_REJECT)
    )
    check_budgets(target, budget)
    rule = RULE_RISK if recall is not None and max_false_reject is not None else (RULE_RECALL if recall is not None else RULE_FALSE_REJECT)
    point = scores.choose(target, budget, rule)
    if rule == RULE_RECALL and point.recall < target:
        raise TrainingError(
            f"no threshold reaches recall {target:.2%} on the stored scores (best {point.recall:.2%}); ask for less"
        )
    if rule == RULE_FALSE_REJECT and point.false_reject_rate > budget:
        raise TrainingError(
            f"no threshold keeps false rejects within {budget:.2%} on the stored scores "
            f"(at best {point.false_reject_rate:.2%}: good parts score 1.0); ask for more"
        )
    return point


def _redo_report(staging: Path, raw: dict[str, Any], scores: OperatingScores, point: OperatingPoint,
                 test_metrics: dict[str, Any] | None, pass_label: str) -> None:
    """The moved bundle's report pictures and model card, for the new point."""
    report_dir = staging / REPORT_DIR
    test = _test_scores(staging)
    report.plot_operating_point(scores, point, test, report_dir)
    if test is not None and test_metrics is not None:
        report.plot_confusion(
            test_metrics["confusion"], pass_label, report_dir / "confusion.png",
            f"int8 on test, threshold {point.threshold:.3f}",
        )
    card = report_dir / "model_card.md"
    card.write_text(
        report.model_card(raw, {"data_dir": "(see the original bundle)", "runtime": raw.get("metrics", {}).get("runtime", "?")}),
        encoding="utf-8",
    )


def _test_scores(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    metrics_file = bundle_dir / REPORT_DIR / "metrics.json"
    try:
        test = json.loads(metrics_file.read_text(encoding="utf-8"))["test_scores"]
        labels = test["labels"]
        return np.array([label != test["pass_label"] for label in labels], bool), np.asarray(test["int8"], float)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _retest(bundle_dir: Path, manifest: dict[str, Any], threshold: float) -> dict[str, Any] | None:
    """int8 test metrics at the new threshold, from the test scores the fit stored (None without them)."""
    metrics_file = bundle_dir / REPORT_DIR / "metrics.json"
    try:
        stored = json.loads(metrics_file.read_text(encoding="utf-8"))
        test = stored["test_scores"]
        metrics = compute_metrics(test["labels"], np.asarray(test["int8"], float), test["pass_label"], threshold)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stored.setdefault("metrics", {})["int8"] = metrics
    stored["threshold_moved_to"] = threshold
    metrics_file.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    return metrics


__all__ = ["MovedBundle", "load_operating_scores", "move_threshold", "moved_version"]
