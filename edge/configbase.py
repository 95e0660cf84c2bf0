"""What the agent's and the cloud's config files share: sections, the broker, loading, errors.

Both files are TOML validated by pydantic models built on :class:`Section` (unknown keys
are errors, values are frozen). Both connect to the broker with the fields of
:class:`BrokerConfig`. Relative paths are made absolute against the config file's folder
(:func:`resolve_paths`) before validation, and every problem is reported as a
``key.path = value: message`` line (:func:`format_errors`), never as a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is the same parser (it became tomllib)
    import tomli as tomllib

SectionT = TypeVar("SectionT", bound=BaseModel)


class Section(BaseModel):
    """A config table: unknown keys are errors (a typo never falls back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(Section):
    """How to reach the MQTT broker; the password comes from the environment only."""

    password_env: ClassVar[str]  # the variable the password is read from

    host: str = Field(default="127.0.0.1", description="broker host")
    port: int = Field(default=1883, ge=1, le=65535, description="broker port")
    topic_prefix: str = Field(
        default="linewatch",
        pattern=r"^[A-Za-z0-9_/-]+$",
        description="the same on the agents and the cloud",
    )
    username: str | None = Field(
        default=None, description="the password comes from the environment"
    )
    tls: bool = Field(default=False, description="connect with TLS")
    ca_file: Path | None = Field(default=None, description="CA bundle for the broker's certificate")
    cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="client key (mutual TLS)")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive")

    @property
    def password(self) -> str | None:
        """From the environment only, never from the file."""
        return os.environ.get(self.password_env)

    @staticmethod
    def resolve_file_paths(raw: Any, base: Path) -> None:
        """Make the TLS file paths of a raw ``[mqtt]`` table absolute against ``base``."""
        resolve_paths(raw, ("ca_file", "cert_file", "key_file"), base)


def resolve_paths(section: Any, keys: Iterable[str], base: Path) -> None:
    """Make the relative paths under ``keys`` of a raw config table absolute against ``base``."""
    if not isinstance(section, dict):
        return  # not a table: validation says so
    for key in keys:
        value = section.get(key)
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            section[key] = str(p if p.is_absolute() else base / p)


def read_toml(path: Path, error: type[Exception], *, missing: str) -> dict[str, Any]:
    """The top table of a TOML file; ``error`` says in one line what is wrong and how to fix it.

    ``missing`` is what to do when there is no such file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(f"{path}: no such file; {missing}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read it ({exc})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc}); fix the syntax at that line") from exc


def format_errors(exc: ValidationError, source: str, example: str) -> str:
    """pydantic errors as 'key.path = value: message' lines, Frigate-style."""
    from edge.capture import redact_url  # camera URLs may hold a password: never print it

    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (typo? see {example})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        value = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f" = {value!r}"
        lines.append(redact_url(f"  {loc}{shown}: {msg}"))
    return "\n".join(lines)


def validate(
    model: type[SectionT], raw: dict[str, Any], *, source: str, error: type[Exception], example: str
) -> SectionT:
    """``raw`` as a ``model``; ``error`` lists every problem (see :func:`format_errors`)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(format_errors(exc, source, example)) from exc


__all__ = [
    "BrokerConfig",
    "Section",
    "format_errors",
    "read_toml",
    "resolve_paths",
    "validate",
]
