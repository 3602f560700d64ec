#!/usr/bin/env bash
# Sets up everything mqttinfer needs on a Debian/Ubuntu machine, idempotently:
#   Debian packages (mosquitto, mosquitto-clients, dataset-fashion-mnist) when missing,
#   a virtual environment in .venv, and the package with the extras asked for.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,train
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${MQTTINFER_VENV:-.venv}"
python="${PYTHON:-python3}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The protocol document's worked example (and its test) builds a frame with xxd.
command -v xxd >/dev/null 2>&1 || need_apt+=(xxd)
# broker init makes TLS material with the openssl command-line tool.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
# The venv module is a separate Debian package on some systems.
"$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)

if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $sudo apt-get update -qq || echo "setup: apt-get update failed; trying the install anyway" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" \
      || echo "setup: could not install ${need_apt[*]}; the demo falls back where it can (see README)" >&2
  else
    echo "setup: no apt-get here; please install: ${need_apt[*]} (see README)" >&2
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.mqttinfer-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  spec="."
  [ -n "$extras" ] && spec=".[${extras}]"
  echo "setup: installing mqttinfer${extras:+[$extras]} into $venv"
  "$venv/bin/python" -m pip install -q -e "$spec"
  touch "$stamp"
fi
