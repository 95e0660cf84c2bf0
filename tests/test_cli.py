"""The `linewatch` command: every command has help with an example; groups load lazily."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edge.cli import LinewatchGroup, cli


def _all_commands(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, click.Context(cmd, parent=ctx), (*prefix, name))


def test_every_command_has_help_with_an_example() -> None:
    ctx = click.Context(cli)
    found = list(_all_commands(cli, ctx))
    names = {" ".join(path) for path, _ in found}
    for required in (
        "train synth",
        "train fit",
        "train eval",
        "edge validate-config",
        "edge run",
        "edge status",
        "cloud serve",
        "cloud fleet",
        "demo",
    ):
        assert required in names, f"missing command: linewatch {required}"
    for path, _cmd in found:
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, f"linewatch {' '.join(path)} --help has no example"


def test_every_group_turns_our_errors_into_one_line() -> None:
    """One convention: every group is a LinewatchGroup, so no command catches LinewatchError itself."""
    ctx = click.Context(cli)
    groups = [" ".join(path) for path, cmd in _all_commands(cli, ctx) if isinstance(cmd, click.Group)]
    assert {"edge", "cloud", "train", "cloud devices", "cloud models", "cloud rollout"} <= set(groups)
    assert isinstance(cli, LinewatchGroup)
    for path, cmd in _all_commands(cli, ctx):
        if isinstance(cmd, click.Group):
            assert isinstance(cmd, LinewatchGroup), f"linewatch {' '.join(path)} is not a LinewatchGroup"


def test_edge_group_does_not_import_tensorflow_or_other_parts() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from edge.cli import cli\n"
        "r = CliRunner().invoke(cli, ['edge', 'status', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "import edge.agent, edge.inference, edge.buffer, edge.capture, edge.config\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'cloud', 'training')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"edge imported: {out.stdout}"


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge.cli as root

    monkeypatch.setitem(root.LAZY_COMMANDS, "train", ("training.cli:train", "training", ("no_such_module_xyz",)))
    result = CliRunner().invoke(cli, ["train", "fit", "data"])
    assert result.exit_code != 0
    assert "pip install 'linewatch[training]'" in result.output


def test_install_model_refuses_an_unsigned_bundle_and_keeps_nothing(tmp_path, tiny_bundle) -> None:
    from tests.conftest import run_cli

    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'device_id = "cam"\ncamera.source = "x.avi"\nmodel.path = "models"\nbuffer.path = "b.db"\n'
        'ota.trusted_keys = []\n'
    )
    proc = run_cli("edge", "install-model", str(tiny_bundle), "--config", str(cfg))
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "unsigned" in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "current").exists()
