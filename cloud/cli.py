"""``linewatch cloud ...``: ingest, fleet state and stored results.

Loaded lazily by the root command (``edge.cli``) as ``cloud.cli:cloud``. Keep this module
light at import time: every command imports what it needs inside its body.

Commands read the cloud config from ``--config FILE``; without it, ``./cloud.toml`` if
present, else the built-in defaults (``store.path = "cloud.db"`` in the working folder).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from cloud.cli_common import config_option, load_config, open_readonly_store, required_config_option
from edge.cli import LinewatchGroup, echo_json, fail, result_line


@click.group(cls=LinewatchGroup)
def cloud() -> None:
    """Run the cloud side: MQTT ingest, fleet state, stored results.

    Example:

        linewatch cloud serve --config cloud.toml
    """


@cloud.command("serve")
@required_config_option
def serve(config_file: Path) -> None:
    """Run one ingest worker until SIGTERM or Ctrl-C (start several: they share the load).

    Stores what devices send, once per (device, seq), and acks it after the commit.
    With a [web] section it also serves the fleet pages and /metrics (see `cloud web`).

    Example:

        linewatch cloud serve --config cloud.toml
    """
    from cloud.ingest import run_ingest

    config = load_config(config_file)
    web = None
    try:
        if config.web is not None:
            web = _start_web(config)
        code = run_ingest(config)
    finally:
        if web is not None:
            web.stop()
            web.join()
    sys.exit(code)


def _start_web(config: Any) -> Any:
    try:
        from cloud.web import WebServer
    except ImportError as exc:
        raise click.ClickException(f"the web pages need the cloud extra ({exc.name} is missing): pip install 'linewatch[cloud]'") from exc
    server = WebServer(config)
    server.start()
    click.echo(f"linewatch web: {server.url} (token from [web] token)", err=True)
    return server


@cloud.command("web")
@config_option
def web(config_file: Path | None) -> None:
    """Serve only the read-only fleet pages and /metrics, until SIGTERM or Ctrl-C.

    Needs a [web] section with a token (or LINEWATCH_CLOUD_WEB_TOKEN). Pages: / (fleet),
    /devices/ID, /models, /rollouts/ID; /api/fleet as JSON; /metrics for Prometheus
    (Authorization: Bearer TOKEN). `cloud serve` serves the same when [web] is set.

    Example:

        linewatch cloud web --config cloud.toml
    """
    import signal
    import threading

    config = load_config(config_file)
    if config.web is None:
        raise click.ClickException("no [web] section in the cloud config; add one with host, port and token")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
    server = _start_web(config)
    while not stop.wait(0.5):
        pass
    server.stop()
    server.join()


@cloud.command("fleet")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per device.")
def fleet(config_file: Path | None, as_json: bool) -> None:
    """Show every device: online, offline_buffering or dead, rows stored, backlog, gaps, drift.

    ``drift`` is the device's own report (ok, warning, drift, or off when its model has no
    reference statistics); `linewatch cloud drift` shows the history.

    Example:

        linewatch cloud fleet --json
    """
    config = load_config(config_file)
    with open_readonly_store(config) as store:
        devices = store.fleet(now=time.time(), offline_after_s=config.fleet.offline_after_s, dead_after_s=config.fleet.dead_after_s)
    if as_json:
        echo_json(devices)
        return
    if not devices:
        click.echo("no devices yet")
        return
    click.echo(f"{'device':<24} {'state':<18} {'results':>9} {'backlog':>8} {'evicted':>8}  {'drift':<8} model  last seen")
    for d in devices:
        ago = "never" if d["last_seen_s_ago"] is None else f"{d['last_seen_s_ago']:.0f} s ago"
        # A changed or doubled buffer must not hide in the JSON only.
        identity = {"new_buffer": f"  NEW BUFFER ({len(d['buffers'])} buffers)",
                    "conflict": f"  ID CONFLICT ({d['conflicts']} rows kept aside, {len(d['buffers'])} buffers)"}.get(
            d["identity"], "")  # fmt: skip
        click.echo(
            f"{d['device_id']:<24} {d['state']:<18} {d['results']:>9} {d['backlog'] if d['backlog'] is not None else '-':>8}"
            f" {d['evicted']:>8}  {drift_word(d.get('drift')):<8} {d['model_version'] or '-'}  {ago}{identity}"
        )


@cloud.command("results")
@click.option("--device", "device_id", required=True, help="Device id.")
@config_option
@click.option("--after", "after_seq", default=0, show_default=True, help="Only seqs above this.")
@click.option("--limit", default=100, show_default=True, help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def results(device_id: str, config_file: Path | None, after_seq: int, limit: int, as_json: bool) -> None:
    """Show the results the cloud stored for one device, in seq order.

    A tiled model's rows also show the deciding tile: box=x,y WxH in camera pixels.

    Example:

        linewatch cloud results --device line1-cam1 --limit 20 --json
    """
    config = load_config(config_file)
    with open_readonly_store(config) as store:
        rows = store.results(device_id, limit=limit, after_seq=after_seq)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(result_line(r, ts_format=".3f"))


@cloud.command("counters")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def counters(config_file: Path | None, as_json: bool) -> None:
    """Show ingest counters: rows stored, duplicates ignored, messages rejected and why.

    Example:

        linewatch cloud counters --json
    """
    config = load_config(config_file)
    with open_readonly_store(config) as store:
        values = store.counters()
    if as_json:
        echo_json(values)
        return
    for name, value in values.items():
        click.echo(f"{name:>32}: {value}")


def drift_word(drift: dict[str, Any] | None) -> str:
    """One word for the fleet table: ok, warning, drift, off, learning, or - (not reported)."""
    if not drift:
        return "-"
    if drift.get("checks") == "off":
        return "off"
    if drift.get("checks") == "baseline":
        return "learning"
    return str(drift.get("state") or "-")


# Drift history and drift samples (cloud/drift_cli.py).
from cloud.drift_cli import register as _register_drift  # noqa: E402 - attaches to the group below


@cloud.command("conflicts")
@click.option("--device", "device_id", help="Only this device.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def conflicts(device_id: str | None, config_file: Path | None, as_json: bool) -> None:
    """Show rows kept aside because another row already had their (device, buffer, seq).

    A cloned disk or one device id on two boxes makes them; nothing is dropped.

    Example:

        linewatch cloud conflicts --device line1-cam1 --json
    """
    config = load_config(config_file)
    with open_readonly_store(config) as store:
        rows = store.conflicts(device_id)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['device_id']} buffer={r['buffer_id'] or '-'} {r['table_name']} seq={r['seq']}: {r['row']} (stored: {r['stored']})")


@cloud.group("devices")
def devices() -> None:
    """Broker identities: the site CA, device certificates, passwords and ACL entries.

    Example:

        linewatch cloud devices add line1-cam1 --config cloud.toml
    """


def _broker_dir(config: Any) -> Path:
    return Path(config.data_dir) / "broker"


@devices.command("add")
@click.argument("device_id")
@config_option
@click.option("--passwd", "passwd_file", type=click.Path(path_type=Path),
              help="Mosquitto password file to add to (default: <data_dir>/broker/linewatch-devices.passwd,"
                   " or linewatch-cloud.passwd with --cloud-account).")  # fmt: skip
@click.option("--acl", "acl_file", type=click.Path(path_type=Path),
              help="Mosquitto ACL file to add the device's block to (default: <data_dir>/broker/linewatch.acl).")
@click.option("--cloud-account", is_flag=True, help="A cloud service account (ingest, OTA, push) instead of a device.")
def devices_add(device_id: str, config_file: Path | None, passwd_file: Path | None, acl_file: Path | None,
                cloud_account: bool) -> None:  # fmt: skip
    """Make a device's broker credentials: certificate, password entries, ACL block.

    Writes the files to copy to the box into <data_dir>/devices/DEVICE_ID/ and prints where
    each goes. The password is only in agent.env there (mode 0600), never printed.

    Example:

        linewatch cloud devices add line1-cam1 --config cloud.toml --passwd /etc/mosquitto/linewatch-devices.passwd
    """
    from cloud.devices import add_device

    config = load_config(config_file)
    broker = _broker_dir(config)
    if passwd_file is None:
        passwd_file = broker / ("linewatch-cloud.passwd" if cloud_account else "linewatch-devices.passwd")
    if acl_file is None:
        acl_file = broker / "linewatch.acl"  # a new file starts with the cloud account's block
    try:
        kit = add_device(device_id, ca_dir=Path(config.data_dir) / "ca", out_dir=Path(config.data_dir) / "devices",
                         passwd_file=passwd_file, acl_file=acl_file, prefix=config.mqtt.topic_prefix,
                         cloud_account=cloud_account)  # fmt: skip
    except OSError as exc:
        raise fail(exc) from exc
    where = "/etc/linewatch"
    click.echo(f"{'cloud account' if cloud_account else 'device'} {device_id}: files in {kit.folder}")
    click.echo(f"  copy {kit.ca} -> {where}/ca.crt")
    click.echo(f"  copy {kit.cert.cert} -> {where}/{'cloud' if cloud_account else 'device'}.crt")
    click.echo(f"  copy {kit.cert.key} -> {where}/{'cloud' if cloud_account else 'device'}.key (mode 0640, group linewatch)")
    click.echo(f"  copy {kit.env_file} -> {where}/{kit.env_file.name} (mode 0600; holds the password)")
    click.echo(f"broker: password entries in {kit.passwd_file}" + (f", ACL block in {kit.acl_file}" if kit.acl_file else ""))
    click.echo("  copy them to /etc/mosquitto/ if this is not the broker host, then reload it: systemctl reload mosquitto")
    if not cloud_account:
        click.echo(f'agent.toml [mqtt]: username = "{device_id}", tls = true, port = 8883, ca_file = "{where}/ca.crt",'
                   f' cert_file = "{where}/device.crt", key_file = "{where}/device.key"')  # fmt: skip


@devices.command("broker-cert")
@click.argument("hosts", nargs=-1, required=True)
@config_option
def devices_broker_cert(hosts: tuple[str, ...], config_file: Path | None) -> None:
    """Make the broker's server certificate from the site CA, for the names boxes connect to.

    Example:

        linewatch cloud devices broker-cert broker.plant.local 10.0.0.5 --config cloud.toml
    """
    from cloud.devices import issue_certificate, site_ca

    config = load_config(config_file)
    try:
        ca = site_ca(Path(config.data_dir) / "ca")
        issued = issue_certificate(ca, hosts[0], _broker_dir(config), hosts=list(hosts))
    except OSError as exc:
        raise fail(exc) from exc
    click.echo(f"copy {ca.cert} -> /etc/mosquitto/certs/ca.crt, {issued.cert} -> /etc/mosquitto/certs/server.crt,"
               f" {issued.key} -> /etc/mosquitto/certs/server.key (readable by mosquitto only)")  # fmt: skip


# Registry, signing keys, push and rollout commands (cloud/ota_cli.py).
from cloud.ota_cli import register as _register_ota  # noqa: E402 - attaches to the group above

_register_ota(cloud)
_register_drift(cloud)
