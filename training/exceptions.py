"""Errors raised by the training package.

They derive from :class:`edge.exceptions.LinewatchError`, so ``linewatch train`` turns
every one of them into a one-line message (exit code 1, no traceback). Each message
says what is wrong and what to do next.

    LinewatchError                  (edge.exceptions)
     └── TrainingError              anything the trainer refuses to do
          ├── DataError             DATA_DIR missing, empty, one class, too few images,
          │                         wrong --pass-label, nothing readable
          ├── ExportError           the TFLite converter failed or gave a non-int8 model
          └── QuantizationGateError int8 lost too much balanced accuracy against float
"""

from __future__ import annotations

from edge.exceptions import LinewatchError


class TrainingError(LinewatchError):
    """Base class of the trainer's own errors."""


class DataError(TrainingError):
    """The dataset folder cannot be trained on as it is."""


class ExportError(TrainingError):
    """Converting the Keras model to a full-integer TFLite model failed."""


class QuantizationGateError(TrainingError):
    """The int8 model is too much worse than the float model (see ``--allow-quantization-drop``)."""


__all__ = ["DataError", "ExportError", "QuantizationGateError", "TrainingError"]
