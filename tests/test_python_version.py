"""The oldest Python the project promises is the one its code is written for.

pyproject's ``requires-python`` is the promise. These tests check that the README, the
Makefile, ruff and mypy state the same version, that every module parses with that
version's grammar, and that no module uses a standard-library name added after it
(``tomllib`` included) unless the use is guarded by a version check or an ImportError
fallback. mypy (``make lint``, checking as that version) covers methods these tests cannot
see, such as ``Path.walk``.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is the same parser (it became tomllib)
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("edge", "cloud", "training", "tests", "benchmarks")

# Standard-library modules and names, with the Python version that added them.
NEW_MODULES: dict[str, tuple[int, int]] = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}
NEW_NAMES: dict[tuple[str, str], tuple[int, int]] = {
    **{("builtins", n): (3, 11) for n in ("ExceptionGroup", "BaseExceptionGroup")},
    ("datetime", "UTC"): (3, 11),
    **{
        ("enum", n): (3, 11)
        for n in (
            "StrEnum",
            "ReprEnum",
            "EnumCheck",
            "FlagBoundary",
            "verify",
            "member",
            "nonmember",
            "global_enum",
            "show_flag_values",
        )
    },
    **{
        ("typing", n): (3, 11)
        for n in (
            "Self",
            "LiteralString",
            "Never",
            "assert_never",
            "assert_type",
            "reveal_type",
            "dataclass_transform",
            "NotRequired",
            "Required",
            "TypeVarTuple",
            "Unpack",
            "get_overloads",
            "clear_overloads",
        )
    },
    **{("typing", n): (3, 12) for n in ("override", "TypeAliasType")},
    **{("typing", n): (3, 13) for n in ("ReadOnly", "TypeIs", "NoDefault")},
    **{
        ("asyncio", n): (3, 11) for n in ("TaskGroup", "timeout", "timeout_at", "Runner", "Barrier")
    },
    ("hashlib", "file_digest"): (3, 11),
    ("contextlib", "chdir"): (3, 11),
    ("operator", "call"): (3, 11),
    ("logging", "getLevelNamesMapping"): (3, 11),
    ("math", "exp2"): (3, 11),
    ("math", "cbrt"): (3, 11),
    ("re", "NOFLAG"): (3, 11),
    ("sqlite3", "Blob"): (3, 11),
    ("inspect", "getmembers_static"): (3, 11),
    ("inspect", "markcoroutinefunction"): (3, 12),
    ("itertools", "batched"): (3, 12),
    ("warnings", "deprecated"): (3, 13),
    ("copy", "replace"): (3, 13),
}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def oldest_python() -> tuple[int, int]:
    """The version ``requires-python = ">=X.Y"`` names."""
    spec = _pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m, f"requires-python {spec!r}: expected the form '>=X.Y'"
    return int(m[1]), int(m[2])


def _sources() -> Iterator[Path]:
    for folder in SOURCE_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def _guard_version(test: ast.expr) -> tuple[int, int] | None:
    """``sys.version_info >= (3, 11)`` -> (3, 11); anything else -> None."""
    if (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.GtE)
        and ast.unparse(test.left) == "sys.version_info"
        and isinstance(test.comparators[0], ast.Tuple)
    ):
        try:
            version = ast.literal_eval(test.comparators[0])
        except ValueError:
            return None
        return (version[0], version[1]) if len(version) >= 2 else None
    return None


class _NewNames(ast.NodeVisitor):
    """Collects uses of names newer than ``oldest`` outside a version or ImportError guard."""

    def __init__(self, oldest: tuple[int, int]) -> None:
        self.oldest = oldest
        self.guarded = 0
        self.modules: dict[str, str] = {}  # local name -> module it stands for
        self.found: list[tuple[int, str, tuple[int, int]]] = []

    def _use(self, node: ast.AST, what: str, version: tuple[int, int] | None) -> None:
        if version is not None and version > self.oldest and not self.guarded:
            self.found.append((getattr(node, "lineno", 0), what, version))

    def visit_If(self, node: ast.If) -> None:
        version = _guard_version(node.test)
        if version is None:
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.guarded += 1  # the body runs only where the name exists
        for child in node.body:
            self.visit(child)
        self.guarded -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Try(self, node: ast.Try) -> None:
        catches = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        names = {n.strip("() ") for c in catches for n in c.split(",")}
        if names & IMPORT_ERRORS:
            self.guarded += 1
            for child in node.body:
                self.visit(child)
            self.guarded -= 1
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            local = alias.asname or alias.name.split(".")[0]  # `import a.b` binds `a`
            self.modules[local] = alias.name if alias.asname else local
            self._use(node, f"import {alias.name}", NEW_MODULES.get(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        self._use(node, f"from {module} import", NEW_MODULES.get(module))
        for alias in node.names:
            self._use(
                node,
                f"from {module} import {alias.name}",
                NEW_NAMES.get((module, alias.name)) or NEW_MODULES.get(f"{module}.{alias.name}"),
            )

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.modules:
            module = self.modules[node.value.id]
            self._use(node, f"{module}.{node.attr}", NEW_NAMES.get((module, node.attr)))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        self._use(node, node.id, NEW_NAMES.get(("builtins", node.id)))


def new_names_in(source: str, oldest: tuple[int, int]) -> list[tuple[int, str, tuple[int, int]]]:
    """(line, what, version) for every unguarded use of a name newer than ``oldest``."""
    visitor = _NewNames(oldest)
    visitor.visit(ast.parse(source))
    return visitor.found


def test_every_place_states_the_same_oldest_python() -> None:
    major, minor = oldest_python()
    config = _pyproject()["tool"]
    assert config["ruff"]["target-version"] == f"py{major}{minor}"
    assert config["mypy"]["python_version"] == f"{major}.{minor}", (
        "mypy must check as the oldest Python"
    )
    assert f"Python {major}.{minor}+" in (REPO / "README.md").read_text(encoding="utf-8")
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    assert f"| language | Python {major}.{minor} or newer |" in design
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert (
        f"sys.version_info < ({major}, {minor})" in makefile
        and f"Python {major}.{minor} or newer" in makefile
    )


@pytest.mark.parametrize("path", list(_sources()), ids=lambda p: str(p.relative_to(REPO)))
def test_module_runs_on_the_oldest_python(path: Path) -> None:
    oldest = oldest_python()
    source = path.read_text(encoding="utf-8")
    try:
        ast.parse(source, filename=str(path), feature_version=oldest)
    except SyntaxError as exc:
        pytest.fail(
            f"{path.relative_to(REPO)}:{exc.lineno}: not Python {oldest[0]}.{oldest[1]} syntax: {exc.msg}"
        )
    found = new_names_in(source, oldest)
    assert not found, "\n".join(
        f"{path.relative_to(REPO)}:{line}: {what} needs Python {v[0]}.{v[1]}; guard it "
        "(if sys.version_info >= ...: / except ImportError:) or raise requires-python"
        for line, what, v in found
    )


def test_tomli_is_installed_where_tomllib_is_missing() -> None:
    """Below 3.11 the config loaders import tomli: an extra every config reader needs must list it."""
    if oldest_python() >= (3, 11):
        return
    extras = _pyproject()["project"]["optional-dependencies"]
    wanted = re.compile(r"""^tomli\b.*;\s*python_version\s*<\s*["']3\.11["']$""")
    assert any(wanted.match(d) for d in extras["edge"]), (
        "the edge extra (cloud and training include it) needs tomli on 3.10"
    )


def test_the_checker_sees_new_names() -> None:
    """The scan itself: unguarded new names are found, guarded ones are not."""
    bad = "import tomllib\nfrom enum import StrEnum\nimport datetime as dt\nx = dt.UTC\ntry:\n    pass\nexcept ExceptionGroup:\n    pass\n"
    assert [what for _line, what, _v in new_names_in(bad, (3, 10))] == [
        "import tomllib",
        "from enum import StrEnum",
        "datetime.UTC",
        "ExceptionGroup",
    ]
    assert new_names_in(bad, (3, 11)) == []
    good = (
        "import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import tomli as tomllib\n"
        "try:\n    from typing import Self\nexcept ImportError:\n    Self = None\n"
    )
    assert new_names_in(good, (3, 10)) == []
