"""The operating point: which defect score fails a part, chosen from both classes' scores.

A bundle ships one threshold (fail when score >= threshold). It is chosen on scores of
images the scoring model was not trained on (the validation split, or out-of-fold scores
when validation holds few defects), for two budgets: a defect recall to reach
(``target_recall``) and a false-reject rate not to exceed (``max_false_reject``).

The rule (``RULE_RISK``, the default; docs/training.md, "Operating point"):

1. Each class's score tail is smoothed: a Gaussian kernel estimate of the scores in logit
   space, bandwidth by Silverman's rule with a floor. A few dozen defects then give a tail
   that reaches past the lowest one seen, instead of a cut on that one score.
2. Feasible thresholds are those where the smoothed recall is at least the target and the
   smoothed false-reject rate at most the budget: an interval, as both fall with the
   threshold.
3. The threshold minimises the smoothed risk ``w * miss + false_reject``: inside the
   feasible interval when there is one, so a budget's edge is shipped only when the risk
   itself points past it; over all thresholds when there is none, where the cut stays near
   the best balanced accuracy the scores allow, leaning towards catching defects, and the
   shortfalls against both budgets are stated. Shipping the recall target's edge instead
   would fail most good parts of a model that ranks parts only fairly.

The lean ``w`` depends on where the scores come from (:func:`miss_weight_for`). The shipped
model's own validation scores are optimistic (its epoch was chosen on them), so a missed
defect weighs 1.5 false rejects there. Out-of-fold scores come from fold models trained on
less data, which score defects lower than the shipped model does, so they already put the
cut low: there a miss weighs 1. On the six magnetic-tile sets (docs/benchmarks.md) a
weight of 1.5 on out-of-fold scores cost balanced accuracy on five of them and caught no
more held-out defects.

``train threshold`` moves a bundle's point directly: ``RULE_RECALL`` ships the highest
threshold whose recall reaches the target (smoothed, and on the scores themselves),
``RULE_FALSE_REJECT`` the lowest whose false-reject rate is within the budget (both ways). Kept for comparison
(``benchmarks/operating_point.py``): ``RULE_EDGE``, the k-th highest defect score for the
target recall (the earlier rule), and ``RULE_MIDDLE``, the middle of the feasible
interval in logit space, else the risk rule.

Pure numpy and scipy; no TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclasses_replace
from typing import Any

import numpy as np
from scipy import special, stats

DEFAULT_TARGET_RECALL = 0.99
DEFAULT_MAX_FALSE_REJECT = 0.02
# Below this many validation defects the threshold comes from out-of-fold scores: with all
# of 300 defects caught, the one-sided 95 % lower bound on recall is 0.990.
MIN_VALIDATION_DEFECTS = 300
DEFAULT_FOLDS = 5
CONFIDENCE = 0.95

RULE_RISK = "risk"
RULE_RECALL = "recall"
RULE_FALSE_REJECT = "false_reject"
RULE_MIDDLE = "middle"
RULE_EDGE = "edge"
RULES = (RULE_RISK, RULE_RECALL, RULE_FALSE_REJECT, RULE_MIDDLE, RULE_EDGE)
# What a missed defect weighs in false rejects, in the risk rule (see the module docstring;
# what each weight costs and buys: docs/training.md, "Operating point").
MISS_WEIGHT_VALIDATION = 1.5
MISS_WEIGHT_OUT_OF_FOLD = 1.0


def miss_weight_for(scores_from: str) -> float:
    """The risk rule's miss weight for scores from ``validation`` or ``out-of-fold (k folds)``."""
    return MISS_WEIGHT_OUT_OF_FOLD if scores_from.startswith("out-of-fold") else MISS_WEIGHT_VALIDATION

# Scores are probabilities; int8 outputs step by 1/256, so clip a little inside (0, 1).
_EPS = 1e-4
_MIN_BANDWIDTH = 0.05  # logit units: a saturated cluster (many equal scores) still has a tail
_GRID = 4001


def check_budgets(target_recall: float, max_false_reject: float) -> None:
    """Raise ValueError unless target_recall is in (0, 1] and max_false_reject in [0, 1)."""
    if not (isinstance(target_recall, (int, float)) and 0.0 < target_recall <= 1.0):
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    if not (isinstance(max_false_reject, (int, float)) and 0.0 <= max_false_reject < 1.0):
        raise ValueError(f"max false-reject rate must be in [0, 1), got {max_false_reject}")


