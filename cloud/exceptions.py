"""Errors raised by the cloud package.

Every message says what is wrong and what to do next; ``cloud/cli.py`` turns them into a
one-line ``click.ClickException``, never a traceback.

    LinewatchError                      (edge.exceptions)
     └── CloudError
          ├── CloudConfigError          cloud config file missing, unparsable or invalid
          ├── StoreError                the cloud store cannot be opened or written
          └── PayloadRejected           an MQTT payload failed validation (ingest counts it)
"""

from __future__ import annotations

from edge.exceptions import LinewatchError


class CloudError(LinewatchError):
    """Base class of the cloud's own errors."""


class CloudConfigError(CloudError):
    """The cloud configuration is missing, unparsable or invalid."""


class StoreError(CloudError):
    """The cloud store cannot be opened, migrated or written."""


class PayloadRejected(CloudError):
    """A message failed validation; ``reason`` is the counter it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
