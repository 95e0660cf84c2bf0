"""Errors raised by the edge package.

Every message says what is wrong and what to do next; the CLI turns them into a
one-line error with a non-zero exit code, never a traceback.

    LinewatchError
     ├── ConfigError            agent config file missing, unparsable or invalid
     ├── BundleError            model bundle missing files or with a bad manifest
     │    └── ChecksumMismatch  model file does not match the manifest's sha256
     ├── RuntimeUnavailable     no TFLite runtime (LiteRT, tflite-runtime, tf.lite) importable
     ├── ModelLoadError         the runtime refused the model file
     ├── ImageError             an image file cannot be read or decoded
     ├── CameraError            a camera source cannot be opened
     └── BufferStoreError       the local SQLite buffer cannot be used
"""

from __future__ import annotations


class LinewatchError(Exception):
    """Base class of every error Linewatch raises on purpose."""


class ConfigError(LinewatchError):
    """The agent configuration is missing, unparsable or invalid."""


class BundleError(LinewatchError):
    """A model bundle is incomplete or its manifest is invalid."""


class ChecksumMismatch(BundleError):
    """The model file's sha256 differs from the one in the manifest."""


class RuntimeUnavailable(LinewatchError):
    """No TFLite interpreter can be imported."""


class ModelLoadError(LinewatchError):
    """The interpreter could not load or run the model file."""


class ImageError(LinewatchError):
    """An image file cannot be read or decoded."""


class CameraError(LinewatchError):
    """A camera source cannot be opened or has failed."""


class BufferStoreError(LinewatchError):
    """The local SQLite buffer cannot be opened or written."""
