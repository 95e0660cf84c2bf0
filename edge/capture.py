"""Cameras: turn ``camera.source`` into a stream of :class:`Frame` for the inspection loop.

A source string is parsed once (:func:`parse_source`) into a :class:`SourceSpec`; the
factory :func:`open_source` is the one place that maps a kind to a :class:`FrameSource`
implementation (OpenCV ``VideoCapture`` or an image folder), so a test can hand
:class:`Capture` a fake USB camera and exercise everything else for real.

:class:`Capture` reads the source in its own thread into a small bounded queue:

- finite sources (video files, image folders) use backpressure: the reader waits for the
  consumer, so every frame of a file is inspected exactly once;
- live sources (USB, V4L2, RTSP/HTTP, GStreamer) drop the *oldest* queued frame when the
  consumer falls behind, so decisions stay close to real time; drops are counted and logged.

The reader never dies: a failed open or read puts the camera 'down' and retries with
exponential backoff and jitter (:class:`edge.backoff.Backoff`); a file that does not exist yet is retried until it appears;
a finite source that ends is reported as 'ended' and the agent keeps running. Every wait
is on a stop Event, so :meth:`Capture.stop` returns within a second.
"""

from __future__ import annotations

import glob
import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, Protocol, runtime_checkable

import cv2
import numpy as np

