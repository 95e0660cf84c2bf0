"""The ``linewatch`` command: one group per part, each imported only when invoked.

The root lives in ``edge`` because the edge extra is the smallest install that must
run ``linewatch``; the ``train``, ``cloud`` and ``demo`` entries are looked up by name
at invocation (never imported here), so a box with only the edge extra never loads
TensorFlow or the cloud code, and a missing extra is named with its install command.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edge.exceptions import LinewatchError

F = TypeVar("F", bound=Callable[..., Any])

# name -> ("module:attribute", extra that provides it, modules that extra brings)
LAZY_COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "train": ("training.cli:train", "training", ("tensorflow", "numpy", "cv2")),
    "edge": ("edge.cli:edge", "edge", ("numpy", "cv2", "sqlite_utils", "pydantic", "paho")),
    "cloud": ("cloud.cli:cloud", "cloud", ("sqlite_utils", "pydantic", "paho", "cryptography")),
    "demo": ("cloud.demo:demo", "training", ("tensorflow", "sqlite_utils", "paho")),
}


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that cannot be found, without importing any of them."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


class LinewatchGroup(click.Group):
    """A click group that turns our own errors into click's one-line ``Error: ...`` (exit code 1).

    Every ``linewatch`` group is one (subgroups made with ``@group.group()`` too), so
    commands raise :class:`~edge.exceptions.LinewatchError` and never catch it just to
    print it; whichever group ran the command converts it, the root included, and a
    group invoked on its own (tests, ``python -m training.cli``) behaves the same.
    """

    group_class = type  # subgroups made with @group.group() are LinewatchGroups too
    # What becomes a one-line error instead of a traceback.
    one_line_errors: tuple[type[Exception], ...] = (LinewatchError,)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except self.one_line_errors as exc:
            raise click.ClickException(str(exc)) from exc


class LazyGroup(LinewatchGroup):
    """The root group: its part groups are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        target, extra, needs = LAZY_COMMANDS[cmd_name]
        missing = missing_modules(needs)
        if missing:
            return _missing_extra_command(cmd_name, extra, missing)
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


def _missing_extra_command(name: str, extra: str, missing: list[str]) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def stub() -> None:
        raise click.ClickException(
            f"`linewatch {name}` needs the '{extra}' extra ({', '.join(missing)} not installed). "
            f"Install it with: pip install 'linewatch[{extra}]'"
        )

    stub.help = f"(needs: pip install 'linewatch[{extra}]')"
    return stub


def configure_logging(verbose: int) -> None:
    """Only the CLI configures handlers; the packages just log."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="linewatch")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Linewatch: visual inspection at the edge.

    Example:

        linewatch train synth data/ && linewatch train fit data/ --out bundle/
    """
    configure_logging(verbose)


def echo_json(value: Any) -> None:
    """Print one JSON document on stdout (machine-readable output for --json)."""
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def config_option(help_text: str, *, required: bool = False) -> Callable[[F], F]:
    """The ``--config FILE`` option (the ``config_file`` parameter, a Path) with this help."""
    return click.option("--config", "config_file", required=required, type=click.Path(path_type=Path), help=help_text)


agent_config_option = config_option("Agent TOML file.", required=True)


def box_text(box: Any) -> str:
    """' box=x,y WxH' for a result row's box (tiled models), '' without one."""
    if not box:
        return ""
    x, y, w, h = box
    return f" box={x},{y} {w}x{h}"


def result_line(row: dict[str, Any], *, ts_format: str = "") -> str:
    """One stored decision as a line of ``edge results`` / ``cloud results``.

    ``ts_format`` is the format spec of the capture time (``""``: as stored).
    """
    verdict = "PASS" if row["passed"] else "FAIL"
    return (
        f"{row['seq']:>8} {row['ts']:{ts_format}} part={row['part_id']} {verdict} {row['label']} score={row['score']:.3f}"
        f" model={row['model_version']}{box_text(row.get('box'))}"
    )


def fail(exc: BaseException) -> click.ClickException:
    """Turn an error that is not a LinewatchError (an OSError) into the CLI's one-line error."""
    return click.ClickException(str(exc))


@click.group(cls=LinewatchGroup)
def edge() -> None:
    """Run and inspect the edge agent on this box.

    Example:

        linewatch edge validate-config /etc/linewatch/agent.toml
    """


