"""Helpers shared by the cloud CLI modules (cloud/cli.py, cloud/ota_cli.py): config loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge.cli import fail

CONFIG_HELP = "Cloud TOML file (default: ./cloud.toml if present, else built-in defaults)."


def load_config_or_fail(config_file: Path | None) -> Any:
    """The cloud config, or a one-line CLI error that says what is wrong."""
    from cloud.config import load_cloud_config
    from edge.exceptions import LinewatchError

    try:
        return load_cloud_config(config_file)
    except LinewatchError as exc:
        raise fail(exc) from exc


def config_option(fn: Any) -> Any:
    """The ``--config`` option every cloud command takes."""
    return click.option("--config", "config_file", type=click.Path(path_type=Path), help=CONFIG_HELP)(fn)
