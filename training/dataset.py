"""DATA_DIR -> checked samples -> a reproducible stratified split -> model-ready arrays.

DATA_DIR holds one folder per class (jpg, png or bmp, any size, gray or colour). The pass
class is ``ok`` unless told otherwise; every other class is a defect.

:func:`scan_dataset` is the data verification step that runs before any training
(CRISP-ML(Q) "data quality verification"): it reads every file once, lists and skips the
unreadable ones, removes exact duplicates (sha256 of the bytes), counts the classes and
refuses data it cannot split, naming what to fix. :func:`split_dataset` makes a
stratified train/val/test split that depends only on the files' contents and the seed,
and keeps near-duplicates (same group) on one side. :func:`load_arrays` converts images
with the very functions the edge uses (:mod:`edge.preprocess`), so training sees what the
box will see.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.exceptions import ImageError
from edge.preprocess import IMAGE_SUFFIXES, read_image, resize_uint8
from edge.protocol import Preprocessing
from training.exceptions import DataError

logger = logging.getLogger(__name__)

DEFAULT_PASS_LABEL = "ok"
# Below this many images a class cannot give train, val and test a fair share.
MIN_PER_CLASS = 10
# Above this largest:smallest ratio the data check warns (training weights classes anyway).
MAX_IMBALANCE = 20.0
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
# DATA_DIR/masks/<class>/<image's path in its class folder> holds optional defect masks
# (white = defect). It is not a class folder.
MASKS_FOLDER = "masks"
# A mask pixel counts as defect above this grey level (masks saved as JPEG stay usable).
MASK_LEVEL = 127


@dataclass(frozen=True)
class Sample:
    """One readable, unique image file and its class (the folder it sits in)."""

    path: Path
    label: str
    sha256: str


@dataclass(frozen=True)
class DataReport:
    """The outcome of the data check: what will be trained on and what was set aside."""

    data_dir: Path
    labels: tuple[str, ...]  # every class, sorted; this is the model's output order
    pass_label: str
    samples: tuple[Sample, ...]  # readable and deduplicated, sorted by (label, path)
    unreadable: tuple[tuple[Path, str], ...] = ()  # (file, reason), skipped
    duplicates: tuple[tuple[Path, Path], ...] = ()  # (dropped copy, kept file)
    conflicts: tuple[Path, ...] = ()  # same bytes under two classes: every copy dropped
    ignored: int = 0  # files that are not images by their suffix
    warnings: tuple[str, ...] = ()
    fingerprint: str = ""
    class_counts: Mapping[str, int] = field(default_factory=dict)
    masks_dir: Path | None = None  # where defect masks were looked for, when that folder exists
    masks: Mapping[Path, Path] = field(default_factory=dict)  # defect image -> its mask file

    @property
    def defect_labels(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if label != self.pass_label)

    @property
    def imbalance(self) -> float:
        """Largest class count over smallest (1.0 when balanced)."""
        counts = [c for c in self.class_counts.values() if c > 0]
        return max(counts) / min(counts) if counts else 0.0

    def summary_lines(self) -> list[str]:
        """A few human lines for the CLI: counts, what was skipped and why."""
        counts = ", ".join(
            f"{label}={self.class_counts.get(label, 0)}{' (pass)' if label == self.pass_label else ''}"
            for label in self.labels
        )
        lines = [f"data check: {len(self.samples)} images in {len(self.labels)} classes: {counts}"]
        if self.unreadable:
            lines.append(f"  skipped {len(self.unreadable)} unreadable file(s):")
            lines.extend(f"    {p}: {reason}" for p, reason in self.unreadable[:20])
            if len(self.unreadable) > 20:
                lines.append(f"    ... and {len(self.unreadable) - 20} more")
        if self.duplicates:
            lines.append(f"  removed {len(self.duplicates)} exact duplicate(s):")
            lines.extend(f"    {dup} == {kept}" for dup, kept in self.duplicates[:20])
            if len(self.duplicates) > 20:
                lines.append(f"    ... and {len(self.duplicates) - 20} more")
        if self.masks_dir is not None:
            defects = sum(1 for s in self.samples if s.label != self.pass_label)
            lines.append(
                f"  defect masks: {len(self.masks)} of {defects} defect images have one ({self.masks_dir}); "
                "the network is told where those defects are"
            )
        lines.extend(f"  warning: {w}" for w in self.warnings)
        lines.append(f"  fingerprint {self.fingerprint[:16]}…")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for the manifest and metrics.json)."""
        return {
            "data_dir": str(self.data_dir),
            "labels": list(self.labels),
            "pass_label": self.pass_label,
            "fingerprint": self.fingerprint,
            "class_counts": dict(self.class_counts),
            "images": len(self.samples),
            "unreadable": [str(p) for p, _ in self.unreadable],
            "duplicates_removed": len(self.duplicates),
            "label_conflicts_removed": [str(p) for p in self.conflicts],
            "ignored_non_images": self.ignored,
            "imbalance": round(self.imbalance, 3),
            "warnings": list(self.warnings),
            "masks_dir": str(self.masks_dir) if self.masks_dir is not None else None,
            "masks": len(self.masks),
        }


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dataset_fingerprint(samples: Iterable[Sample]) -> str:
    """sha256 over the sorted (class, file sha256) pairs: names and order do not matter."""
    h = hashlib.sha256()
    for label, digest in sorted((s.label, s.sha256) for s in samples):
        h.update(f"{label}\t{digest}\n".encode())
    return h.hexdigest()