@edge.command("validate-config")
@click.argument("file", type=click.Path(path_type=Path))
def validate_config(file: Path) -> None:
    """Check an agent config file and print every problem with its key path.

    Besides the keys, it checks the files the config names (CA, client certificate and
    key, trusted keys, a video file) and warns about risky settings (allow_unsigned, MQTT
    in clear to another host, an open operator page). Exit code 1 on any error.

    Example:

        linewatch edge validate-config /etc/linewatch/agent.toml
    """
    from edge.capture import redact_url
    from edge.checks import check_config
    from edge.config import load_config

    config = load_config(file)
    findings = check_config(config)
    for finding in findings:
        click.echo(f"{file}: {finding}", err=finding.level == "error")
    errors = sum(f.level == "error" for f in findings)
    if errors:
        raise click.ClickException(f"{file}: {errors} error(s); the agent would inspect but not sync or update until fixed")
    source = redact_url(str(config.camera.source))
    click.echo(f"{file}: ok (device {config.device_id}, camera {source}"
               f"{f', {len(findings)} warning(s)' if findings else ''})")  # fmt: skip


@edge.command("run")
@agent_config_option
@click.option("--echo", is_flag=True, help="Print one JSON line per decision on stdout, after it is committed.")
def run(config_file: Path, echo: bool) -> None:
    """Run the agent until SIGTERM or Ctrl-C: capture, decide, record, sync.

    Example:

        linewatch edge run --config /etc/linewatch/agent.toml --echo
    """
    from edge.agent import run_agent
    from edge.config import load_config

    sys.exit(run_agent(load_config(config_file), echo=sys.stdout if echo else None))


@edge.command("status")
@agent_config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_file: Path, as_json: bool) -> None:
    """Show what the agent decided, its camera, model and buffer (read from the buffer).

    Example:

        linewatch edge status --config /etc/linewatch/agent.toml --json
    """
    from edge.config import load_config
    from edge.status import read_status

    report = read_status(load_config(config_file))
    if as_json:
        echo_json(report)
        return
    from edge.drift import describe

    for key in sorted(report):
        value = describe(report[key]) if key == "drift" else report[key]
        click.echo(f"{key:>18}: {value}")


@edge.command("results")
@agent_config_option
@click.option("--tail", default=20, show_default=True, help="How many recent decisions to show.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def results(config_file: Path, tail: int, as_json: bool) -> None:
    """Show the most recent decisions, newest last.

    A tiled model's rows also show the deciding tile: box=x,y WxH in camera pixels.

    Example:

        linewatch edge results --config /etc/linewatch/agent.toml --tail 50
    """
    from edge.buffer import Buffer
    from edge.config import load_config

    config = load_config(config_file)
    with Buffer.open_readonly(config.buffer.path) as buf:
        rows = buf.tail(tail)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(result_line(r))


@edge.command("install-model")
@click.argument("bundle", type=click.Path(path_type=Path))
@agent_config_option
@click.option("--allow-downgrade", is_flag=True, help="Install even if it is older than the installed model (anti-rollback).")
def install_model(bundle: Path, config_file: Path, allow_downgrade: bool) -> None:
    """Install a signed bundle (.lwb file or folder) into the agent's model store by hand.

    The same checks as an over-the-air update: signature against ota.trusted_keys,
    checksum, compatibility with the current model, golden images; then an atomic switch.
    A running agent picks it up at its next start (pushes switch live models).

    Example:

        linewatch edge install-model model-1.0.0.lwb --config /etc/linewatch/agent.toml
    """
    from edge.config import load_config
    from edge.inference import Classifier
    from edge.install import install_bundle
    from edge.models import ModelStore

    config = load_config(config_file)
    store = ModelStore(config.model.path)
    store.root.mkdir(parents=True, exist_ok=True)
    try:
        current: Classifier | None = Classifier(store.current(), runtime=config.model.runtime)
    except LinewatchError:
        current = None  # first install on this box
    result = install_bundle(bundle, store, config.ota, current, runtime=config.model.runtime, allow_downgrade=allow_downgrade)
    if not result.ok:
        raise click.ClickException(f"{bundle} refused at {result.stage}: {result.reason}; the current model is unchanged")
    click.echo(f"installed {result.version} at {result.path} (signed by key {result.key_id})")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="linewatch")


if __name__ == "__main__":
    main()
