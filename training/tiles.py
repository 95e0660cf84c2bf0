"""Training crops for tiled bundles, and per-picture scores through the edge's tiling.

A tiled model (``train fit --tile WxH --scale S``) learns on crops of each picture at the
tiling's scale, the size of one tile, instead of the whole picture squeezed to the model
input. Which crops, and their labels (docs/training.md, "Tiles"):

- A good picture gives ``negatives`` crops at random places, or an eighth of its tiles
  when that is more: every crop is good.
- A defect picture with a mask gives ``focus`` crops placed so that a random defect pixel
  falls inside, and ``context`` crops at random places (or a sixteenth of its tiles). A crop is a defect crop when it
  holds at least ``min(DEFECT_PIXELS, half the picture's defect pixels)`` defect pixels
  (mask coverage >= COVERAGE after scaling), a good crop when it holds none, and is left
  out when it holds a few (a defect cut at the crop's border is neither).
- A defect picture without a mask gives no crops in the first round.
- Second, shorter round: the first round's model scores every tile of the training
  pictures. A good picture's highest-scoring tiles (one per 50 of its tiles, at least one)
  join as good crops (its hardest negatives: a part fails on its worst tile, so the worst
  tile is what must stay low), and
  a defect picture without a mask gives its highest-scoring tile as a defect crop (the
  multiple-instance rule: the picture says "somewhere here", the model says where).
- With ``whole_frame``, every picture also gives its whole view (the picture squeezed to
  one tile), labelled by the same rule on the squeezed mask: a good picture's view is good,
  a defect picture's view is a defect when the defect is still visible at that size, left
  out otherwise; a defect picture without a mask gives a defect view.

A picture's score is the max over all its model inputs, cut by :func:`edge.tiling.cut`:
the same rule and the same code as the box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.exceptions import ImageError
from edge.preprocess import read_image
from edge.protocol import Tiling
from edge.tiling import cut, grid_for, rule_scores, scaled_roi, whole_view
from training.dataset import Sample
from training.exceptions import DataError

# A scaled mask pixel is a defect pixel at this coverage (as MAP_CELL_COVERAGE in the model).
COVERAGE = 0.25
DEFECT_PIXELS = 16
NEGATIVES_PER_PICTURE = 8
# Large pictures give more: an eighth of their tiles (a full-HD frame at 128 px tiles: 27).
NEGATIVE_SHARE = 1 / 8
# Second round: a good picture's highest-scoring tiles, one per HARD_NEGATIVE_TILES of its tiles.
HARD_NEGATIVE_TILES = 50
FOCUS_PER_DEFECT = 8
CONTEXT_PER_DEFECT = 4
SCORE_BATCH = 512  # model inputs per float predict call while scoring pictures


@dataclass(frozen=True)
class CropSet:
    """Crops as model inputs, with their labels and masks."""

    x: np.ndarray  # uint8 (N, tile H, tile W, C)
    y: np.ndarray  # model class index per crop
    masks: np.ndarray  # float32 (N, tile H, tile W) defect coverage
    known: np.ndarray  # bool (N,): the crop's mask is known (good pictures' are all zero)
    owner: np.ndarray  # int (N,): the picture each crop came from
    whole: np.ndarray  # bool (N,): the crop is a whole view

    def __len__(self) -> int:
        return len(self.y)

    def summary(self, pass_class: int) -> str:
        n_def = int(np.sum(self.y != pass_class))
        return f"{len(self)} crops ({n_def} defect, {int(np.sum(self.whole))} whole views)"

    def select(self, keep: np.ndarray) -> CropSet:
        """The crops where ``keep`` (bool per crop) is True."""
        return CropSet(*(getattr(self, f)[keep] for f in _FIELDS))


_FIELDS = ("x", "y", "masks", "known", "owner", "whole")


def picture_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path} can no longer be read ({exc}); it changed since the data check, run again") from None


def check_pictures(samples: Sequence[Sample], tiling: Tiling) -> None:
    """Every picture must hold at least one tile: one line naming the first that does not."""
    for s in samples:
        width, height = picture_size(s.path)
        try:
            grid_for(width, height, tiling)
        except ImageError as exc:
            raise DataError(f"{s.path}: {exc}") from None


def _picture(path: Path, tiling: Tiling, color_mode: str) -> np.ndarray:
    return scaled_roi(read_image(path), tiling, color_mode)


def _mask(path: Path, picture_path: Path, tiling: Tiling) -> np.ndarray:
    """A mask file at the tiling's scale: float32 coverage (H, W) in [0, 1]."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(f"mask {path} cannot be decoded; replace it with a png (white = defect) or delete it")
    width, height = picture_size(picture_path)
    if mask.shape != (height, width):
        raise DataError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its picture {picture_path} is {width}x{height}"
        )
    coverage = (mask > 127).astype(np.float32)[:, :, None]
    return scaled_roi_float(coverage, tiling)


