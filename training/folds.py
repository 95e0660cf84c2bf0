"""Out-of-fold defect scores: a score for every training and validation image from a model
that never saw it, so the operating point rests on every defect the data has.

A validation split of a few dozen defects cannot place a 99 %-recall threshold: the cut
lands on one or two scores. When validation holds fewer than
:data:`training.operating_point.MIN_VALIDATION_DEFECTS` defects, ``train fit`` splits train
and validation together into k folds (stratified by class, whole groups together when the
split is grouped), trains one model per fold on the other k - 1 with the final model's
recipe, and scores the held-out fold. The recipe includes its model selection: each fold
model keeps an inner validation share of its training folds (stratified, like the final
model's validation split) and restores the epoch with the lowest loss there, so the fold
models are chosen the way the shipped model was. Without that, fold models stopped at the
final model's best epoch number scored the held-out cracks of the magnetic tiles far lower
than the shipped model did (training on a few dozen defects swings from epoch to epoch).
The fold models are thrown away; their scores choose the shipped model's threshold
(docs/training.md, "Operating point").

Imports TensorFlow (through :mod:`training.model`): import it inside commands only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from training import model as model_mod
from training.exceptions import DataError

logger = logging.getLogger(__name__)


def assign_folds(
    labels: Sequence[int] | np.ndarray, folds: int, seed: int, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Fold number (0..folds-1) per item: each class spread evenly over the folds, in a seeded
    random order; with ``groups``, items of one group share a fold (groups dealt largest first)."""
    y = np.asarray(labels)
    rng = np.random.default_rng([seed, 7919])
    out = np.empty(len(y), dtype=np.int64)
    if groups is None:
        for label in np.unique(y):
            idx = np.flatnonzero(y == label)
            idx = idx[rng.permutation(len(idx))]
            # continue the round-robin where the previous class stopped, so fold sizes stay even
            out[idx] = (np.arange(len(idx)) + int(label)) % folds
        return out
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    keys = sorted(members)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    keys.sort(key=lambda k: -len(members[k]))
    counts = np.zeros((folds, int(y.max()) + 1))
    for key in keys:
        add = np.bincount(y[members[key]], minlength=counts.shape[1])
        # the fold where this group's classes are scarcest
        fold = int(np.argmin([np.sum((counts[f] + add) ** 2) for f in range(folds)]))
        counts[fold] += add
        out[members[key]] = fold
    return out


INNER_VALIDATION = 0.15


def _inner_split(y: np.ndarray, seed: int, share: float = INNER_VALIDATION) -> np.ndarray:
    """True for the inner validation items: ``share`` of each class (at least one), seeded."""
    rng = np.random.default_rng([seed, 104729])
    inner = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        if len(idx) < 2:
            continue
        take = max(1, int(round(share * len(idx))))
        inner[rng.permutation(idx)[:take]] = True
    return inner


# (training items, inner validation items, held-out items, fold recipe) -> (held-out scores, training result)
FoldTrainer = Callable[[np.ndarray, np.ndarray, np.ndarray, model_mod.TrainConfig], tuple[np.ndarray, model_mod.TrainResult]]


def out_of_fold(
    y: np.ndarray,
    is_defect: np.ndarray,
    config: model_mod.TrainConfig,
    train_and_score: FoldTrainer,
    *,
    folds: int,
    groups: Sequence[str] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> np.ndarray:
    """A defect score (or a row of scores) for every item, each from the fold model that did
    not train on it.

    ``train_and_score`` trains one fold model with the given recipe (the final model's, with
    the fold's own seed) and scores the held-out items; each fold model trains on its other
    folds minus an inner validation share, which chooses its epoch as the final model's
    validation split chose the final model's. Raises :class:`DataError` when there are fewer
    defects than folds.
    """
    n_defect = int(np.sum(is_defect))
    if folds < 2:
        raise ValueError("out-of-fold scores need at least 2 folds")
    if n_defect < folds:
        raise DataError(
            f"{n_defect} defect images cannot fill {folds} folds; add defect images or pass --folds {max(2, n_defect)} "
            "(or --folds 0 to choose the threshold on the validation split alone)"
        )
    fold_of = assign_folds(y, folds, config.seed, groups)
    scores: np.ndarray | None = None
    for k in range(folds):
        hold = fold_of == k
        rest = np.flatnonzero(~hold)
        inner = _inner_split(y[rest], config.seed + k)
        fit_idx, val_idx = rest[~inner], rest[inner]
        fold_config = dataclasses.replace(config, seed=config.seed + 1000 * (k + 1))
        held, trained = train_and_score(fit_idx, val_idx, np.flatnonzero(hold), fold_config)
        if scores is None:  # one score per item, or a row (a tiled picture's worst tile and whole view)
            scores = np.zeros((len(y), *np.shape(held)[1:]), dtype=np.float64)
        scores[hold] = held
        say(
            f"  fold {k + 1}/{folds}: {len(fit_idx)} training and {len(val_idx)} validation images, best epoch "
            f"{trained.best_epoch} of {trained.epochs_run}; scored {int(np.sum(hold))} "
            f"({int(np.sum(is_defect[hold]))} defects), {trained.seconds:.0f}s"
        )
        del trained
    assert scores is not None  # folds >= 2
    return scores


def out_of_fold_scores(
    x: np.ndarray,
    y: np.ndarray,
    is_defect: np.ndarray,
    config: model_mod.TrainConfig,
    num_classes: int,
    *,
    folds: int,
    pass_index: int,
    masks: np.ndarray | None = None,
    mask_known: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> np.ndarray:
    """:func:`out_of_fold` for whole-picture models: float defect scores (1 - P(pass)) of
    every image of ``x``."""

    def train_and_score(
        fit_idx: np.ndarray, val_idx: np.ndarray, hold_idx: np.ndarray, fold_config: model_mod.TrainConfig
    ) -> tuple[np.ndarray, model_mod.TrainResult]:
        trained = model_mod.train_model(
            x[fit_idx],
            y[fit_idx],
            x[val_idx],
            y[val_idx],
            num_classes,
            fold_config,
            masks_train=masks[fit_idx] if masks is not None else None,
            mask_known=mask_known[fit_idx] if mask_known is not None else None,
            pass_index=pass_index,
        )
        probs = model_mod.predict_proba(trained.model, x[hold_idx])
        return np.clip(1.0 - probs[:, pass_index], 0.0, 1.0), trained

    return out_of_fold(y, is_defect, config, train_and_score, folds=folds, groups=groups, say=say)


__all__ = ["FoldTrainer", "assign_folds", "out_of_fold", "out_of_fold_scores"]
