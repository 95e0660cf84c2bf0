"""The operating point: the rule on known score sets, the confidence bound, stored scores,
and ``linewatch train threshold`` end to end on a real bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.protocol import read_manifest
from tests.helpers import invoke_train
from training.operating_point import (
    MISS_WEIGHT_OUT_OF_FOLD,
    MISS_WEIGHT_VALIDATION,
    SCORES_FILE,
    OperatingScores,
    best_cut,
    choose_operating_point,
    defects_needed,
    recall_lower_bound,
)


def labelled(defect: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.ones(len(defect), bool), np.zeros(len(good), bool)], np.r_[defect, good]


# --------------------------------------------------------------------------- the rule


def test_separated_scores_put_the_threshold_inside_the_gap() -> None:
    rng = np.random.default_rng(0)
    defect = rng.uniform(0.70, 0.97, 40)
    good = rng.uniform(0.01, 0.25, 300)
    y, s = labelled(defect, good)
    point = choose_operating_point(y, s, 0.99, 0.02)
    assert good.max() < point.threshold < defect.min()
    assert point.threshold not in set(defect.tolist())
    # not hugging either side: at least a fifth of the gap from each end (in logit terms)
    z = lambda v: np.log(v / (1 - v))  # noqa: E731
    gap = z(defect.min()) - z(good.max())
    assert z(point.threshold) - z(good.max()) > 0.2 * gap and z(defect.min()) - z(point.threshold) > 0.2 * gap
    assert point.feasible and point.recall == 1.0 and point.false_reject_rate == 0.0
    assert point.feasible_interval is not None
    assert point.feasible_interval[0] <= point.threshold <= point.feasible_interval[1]
    assert not point.shortfalls()


def test_the_old_rule_shipped_a_defects_own_score() -> None:
    """The edge rule (k-th defect score) is what the risk rule replaces: it sits on a defect."""
    rng = np.random.default_rng(1)
    y, s = labelled(rng.uniform(0.7, 0.97, 40), rng.uniform(0.01, 0.25, 300))
    edge = choose_operating_point(y, s, 0.99, 0.02, rule="edge")
    assert edge.threshold in set(s[y].tolist())


def test_overlapping_scores_let_recall_win_and_report_the_overshoot() -> None:
    rng = np.random.default_rng(2)
    from scipy.special import expit

    defect = expit(rng.normal(1.9, 1.0, 400))  # ROC AUC about 0.91: no cut meets 99 % at 2 %
    good = expit(rng.normal(0.0, 1.0, 2000))
    y, s = labelled(defect, good)
    point = choose_operating_point(y, s, 0.99, 0.02)
    assert not point.feasible
    best = best_cut(y, s)
    # leans towards catching defects, and stays near the best balanced accuracy
    assert point.recall > best["recall"] + 0.02
    assert (point.recall + 1 - point.false_reject_rate) / 2 > best["balanced_accuracy"] - 0.02
    assert point.false_reject_rate > 0.02
    assert any("over the budget" in line for line in point.shortfalls())
    assert any("no threshold meets both budgets" in w and "over the budget" in w for w in point.warnings)
    assert point.miss_weight == MISS_WEIGHT_VALIDATION > 1
    # out-of-fold scores lean less: fold models already score defects low
    oof = choose_operating_point(y, s, 0.99, 0.02, scores_from="out-of-fold (5 folds)")
    assert oof.miss_weight == MISS_WEIGHT_OUT_OF_FOLD < MISS_WEIGHT_VALIDATION
    assert oof.threshold > point.threshold and oof.recall < point.recall


def test_one_good_outlier_does_not_drag_the_cut_above_the_defects() -> None:
    """The screws case: 48 good parts, one scoring high, 9 well-separated defects."""
    good = np.r_[np.full(47, 0.02), 0.93]
    defect = np.array([0.80, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.99, 0.995])
    y, s = labelled(defect, good)
    point = choose_operating_point(y, s, 0.99, 0.02)
    assert point.threshold < 0.80 and point.recall == 1.0


def test_few_defects_are_warned_about() -> None:
    y, s = labelled(np.full(30, 0.9), np.full(100, 0.1))
    point = choose_operating_point(y, s, 0.99, 0.02)
    assert any("30 defects cannot show 99.00% recall" in w and "299 defects would" in w for w in point.warnings)


@pytest.mark.parametrize(
    ("caught", "n", "bound"),
    [
        (300, 300, 0.05 ** (1 / 300)),  # all caught: (1 - confidence) ** (1 / n)
        (10, 10, 0.05**0.1),
        (9, 10, 0.605837),  # p^10 + 10 p^9 (1 - p) = 0.05
        (0, 10, 0.0),
    ],
)
def test_clopper_pearson_lower_bound_against_known_values(caught: int, n: int, bound: float) -> None:
    assert recall_lower_bound(caught, n) == pytest.approx(bound, abs=2e-4)


@pytest.mark.parametrize(("caught", "n"), [(95, 100), (38, 42), (1, 3)])
def test_clopper_pearson_bound_leaves_5_percent_in_the_binomial_tail(caught: int, n: int) -> None:
    """At the bound p, catching ``caught`` or more of ``n`` has probability 0.05 (the definition)."""
    from math import comb

    p = recall_lower_bound(caught, n)
    tail = sum(comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(caught, n + 1))
    assert tail == pytest.approx(0.05, abs=1e-6)


def test_defects_needed_for_a_target() -> None:
    assert defects_needed(0.99) == 299
    assert defects_needed(0.95) == 59
    assert recall_lower_bound(299, 299) >= 0.99 > recall_lower_bound(298, 298)


@pytest.mark.parametrize(("recall", "frr"), [(0.0, 0.02), (1.01, 0.02), (0.99, -0.1), (0.99, 1.0)])
def test_budgets_out_of_range_are_refused(recall: float, frr: float) -> None:
    y, s = labelled(np.full(5, 0.9), np.full(5, 0.1))
    with pytest.raises(ValueError, match="must be in"):
        choose_operating_point(y, s, recall, frr)


def test_stored_scores_round_trip_and_shift() -> None:
    stored = OperatingScores("validation", "int8", "ok", ("a", "b"), ("ok", "scratch"), np.array([0.2, 0.8]))
    again = OperatingScores.from_json(json.loads(json.dumps(stored.to_json())))
    assert again.labels == stored.labels and np.allclose(again.scores, stored.scores)
    moved = stored.shifted(np.log(4.0))  # logit + log 4: 0.2 -> 0.5
    assert moved.scores[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one score in"):
        OperatingScores.from_json({**stored.to_json(), "scores": [0.2]})


# --------------------------------------------------------------------------- train fit and train threshold


def test_fit_records_the_operating_point_and_its_scores(tiny_bundle: Path) -> None:
    m = read_manifest(tiny_bundle)
    op = m.operating_point
    assert op is not None and op.threshold == m.threshold
    assert op.rule == "risk" and op.scores_from.startswith("out-of-fold")  # few validation defects
    assert (op.target_recall, op.max_false_reject) == (0.99, 0.02)
    stored = json.loads((tiny_bundle / "report" / SCORES_FILE).read_text())
    assert len(stored["scores"]) == op.n_defect + op.n_pass == len(stored["files"])
    assert op.n_defect == sum(1 for label in stored["labels"] if label != "ok")
    assert 0 <= op.recall_lower_95 <= op.recall
    for picture in ("scores.png", "operating_point.png"):
        assert (tiny_bundle / "report" / picture).stat().st_size > 5000
    card = (tiny_bundle / "report" / "model_card.md").read_text()
    assert "## Operating point" in card and "lower bound" in card


def test_train_threshold_moves_the_point_and_eval_shows_it(tiny_bundle: Path, tmp_path: Path) -> None:
    stored = OperatingScores.from_json(json.loads((tiny_bundle / "report" / SCORES_FILE).read_text()))
    old = read_manifest(tiny_bundle)
    code, out = invoke_train("threshold", str(tiny_bundle), "--out", str(tmp_path / "r50"), "--recall", "0.5")
    assert code == 0, out
    new = read_manifest(tmp_path / "r50")
    assert new.version.startswith(f"{old.version}.t") and new.version in out
    assert new.model.sha256 == old.model.sha256
    op = new.operating_point
    assert op is not None and op.rule == "recall" and op.target_recall == 0.5
    # the highest threshold that still reaches the recall on the stored scores
    assert np.mean(stored.scores[stored.is_defect] >= new.threshold) >= 0.5
    assert "recall" in out and "lower bound" in out
    # evaluate on the bundle's own golden pictures
    golden = tmp_path / "golden-set"
    for g in new.golden:
        (golden / g.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "r50" / g.file, golden / g.label)
    code, out = invoke_train("eval", str(tmp_path / "r50"), "--data", str(golden), "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["threshold"] == new.threshold != old.threshold
    assert result["operating_point"]["rule"] == "recall" and result["operating_point"]["target_recall"] == 0.5
    assert result["bundle"]["version"] == new.version

    code, out = invoke_train("threshold", str(tiny_bundle), "--out", str(tmp_path / "f0"), "--max-false-reject", "0.0")
    assert code == 0, out
    f0 = read_manifest(tmp_path / "f0")
    assert f0.operating_point is not None and f0.operating_point.false_reject_rate == 0.0
    assert np.all(stored.scores[~stored.is_defect] < f0.threshold)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "give --recall R or --max-false-reject F"),
        (("--recall", "0"), "not in (0, 1]"),
        (("--recall", "1.2"), "not in (0, 1]"),
        (("--max-false-reject", "1"), "not in [0, 1)"),
    ],
)
def test_train_threshold_bad_requests(tiny_bundle: Path, tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    code, out = invoke_train("threshold", str(tiny_bundle), "--out", str(tmp_path / "x"), *args)
    assert code != 0 and needle in out and "Traceback" not in out
    assert not (tmp_path / "x").exists()


def test_train_threshold_needs_stored_scores(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "report" / SCORES_FILE).unlink()
    code, out = invoke_train("threshold", str(bundle_copy), "--out", str(tmp_path / "x"), "--recall", "0.9")
    assert code == 1 and "has no stored operating scores" in out and "train fit" in out
    (bundle_copy / "report" / SCORES_FILE).write_text("{not json")
    code, out = invoke_train("threshold", str(bundle_copy), "--out", str(tmp_path / "x"), "--recall", "0.9")
    assert code == 1 and "cannot be read" in out


def test_fewer_defects_than_folds_is_one_line(tmp_path: Path) -> None:
    from training.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, count=40, seed=4, size=32)
    code, out = invoke_train("fit", str(data), "--out", str(tmp_path / "b"), "--epochs", "1", "--size", "32", "--folds", "40")
    assert code == 1 and "cannot fill 40 folds" in out and "--folds" in out and "Traceback" not in out


def test_train_threshold_refuses_a_request_the_scores_cannot_meet(bundle_copy: Path, tmp_path: Path) -> None:
    """A good part that scored 1.0 fails at every threshold: no false-reject budget of 0 holds."""
    path = bundle_copy / "report" / SCORES_FILE
    raw = json.loads(path.read_text())
    good = raw["labels"].index("ok")
    raw["scores"][good] = 1.0
    path.write_text(json.dumps(raw))
    code, out = invoke_train("threshold", str(bundle_copy), "--out", str(tmp_path / "x"), "--max-false-reject", "0")
    assert code == 1 and "no threshold keeps false rejects within 0.00%" in out and "Traceback" not in out
    assert not (tmp_path / "x").exists()