from edge.backoff import Backoff
from edge.enums import TextEnum
from edge.exceptions import CameraError, ImageError
from edge.preprocess import IMAGE_SUFFIXES, read_image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (
    ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mts",
    ".m2ts", ".wmv", ".flv", ".3gp", ".ogv", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc",
    ".y4m",
)
URL_SCHEMES = ("rtsp", "rtsps", "http", "https")
SOURCE_KINDS = ("device", "url", "gstreamer", "video", "images")
_GLOB_CHARS = re.compile(r"[*?\[]")
_DEV_VIDEO = re.compile(r"^/dev/video\d+$")
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^/\s]*@")


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``camera.source``: ``kind`` is one of :data:`SOURCE_KINDS`.

    ``value`` is an ``int`` device index, or a string (device path, URL, GStreamer
    pipeline, video path, image folder, glob pattern or single image path).
    """

    kind: str
    value: str | int

    @property
    def display(self) -> str:
        """The source as it may appear in logs and status: URL passwords are masked."""
        if isinstance(self.value, str):
            return redact_url(self.value)
        return str(self.value)

    @property
    def finite(self) -> bool:
        """Whether this kind of source has an end (a file or a folder of files)."""
        return self.kind in ("video", "images")


def redact_url(text: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x`` (camera passwords stay out of logs).

    Works on any text, so a URL inside a GStreamer pipeline is masked too.
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)


def parse_source(source: str | int, *, base_dir: Path | None = None) -> SourceSpec:
    """Classify a ``camera.source`` value; raise :class:`CameraError` when it is none of the kinds.

    - ``0`` / ``"0"`` -> device index; ``"/dev/video0"`` -> device path
    - ``rtsp://``, ``rtsps://``, ``http://``, ``https://`` -> url
    - a string containing ``" ! "`` -> gstreamer pipeline
    - a path ending in a video suffix (``.mp4``, ``.avi``, ...) -> video (may not exist yet)
    - a folder, a glob pattern (``*``, ``?``, ``[``) or a single jpg/png/bmp file -> images

    A path without a suffix that does not exist yet is taken as an image folder to wait for.
    ``base_dir`` resolves relative paths (the config module passes the config file's folder).

    Example::

        >>> parse_source("rtsp://cam.local/stream")
        SourceSpec(kind='url', value='rtsp://cam.local/stream')
    """
    if isinstance(source, bool) or not isinstance(source, int | str):
        raise CameraError(
            f"camera.source must be a device index, a path, a URL or a GStreamer pipeline, "
            f"not {source!r}"
        )
    if isinstance(source, int):
        if source < 0:
            raise CameraError(f"camera.source device index {source} is negative; use 0 for the first camera")
        return SourceSpec("device", source)
    text = source.strip()
    if not text:
        raise CameraError("camera.source is empty; set a device index, a path, a URL or a pipeline")
    if text.isdigit():
        return SourceSpec("device", int(text))
    if " ! " in text:  # before URLs: a pipeline may hold `location=rtsp://...`
        return SourceSpec("gstreamer", text)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme:
        if scheme in URL_SCHEMES:
            return SourceSpec("url", text)
        raise CameraError(
            f"camera.source {redact_url(text)!r}: unsupported URL scheme {scheme!r}; "
            f"use one of {', '.join(s + '://' for s in URL_SCHEMES)} or a GStreamer pipeline"
        )
    if _DEV_VIDEO.match(text) or text.startswith("/dev/v4l/"):
        return SourceSpec("device", text)
    path = Path(text).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    value = str(path)
    if _GLOB_CHARS.search(text):
        return SourceSpec("images", value)
    suffix = path.suffix.lower()
    if path.is_dir():
        return SourceSpec("images", value)
    if suffix in VIDEO_SUFFIXES:
        return SourceSpec("video", value)
    if suffix in IMAGE_SUFFIXES:
        return SourceSpec("images", value)  # one image, inspected once
    if not suffix and not path.exists():
        return SourceSpec("images", value)  # a folder that will be created later
    raise CameraError(
        f"camera.source {text!r}: not a device, URL, pipeline, video ({', '.join(VIDEO_SUFFIXES[:5])}, ...), "
        f"image ({', '.join(IMAGE_SUFFIXES)}) or folder; check the path and its suffix"
    )


def validate_source(source: str | int, *, base_dir: Path | None = None) -> str | None:
    """Return what is wrong with ``source`` as one message, or ``None`` when it can be used.

    Checks the syntax and what this OpenCV build can open (a GStreamer pipeline needs an
    OpenCV built with GStreamer). A file or folder that does not exist yet is valid: the
    agent waits for it.
    """
    try:
        spec = parse_source(source, base_dir=base_dir)
    except CameraError as exc:
        return str(exc)
    if spec.kind == "gstreamer" and not _has_backend(cv2.CAP_GSTREAMER):
        return (
            "camera.source is a GStreamer pipeline but this OpenCV build has no GStreamer "
            "support (the PyPI opencv-python-headless wheel has none); install an OpenCV "
            "built with GStreamer, or use a device index, URL or file instead"
        )
    return None


def _has_backend(api: int) -> bool:
    try:
        return bool(cv2.videoio_registry.hasBackend(api))
    except (AttributeError, cv2.error):  # very old builds: let the open attempt tell
        return True


def natural_key(text: str) -> list[tuple[int, int | str]]:
    """Sort key where ``img2.png`` comes before ``img10.png``."""
    return [(0, int(p)) if p.isdigit() else (1, p.lower()) for p in re.split(r"(\d+)", text) if p]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)  # eq on pixel arrays is ambiguous: frames compare by identity
class Frame:
    """One image from the camera, as handed to the inspection loop.

    ``index`` counts from 0 for the life of the :class:`Capture` (across reconnects and
    restarts); ``ts`` is ``time.time()`` at grab; ``grab_ms`` is how long the source took
    to produce it; ``wait_ms`` is how long the consumer waited for it in :meth:`Capture.get`.
    """

    image: np.ndarray
    index: int
    ts: float
    source: str
    wait_ms: float = 0.0
    grab_ms: float = 0.0


class CameraPhase(TextEnum):
    """Where the camera is: status JSON, logs and the operator page carry the value."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"  # a failed open or read; the reader retries with backoff
    ENDED = "ended"  # a finite source (video, image folder) has no more frames
    STOPPED = "stopped"  # terminal until start()


@dataclass(frozen=True)
class CameraState:
    """A snapshot of the camera for status pages and events.

    ``state`` is a :class:`CameraPhase`; ``since`` is when it last changed;
    ``down_since`` is set while the camera is 'down'; ``frames`` counts frames read (and
    numbered), ``dropped`` those discarded because the consumer was slow (live sources) or
    the capture stopped, so ``frames == taken + dropped + queued``; ``bad_frames`` counts
    unreadable images skipped; ``fps`` is measured over the last frames.
    """

    state: CameraPhase
    since: float
    down_since: float | None
    reconnects: int
    frames: int
    dropped: int
    bad_frames: int
    last_error: str | None
    source: str
    fps: float
    restarts: int = 0


# --------------------------------------------------------------------------- sources


@runtime_checkable
class FrameSource(Protocol):
    """What :class:`Capture` needs from a camera.

    ``open()`` raises :class:`CameraError`; ``read()`` returns an image, or ``None`` at the
    end of a finite source, and raises :class:`CameraError` when a live source fails;
    ``close()`` is idempotent. ``finite`` says whether the source has an end.
    Optionally, ``interrupt()`` wakes a ``read()`` waiting to pace frames (any thread)
    and ``bad_frames`` counts images skipped as unreadable.
    """

    finite: bool

    def open(self) -> None: ...

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class _Pacer:
    """Paces reads to ``fps`` with waits on an Event, so a stop is never stuck behind a sleep."""

    def __init__(self, fps: float | None) -> None:
        self.period = 1.0 / fps if fps else 0.0
        self.wake = threading.Event()
        self._due: float | None = None

    def reset(self) -> None:
        self._due = None
        self.wake.clear()

    def wait(self) -> bool:
        """Wait for the next slot; False when interrupted."""
        if not self.period:
            return not self.wake.is_set()
        now = time.monotonic()
        if self._due is None:
            self._due = now
        elif self._due > now and self.wake.wait(self._due - now):
            return False
        # Late (a slow consumer under backpressure): pace from now rather than burst to catch up.
        self._due = max(self._due, time.monotonic()) + self.period
        return not self.wake.is_set()


class OpenCVSource:
    """A ``cv2.VideoCapture`` over a device, URL, GStreamer pipeline or video file.

    Network streams get open and read timeouts (``CAP_PROP_OPEN_TIMEOUT_MSEC``,
    ``CAP_PROP_READ_TIMEOUT_MSEC``) so a dead camera fails a read instead of hanging.
    A video file is finite unless ``loop``; ``fps`` paces a file like a live camera.
    """

    def __init__(
        self,
        spec: SourceSpec,
        *,
        fps: float | None = None,
        loop: bool = False,
        timeout_ms: int = 10_000,
    ) -> None:
        if spec.kind not in ("device", "url", "gstreamer", "video"):
            raise CameraError(f"OpenCVSource cannot read a {spec.kind!r} source; use ImageFolderSource")
        self.spec = spec
        self.loop = loop
        self.finite = spec.kind == "video" and not loop
        self.timeout_ms = int(timeout_ms)
        self._pacer = _Pacer(fps if spec.kind == "video" else None)
        self._cap: cv2.VideoCapture | None = None

    def _create(self) -> cv2.VideoCapture:
        spec = self.spec
        if spec.kind == "device":
            if isinstance(spec.value, int):
                cap = cv2.VideoCapture(spec.value, cv2.CAP_ANY)
            else:
                cap = cv2.VideoCapture(spec.value, cv2.CAP_V4L2)
            # Not every backend knows this property; set() then returns False, which is fine.
            cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms)
            return cap
        if spec.kind == "url":
            # Only FFmpeg honours these; a backend given unknown params refuses to open.
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms,
            ]
            return cv2.VideoCapture(str(spec.value), cv2.CAP_FFMPEG, params)
        if spec.kind == "gstreamer":
            if not _has_backend(cv2.CAP_GSTREAMER):
                raise CameraError(
                    "this OpenCV build has no GStreamer support; install an OpenCV built with "
                    "GStreamer or use a device index, URL or file as camera.source"
                )
            return cv2.VideoCapture(str(spec.value), cv2.CAP_GSTREAMER)
        path = Path(str(spec.value))
        if not path.is_file():
            raise CameraError(f"video file {path} does not exist (yet); waiting for it to appear")
        return cv2.VideoCapture(str(path), cv2.CAP_ANY)

    def open(self) -> None:
        """Open the capture; raise :class:`CameraError` when OpenCV cannot."""
        self.close()
        self._pacer.reset()
        try:
            cap = self._create()
        except cv2.error as exc:
            raise CameraError(f"camera {self.spec.display}: OpenCV error on open: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            hint = {
                "device": "check the cable, the index and that no other program holds the camera",
                "url": "check the address, credentials and that the camera is reachable",
                "gstreamer": "check the pipeline with gst-launch-1.0; it must end in appsink",
                "video": "the file may be incomplete or in a codec this OpenCV cannot decode",
            }[self.spec.kind]
            raise CameraError(f"camera {self.spec.display}: cannot open ({hint})")
        self._cap = cap

    def read(self) -> np.ndarray | None:
        """Next frame; ``None`` at the end of a file; :class:`CameraError` when a live source fails."""
        cap = self._cap
        if cap is None:
            raise CameraError(f"camera {self.spec.display}: read before open (or after close)")
        if not self._pacer.wait():
            return None if self.finite else self._failed("interrupted")
        try:
            ok, image = cap.read()
        except cv2.error as exc:
            raise CameraError(f"camera {self.spec.display}: OpenCV error on read: {exc}") from exc
        if ok and image is not None:
            return image
        if self.spec.kind == "video":
            if self.loop:
                self.open()
                if self._cap is not None:
                    ok, image = self._cap.read()
                    if ok and image is not None:
                        return image
                raise CameraError(f"video {self.spec.display}: no frame after rewinding; is the file empty?")
            return None
        return self._failed("no frame (stream closed, camera unplugged or read timeout)")

    def _failed(self, why: str) -> NoReturn:
        raise CameraError(f"camera {self.spec.display}: {why}; reconnecting")

    def interrupt(self) -> None:
        """Wake a read waiting to pace frames (safe from any thread)."""
        self._pacer.wake.set()

    def close(self) -> None:
        """Release the capture (idempotent)."""
        cap, self._cap = self._cap, None
        if cap is not None:
            try:
                cap.release()
            except cv2.error as exc:
                logger.warning("camera %s: release failed: %s", self.spec.display, exc)


