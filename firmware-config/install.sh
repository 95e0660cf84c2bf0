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
install -d -m 0755 /etc/linewatch /opt/linewatch
python3 -m venv /opt/linewatch/venv
/opt/linewatch/venv/bin/pip install --quiet "$REPO[edge]"   # no TensorFlow on the box
if [ ! -f /etc/linewatch/agent.toml ]; then
  sed -e "s/^device_id = .*/device_id = \"$DEVICE_ID\"/" \
      -e 's#^path = "models/"#path = "/var/lib/linewatch/models"#' \
      -e 's#^path = "buffer.db"#path = "/var/lib/linewatch/buffer.db"#' \
      -e 's#^trusted_keys = .*#trusted_keys = ["/etc/linewatch/signing.pub"]#' \
      "$HERE/agent.example.toml" > /etc/linewatch/agent.toml
  echo "wrote /etc/linewatch/agent.toml: set camera.source and mqtt.host, then copy the fleet's signing.pub to /etc/linewatch/"
fi
[ -f /etc/linewatch/agent.env ] || { echo "# LINEWATCH_MQTT_PASSWORD=..." > /etc/linewatch/agent.env; chmod 0600 /etc/linewatch/agent.env; }
install -m 0644 "$HERE/linewatch-agent.service" /etc/systemd/system/linewatch-agent.service
systemctl daemon-reload
systemctl enable linewatch-agent.service
echo "installed. Check the config:  /opt/linewatch/venv/bin/linewatch edge validate-config /etc/linewatch/agent.toml"
echo "then start:                   systemctl start linewatch-agent && journalctl -fu linewatch-agent"