def class_folders(data_dir: Path) -> list[Path]:
    """The class sub-folders of DATA_DIR (hidden ones ignored), raising :class:`DataError`."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(
            f"{data_dir} does not exist; pass a folder with one sub-folder of images per class "
            f"(e.g. {data_dir}/ok and {data_dir}/scratch), or make one with `linewatch train synth {data_dir}`"
        )
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is a file, not a folder; pass a folder with one sub-folder of images per class")
    folders = sorted(
        p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != MASKS_FOLDER
    )
    if not folders:
        raise DataError(
            f"{data_dir} has no class folders; put the images in one sub-folder per class "
            f"(e.g. {data_dir}/ok and {data_dir}/scratch)"
        )
    return folders


def image_files(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` (recursively, sorted) and how many other files were ignored."""
    images: list[Path] = []
    ignored = 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            ignored += 1
    return images, ignored


def list_images(data_dir: Path) -> list[tuple[Path, str]]:
    """Every image file of a folder-per-class DATA_DIR as ``(path, class)``; nothing is decoded."""
    found: list[tuple[Path, str]] = []
    for folder in class_folders(data_dir):
        files, _ = image_files(folder)
        found.extend((p, folder.name) for p in files)
    if not found:
        raise DataError(f"{data_dir} has class folders but no jpg/png/bmp images in them; add images")
    return found


def _decode_problem(data: bytes) -> str | None:
    """Why these bytes are not a usable image, or None when they decode."""
    if not data:
        return "empty file"
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        return "cannot be decoded (corrupt or not jpg/png/bmp)"
    if image.size == 0 or min(image.shape[:2]) < 1:
        return "decodes to an empty image"
    return None


def scan_dataset(
    data_dir: Path,
    *,
    pass_label: str | None = None,
    min_per_class: int = MIN_PER_CLASS,
    max_imbalance: float = MAX_IMBALANCE,
    masks_dir: Path | None = None,
) -> DataReport:
    """Check DATA_DIR before training and return what will be trained on.

    Defect masks are looked for in ``masks_dir`` (default DATA_DIR/masks, when it exists):
    ``<masks_dir>/<class>/<the image's path in its class folder>``, or the same name with
    a ``.png`` suffix. Masks are optional and may cover only some defect images; masks of
    pass-class images are not needed (a passing part has no defect pixels).

    Raises :class:`DataError` (one line that says what to do) for: a missing or empty folder,
    a single class, a ``pass_label`` that is not a class, no readable image at all, or a class
    with fewer than ``min_per_class`` usable images. Unreadable files and exact duplicates
    are listed in the report and skipped; an imbalance above ``max_imbalance``:1 is a warning.
    """
    data_dir = Path(data_dir)
    folders = class_folders(data_dir)
    labels = tuple(f.name for f in folders)
    wanted = _pass_label_of(data_dir, labels, pass_label)
    read = _read_images(data_dir, folders, labels)
    samples, duplicates, conflicts = _dedupe(read.by_hash)
    class_counts = _class_counts(samples, labels, min_per_class)
    warnings = _dataset_warnings(read.unreadable, conflicts, class_counts, max_imbalance)
    if read.ignored:
        logger.info("ignored %s non-image files under %s", read.ignored, data_dir)
    found_dir, masks = _find_masks(data_dir, masks_dir, samples, wanted, warnings)

    return DataReport(
        data_dir=data_dir,
        labels=labels,
        pass_label=wanted,
        samples=tuple(samples),
        unreadable=tuple(read.unreadable),
        duplicates=tuple(duplicates),
        conflicts=tuple(conflicts),
        ignored=read.ignored,
        warnings=tuple(warnings),
        fingerprint=dataset_fingerprint(samples),
        class_counts=class_counts,
        masks_dir=found_dir,
        masks=masks,
    )