def recall_lower_bound(caught: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower confidence bound on a proportion (``caught`` of ``n``).

    With all of n caught it is (1 - confidence) ** (1 / n): 0.990 for 300 defects at 95 %.
    0 when n is 0 or nothing was caught.
    """
    if n <= 0 or caught <= 0:
        return 0.0
    if caught > n:
        raise ValueError(f"caught ({caught}) cannot exceed n ({n})")
    return float(stats.beta.ppf(1.0 - confidence, caught, n - caught + 1))


def defects_needed(target_recall: float, confidence: float = CONFIDENCE) -> int:
    """Fewest defects whose all-caught lower bound reaches ``target_recall`` (299 for 0.99)."""
    if target_recall >= 1.0:
        return math.inf  # type: ignore[return-value]  # no finite set proves recall 1
    return math.ceil(math.log(1.0 - confidence) / math.log(target_recall))


def to_logit(scores: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(s) - np.log1p(-s)


def to_score(logit: float) -> float:
    return float(special.expit(logit))


def bandwidth(z: np.ndarray) -> float:
    """Silverman's rule of thumb, 0.9 min(std, IQR / 1.34) n^-1/5, with a floor."""
    if len(z) < 2:
        return 0.5
    spread = float(np.std(z, ddof=1))
    q75, q25 = np.percentile(z, [75, 25])
    iqr = float(q75 - q25) / 1.34
    scale = min(spread, iqr) if iqr > 0 else spread
    return max(_MIN_BANDWIDTH, 0.9 * scale * len(z) ** -0.2)


def smoothed_tail(z: np.ndarray, grid: np.ndarray, h: float | None = None) -> np.ndarray:
    """Share of the smoothed distribution of ``z`` at or above each grid point."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) == 0:
        return np.zeros_like(grid)
    h = bandwidth(z) if h is None else h
    # mean over samples of P(sample + noise >= t), chunked to bound memory
    out = np.zeros_like(grid)
    for i in range(0, len(z), 2048):
        out += special.ndtr((z[i : i + 2048, None] - grid[None, :]) / h).sum(axis=0)
    return out / len(z)


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen threshold and what it gives on the scores it was chosen from."""

    threshold: float
    rule: str
    scores_from: str
    target_recall: float
    max_false_reject: float
    n_defect: int
    n_pass: int
    recall: float  # on the scores it was chosen from, at the threshold
    false_reject_rate: float
    recall_lower_95: float  # one-sided Clopper-Pearson bound for recall on n_defect
    feasible: bool  # some threshold meets both budgets (smoothed estimates)
    smoothed_recall: float
    smoothed_false_reject_rate: float
    miss_weight: float
    feasible_interval: tuple[float, float] | None = None  # thresholds, when feasible
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def reached(self) -> bool:
        return self.recall >= self.target_recall and self.false_reject_rate <= self.max_false_reject

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["feasible_interval"] = list(self.feasible_interval) if self.feasible_interval else None
        d["warnings"] = list(self.warnings)
        return {k: (round(v, 6) if isinstance(v, float) and k != "threshold" else v) for k, v in d.items()}

    def summary(self) -> str:
        """One line for the CLI and the model card."""
        line = (
            f"threshold {self.threshold:.4f} ({self.rule} rule, {self.scores_from}: {self.n_defect} defects, "
            f"{self.n_pass} good): recall {self.recall:.2%} (95 % lower bound {self.recall_lower_95:.2%}, "
            f"target {self.target_recall:.2%}), false rejects {self.false_reject_rate:.2%} "
            f"(budget {self.max_false_reject:.2%})"
        )
        return line

    def shortfalls(self) -> list[str]:
        """What the point misses of its budgets, in words, empty when it meets both."""
        out = []
        if self.recall < self.target_recall:
            out.append(f"recall {100 * (self.target_recall - self.recall):.1f} points below the target")
        if self.false_reject_rate > self.max_false_reject:
            out.append(
                f"false rejects {100 * (self.false_reject_rate - self.max_false_reject):.1f} points over the budget"
            )
        return out


def _empirical(is_defect: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float, int]:
    failed = scores >= threshold
    n_def = int(is_defect.sum())
    n_pass = int((~is_defect).sum())
    caught = int(failed[is_defect].sum())
    recall = caught / n_def if n_def else 0.0
    frr = float(failed[~is_defect].sum()) / n_pass if n_pass else 0.0
    return recall, frr, caught


def _edge_threshold(defect_scores: np.ndarray, target_recall: float) -> float:
    ordered = np.sort(defect_scores)[::-1]
    k = max(1, math.ceil(target_recall * len(ordered) - 1e-9))
    return float(ordered[k - 1])


def _lowest_within(pass_scores: np.ndarray, max_false_reject: float) -> float:
    """The lowest threshold that fails at most ``max_false_reject`` of these good parts."""
    ordered = np.sort(pass_scores)[::-1]
    allowed = int(math.floor(max_false_reject * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return 0.0
    return float(min(1.0, np.nextafter(ordered[allowed], np.inf)))


def choose_operating_point(
    is_defect: np.ndarray,
    scores: np.ndarray,
    target_recall: float = DEFAULT_TARGET_RECALL,
    max_false_reject: float = DEFAULT_MAX_FALSE_REJECT,
    *,
    scores_from: str = "validation",
    rule: str = RULE_RISK,
    confidence: float = CONFIDENCE,
) -> OperatingPoint:
    """The operating point for defect ``scores`` (1 - P(pass)) of images with known labels.

    See the module docstring for the rule. Raises ValueError for budgets out of range,
    an unknown rule, or scores without any defect or any good part.
    """
    check_budgets(target_recall, max_false_reject)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    y = np.asarray(is_defect, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if len(y) != len(s):
        raise ValueError("one score per image is needed")
    if not y.any() or y.all():
        raise ValueError("an operating point needs scores of both defects and good parts")
    zd, zp = to_logit(s[y]), to_logit(s[~y])
    hd, hp = bandwidth(zd), bandwidth(zp)
    lo = min(zd.min() - 5 * hd, zp.min() - 5 * hp)
    hi = max(zd.max() + 5 * hd, zp.max() + 5 * hp)
    grid = np.linspace(lo, hi, _GRID)
    recall_s = smoothed_tail(zd, grid, hd)
    frr_s = smoothed_tail(zp, grid, hp)
    ok = (recall_s >= target_recall - 1e-12) & (frr_s <= max_false_reject + 1e-12)
    feasible = bool(ok.any())
    miss_weight = miss_weight_for(scores_from)
    risk = miss_weight * (1.0 - recall_s) + frr_s
    interval: tuple[float, float] | None = None
    if feasible:
        idx = np.flatnonzero(ok)
        interval = (to_score(grid[idx[0]]), to_score(grid[idx[-1]]))
    threshold = _pick_threshold(rule, grid, ok, risk, recall_s, frr_s, y, s, target_recall, max_false_reject)
    threshold = float(np.clip(threshold, 0.0, 1.0))
    z_t = float(to_logit(np.array([threshold]))[0])
    recall, frr, caught = _empirical(y, s, threshold)
    n_def, n_pass = int(y.sum()), int((~y).sum())
    warnings = _warnings(rule, feasible, miss_weight, n_def, recall, frr, target_recall, max_false_reject, confidence)
    return OperatingPoint(
        threshold=threshold,
        rule=rule,
        scores_from=scores_from,
        target_recall=float(target_recall),
        max_false_reject=float(max_false_reject),
        n_defect=n_def,
        n_pass=n_pass,
        recall=recall,
        false_reject_rate=frr,
        recall_lower_95=recall_lower_bound(caught, n_def, confidence),
        feasible=feasible,
        smoothed_recall=float(smoothed_tail(zd, np.array([z_t]), hd)[0]),
        smoothed_false_reject_rate=float(smoothed_tail(zp, np.array([z_t]), hp)[0]),
        miss_weight=miss_weight,
        feasible_interval=interval,
        warnings=tuple(warnings),
    )


def _pick_threshold(
    rule: str,
    grid: np.ndarray,
    ok: np.ndarray,
    risk: np.ndarray,
    recall_s: np.ndarray,
    frr_s: np.ndarray,
    y: np.ndarray,
    s: np.ndarray,
    target_recall: float,
    max_false_reject: float,
) -> float:
    """The threshold each rule picks on the logit ``grid`` (smoothed tails ``recall_s``,
    ``frr_s``; ``ok`` where both budgets hold) or on the raw scores."""
    feasible = bool(ok.any())
    if rule == RULE_EDGE:
        threshold = _edge_threshold(s[y], target_recall)
    elif rule == RULE_RECALL:
        # reach it both on the smoothed tail and on the scores themselves
        reach = np.flatnonzero(recall_s >= target_recall - 1e-12)
        smoothed = to_score(grid[reach[-1]]) if len(reach) else 0.0
        threshold = min(smoothed, _edge_threshold(s[y], target_recall))
    elif rule == RULE_FALSE_REJECT:
        within = np.flatnonzero(frr_s <= max_false_reject + 1e-12)
        smoothed = to_score(grid[within[0]]) if len(within) else 1.0
        threshold = max(smoothed, _lowest_within(s[~y], max_false_reject))
    elif rule == RULE_MIDDLE and feasible:
        idx = np.flatnonzero(ok)
        threshold = to_score((grid[idx[0]] + grid[idx[-1]]) / 2)
    else:
        pick = np.where(ok, risk, np.inf) if feasible else risk
        # several grid points may tie (flat risk in a wide gap): take the middle of the minimum
        best = np.flatnonzero(pick <= pick.min() + 1e-12)
        threshold = to_score(grid[best[len(best) // 2]])
    return threshold


def _warnings(
    rule: str,
    feasible: bool,
    miss_weight: float,
    n_def: int,
    recall: float,
    frr: float,
    target_recall: float,
    max_false_reject: float,
    confidence: float,
) -> list[str]:
    """What the summary and the model card must say about the chosen point."""
    warnings: list[str] = []
    best_bound = recall_lower_bound(n_def, n_def, confidence)
    if best_bound < target_recall:
        warnings.append(
            f"{n_def} defects cannot show {target_recall:.2%} recall: even with all caught the 95 % lower bound "
            f"is {best_bound:.2%}; {defects_needed(target_recall, confidence)} defects would"
        )
    if not feasible and rule == RULE_RISK:
        warnings.append(
            f"no threshold meets both budgets on these scores; the cut minimises {miss_weight:g} x missed defects "
            "+ false rejects: " + (", ".join(_shortfalls(recall, frr, target_recall, max_false_reject)) or "both met on the raw scores")
        )
    return warnings


def _shortfalls(recall: float, frr: float, target_recall: float, max_false_reject: float) -> list[str]:
    out = []
    if recall < target_recall:
        out.append(f"recall {recall:.2%} is {100 * (target_recall - recall):.1f} points below the target")
    if frr > max_false_reject:
        out.append(f"false rejects {frr:.2%} are {100 * (frr - max_false_reject):.1f} points over the budget")
    return out


def best_cut(is_defect: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The threshold with the highest balanced accuracy on these scores (an oracle, for reports)."""
    y = np.asarray(is_defect, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    best = {"threshold": 1.0, "balanced_accuracy": 0.5, "recall": 0.0, "false_reject_rate": 0.0}
    for t in np.unique(s):
        recall, frr, _ = _empirical(y, s, float(t))
        ba = (recall + 1.0 - frr) / 2
        if ba > best["balanced_accuracy"]:
            best = {"threshold": float(t), "balanced_accuracy": ba, "recall": recall, "false_reject_rate": frr}
    return best




SCORES_FILE = "operating_scores.json"  # in the bundle's report/ folder


@dataclass(frozen=True)
class OperatingScores:
    """The labelled scores an operating point is chosen from, stored with the bundle so that
    ``train threshold`` can move the point without retraining."""

    scores_from: str  # "validation" or "out-of-fold (k folds)"
    model: str  # "int8" (the shipped model) or "float" (fold models, in the shipped model's scale)
    pass_label: str
    files: tuple[str, ...]
    labels: tuple[str, ...]
    scores: np.ndarray

    @property
    def is_defect(self) -> np.ndarray:
        return np.array([label != self.pass_label for label in self.labels], dtype=bool)

    def shifted(self, logit_shift: float, model: str | None = None) -> OperatingScores:
        """The same scores after the defect logit moved by ``logit_shift`` (see move_operating_point)."""
        moved = special.expit(to_logit(self.scores) + logit_shift) if logit_shift else self.scores
        return dataclasses_replace(self, scores=np.asarray(moved, dtype=np.float64), model=model or self.model)

    def choose(self, target_recall: float, max_false_reject: float, rule: str = RULE_RISK) -> OperatingPoint:
        return choose_operating_point(
            self.is_defect, self.scores, target_recall, max_false_reject, scores_from=self.scores_from, rule=rule
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "score": "1 - P(pass label)",
            "scores_from": self.scores_from,
            "model": self.model,
            "pass_label": self.pass_label,
            "files": list(self.files),
            "labels": list(self.labels),
            "scores": [round(float(v), 7) for v in self.scores],
        }

    @classmethod
    def from_json(cls, raw: Any, source: str = SCORES_FILE) -> OperatingScores:
        """Parse :meth:`to_json`'s output; ValueError naming ``source`` when it is not that."""
        try:
            scores = np.asarray(raw["scores"], dtype=np.float64)
            labels = tuple(str(v) for v in raw["labels"])
            files = tuple(str(v) for v in raw.get("files", [""] * len(labels)))
            out = cls(
                scores_from=str(raw["scores_from"]),
                model=str(raw.get("model", "int8")),
                pass_label=str(raw["pass_label"]),
                files=files,
                labels=labels,
                scores=scores,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source} is not a stored set of operating scores ({exc!r})") from exc
        if len(scores) != len(labels) or scores.ndim != 1 or not np.all((scores >= 0) & (scores <= 1)):
            raise ValueError(f"{source} is damaged: it needs one score in [0, 1] per label")
        return out


__all__ = [
    "SCORES_FILE",
    "MISS_WEIGHT_OUT_OF_FOLD",
    "MISS_WEIGHT_VALIDATION",
    "miss_weight_for",
    "OperatingScores",
    "DEFAULT_FOLDS",
    "DEFAULT_MAX_FALSE_REJECT",
    "DEFAULT_TARGET_RECALL",
    "MIN_VALIDATION_DEFECTS",
    "RULES",
    "OperatingPoint",
    "best_cut",
    "check_budgets",
    "choose_operating_point",
    "defects_needed",
    "recall_lower_bound",
]
