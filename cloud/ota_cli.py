"""``linewatch cloud`` commands for over-the-air models: keys, registry, push, rollout status.

Attach them to the ``cloud`` group with :func:`register` (cloud/cli.py)::

    linewatch cloud keys init
    linewatch cloud models add BUNDLE | list | show VERSION
    linewatch cloud push MODEL --to TARGET [--canary N|N%] [--min-success R] [--timeout S] [--wait-health]
    linewatch cloud rollout status [--rollout ID]

Every command reads the cloud config from ``--config`` (default ./cloud.toml, else the
built-in defaults), like the other cloud commands.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from cloud.cli_common import config_option, load_config
from edge.cli import LinewatchGroup, echo_json

# -- keys -------------------------------------------------------------------------------------


@click.group("keys", cls=LinewatchGroup)
def keys() -> None:
    """Manage the Ed25519 key that signs models (devices trust its public half).

    Example:

        linewatch cloud keys init --config cloud.toml
    """


@keys.command("init")
@config_option
@click.option("--force", is_flag=True, help="Replace an existing key (every box must then get the new public key).")
def keys_init(config_file: Path | None, force: bool) -> None:
    """Create the signing key pair in the cloud data_dir/keys (private key mode 0600).

    Copy the printed public key file to each box and list it in the agent config
    (ota.trusted_keys).

    Example:

        linewatch cloud keys init --config cloud.toml
    """
    from cloud.registry import init_keys

    config = load_config(config_file)
    kid, priv, pub = init_keys(config, force=force)
    click.echo(f"key id:      {kid}")
    click.echo(f"private key: {priv} (keep it here, mode 0600)")
    click.echo(f"public key:  {pub}")
    click.echo(f'copy the public key to each box and add it to the agent config:  ota.trusted_keys = ["{pub.name}"]')


# -- models -----------------------------------------------------------------------------------


@click.group("models", cls=LinewatchGroup)
def models() -> None:
    """The model registry: signed, packed bundles ready to push.

    Example:

        linewatch cloud models add bundle/ && linewatch cloud models list
    """


@models.command("add")
@click.argument("bundle", type=click.Path(path_type=Path))
@config_option
@click.option("--check/--no-check", default=True, show_default=True, help="Run the golden images here before adding.")
@click.option("--json", "as_json", is_flag=True, help="Print the registry entry as JSON.")
def models_add(bundle: Path, config_file: Path | None, check: bool, as_json: bool) -> None:
    """Validate, sign and store a bundle folder or .lwb file in the registry.

    Example:

        linewatch cloud models add bundle-v2/ --config cloud.toml
    """
    from cloud.registry import Registry, open_ota_store

    config = load_config(config_file)
    with open_ota_store(config) as store:
        model = Registry(config, store).add(bundle, check=check)
    if as_json:
        echo_json(model.summary())
        return
    click.echo(f"added {model.version} ({model.name}): {model.size} bytes, sha256 {model.sha256[:12]}…, signed by key {model.key_id}")


@models.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def models_list(config_file: Path | None, as_json: bool) -> None:
    """List registered models, newest first.

    Example:

        linewatch cloud models list --json
    """
    from cloud.registry import Registry, open_ota_store

    config = load_config(config_file)
    with open_ota_store(config) as store:
        entries = Registry(config, store).list()
    if as_json:
        echo_json([m.summary() for m in entries])
        return
    if not entries:
        click.echo("no models yet: linewatch cloud models add BUNDLE")
        return
    for m in entries:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.added))
        bal = m.metrics.get("int8", {}).get("balanced_accuracy") if isinstance(m.metrics.get("int8"), dict) else None
        extra = f"  int8 balanced accuracy {bal:.3f}" if isinstance(bal, int | float) else ""
        click.echo(f"{m.version:<20} {m.name:<20} {m.size:>10} B  {m.sha256[:12]}  {added}{extra}")


@models.command("show")
@click.argument("version")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, manifest included.")
def models_show(version: str, config_file: Path | None, as_json: bool) -> None:
    """Show one registered model: checksums, key, metrics and manifest.

    Example:

        linewatch cloud models show 1.2.0 --json
    """
    from cloud.registry import Registry, open_ota_store

    config = load_config(config_file)
    with open_ota_store(config) as store:
        m = Registry(config, store).get(version)
    if as_json:
        echo_json({**m.summary(), "manifest": m.manifest})
        return
    for key, value in m.summary().items():
        click.echo(f"{key:>14}: {value}")


# -- push and rollouts ------------------------------------------------------------------------


@click.command("push")
@click.argument("model")
@click.option("--to", "target", required=True, help="A device id, a group, or a comma-separated list of both.")
@config_option
@click.option("--canary", default=None, help="Deploy to N devices (or N%) first; continue only if they succeed.")
@click.option("--min-success", default=1.0, show_default=True, type=float, help="Success ratio needed to proceed (0-1].")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=float, help="Seconds to wait for each phase.")
@click.option(
    "--wait-health/--no-wait-health", default=False, show_default=True,
    help="Count a device only after its health watch passed (ota.health_parts decisions of the new model).",
)  # fmt: skip
@click.option("--chunk-bytes", default=None, type=int, help="Chunk size (default and max 65536).")
@click.option("--allow-downgrade", is_flag=True,
              help="Allow devices running a newer version to go back to this one (signed into the push; refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON at the end.")
def push(
    model: str, target: str, config_file: Path | None, canary: str | None, min_success: float, timeout_s: float,
    wait_health: bool, chunk_bytes: int | None, allow_downgrade: bool, as_json: bool,
) -> None:  # fmt: skip
    """Roll a model out to devices, canaries first, serving its chunks until done.

    MODEL is a registered version, or a bundle folder / .lwb file (added and signed first).
    Exit code 0 when the rollout is done, 1 when it halted (canaries or later devices below
    --min-success: every device that took the model is sent back to its previous one).

    Example:

        linewatch cloud push 1.2.0 --to line1 --canary 1 --min-success 0.9 --timeout 300
    """
    from cloud.registry import Registry, open_ota_store
    from cloud.rollout import run_push
    from edge.protocol import OTA_CHUNK_BYTES

    config = load_config(config_file)
    with open_ota_store(config) as store:
        registry = Registry(config, store)
        path = Path(model)
        entry = registry.add(path) if path.exists() else registry.get(model)
    outcome = run_push(
        config, entry, target, canary=canary, min_success=min_success, timeout_s=timeout_s,
        chunk_bytes=chunk_bytes or OTA_CHUNK_BYTES, wait_health=wait_health,
        echo=lambda line: click.echo(line, err=as_json), allow_downgrade=allow_downgrade,
    )  # fmt: skip
    if as_json:
        echo_json(
            {"rollout": outcome.rollout_id, "version": outcome.version, "state": outcome.state, "canaries": list(outcome.canaries),
             "devices": outcome.devices, "reasons": outcome.reasons, "success_ratio": outcome.success_ratio, "message": outcome.message,
             "rolled_back": outcome.rolled_back}
        )  # fmt: skip
    else:
        for d, why in sorted(outcome.reasons.items()):
            click.echo(f"  {d}: {why}")
    sys.exit(0 if outcome.state == "done" else 1)


@click.group("rollout", cls=LinewatchGroup)
def rollout() -> None:
    """Follow rollouts.

    Example:

        linewatch cloud rollout status
    """


@rollout.command("status")
@config_option
@click.option("--rollout", "rollout_id", default=None, help="A rollout id (default: the latest).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def rollout_status_cmd(config_file: Path | None, rollout_id: str | None, as_json: bool) -> None:
    """Show a rollout and the OTA state of each device.

    Example:

        linewatch cloud rollout status --json
    """
    from cloud.rollout import rollout_status

    config = load_config(config_file)
    report = rollout_status(config, rollout_id)
    if as_json:
        echo_json(report)
        return
    ro = report["rollout"]
    if ro is None:
        click.echo("no rollouts yet: linewatch cloud push MODEL --to TARGET")
    else:
        click.echo(f"rollout {ro['id']}: {ro['version']} to {ro['target']}: {ro['state']}{' - ' + ro['message'] if ro['message'] else ''}")
        for d in report["deployments"]:
            progress = f" {d['received']}/{d['chunks']}" if d["received"] is not None and d["chunks"] else ""
            why = f" ({d['stage']}: {d['reason']})" if d["reason"] else ""
            # a halted rollout points the device's row at the version it was sent back to
            back = f" -> rolled back to {d['desired_version']}" if d["desired_version"] and d["desired_version"] != ro["version"] else ""
            click.echo(
                f"  {d['device_id']:<24} {d['phase']:<7} {d['state'] or '-':<12}{progress} was {d['previous_version'] or '-'}{back}{why}"
            )
    others = [d for d in report["devices"] if not ro or d["rollout"] != ro["id"]]
    if others:
        click.echo("other devices (last OTA state):")
        for d in others:
            click.echo(f"  {d['device_id']:<24} {d['state']:<12} {d['version'] or '-'} (running {d['model_version'] or '-'})")


COMMANDS: tuple[click.Command, ...] = (keys, models, push, rollout)


def register(group: click.Group) -> None:
    """Add the OTA commands to the ``cloud`` click group."""
    for cmd in COMMANDS:
        group.add_command(cmd)


__all__ = ["COMMANDS", "keys", "models", "push", "register", "rollout"]