def _pass_label_of(data_dir: Path, labels: tuple[str, ...], pass_label: str | None) -> str:
    """The pass class: ``pass_label`` or the default; :class:`DataError` when DATA_DIR has
    a single class or no such class folder."""
    if len(labels) < 2:
        raise DataError(
            f"{data_dir} has a single class folder ({labels[0]}); a classifier needs the pass class "
            f"and at least one defect class: add e.g. {data_dir}/scratch with defect images"
        )
    wanted = pass_label if pass_label is not None else DEFAULT_PASS_LABEL
    if wanted not in labels:
        how = "pass --pass-label with" if pass_label is None else "--pass-label must be"
        raise DataError(
            f"pass label {wanted!r} is not a class folder in {data_dir} (found: {', '.join(labels)}); {how} one of them"
        )
    return wanted


@dataclass
class _ReadImages:
    """The image files of the class folders, read: decodable ones grouped by content hash
    as (path, class), the others with the reason, and how many non-image files were ignored."""

    by_hash: dict[str, list[tuple[Path, str]]]
    unreadable: list[tuple[Path, str]]
    ignored: int


def _read_images(data_dir: Path, folders: Sequence[Path], labels: tuple[str, ...]) -> _ReadImages:
    """Read and decode every image file once; :class:`DataError` when there is none or
    none decodes."""
    read = _ReadImages(defaultdict(list), [], 0)
    total_files = 0
    for folder in folders:
        files, skipped = image_files(folder)
        read.ignored += skipped
        for path in files:
            total_files += 1
            try:
                data = path.read_bytes()
            except OSError as exc:
                read.unreadable.append((path, f"cannot be read ({exc.strerror or exc})"))
                continue
            problem = _decode_problem(data)
            if problem:
                read.unreadable.append((path, problem))
                continue
            read.by_hash[sha256_bytes(data)].append((path, folder.name))

    if total_files == 0:
        raise DataError(f"{data_dir} has class folders ({', '.join(labels)}) but no jpg/png/bmp images; add images")
    if not read.by_hash:
        example = read.unreadable[0][0] if read.unreadable else data_dir
        raise DataError(
            f"none of the {total_files} image files in {data_dir} can be decoded (e.g. {example}); "
            "check that they are real jpg/png/bmp files"
        )
    return read


def _dedupe(by_hash: dict[str, list[tuple[Path, str]]]
            ) -> tuple[list[Sample], list[tuple[Path, Path]], list[Path]]:
    """One sample per distinct image (sorted by class and path), the duplicates left out as
    (copy, kept), and the files of images found under more than one class."""
    samples: list[Sample] = []
    duplicates: list[tuple[Path, Path]] = []
    conflicts: list[Path] = []
    for digest, copies in by_hash.items():
        copies.sort(key=lambda pc: (pc[1], str(pc[0])))
        if len({label for _, label in copies}) > 1:
            # The same picture labelled two ways teaches nothing; keep none of it.
            conflicts.extend(p for p, _ in copies)
            continue
        kept_path, label = copies[0]
        samples.append(Sample(kept_path, label, digest))
        duplicates.extend((p, kept_path) for p, _ in copies[1:])
    samples.sort(key=lambda s: (s.label, str(s.path)))
    duplicates.sort()
    conflicts.sort()
    return samples, duplicates, conflicts


