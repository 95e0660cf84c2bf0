"""Named states whose values are the strings status, JSON and MQTT messages carry."""

from __future__ import annotations

from enum import Enum


class TextEnum(str, Enum):
    """An enum of strings that prints, formats, compares and serialises as its value.

    ``str()`` and f-strings give the value (``"golden"``, not ``"InstallStage.GOLDEN"``),
    members equal their values, and ``json.dumps`` and pydantic write the plain string, so
    output is the same as with the string itself. What ``enum.StrEnum`` does on 3.11+,
    also on Python 3.10.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)
