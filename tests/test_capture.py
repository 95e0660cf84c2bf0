"""edge.capture on real OpenCV: generated videos and image folders, a closed RTSP port,
and fake USB cameras (the one piece of hardware a test machine cannot have)."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.backoff import Backoff
from edge.capture import (
    CameraState,
    Capture,
    Frame,
    FrameSource,
    ImageFolderSource,
    OpenCVSource,
    SourceSpec,
    natural_key,
    open_source,
    parse_source,
    redact_url,
    validate_source,
)
from edge.exceptions import CameraError
from tests import helpers
from tests.helpers import free_port

# The fake cameras are quick: poll often and give up soon.
wait_for = functools.partial(helpers.wait_for, timeout=5.0, interval=0.01)
FAST = Backoff(initial=0.02, factor=2.0, maximum=0.1, jitter=0.1)
W, H, BITS = 128, 32, 8


# --------------------------------------------------------------------------- helpers


def encode(i: int) -> np.ndarray:
    """A BGR frame whose 8 vertical bands spell ``i`` in binary: survives MJPG compression."""
    img = np.zeros((H, W, 3), np.uint8)
    band = W // BITS
    for bit in range(BITS):
        if i >> bit & 1:
            img[:, bit * band : (bit + 1) * band] = 255
    return img


def decode(img: np.ndarray) -> int:
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    band = W // BITS
    value = 0
    for bit in range(BITS):
        # The band's centre avoids the blur MJPG puts on the edges between bands.
        if gray[:, bit * band + 3 : (bit + 1) * band - 3].mean() > 127:
            value |= 1 << bit
    return value


def write_numbered_video(path: Path, n: int, fps: float = 25.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (W, H))
    assert writer.isOpened(), "this OpenCV build cannot write MJPG .avi"
    for i in range(n):
        writer.write(encode(i))
    writer.release()
    return path


def write_numbered_images(folder: Path, indices: list[int], name: str = "img{}.png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        path = folder / name.format(i)
        assert cv2.imwrite(str(path), encode(i))
        paths.append(path)
    return paths


def drain(cap: Capture, until: str = "ended", timeout: float = 10.0, delay: float = 0.0) -> list[Frame]:
    """Take frames until the camera reaches ``until`` with an empty queue."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = cap.get(timeout=0.05)
        if frame is not None:
            frames.append(frame)
            if delay:
                time.sleep(delay)
            continue
        if cap.state().state == until and cap.queued == 0:
            return frames
    raise AssertionError(f"camera never reached {until!r}: {cap.state()}")


