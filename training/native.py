"""Keep what native runtimes print on their own out of the command's output.

TensorFlow's converter and the TFLite interpreters write straight to file descriptors 1
and 2 ("fully_quantize: ...", "Created TensorFlow Lite XNNPACK delegate for CPU."), which
no Python logging setting reaches. No TensorFlow import here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_native_output() -> Iterator[list[str]]:
    """Silence what the converter and the interpreters print from C++ on stdout/stderr.

    They write straight to file descriptors 1 and 2 ("fully_quantize: ...", "Created
    TensorFlow Lite XNNPACK delegate", MLIR notes), which no Python logging setting reaches.
    The captured text is yielded (filled on exit) so a failure can still show it.
    """
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def import_quietly(name: str) -> None:
    """Import ``name`` (e.g. "tensorflow") without the lines its native libraries print as
    they load (TensorFlow: absl's "All log messages before absl::InitializeLog()" and
    oneDNN's notice, twice, whatever TF_CPP_MIN_LOG_LEVEL says). A failing import shows them."""
    try:
        with quiet_native_output() as captured:
            importlib.import_module(name)
    except BaseException:
        sys.stderr.write("".join(captured))
        raise


__all__ = ["import_quietly", "quiet_native_output"]