def scaled_roi_float(plane: np.ndarray, tiling: Tiling) -> np.ndarray:
    """A float (H, W, 1) plane cut to the ROI and resized like the picture: (h, w)."""
    if tiling.roi is not None:
        x, y, w, h = tiling.roi
        plane = plane[y : y + h, x : x + w]
    h, w = plane.shape[:2]
    sw, sh = max(1, int(round(w * tiling.scale))), max(1, int(round(h * tiling.scale)))
    out = plane[:, :, 0]
    if (sw, sh) != (w, h):
        out = cv2.resize(out, (sw, sh), interpolation=cv2.INTER_AREA if tiling.scale < 1 else cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def crop_label(coverage: np.ndarray, picture_defect_pixels: int) -> str:
    """'defect', 'good' or 'skip' for a crop's mask coverage (see the module docstring)."""
    inside = int(np.sum(coverage >= COVERAGE))
    if inside >= max(1, min(DEFECT_PIXELS, picture_defect_pixels // 2)):
        return "defect"
    if float(coverage.max(initial=0.0)) <= 0.0:
        return "good"
    return "skip"


def _grid_share(width: int, height: int, tiling: Tiling, share: float) -> int:
    """``share`` of the number of tiles that cover a scaled width x height picture."""
    tiles = (width / (tiling.width * (1 - tiling.overlap))) * (height / (tiling.height * (1 - tiling.overlap)))
    return int(round(share * tiles))


def _random_offsets(rng: np.random.Generator, size: tuple[int, int], tiling: Tiling, n: int) -> list[tuple[int, int]]:
    sw, sh = size
    return [
        (int(rng.integers(0, sw - tiling.width + 1)), int(rng.integers(0, sh - tiling.height + 1))) for _ in range(n)
    ]


def _focus_offsets(
    rng: np.random.Generator, coverage: np.ndarray, tiling: Tiling, n: int
) -> list[tuple[int, int]]:
    """Crops that each hold a random defect pixel at a random place inside them."""
    ys, xs = np.nonzero(coverage >= COVERAGE)
    if len(xs) == 0:
        return []
    sh, sw = coverage.shape
    out = []
    for _ in range(n):
        i = int(rng.integers(len(xs)))
        x0 = int(xs[i]) - int(rng.integers(tiling.width))
        y0 = int(ys[i]) - int(rng.integers(tiling.height))
        out.append((min(max(0, x0), sw - tiling.width), min(max(0, y0), sh - tiling.height)))
    return out


def training_crops(
    samples: Sequence[Sample],
    classes: np.ndarray,
    pass_class: int,
    masks: Mapping[Path, Path],
    tiling: Tiling,
    color_mode: str,
    *,
    seed: int,
    negatives: int = NEGATIVES_PER_PICTURE,
    focus: int = FOCUS_PER_DEFECT,
    context: int = CONTEXT_PER_DEFECT,
) -> CropSet:
    """The crops one split trains on (see the module docstring); ``classes`` are the model's
    class indices per picture."""
    rng = np.random.default_rng([seed, 4099])
    th, tw = tiling.height, tiling.width
    xs: list[np.ndarray] = []
    ys: list[int] = []
    ms: list[np.ndarray] = []
    known: list[bool] = []
    owner: list[int] = []
    whole: list[bool] = []

    def add(crop: np.ndarray, label: int, mask: np.ndarray | None, index: int, is_whole: bool) -> None:
        xs.append(crop)
        ys.append(label)
        ms.append(mask if mask is not None else np.zeros((th, tw), np.float32))
        known.append(mask is not None)
        owner.append(index)
        whole.append(is_whole)

    for index, (sample, label) in enumerate(zip(samples, classes, strict=True)):
        picture = _picture(sample.path, tiling, color_mode)
        sh, sw = picture.shape[:2]
        good = int(label) == pass_class
        mask_path = masks.get(sample.path)
        coverage = np.zeros((sh, sw), np.float32) if good else (
            _mask(mask_path, sample.path, tiling) if mask_path is not None else None
        )
        if coverage is None:  # a defect without a mask: its whole view only (MIL adds its tile later)
            if tiling.whole_frame:
                add(whole_view(picture, tiling), int(label), None, index, True)
            continue
        total = int(np.sum(coverage >= COVERAGE))
        if good:
            offsets = _random_offsets(rng, (sw, sh), tiling, max(negatives, _grid_share(sw, sh, tiling, NEGATIVE_SHARE)))
        else:
            offsets = _focus_offsets(rng, coverage, tiling, focus) + _random_offsets(
                rng, (sw, sh), tiling, max(context, _grid_share(sw, sh, tiling, NEGATIVE_SHARE / 2))
            )
        for x, y in offsets:
            cov = coverage[y : y + th, x : x + tw]
            verdict = crop_label(cov, total)
            if verdict == "skip":
                continue
            add(picture[y : y + th, x : x + tw], int(label) if verdict == "defect" else pass_class, cov, index, False)
        if tiling.whole_frame:
            cov = cv2.resize(coverage, (tw, th), interpolation=cv2.INTER_AREA)
            verdict = "good" if good else crop_label(cov, total)
            if verdict != "skip":
                add(whole_view(picture, tiling), int(label) if verdict == "defect" else pass_class, cov, index, True)
    channels = 1 if color_mode == "gray" else 3
    return CropSet(
        x=np.stack(xs) if xs else np.zeros((0, th, tw, channels), np.uint8),
        y=np.array(ys, np.int64),
        masks=np.stack(ms) if ms else np.zeros((0, th, tw), np.float32),
        known=np.array(known, bool),
        owner=np.array(owner, np.int64),
        whole=np.array(whole, bool),
    )


def join(a: CropSet, b: CropSet) -> CropSet:
    """Two crop sets as one (owners kept as they are)."""
    return CropSet(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in _FIELDS))


@dataclass(frozen=True)
class PoolCrops:
    """The crops of the training and validation pictures, cut once: the final model and
    the fold models choose theirs by picture (``owner`` indexes ``samples``)."""

    samples: tuple[Sample, ...]  # training pictures, then validation pictures
    classes: np.ndarray  # the model's class per picture
    n_train: int
    crops: CropSet
    unmasked: np.ndarray  # bool per picture: a defect without a mask (multiple-instance rule)
    tiling: Tiling
    color_mode: str
    pass_class: int

    @classmethod
    def build(
        cls,
        split: Any,
        model_ys: Mapping[str, np.ndarray],
        pass_class: int,
        masks: Mapping[Path, Path],
        tiling: Tiling,
        color_mode: str,
        seed: int,
    ) -> PoolCrops:
        samples = tuple(split.train) + tuple(split.val)
        classes = np.concatenate([model_ys["train"], model_ys["val"]])
        crops = training_crops(samples, classes, pass_class, masks, tiling, color_mode, seed=seed)
        unmasked = np.array([int(c) != pass_class and s.path not in masks for s, c in zip(samples, classes, strict=True)], bool)
        return cls(samples, classes, len(split.train), crops, unmasked, tiling, color_mode, pass_class)

    def of(self, pictures: np.ndarray) -> CropSet:
        """The crops of these pictures."""
        return self.crops.select(np.isin(self.crops.owner, pictures))

    def of_train(self) -> CropSet:
        return self.of(np.arange(self.n_train))

    def of_val(self) -> CropSet:
        return self.of(np.arange(self.n_train, len(self.samples)))

    def good_among(self, pictures: np.ndarray) -> np.ndarray:
        """Those of ``pictures`` that are good."""
        pictures = np.asarray(pictures)
        return pictures[self.classes[pictures] == self.pass_class]

    def unmasked_among(self, pictures: np.ndarray) -> np.ndarray:
        """Those of ``pictures`` that are defects without a mask."""
        pictures = np.asarray(pictures)
        return pictures[self.unmasked[pictures]]

    def best_tiles(self, pictures: np.ndarray, score_inputs: Callable[[np.ndarray], np.ndarray]) -> CropSet:
        """:func:`best_tiles` of these pictures, owners as picture indices."""
        pictures = np.asarray(pictures)
        found = best_tiles(
            [self.samples[i] for i in pictures], self.classes[pictures], self.pass_class, self.tiling, self.color_mode, score_inputs
        )
        return dataclasses.replace(found, owner=pictures[found.owner])

    def describe(self) -> str:
        t = self.tiling
        return (
            f"{t.width}x{t.height} model inputs at scale {t.scale:g}, overlap {t.overlap:g}"
            f"{', plus the whole view' if t.whole_frame else ''}; training {self.of_train().summary(self.pass_class)}, "
            f"validation {self.of_val().summary(self.pass_class)}"
            + (f"; {int(np.sum(self.unmasked))} defect pictures without masks (multiple-instance rule)" if self.unmasked.any() else "")
        )


def picture_inputs(samples: Sequence[Sample], tiling: Tiling, color_mode: str) -> Iterator[tuple[int, np.ndarray]]:
    """(picture index, uint8 model inputs) for each picture, cut exactly as the box cuts."""
    for index, sample in enumerate(samples):
        inputs, _ = cut(read_image(sample.path), tiling, color_mode)
        yield index, inputs


def picture_parts(
    samples: Sequence[Sample],
    tiling: Tiling,
    color_mode: str,
    score_inputs: Callable[[np.ndarray], np.ndarray],
    *,
    batch: int = SCORE_BATCH,
) -> np.ndarray:
    """Each picture's (worst tile's score, whole view's score) by ``score_inputs``: (N, 2);
    without a whole view both columns hold the worst tile's."""
    out = np.zeros((len(samples), 2), np.float64)
    pending: list[tuple[int, np.ndarray]] = []
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if not pending:
            return
        scores = score_inputs(np.concatenate([p[1] for p in pending]))
        start = 0
        for index, inputs in pending:
            mine = scores[start : start + len(inputs)]
            worst = float(np.max(mine[:-1] if tiling.whole_frame else mine))
            out[index] = (worst, float(mine[-1]) if tiling.whole_frame else worst)
            start += len(inputs)
        pending, size = [], 0

    for index, inputs in picture_inputs(samples, tiling, color_mode):
        pending.append((index, inputs))
        size += len(inputs)
        if size >= batch:
            flush()
    flush()
    return out


def picture_scores(samples: Sequence[Sample], tiling: Tiling, *args: Any, **kwargs: Any) -> np.ndarray:
    """Each picture's score by the tiling's decision rule (edge/tiling.py ``rule_scores``);
    the other arguments are :func:`picture_parts`'s."""
    return rule_scores(picture_parts(samples, tiling, *args, **kwargs), tiling)


# Decision rules training tries for a tiled bundle with a whole view: "max", then "fused"
# with these whole-view weights. A fused rule replaces "max" only when it ranks the
# held-out pictures better by RULE_MIN_GAIN of ROC AUC: on split halves of the magnetic
# tiles' test sets a smaller margin chose weights that lost on the other half as often as
# they won on the single-kind sets (docs/training.md, "Decision rule").
RULE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
RULE_MIN_GAIN = 0.01


@dataclass(frozen=True)
class RuleChoice:
    """The decision rule picked on held-out pictures' (worst tile, whole view) scores."""

    tiling: Tiling
    auc: dict[str, float | None]  # each candidate's ROC AUC on the held-out pictures

    def describe(self) -> str:
        t = self.tiling
        chosen = "max" if t.rule == "max" else f"fused, whole-view weight {t.whole_weight:g}"
        tried = ", ".join(f"{k} {v:.3f}" for k, v in self.auc.items() if v is not None)
        return f"decision rule: {chosen} (held-out ROC AUC {tried})"

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.tiling.rule, "whole_weight": self.tiling.whole_weight, "min_gain": RULE_MIN_GAIN,
                "held_out_auc": {k: (None if v is None else round(v, 4)) for k, v in self.auc.items()}}


def choose_rule(parts: np.ndarray, is_defect: np.ndarray, tiling: Tiling) -> RuleChoice:
    """The decision rule for a tiled bundle, from held-out pictures' :func:`picture_parts`:
    ``max`` unless a fused weight ranks them better by RULE_MIN_GAIN (ROC AUC)."""
    from training.evaluate import roc_auc

    base = tiling.model_copy(update={"rule": "max", "whole_weight": 0.0})
    auc: dict[str, float | None] = {"max": roc_auc(is_defect, rule_scores(parts, base))}
    if not tiling.whole_frame or auc["max"] is None:
        return RuleChoice(base, auc)
    best, best_auc = base, auc["max"]
    for weight in RULE_WEIGHTS:
        candidate = tiling.model_copy(update={"rule": "fused", "whole_weight": weight})
        value = roc_auc(is_defect, rule_scores(parts, candidate))
        auc[f"fused {weight:g}"] = value
        if value is not None and value > best_auc + (RULE_MIN_GAIN if best is base else 0.0):
            best, best_auc = candidate, value
    return RuleChoice(best, auc)


def best_tiles(
    samples: Sequence[Sample],
    classes: np.ndarray,
    pass_class: int,
    tiling: Tiling,
    color_mode: str,
    score_inputs: Callable[[np.ndarray], np.ndarray],
) -> CropSet:
    """Each picture's highest-scoring tile, labelled with the picture's class: for a defect
    picture without a mask the multiple-instance guess of where its defect is; for a good
    picture its hardest negatives (known clean: an all-zero mask), one per
    HARD_NEGATIVE_TILES of its tiles."""
    xs, ys, owner = [], [], []
    for index, inputs in picture_inputs(samples, tiling, color_mode):
        tiles = inputs[:-1] if tiling.whole_frame else inputs
        good = int(classes[index]) == pass_class
        k = max(1, len(tiles) // HARD_NEGATIVE_TILES) if good else 1
        for best in np.argsort(-score_inputs(tiles), kind="stable")[:k]:
            xs.append(tiles[int(best)])
            ys.append(int(classes[index]))
            owner.append(index)
    y = np.array(ys, np.int64)
    return CropSet(
        x=np.stack(xs) if xs else np.zeros((0, tiling.height, tiling.width, 1 if color_mode == "gray" else 3), np.uint8),
        y=y,
        masks=np.zeros((len(xs), tiling.height, tiling.width), np.float32),
        known=y == pass_class,
        owner=np.array(owner, np.int64),
        whole=np.zeros(len(xs), bool),
    )


__all__ = [
    "COVERAGE",
    "DEFECT_PIXELS",
    "CropSet",
    "PoolCrops",
    "best_tiles",
    "check_pictures",
    "crop_label",
    "join",
    "RULE_MIN_GAIN",
    "RULE_WEIGHTS",
    "RuleChoice",
    "choose_rule",
    "picture_inputs",
    "picture_parts",
    "picture_scores",
    "training_crops",
]