class Transitions:
    """Records on_state_change calls as 'old->new'."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.threads: set[str] = set()

    def __call__(self, old: CameraState, new: CameraState) -> None:
        self.seen.append(f"{old.state}->{new.state}")
        self.threads.add(threading.current_thread().name)


@pytest.fixture
def captures() -> object:
    """Stops every Capture a test made, even when it fails."""
    made: list[Capture] = []
    yield made
    for cap in made:
        cap.stop(timeout=2.0)


# --------------------------------------------------------------------------- fake USB cameras


class FastCamera:
    """A live camera faster than any consumer: a new frame on every read, no sleep."""

    finite = False

    def __init__(self) -> None:
        self.produced = 0

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        self.produced += 1
        return np.full((4, 4), self.produced % 256, np.uint8)

    def close(self) -> None:
        pass


class FlakyCamera:
    """Scripted live camera: ``frames`` reads then a failure (None = works forever);
    ``open_fails`` simulates an unplugged camera."""

    finite = False

    def __init__(self, frames: int | None, open_fails: bool = False) -> None:
        self.frames, self.open_fails, self.n = frames, open_fails, 0

    def open(self) -> None:
        if self.open_fails:
            raise CameraError("fake camera: unplugged")

    def read(self) -> np.ndarray:
        if self.frames is not None and self.n >= self.frames:
            raise CameraError("fake camera: read failed")
        self.n += 1
        time.sleep(0.002)
        return np.zeros((4, 4), np.uint8)

    def close(self) -> None:
        pass


class HangingCamera:
    """A camera whose driver hangs after ``frames`` reads until the capture is released."""

    finite = False

    def __init__(self, frames: int) -> None:
        self.frames, self.n = frames, 0
        self.released = threading.Event()
        self.hanging = threading.Event()

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        if self.n >= self.frames:
            self.hanging.set()
            self.released.wait(30)
            raise CameraError("fake camera: released while hung")
        self.n += 1
        return np.zeros((4, 4), np.uint8)

    def close(self) -> None:
        self.released.set()


def scripted(*cameras: FrameSource) -> Callable[[], FrameSource]:
    """A source factory handing out ``cameras`` in order (the last one again after that)."""
    queue = list(cameras)

    def factory() -> FrameSource:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return factory


# --------------------------------------------------------------------------- parse_source


@pytest.mark.parametrize(
    ("source", "kind", "value"),
    [
        (0, "device", 0),
        (2, "device", 2),
        ("1", "device", 1),
        (" 3 ", "device", 3),
        ("/dev/video0", "device", "/dev/video0"),
        ("/dev/v4l/by-id/usb-cam-video-index0", "device", "/dev/v4l/by-id/usb-cam-video-index0"),
        ("rtsp://10.0.0.5:554/stream1", "url", "rtsp://10.0.0.5:554/stream1"),
        ("rtsps://cam.local/s", "url", "rtsps://cam.local/s"),
        ("http://cam.local/video.mjpg", "url", "http://cam.local/video.mjpg"),
        ("HTTPS://cam.local/video", "url", "HTTPS://cam.local/video"),
        (
            "rtspsrc location=rtsp://cam/s ! decodebin ! videoconvert ! appsink",
            "gstreamer",
            "rtspsrc location=rtsp://cam/s ! decodebin ! videoconvert ! appsink",
        ),
        ("parts.mp4", "video", "parts.mp4"),
        ("/data/line1.AVI", "video", "/data/line1.AVI"),
        ("clip.mkv", "video", "clip.mkv"),
        ("clip.mov", "video", "clip.mov"),
        ("clip.webm", "video", "clip.webm"),
        ("shots/*.png", "images", "shots/*.png"),
        ("shots/img?.jpg", "images", "shots/img?.jpg"),
        ("shots/[ab]*.bmp", "images", "shots/[ab]*.bmp"),
        ("single.jpg", "images", "single.jpg"),
        ("incoming", "images", "incoming"),  # a folder that does not exist yet
    ],
)
def test_parse_source_kinds(source: str | int, kind: str, value: str | int) -> None:
    assert parse_source(source) == SourceSpec(kind, value)
    assert validate_source(source) is None or kind == "gstreamer"


def test_parse_source_existing_folder_and_base_dir(tmp_path: Path) -> None:
    (tmp_path / "frames.d").mkdir()
    assert parse_source(str(tmp_path / "frames.d")) == SourceSpec("images", str(tmp_path / "frames.d"))
    assert parse_source("parts.mp4", base_dir=tmp_path) == SourceSpec("video", str(tmp_path / "parts.mp4"))
    assert parse_source("rtsp://h/x", base_dir=tmp_path).value == "rtsp://h/x"


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (-1, "negative"),
        (True, "device index"),
        ("ftp://host/file.mp4", "unsupported URL scheme"),
        ("notes.txt", "check the path"),
    ],
)
def test_parse_source_errors_say_what_to_do(source: object, words: str) -> None:
    with pytest.raises(CameraError, match=words):
        parse_source(source)  # type: ignore[arg-type]
    message = validate_source(source)  # type: ignore[arg-type]
    assert message is not None and words in message


def test_gstreamer_needs_a_gstreamer_build() -> None:
    message = validate_source("videotestsrc ! appsink")
    has_gst = cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER)
    assert (message is None) == has_gst
    if message:
        assert "GStreamer" in message


def test_url_passwords_never_shown() -> None:
    url = "rtsp://admin:hunter2@10.0.0.5:554/s"
    spec = parse_source(url)
    assert spec.display == "rtsp://admin:***@10.0.0.5:554/s"
    assert "hunter2" not in Capture(spec).state().source
    assert "hunter2" not in Capture(lambda: open_source(spec), source=url).source
    pipeline = parse_source(f"rtspsrc location={url} ! decodebin ! appsink")
    assert "hunter2" not in pipeline.display
    assert redact_url("rtsp://10.0.0.5:554/s") == "rtsp://10.0.0.5:554/s"
    assert redact_url("/data/a:b@c.mp4") == "/data/a:b@c.mp4"


def test_natural_sort() -> None:
    names = ["img10.png", "img2.png", "IMG1.png", "img1b.png"]
    assert sorted(names, key=natural_key) == ["IMG1.png", "img1b.png", "img2.png", "img10.png"]


def test_factory_maps_kinds_to_classes(tmp_path: Path) -> None:
    assert isinstance(open_source(parse_source(str(tmp_path))), ImageFolderSource)
    for source in (0, "rtsp://h/x", str(tmp_path / "v.avi")):
        assert isinstance(open_source(parse_source(source)), OpenCVSource)
    assert open_source(parse_source(str(tmp_path / "v.avi"))).finite
    assert not open_source(parse_source(str(tmp_path / "v.avi")), loop=True).finite
    assert not open_source(parse_source(0)).finite


# --------------------------------------------------------------------------- files


def test_video_every_frame_once_in_order_with_slow_consumer(tmp_path: Path, captures: list) -> None:
    video = write_numbered_video(tmp_path / "parts.avi", 60)
    seen = Transitions()
    cap = Capture(str(video), maxsize=2, on_state_change=seen)
    captures.append(cap)
    cap.start()
    frames = drain(cap, delay=0.003)  # slower than the reader: it must wait, not drop

    assert [decode(f.image) for f in frames] == list(range(60))
    assert [f.index for f in frames] == list(range(60))
    assert all(f.image.dtype == np.uint8 and f.image.shape == (H, W, 3) for f in frames)
    assert all(f.source == str(video) and f.grab_ms >= 0 and f.wait_ms >= 0 for f in frames)
    assert all(a.ts <= b.ts for a, b in zip(frames, frames[1:], strict=False))
    st = cap.state()
    assert (st.state, st.frames, st.dropped, st.reconnects) == ("ended", 60, 0, 0)
    assert seen.seen == ["starting->up", "up->ended"]
    assert seen.threads == {"capture-1"}  # called from the capture thread
    assert cap.running  # an ended file leaves the reader idling, not dead
    assert cap.stop()
    assert cap.state().state == "stopped"
    assert seen.seen[-1] == "ended->stopped"


def test_factory_callable_form_as_the_agent_uses_it(tmp_path: Path, captures: list) -> None:
    spec = parse_source(str(write_numbered_video(tmp_path / "v.avi", 8)))
    cap = Capture(lambda: open_source(spec), source="line camera", backpressure=True, maxsize=1)
    captures.append(cap)
    cap.start()
    frames = drain(cap, delay=0.01)
    assert [decode(f.image) for f in frames] == list(range(8))
    assert cap.state().source == "line camera" and cap.state().dropped == 0


def test_image_folder_natural_order_and_bad_files_skipped(tmp_path: Path, captures: list) -> None:
    folder = tmp_path / "shots"
    write_numbered_images(folder, [1, 2, 3, 9, 10, 11, 20])
    (folder / "img5.png").write_bytes(b"not a png at all")  # corrupt: counted and skipped
    (folder / "img12.jpg").write_bytes(b"")  # empty file
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    cap = Capture(str(folder), maxsize=2)
    captures.append(cap)
    cap.start()
    frames = drain(cap)

    assert [decode(f.image) for f in frames] == [1, 2, 3, 9, 10, 11, 20]
    assert [f.index for f in frames] == list(range(7))
    st = cap.state()
    assert (st.state, st.frames, st.bad_frames, st.dropped) == ("ended", 7, 2, 0)


def test_glob_source_selects_matching_images(tmp_path: Path, captures: list) -> None:
    folder = tmp_path / "mixed"
    write_numbered_images(folder, [3, 1, 12], name="a{}.png")
    write_numbered_images(folder, [2], name="b{}.png")
    write_numbered_images(folder, [4], name="a{}.bmp")
    cap = Capture(str(folder / "a*.png"))
    captures.append(cap)
    cap.start()
    assert [decode(f.image) for f in drain(cap)] == [1, 3, 12]


def test_single_image_source(tmp_path: Path, captures: list) -> None:
    (path,) = write_numbered_images(tmp_path, [7])
    cap = Capture(str(path))
    captures.append(cap)
    cap.start()
    assert [decode(f.image) for f in drain(cap)] == [7]


def test_image_folder_replay_is_paced_by_fps(tmp_path: Path, captures: list) -> None:
    write_numbered_images(tmp_path / "f", list(range(10)))
    cap = Capture(str(tmp_path / "f"), fps=20, maxsize=16)
    captures.append(cap)
    t0 = time.monotonic()
    cap.start()
    frames = drain(cap)
    elapsed = time.monotonic() - t0
    assert len(frames) == 10
    assert elapsed >= 0.35  # 9 intervals of 50 ms; loose on purpose (no tight timings)
    assert frames[-1].ts - frames[0].ts >= 0.35


def test_image_folder_loop_replays(tmp_path: Path) -> None:
    write_numbered_images(tmp_path, [1, 2])
    src = ImageFolderSource(parse_source(str(tmp_path)), loop=True)
    assert not src.finite
    src.open()
    assert [decode(src.read()) for _ in range(5)] == [1, 2, 1, 2, 1]  # type: ignore[arg-type]
    src.close()


# --------------------------------------------------------------------------- failures


def test_missing_video_is_retried_until_it_appears(tmp_path: Path, captures: list) -> None:
    path = tmp_path / "later.avi"
    seen = Transitions()
    cap = Capture(str(path), backoff=FAST, on_state_change=seen)
    captures.append(cap)
    cap.start()
    wait_for(lambda: cap.state().reconnects >= 2)
    st = cap.state()
    assert st.state == "down" and st.down_since is not None
    assert st.last_error and "does not exist" in st.last_error

    # Appear atomically, as a copy or an upload would finish: write elsewhere, then rename.
    write_numbered_video(tmp_path / "later.partial.avi", 12)
    os.replace(tmp_path / "later.partial.avi", path)
    frames = drain(cap)
    assert [decode(f.image) for f in frames] == list(range(12))
    st = cap.state()
    assert st.state == "ended" and st.down_since is None
    assert seen.seen == ["starting->down", "down->up", "up->ended"]


def test_missing_image_folder_is_retried_until_it_has_images(tmp_path: Path, captures: list) -> None:
    folder = tmp_path / "incoming"
    cap = Capture(str(folder), backoff=FAST)
    captures.append(cap)
    cap.start()
    wait_for(lambda: cap.state().reconnects >= 1)
    folder.mkdir()
    wait_for(lambda: cap.state().reconnects >= 3)  # empty folder: still waiting
    assert cap.state().state == "down" and "no " in (cap.state().last_error or "")
    write_numbered_images(tmp_path / "staging", [5, 6])
    for p in sorted((tmp_path / "staging").iterdir()):
        os.replace(p, folder / p.name)
    assert [decode(f.image) for f in drain(cap)] == [5, 6]


def test_bad_url_stays_down_and_is_retried(captures: list) -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/x"  # nothing listens: connection refused
    cap = Capture(url, backoff=FAST, timeout_ms=1000)
    captures.append(cap)
    cap.start()
    wait_for(lambda: cap.state().reconnects >= 3, timeout=10)
    st = cap.state()
    assert st.state == "down" and st.frames == 0
    assert st.last_error and "cannot open" in st.last_error
    assert cap.running  # the failure never escaped the thread
    assert cap.stop()


def test_live_camera_failure_reconnects_and_keeps_counting(captures: list) -> None:
    seen = Transitions()
    factory = scripted(FlakyCamera(5), FlakyCamera(None, open_fails=True), FlakyCamera(None))
    cap = Capture(factory, source="usb-cam", backoff=FAST, maxsize=64, on_state_change=seen)
    captures.append(cap)
    cap.start()
    frames: list[Frame] = []

    def took_15() -> bool:
        frame = cap.get(0.01)
        if frame is not None:
            frames.append(frame)
        return len(frames) >= 15

    wait_for(took_15)
    assert [f.index for f in frames] == list(range(len(frames)))  # one numbering across reconnects
    st = cap.state()
    assert st.state == "up" and st.reconnects == 2 and st.last_error == "fake camera: unplugged"
    assert st.source == "usb-cam" and frames[0].source == "usb-cam"
    assert seen.seen == ["starting->up", "up->down", "down->up"]
    assert st.fps > 0


def test_callback_errors_do_not_kill_the_camera(tmp_path: Path, captures: list) -> None:
    def broken(old: CameraState, new: CameraState) -> None:
        raise RuntimeError("bug in the agent's callback")

    cap = Capture(str(write_numbered_video(tmp_path / "v.avi", 5)), on_state_change=broken)
    captures.append(cap)
    cap.start()
    assert len(drain(cap)) == 5


# --------------------------------------------------------------------------- live dropping


def test_live_source_drops_oldest_and_accounts_for_every_frame(captures: list) -> None:
    camera = FastCamera()
    cap = Capture(lambda: camera, maxsize=4, drop_log_interval=0.1)
    captures.append(cap)
    cap.start()
    taken: list[Frame] = []
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        frame = cap.get(timeout=0.1)
        if frame is not None:
            taken.append(frame)
        time.sleep(0.02)  # a slow consumer
    assert cap.stop()
    st = cap.state()
    assert st.dropped > 0
    assert st.frames == camera.produced
    assert len(taken) + st.dropped + cap.queued == camera.produced
    indices = [f.index for f in taken]
    assert indices == sorted(set(indices))
    assert indices[-1] - indices[0] > len(indices)  # the consumer saw recent frames, not a backlog


# --------------------------------------------------------------------------- stop and restart


def _stops_fast(cap: Capture) -> None:
    t0 = time.monotonic()
    assert cap.stop(timeout=2.0), "reader thread did not end"
    assert time.monotonic() - t0 < 1.0
    assert not cap.running and cap.join(0) and cap.state().state == "stopped"


def test_stop_when_up_and_blocked_on_a_full_queue(tmp_path: Path) -> None:
    cap = Capture(str(write_numbered_video(tmp_path / "v.avi", 30)), maxsize=1)
    cap.start()
    wait_for(lambda: cap.state().frames == 2)  # one queued, one waiting for room
    time.sleep(0.1)
    assert cap.state().state == "up" and cap.state().frames == 2
    _stops_fast(cap)
    st = cap.state()
    assert st.frames == st.dropped + cap.queued == 2


def test_stop_when_down_in_a_long_backoff(tmp_path: Path) -> None:
    cap = Capture(str(tmp_path / "never.avi"), backoff=Backoff(initial=30.0, maximum=30.0))
    cap.start()
    wait_for(lambda: cap.state().state == "down")
    _stops_fast(cap)


def test_stop_when_ended(tmp_path: Path) -> None:
    cap = Capture(str(write_numbered_video(tmp_path / "v.avi", 3)))
    cap.start()
    drain(cap)
    _stops_fast(cap)


def test_stop_during_slow_fps_pacing(tmp_path: Path) -> None:
    write_numbered_images(tmp_path, [1, 2, 3])
    cap = Capture(str(tmp_path), fps=0.2)  # 5 s between frames
    cap.start()
    assert cap.get(timeout=2.0) is not None
    _stops_fast(cap)


def test_stop_before_start_and_twice() -> None:
    cap = Capture("rtsp://127.0.0.1:9/x")
    assert cap.stop() and cap.state().state == "stopped"
    assert cap.stop()


def test_restart_replaces_a_hung_reader(captures: list) -> None:
    hung = HangingCamera(frames=3)
    cap = Capture(scripted(hung, FlakyCamera(None)), maxsize=8)
    captures.append(cap)
    cap.start()
    assert hung.hanging.wait(5)
    before = [cap.get(0.5) for _ in range(3)]
    assert [f.index for f in before if f is not None] == [0, 1, 2]
    stalled_since = cap.last_progress
    time.sleep(0.2)
    assert cap.last_progress == stalled_since and cap.state().state == "up"  # what the watchdog sees

    cap.restart()  # the old reader stays hung past the grace period: its capture is released
    assert hung.released.is_set()
    after = cap.get(2.0)
    assert after is not None and after.index == 3
    assert cap.restarts == cap.state().restarts == 1
    assert cap.last_progress > stalled_since
    assert cap.state().state == "up"
