"""Helpers shared by the cloud CLI modules (cloud/cli.py, cloud/ota_cli.py, cloud/drift_cli.py).

Errors need no handling here: the ``linewatch`` groups (``edge.cli.LinewatchGroup``)
turn every :class:`~edge.exceptions.LinewatchError` into a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge.cli import config_option as _config_option

CONFIG_HELP = "Cloud TOML file (default: ./cloud.toml if present, else built-in defaults)."

# The ``--config`` option every cloud command takes (``cloud serve`` requires it).
config_option = _config_option(CONFIG_HELP)
required_config_option = _config_option("Cloud TOML file.", required=True)


def load_config(config_file: Path | None) -> Any:
    """The cloud config ``--config`` names (imported only when a command runs)."""
    from cloud.config import load_cloud_config

    return load_cloud_config(config_file)


def open_readonly_store(config: Any) -> Any:
    """The cloud store, read-only, for the commands that show what it holds."""
    from cloud.store import open_store

    return open_store(config, readonly=True)
