#!/usr/bin/env bash
# Install the Linewatch edge agent on a Debian/Ubuntu box (run as root from a checkout).
#   sudo firmware-config/install.sh [DEVICE_ID]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
DEVICE_ID="${1:-$(hostname -s)}"

if [ "$(id -u)" != 0 ]; then echo "run as root: sudo $0 $*" >&2; exit 1; fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv
id linewatch >/dev/null 2>&1 || useradd --system --home /var/lib/linewatch --shell /usr/sbin/nologin linewatch
install -d -o linewatch -g linewatch -m 0750 /var/lib/linewatch /var/lib/linewatch/models
install -d -m 0755 /opt/linewatch
# Configs, keys and the password are readable by the agent's group only (never world-readable).
install -d -o root -g linewatch -m 0750 /etc/linewatch
python3 -m venv /opt/linewatch/venv
/opt/linewatch/venv/bin/pip install --quiet "$REPO[edge]"   # no TensorFlow on the box
if [ ! -f /etc/linewatch/agent.toml ]; then
  sed -e "s/^device_id = .*/device_id = \"$DEVICE_ID\"/" \
      -e 's#^path = "models/"#path = "/var/lib/linewatch/models"#' \
      -e 's#^path = "buffer.db"#path = "/var/lib/linewatch/buffer.db"#' \
      -e 's#^trusted_keys = .*#trusted_keys = ["/etc/linewatch/signing.pub"]#' \
      -e "s/^username = .*/username = \"$DEVICE_ID\"/" \
      "$HERE/agent.example.toml" > /etc/linewatch/agent.toml.new
  install -o root -g linewatch -m 0640 /etc/linewatch/agent.toml.new /etc/linewatch/agent.toml
  rm -f /etc/linewatch/agent.toml.new
  echo "wrote /etc/linewatch/agent.toml: set camera.source and mqtt.host, then copy the fleet's signing.pub"
  echo "and what \`linewatch cloud devices add $DEVICE_ID\` made (ca.crt, device.crt, device.key, agent.env) to /etc/linewatch/"
fi
[ -f /etc/linewatch/agent.env ] || { echo "# LINEWATCH_MQTT_PASSWORD=..." > /etc/linewatch/agent.env; }
# Re-applied on every run: a config or key copied in later with a looser mode is tightened.
for f in /etc/linewatch/*.toml /etc/linewatch/*.key /etc/linewatch/*.crt /etc/linewatch/*.pub; do
  if [ -f "$f" ]; then chown root:linewatch "$f"; chmod 0640 "$f"; fi
done
chown root:root /etc/linewatch/agent.env && chmod 0600 /etc/linewatch/agent.env  # systemd reads it as root
install -m 0644 "$HERE/linewatch-agent.service" /etc/systemd/system/linewatch-agent.service
systemctl daemon-reload
systemctl enable linewatch-agent.service
echo "installed. Check the config:  /opt/linewatch/venv/bin/linewatch edge validate-config /etc/linewatch/agent.toml"
echo "then start:                   systemctl start linewatch-agent && journalctl -fu linewatch-agent"