def _class_counts(samples: Sequence[Sample], labels: tuple[str, ...], min_per_class: int) -> dict[str, int]:
    """Usable images per class; :class:`DataError` when a class has fewer than ``min_per_class``."""
    counts = Counter(s.label for s in samples)
    class_counts = {label: counts.get(label, 0) for label in labels}
    small = [(label, n) for label, n in class_counts.items() if n < min_per_class]
    if small:
        what = ", ".join(f"{label!r} has {n}" for label, n in small)
        raise DataError(
            f"too few usable images to split into train/val/test: {what} (after removing unreadable files and "
            f"duplicates; each class needs at least {min_per_class}); add images or remove that class folder"
        )
    return class_counts


def _dataset_warnings(unreadable: Sequence[tuple[Path, str]], conflicts: Sequence[Path],
                      class_counts: dict[str, int], max_imbalance: float) -> list[str]:
    """What the report warns about: skipped unreadable files, dropped conflicts, imbalance."""
    warnings: list[str] = []
    if unreadable:
        warnings.append(f"{len(unreadable)} unreadable file(s) skipped (listed above); fix or delete them")
    if conflicts:
        warnings.append(
            f"{len(conflicts)} file(s) hold the same image under different classes and were all dropped "
            f"(e.g. {conflicts[0]}); put each image in one class folder"
        )
    ratio = max(class_counts.values()) / min(class_counts.values())
    if ratio > max_imbalance:
        warnings.append(
            f"classes are very imbalanced ({ratio:.0f}:1, above {max_imbalance:.0f}:1); class weighting will be used, "
            "but more images of the small classes would help more"
        )
    return warnings


def _find_masks(
    data_dir: Path, masks_dir: Path | None, samples: Sequence[Sample], pass_label: str, warnings: list[str]
) -> tuple[Path | None, dict[Path, Path]]:
    """Pair defect images with their mask files; a problem is a warning, never fatal."""
    if masks_dir is None:
        masks_dir = data_dir / MASKS_FOLDER
        if not masks_dir.is_dir():
            return None, {}
    elif not masks_dir.is_dir():
        raise DataError(f"masks folder {masks_dir} does not exist; pass a folder laid out as <class>/<image name>")
    found: dict[Path, Path] = {}
    for s in samples:
        if s.label == pass_label:
            continue
        rel = s.path.relative_to(data_dir / s.label)
        for candidate in (masks_dir / s.label / rel, (masks_dir / s.label / rel).with_suffix(".png")):
            if candidate.is_file():
                found[s.path] = candidate
                break
    files, _ = image_files(masks_dir)
    unused = len(files) - len(set(found.values()))
    if files and not found:
        warnings.append(
            f"{masks_dir} holds {len(files)} image(s) but none matches a defect image; masks go to "
            f"{masks_dir}/<class>/<the image's file name>"
        )
    elif unused:
        logger.info("%s mask file(s) in %s match no defect image and are ignored", unused, masks_dir)
    return masks_dir, found


@dataclass(frozen=True)
class Split:
    """A train/val/test partition of the samples."""

    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    method: str
    seed: int
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def class_sizes(self) -> dict[str, dict[str, int]]:
        """Per split, per class counts (for the manifest and the stratification check)."""
        return {
            name: dict(sorted(Counter(s.label for s in part).items()))
            for name, part in (("train", self.train), ("val", self.val), ("test", self.test))
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "sizes": self.sizes(),
            "class_sizes": self.class_sizes(),
        }


GroupFn = Callable[[Sample], str]