class ImageFolderSource:
    """The jpg/png/bmp files of a folder, a glob pattern or a single image, in natural order.

    Replays at ``fps`` (as fast as the consumer takes them when ``None`` or 0), once or in a
    ``loop``. Unreadable files are logged, counted in :attr:`bad_frames` and skipped.
    """

    def __init__(self, spec: SourceSpec | str, *, fps: float | None = None, loop: bool = False) -> None:
        self.spec = spec if isinstance(spec, SourceSpec) else SourceSpec("images", str(spec))
        self.loop = loop
        self.finite = not loop
        self.bad_frames = 0
        self.files: list[Path] = []
        self._next = 0
        self._pacer = _Pacer(fps)
        self._opened = False

    def _list(self) -> list[Path]:
        value = str(self.spec.value)
        if _GLOB_CHARS.search(value):
            found = [Path(p) for p in glob.glob(value)]
            where = f"pattern {value}"
        else:
            path = Path(value)
            if path.is_file():
                return [path]
            if not path.is_dir():
                raise CameraError(f"image folder {path} does not exist (yet); waiting for it to appear")
            found = list(path.iterdir())
            where = f"folder {path}"
        files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not files:
            raise CameraError(
                f"image {where} holds no {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} "
                "files (yet); waiting for some"
            )
        return sorted(files, key=lambda p: natural_key(str(p)))

    def open(self) -> None:
        """List the images; raise :class:`CameraError` when there are none (yet)."""
        self.files = self._list()
        self._next = 0
        self._pacer.reset()
        self._opened = True
        logger.info("camera %s: %d images", self.spec.display, len(self.files))

    def read(self) -> np.ndarray | None:
        """The next readable image, or ``None`` after the last one (never with ``loop``)."""
        if not self._opened:
            raise CameraError(f"image source {self.spec.display}: read before open (or after close)")
        if not self._pacer.wait():
            return None
        good_in_pass = True
        while True:
            if self._next >= len(self.files):
                if not (self.loop and good_in_pass):
                    return None  # a loop over only bad files would spin forever
                self._next = 0
                good_in_pass = False
            path = self.files[self._next]
            self._next += 1
            try:
                image = read_image(path)
            except ImageError as exc:
                self.bad_frames += 1
                logger.warning("camera %s: skipping %s (%d bad so far)", self.spec.display, exc, self.bad_frames)
                continue
            return image

    def interrupt(self) -> None:
        """Wake a read waiting to pace frames (safe from any thread)."""
        self._pacer.wake.set()

    def close(self) -> None:
        """Forget the file list (idempotent); a waiting read returns at once."""
        self._opened = False
        self._pacer.wake.set()


