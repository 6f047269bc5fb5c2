#!/usr/bin/env bash
# Peer tools that cannot share the project venv, for `make bench` only (tests never need them):
# img2dataset 1.47.0 (its own numpy/opencv pins) and imagededup 0.3.3 (pulls torch), plus the Debian
# wallpaper packages the near-duplicate quality benchmark cuts into real-photo tiles.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if command -v apt-get >/dev/null; then
  missing=""
  for p in lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 ukui-wallpapers mate-backgrounds; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi
if [ ! -f .venv-bench-ingest/.ok ]; then
  "$PY" -m venv .venv-bench-ingest
  quiet_pip .venv-bench-ingest/bin/pip install -q img2dataset==1.47.0 scikit-image==0.26.0 && touch .venv-bench-ingest/.ok
fi
if [ ! -f .venv-bench-neardup/.ok ]; then
  "$PY" -m venv .venv-bench-neardup
  quiet_pip .venv-bench-neardup/bin/pip install -q imagededup==0.3.3 && touch .venv-bench-neardup/.ok
fi
echo "[setup-bench] peer venvs ready"
