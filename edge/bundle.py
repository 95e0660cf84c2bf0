"""The single-file form of a model bundle (``.lwb``): a deterministic, safely unpacked tar.

Packing the same bundle folder twice gives byte-identical files (sorted entries, zero
timestamps and owners, fixed modes), so a packed bundle has a stable sha256 the cloud
can sign and the edge can verify. Unpacking refuses anything but plain files and
folders under the destination: absolute paths, ``..``, links and devices raise
:class:`edge.exceptions.BundleError`. No TensorFlow here: the edge unpacks what it receives.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from edge.exceptions import BundleError
from edge.fsutil import atomic_write
from edge.protocol import MANIFEST_FILE, PACKED_SUFFIX

logger = logging.getLogger(__name__)

# A bundle is a small model, a few golden images and a report; anything far larger is not one.
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_MEMBERS = 10_000


def _bundle_files(bundle_dir: Path) -> list[PurePosixPath]:
    """Relative paths of every regular file under ``bundle_dir`` (sorted); links are refused."""
    files: list[PurePosixPath] = []
    for root, dirs, names in os.walk(bundle_dir, followlinks=False):
        dirs.sort()
        for name in [*dirs, *names]:
            path = Path(root) / name
            if path.is_symlink():
                raise BundleError(f"{path} is a symbolic link; a bundle holds plain files only, copy the target in")
        for name in sorted(names):
            path = Path(root) / name
            if not path.is_file():
                raise BundleError(f"{path} is not a regular file; remove it from the bundle folder")
            files.append(PurePosixPath(path.relative_to(bundle_dir).as_posix()))
    return sorted(files)


def pack_bundle(bundle_dir: Path, out_file: Path) -> Path:
    """Pack a bundle folder into one deterministic tar file (``.lwb``) and return its path.

    Only the folder's contents are stored (no top-level folder name), so the file unpacks
    into whatever destination the receiver chooses.
    """
    bundle_dir = Path(bundle_dir)
    out_file = Path(out_file)
    if not (bundle_dir / MANIFEST_FILE).is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST_FILE}; pass the folder `linewatch train fit --out` made")
    files = _bundle_files(bundle_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    packed = io.BytesIO()  # a bundle is a few MB at most: build it in memory, write it once
    with tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted({p.as_posix() for f in files for p in f.parents if p.as_posix() != "."}):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            _normalise(info)
            tar.addfile(info)
        for rel in files:
            data = (bundle_dir / rel).read_bytes()
            info = tarfile.TarInfo(rel.as_posix())
            info.size = len(data)
            info.mode = 0o644
            _normalise(info)
            tar.addfile(info, io.BytesIO(data))
    atomic_write(out_file, packed.getvalue())
    logger.info("packed %s (%s files) into %s", bundle_dir, len(files), out_file)
    return out_file


def _normalise(info: tarfile.TarInfo) -> None:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.pax_headers = {}


def _safe_member(member: tarfile.TarInfo, source: Path) -> PurePosixPath:
    name = member.name
    rel = PurePosixPath(name)
    if name.startswith(("/", "\\")) or rel.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{source}: entry {name!r} has an absolute path; refusing to unpack this file")
    if any(part == ".." for part in rel.parts) or "\\" in name:
        raise BundleError(f"{source}: entry {name!r} points outside the bundle; refusing to unpack this file")
    if not (member.isfile() or member.isdir()):
        kind = "a link" if member.issym() or member.islnk() else "a device or special file"
        raise BundleError(f"{source}: entry {name!r} is {kind}; a bundle holds plain files only")
    return rel


def unpack_bundle(packed: Path, dest: Path) -> Path:
    """Unpack a ``.lwb`` file into ``dest`` (which must not exist or be empty) and return ``dest``.

    Every entry is checked before anything is written; on any problem nothing is left in
    ``dest``. The result must hold a manifest.json; its contents are validated by
    :func:`edge.protocol.read_manifest` when the bundle is loaded.
    """
    packed = Path(packed)
    dest = Path(dest)
    if not packed.is_file():
        raise BundleError(f"{packed} does not exist; pass a packed bundle ({PACKED_SUFFIX} file)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} already exists and is not an empty folder; unpack into a new folder")
    try:
        with tarfile.open(packed, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise BundleError(f"{packed}: {len(members)} entries is too many for a model bundle; refusing it")
            checked = [(m, _safe_member(m, packed)) for m in members]
            total = sum(m.size for m, _ in checked if m.isfile())
            if total > MAX_UNPACKED_BYTES:
                raise BundleError(f"{packed}: unpacks to {total} bytes, over the {MAX_UNPACKED_BYTES} limit; refusing it")
            if not any(rel == PurePosixPath(MANIFEST_FILE) for m, rel in checked if m.isfile()):
                raise BundleError(f"{packed} holds no {MANIFEST_FILE}; it is not a model bundle")
            created = not dest.exists()
            dest.mkdir(parents=True, exist_ok=True)
            try:
                for member, rel in checked:
                    target = dest.joinpath(*rel.parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        raise BundleError(f"{packed}: entry {member.name!r} has no data")
                    with source, open(target, "wb") as f:
                        shutil.copyfileobj(source, f)
            except BaseException:
                if created:
                    shutil.rmtree(dest, ignore_errors=True)
                else:
                    for child in dest.iterdir():
                        if child.is_dir():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
                raise
    except tarfile.TarError as exc:
        raise BundleError(f"{packed} is not a valid packed bundle ({exc}); transfer or pack it again") from exc
    except OSError as exc:
        raise BundleError(f"{packed} cannot be unpacked into {dest} ({exc})") from exc
    return dest


__all__ = ["MAX_UNPACKED_BYTES", "pack_bundle", "unpack_bundle"]