SourceFactory = Callable[[], FrameSource]


def open_source(
    spec: SourceSpec, *, fps: float | None = None, loop: bool = False, timeout_ms: int = 10_000
) -> FrameSource:
    """Create (not open) the :class:`FrameSource` for ``spec``: the one map from kind to class."""
    if spec.kind == "images":
        return ImageFolderSource(spec, fps=fps, loop=loop)
    if spec.kind in ("device", "url", "gstreamer", "video"):
        return OpenCVSource(spec, fps=fps, loop=loop, timeout_ms=timeout_ms)
    raise CameraError(f"unknown camera source kind {spec.kind!r}; expected one of {', '.join(SOURCE_KINDS)}")


# --------------------------------------------------------------------------- capture


class _Worker:
    """One reader thread and what only it owns; a restart abandons it for a fresh one."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.halt = threading.Event()
        self.source: FrameSource | None = None
        self.thread: threading.Thread | None = None
        self.got_frames = False  # in the current session: resets the backoff after a failure


class Capture:
    """Reads a camera source in a thread into a bounded queue of :class:`Frame`.

    ``backpressure`` defaults to the source's ``finite``: files are read completely and in
    order; live cameras drop the oldest queued frame when the consumer is slow.
    ``on_state_change(old, new)`` receives two :class:`CameraState` snapshots, from the
    capture thread, whenever ``state`` changes.

    ``maxsize`` bounds the queue; ``fps`` paces video files and image folders (``None``: as
    fast as the consumer takes them); ``loop`` replays them forever (then they count as
    live); ``backoff`` sets the reconnect delays; ``timeout_ms`` the open/read timeouts of
    network streams; ``drop_log_interval`` how often drops are logged.

    ``camera`` is a ``camera.source`` value (parsed with :func:`parse_source` and opened with
    :func:`open_source`), or a callable returning a fresh, unopened :class:`FrameSource` for
    each (re)connect: the agent passes ``lambda: open_source(spec, ...)``, and a test a fake
    USB camera. ``source`` is the name shown in logs and status (URL passwords are masked).

    Example::

        cap = Capture("parts.mp4")
        cap.start()
        while (frame := cap.get(timeout=1.0)) is not None or cap.state().state != CameraPhase.ENDED:
            ...
        cap.stop()
    """

    def __init__(
        self,
        camera: str | int | SourceSpec | SourceFactory,
        *,
        source: str | None = None,
        maxsize: int = 4,
        backpressure: bool | None = None,
        fps: float | None = None,
        loop: bool = False,
        backoff: Backoff | None = None,
        timeout_ms: int = 10_000,
        drop_log_interval: float = 10.0,
        on_state_change: Callable[[CameraState, CameraState], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.spec: SourceSpec | None
        if isinstance(camera, str | int | SourceSpec):
            spec = camera if isinstance(camera, SourceSpec) else parse_source(camera)
            self.spec = spec
            self._factory: SourceFactory = lambda: open_source(spec, fps=fps, loop=loop, timeout_ms=timeout_ms)
        elif callable(camera):
            self.spec = None
            self._factory = camera
        else:
            raise TypeError(f"camera must be a source value or a callable returning a FrameSource, not {camera!r}")
        if source is not None:
            self._label = redact_url(str(source))
        else:
            self._label = self.spec.display if self.spec is not None else "camera"
        self.maxsize = maxsize
        self.backoff = backoff or Backoff()
        self.drop_log_interval = drop_log_interval
        self.on_state_change = on_state_change
        self._backpressure_cfg = backpressure
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=maxsize)
        self._lock = threading.Lock()  # counters and state
        self._life = threading.Lock()  # start/stop/restart
        self._worker: _Worker | None = None
        self._generation = 0
        self._stopping = False
        now = time.time()
        self._state = CameraPhase.STARTING
        self._since = now
        self._down_since: float | None = None
        self._reconnects = 0
        self._frames = 0
        self._dropped = 0
        self._bad_base = 0  # bad frames of sources already closed
        self._last_error: str | None = None
        self._restarts = 0
        self._recent: deque[float] = deque(maxlen=32)
        self._last_progress = time.monotonic()
        self._drops_unlogged = 0
        self._last_drop_log = 0.0

    # ------------------------------------------------------------------ public

    @property
    def source(self) -> str:
        """The source as shown in logs and status (passwords masked)."""
        return self._label

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` of the last frame, state change, or wait on a full queue."""
        return self._last_progress

    @property
    def restarts(self) -> int:
        """How many times :meth:`restart` replaced the reader thread."""
        return self._restarts

    @property
    def queued(self) -> int:
        """Frames waiting in the queue."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        """Whether a reader thread is alive."""
        worker = self._worker
        return worker is not None and worker.thread is not None and worker.thread.is_alive()

    def start(self) -> None:
        """Start the reader thread (no-op when it runs)."""
        with self._life:
            if self.running:
                return
            self._stopping = False
            with self._lock:
                if self._state == CameraPhase.STOPPED:
                    self._state, self._since = CameraPhase.STARTING, time.time()
            self._spawn()

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop reading, wait up to ``timeout`` s for the thread; True when it has ended."""
        with self._life:
            self._stopping = True
            worker = self._worker
            if worker is not None:
                self._halt(worker)
            joined = self._join(worker, timeout)
        if not joined:
            logger.warning("camera %s: reader still blocked %.1f s after stop; left behind", self.source, timeout)
        self._set_state(CameraPhase.STOPPED, worker=None)
        return joined

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader thread to end; True when it has (or never started)."""
        return self._join(self._worker, timeout)

    def restart(self) -> None:
        """Replace a stuck reader with a fresh one (for the agent's watchdog).

        The old thread is asked to stop; if it is still blocked inside the camera driver after
        a second, its capture is released from here as a last resort (best effort: this is
        what unblocks a hung V4L2 read). Counted in ``restarts``.
        """
        with self._life:
            if self._stopping:
                return
            old = self._worker
            if old is not None:
                self._halt(old)
                if not self._join(old, 1.0) and old.source is not None:
                    logger.warning("camera %s: reader stuck; releasing its capture", self.source)
                    try:
                        old.source.close()
                    except Exception:  # noqa: BLE001 - best effort on a stuck driver
                        logger.exception("camera %s: release of stuck capture failed", self.source)
            with self._lock:
                self._restarts += 1
                self._last_progress = time.monotonic()  # give the new reader a full watchdog period
            logger.warning("camera %s: reader restarted (%d restarts)", self.source, self._restarts)
            self._spawn()

    def get(self, timeout: float | None = 1.0) -> Frame | None:
        """The next frame, or ``None`` when none arrives within ``timeout`` s; sets ``wait_ms``."""
        t0 = time.monotonic()
        try:
            frame = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return replace(frame, wait_ms=(time.monotonic() - t0) * 1000.0)

    def state(self) -> CameraState:
        """A consistent snapshot of the camera's state and counters."""
        with self._lock:
            return self._snapshot()

    # ------------------------------------------------------------------ internals

    def _spawn(self) -> None:
        self._generation += 1
        worker = _Worker(self._generation)
        worker.thread = threading.Thread(
            target=self._run, args=(worker,), name=f"capture-{self._generation}", daemon=True
        )
        self._worker = worker
        worker.thread.start()

    @staticmethod
    def _halt(worker: _Worker) -> None:
        worker.halt.set()
        interrupt = getattr(worker.source, "interrupt", None)
        if callable(interrupt):
            try:
                interrupt()
            except Exception:  # noqa: BLE001 - a fake or broken source must not block stop
                logger.exception("interrupt of camera source failed")

    @staticmethod
    def _join(worker: _Worker | None, timeout: float | None) -> bool:
        if worker is None or worker.thread is None:
            return True
        if worker.thread is not threading.current_thread():
            worker.thread.join(timeout)
        return not worker.thread.is_alive()

    def _snapshot(self) -> CameraState:
        return CameraState(
            state=self._state,
            since=self._since,
            down_since=self._down_since,
            reconnects=self._reconnects,
            frames=self._frames,
            dropped=self._dropped,
            bad_frames=self._bad_base + self._current_bad(),
            last_error=self._last_error,
            source=self.source,
            fps=self._fps(),
            restarts=self._restarts,
        )

    def _current_bad(self) -> int:
        worker = self._worker
        return int(getattr(worker.source, "bad_frames", 0)) if worker is not None else 0

    def _fps(self) -> float:
        recent = self._recent
        if len(recent) < 2 or time.monotonic() - recent[-1] > 2.0:
            return 0.0
        span = recent[-1] - recent[0]
        return (len(recent) - 1) / span if span > 0 else 0.0

    def _set_state(self, new: CameraPhase, *, worker: _Worker | None, error: str | None = None) -> None:
        """Change state; a worker that was replaced by a restart changes nothing."""
        with self._lock:
            if worker is not None and worker is not self._worker:
                return
            if self._state == CameraPhase.STOPPED:  # terminal until start(); a late reader changes nothing
                return
            if error is not None:
                self._last_error = error
            self._last_progress = time.monotonic()
            if new == self._state:
                return
            old = self._snapshot()
            now = time.time()
            self._state = new
            self._since = now
            if new == CameraPhase.DOWN:
                self._down_since = self._down_since or now
            elif new != CameraPhase.STOPPED:
                self._down_since = None
            snap = self._snapshot()
        logger.info("camera %s: %s -> %s%s", self.source, old.state, new, f" ({error})" if error else "")
        if self.on_state_change is not None:
            try:
                self.on_state_change(old, snap)
            except Exception:  # noqa: BLE001 - a faulty callback must not kill the camera
                logger.exception("camera %s: on_state_change callback failed", self.source)

    def _close_source(self, worker: _Worker) -> None:
        with self._lock:
            src, worker.source = worker.source, None
            if src is None:
                return
            if worker is self._worker:
                self._bad_base += int(getattr(src, "bad_frames", 0))
        try:
            src.close()
        except Exception:  # noqa: BLE001
            logger.exception("camera %s: close failed", self.source)

    def _run(self, worker: _Worker) -> None:
        halt = worker.halt
        attempt = 0  # consecutive failures, for the backoff
        first = True
        try:
            while not halt.is_set():
                if not first:
                    with self._lock:
                        if worker is self._worker:
                            self._reconnects += 1
                first = False
                try:
                    outcome = self._session(worker)
                except Exception as exc:  # noqa: BLE001 - the reader must survive anything
                    if not isinstance(exc, CameraError):
                        logger.exception("camera %s: unexpected error", self.source)
                    self._close_source(worker)
                    if halt.is_set():
                        break
                    if worker.got_frames:  # it worked for a while: start the backoff over
                        attempt = 0
                    delay = self.backoff.delay(attempt)
                    attempt += 1
                    self._set_state(CameraPhase.DOWN, worker=worker, error=str(exc))
                    logger.warning("camera %s: %s; retry in %.1f s", self.source, exc, delay)
                    halt.wait(delay)
                    continue
                self._close_source(worker)
                if outcome == "ended" and not halt.is_set():
                    self._set_state(CameraPhase.ENDED, worker=worker)
                    while not halt.wait(0.2):  # idle until stopped; the agent keeps running
                        pass
                break
        finally:
            self._close_source(worker)
            if self._stopping and worker is self._worker:
                self._set_state(CameraPhase.STOPPED, worker=worker)

    def _session(self, worker: _Worker) -> str:
        """Open the source and pump frames until it ends ('ended') or we are halted ('halted')."""
        halt = worker.halt
        src = self._factory()
        worker.source = src
        src.open()
        if halt.is_set():
            return "halted"
        self._set_state(CameraPhase.UP, worker=worker)
        backpressure = self._backpressure_cfg if self._backpressure_cfg is not None else src.finite
        worker.got_frames = False
        while not halt.is_set():
            t0 = time.monotonic()
            image = src.read()
            ts = time.time()  # after the read: pacing waits are not part of a decision's latency
            if image is None:
                if halt.is_set():
                    return "halted"
                if src.finite:
                    return "ended"
                raise CameraError(f"camera {self.source}: source returned no frame; reconnecting")
            worker.got_frames = True
            grab_ms = (time.monotonic() - t0) * 1000.0
            if not self._enqueue(worker, image, ts, grab_ms, backpressure):
                return "halted"
        return "halted"

    def _enqueue(self, worker: _Worker, image: np.ndarray, ts: float, grab_ms: float, block: bool) -> bool:
        """Queue one frame; False when halted while waiting for room (the frame is discarded)."""
        with self._lock:
            if worker is not self._worker:
                return False
            frame = Frame(image=image, index=self._frames, ts=ts, source=self.source, grab_ms=grab_ms)
            self._frames += 1
            now = time.monotonic()
            self._recent.append(now)
            self._last_progress = now
        if block:
            while True:
                try:
                    self._queue.put(frame, timeout=0.2)
                    return True
                except queue.Full:
                    # Waiting on the consumer is not a stuck camera: keep the watchdog calm.
                    self._last_progress = time.monotonic()
                    if worker.halt.is_set():
                        # Read but never handed over: count it so frames = taken + dropped + queued.
                        self._count_drops(1, log=False)
                        return False
        dropped_now = 0
        while True:
            try:
                self._queue.put_nowait(frame)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    dropped_now += 1
                except queue.Empty:
                    pass
        if dropped_now:
            self._count_drops(dropped_now)
        return True

    def _count_drops(self, n: int, *, log: bool = True) -> None:
        with self._lock:
            self._dropped += n
            if not log:
                return
            self._drops_unlogged += n
            now = time.monotonic()
            if now - self._last_drop_log < self.drop_log_interval:
                return
            count, self._drops_unlogged, self._last_drop_log = self._drops_unlogged, 0, now
            total = self._dropped
        logger.warning(
            "camera %s: dropped %d oldest frames (consumer slower than the camera; %d in total)",
            self.source, count, total,
        )