def _targets(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Split n items as (train, val, test), giving val and test at least one each when n >= 3."""
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_train = max(0, n - n_val - n_test)
    return n_train, n_val, n_test


def split_dataset(
    samples: Sequence[Sample],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    groups: GroupFn | None = None,
) -> Split:
    """Stratified train/val/test split, reproducible from the files' contents and ``seed``.

    Order comes from each file's sha256, not its name, so renaming files or listing them in
    another order gives the same split. With ``groups``, samples that share a group key
    (near-duplicates: one part photographed twice, one tile under several exposures) always
    land in the same split; groups are then assigned greedily, largest first, each to the split
    where it brings the per-class counts closest to their targets.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    ordered = sorted(samples, key=lambda s: (s.label, s.sha256))
    if groups is None:
        parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
        by_label: dict[str, list[Sample]] = defaultdict(list)
        for s in ordered:
            by_label[s.label].append(s)
        for label in sorted(by_label):
            items = by_label[label]
            perm = rng.permutation(len(items))
            n_train, n_val, _ = _targets(len(items), fractions)
            shuffled = [items[i] for i in perm]
            parts[0].extend(shuffled[:n_train])
            parts[1].extend(shuffled[n_train : n_train + n_val])
            parts[2].extend(shuffled[n_train + n_val :])
        method = "stratified"
    else:
        parts = _group_split(ordered, fractions, rng, groups)
        method = "stratified-group"
    train, val, test = (tuple(sorted(p, key=lambda s: (s.label, str(s.path)))) for p in parts)
    return Split(train, val, test, method=method, seed=seed, fractions=fractions)


def _group_split(
    ordered: list[Sample],
    fractions: Sequence[float],
    rng: np.random.Generator,
    groups: GroupFn,
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    members: dict[str, list[Sample]] = defaultdict(list)
    for s in ordered:
        members[groups(s)].append(s)
    labels = sorted({s.label for s in ordered})
    totals = Counter(s.label for s in ordered)
    target = np.array([[_targets(totals[label], fractions)[k] for label in labels] for k in range(3)], dtype=float)
    current = np.zeros_like(target)
    keys = sorted(members)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    # Big groups first (they are the hard ones to place), shuffled among equals.
    keys.sort(key=lambda k: -len(members[k]))
    parts: tuple[list[Sample], list[Sample], list[Sample]] = ([], [], [])
    for key in keys:
        counts = np.array([sum(1 for s in members[key] if s.label == label) for label in labels], dtype=float)
        # Place the group where it brings the split sizes closest to their targets
        # (the change of a chi-square-like distance; ties go to train, then val).
        change = [
            float(np.sum(((current[k] + counts - target[k]) ** 2 - (current[k] - target[k]) ** 2) / np.maximum(target[k], 1.0)))
            for k in range(3)
        ]
        best = int(np.argmin(change))
        current[best] += counts
        parts[best].extend(members[key])
    return parts


def number_groups(samples: Iterable[Sample], *, gap: int = 100, pattern: str = r"(\d+)(?!.*\d)") -> GroupFn:
    """Group files whose numbers (the last number in the file name) lie within ``gap`` of a neighbour.

    Cameras and datasets often number captures sequentially: one part shot several times
    (several exposures, a burst) gets neighbouring numbers. Sorting all numbers and starting a
    new group at every jump larger than ``gap`` keeps such captures together across classes.
    Files without a number form a group of their own.
    """
    regex = re.compile(pattern)
    numbered: list[tuple[int, Path]] = []
    mapping: dict[Path, str] = {}
    for s in samples:
        m = regex.search(s.path.stem)
        if m:
            numbered.append((int(m.group(1)), s.path))
        else:
            mapping[s.path] = f"file:{s.path}"
    numbered.sort()
    group = 0
    previous: int | None = None
    for number, path in numbered:
        if previous is not None and number - previous > gap:
            group += 1
        mapping[path] = f"num:{group}"
        previous = number
    return lambda s: mapping.get(s.path, f"file:{s.path}")


# Near-duplicates by content (``content_groups``): thumbnails this many pixels a side, and the
# least correlation of every pair in a group. On the magnetic tiles (one tile under several
# exposures) 0.98 finds groups of up to 6-7 pictures that are neighbours in capture number; on
# the synthetic set, where every part is drawn afresh, it finds none (docs/training.md, "Near-duplicates").
CONTENT_THUMBNAIL = 32
CONTENT_SIMILARITY = 0.98
_CONTENT_BLOCK = 1024


def _thumbnail(path: Path, size: int) -> np.ndarray:
    """Zero-mean, unit-length grey thumbnail: its dot product with another is their correlation,
    blind to exposure (gain and offset)."""
    image = read_image(path)
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 1e-9 else small  # a flat picture correlates with nothing


def content_groups(
    samples: Sequence[Sample], *, similarity: float = CONTENT_SIMILARITY, size: int = CONTENT_THUMBNAIL
) -> GroupFn:
    """Group pictures that show the same thing: every pair in a group has thumbnail correlation
    of at least ``similarity`` (complete linkage, so a chain of merely similar pictures does not
    become one group). Finds a part shot several times or under several exposures without
    relying on file names; pictures like no other form a group of their own.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(samples)
    mapping = {s.path: f"file:{s.path}" for s in samples}
    if n < 2:
        return lambda s: mapping.get(s.path, f"file:{s.path}")
    thumbs = np.stack([_thumbnail(s.path, size) for s in samples]).astype(np.float32)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for start in range(0, n, _CONTENT_BLOCK):
        i, j = np.nonzero(thumbs[start : start + _CONTENT_BLOCK] @ thumbs.T >= similarity)
        i += start
        rows.append(i[i < j])
        cols.append(j[i < j])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    group = 0
    for members in _members_of(component):
        if len(members) < 2:
            continue
        corr = thumbs[members] @ thumbs[members].T
        distance = np.clip(1.0 - corr[np.triu_indices(len(members), 1)], 0.0, None)
        for cluster in _members_of(fcluster(linkage(distance, "complete"), 1.0 - similarity, "distance")):
            if len(cluster) > 1:
                for k in cluster:
                    mapping[samples[members[k]].path] = f"content:{group}"
                group += 1
    return lambda s: mapping.get(s.path, f"file:{s.path}")


def _members_of(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each label's members, for labels 0..K or 1..K."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return list(np.split(order, bounds))


def load_arrays(samples: Sequence[Sample], prep: Preprocessing) -> np.ndarray:
    """Read and convert images exactly as the edge does: uint8 array (N, H, W, C)."""
    out = np.empty((len(samples), prep.height, prep.width, 1 if prep.color_mode == "gray" else 3), dtype=np.uint8)
    for i, s in enumerate(samples):
        try:
            out[i] = resize_uint8(read_image(s.path), prep)
        except ImageError as exc:
            raise DataError(f"{exc} (it changed since the data check; run again)") from exc
    return out


def load_masks(
    samples: Sequence[Sample], masks: Mapping[Path, Path], images: np.ndarray, pass_label: str
) -> tuple[np.ndarray, np.ndarray]:
    """Defect masks at model size: (N, H, W) float32 defect coverage in [0, 1] and
    (N,) bool, True where the mask is known.

    A pass-class image is known to be clean (an all-zero mask). A defect image has a
    known mask only when ``masks`` names its file. ``images`` are the model-size arrays of
    :func:`load_arrays` (for the output size). A mask whose size differs from its image's,
    or that cannot be read, is a :class:`DataError`: it was drawn for another picture.
    """
    n, h, w = images.shape[:3]
    out = np.zeros((n, h, w), dtype=np.float32)
    known = np.zeros(n, dtype=bool)
    for i, s in enumerate(samples):
        if s.label == pass_label:
            known[i] = True
            continue
        mask_path = masks.get(s.path)
        if mask_path is None:
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise DataError(f"mask {mask_path} cannot be decoded; replace it with a png (white = defect) or delete it")
        shape = _image_size(s.path)
        if mask.shape != shape:
            raise DataError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {s.path} is "
                f"{shape[1]}x{shape[0]}; a mask must have its image's size"
            )
        binary = (mask > MASK_LEVEL).astype(np.float32)
        out[i] = cv2.resize(binary, (w, h), interpolation=cv2.INTER_AREA)
        known[i] = True
    return out, known


def _image_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{path} can no longer be decoded (it changed since the data check; run again)")
    return int(image.shape[0]), int(image.shape[1])


def label_indices(samples: Sequence[Sample], labels: Sequence[str]) -> np.ndarray:
    """Class index of each sample in ``labels`` order."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[s.label] for s in samples], dtype=np.int64)


__all__ = [
    "DEFAULT_PASS_LABEL",
    "MASKS_FOLDER",
    "MAX_IMBALANCE",
    "MIN_PER_CLASS",
    "DataReport",
    "Sample",
    "Split",
    "class_folders",
    "dataset_fingerprint",
    "image_files",
    "label_indices",
    "list_images",
    "load_arrays",
    "load_masks",
    "number_groups",
    "content_groups",
    "scan_dataset",
    "split_dataset",
]
