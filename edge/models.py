"""The on-box model store: which bundle is live, which is kept for rollback.

``model.path`` is either a single bundle folder (manifest.json inside: handy for a first
install and for demos) or a store folder managed by OTA::

    models/
      versions/<version>-<sha12>/   unpacked, verified bundles
      current -> versions/...       symlink, switched atomically by rename
      previous -> versions/...      the model before, ready for rollback

A symlink swap is a single rename(2), so a crash at any moment leaves either the old or
the new link in place, never none (docs/design.md, guarantee 6).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edge.exceptions import BundleError
from edge.fsutil import fsync_dir
from edge.protocol import MANIFEST_FILE

logger = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"
VERSIONS = "versions"


class ModelStore:
    """Resolve and switch the live bundle under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def is_single_bundle(self) -> bool:
        return (self.root / MANIFEST_FILE).is_file()

    def current(self) -> Path:
        """The bundle folder to run now; :class:`BundleError` says what to do if there is none."""
        if self.is_single_bundle:
            return self.root
        link = self.root / CURRENT
        if link.exists():
            return link.resolve()
        prev = self.root / PREVIOUS
        if prev.exists():
            logger.warning("no current model in %s; falling back to previous %s", self.root, prev.resolve())
            return prev.resolve()
        raise BundleError(
            f"no model in {self.root}: copy a bundle folder there (linewatch train fit --out ...) "
            "or push one with `linewatch cloud push`"
        )

    def previous(self) -> Path | None:
        """The bundle kept for rollback, if any."""
        prev = self.root / PREVIOUS
        return prev.resolve() if prev.exists() else None

    def install_dir(self, name: str) -> Path:
        """Where a new version is unpacked before it is activated."""
        d = self.root / VERSIONS / name
        d.parent.mkdir(parents=True, exist_ok=True)
        return d

    def activate(self, bundle_dir: Path) -> None:
        """Make ``bundle_dir`` current and the old current previous, each by an atomic rename."""
        if self.is_single_bundle:
            raise BundleError(
                f"{self.root} holds a single bundle; point model.path at a store folder to receive OTA updates"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        old = (self.root / CURRENT).resolve() if (self.root / CURRENT).exists() else None
        if old is not None and old != Path(bundle_dir).resolve():
            _atomic_symlink(old, self.root / PREVIOUS)
        _atomic_symlink(Path(bundle_dir).resolve(), self.root / CURRENT)

    def rollback(self) -> Path:
        """Swap current and previous; returns the bundle now current."""
        prev = self.previous()
        if prev is None:
            raise BundleError(f"no previous model in {self.root} to roll back to")
        cur = (self.root / CURRENT).resolve() if (self.root / CURRENT).exists() else None
        _atomic_symlink(prev, self.root / CURRENT)
        if cur is not None:
            _atomic_symlink(cur, self.root / PREVIOUS)
        return prev


def _atomic_symlink(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)  # make the rename itself durable
