#!/usr/bin/env bash
# Idempotent set-up shared by `make demo` and `make test`: Debian packages (WordNet 3.0, Chromium),
# the project venv (.venv), Label Studio's own venv (.venv-labelstudio) and an nltk data folder.
# Each step is skipped when its stamp matches, so a second run takes seconds.
set -euo pipefail
# This machine's pip config names local indexes that may be absent; hide that noise, keep real errors.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

log() { printf '[setup] %s\n' "$*"; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# 1. System packages (Debian/Ubuntu). WordNet 3.0 database files and the browser for UI tests.
DEB_PKGS="wordnet-base wordnet-sense-index chromium chromium-driver postgresql redis-server"
if command -v apt-get >/dev/null; then
  missing=""
  for p in $DEB_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    log "installing Debian packages:$missing"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi

# 2. Project venv from the pinned lock (one pip command).
REQ_HASH=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if ! stamp_ok .venv/.synsetforge-stamp "$REQ_HASH"; then
  log "creating .venv (Airflow, pandas, pyarrow, nltk, boto3, moto, label-studio-sdk, pytest, ...)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  quiet_pip .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -e .
  echo "$REQ_HASH" > .venv/.synsetforge-stamp
fi

# 3. Label Studio server in its own venv: its pins clash with Airflow's.
LS_HASH=$(sha256sum requirements-labelstudio.txt | cut -d' ' -f1)
if ! stamp_ok .venv-labelstudio/.synsetforge-stamp "$LS_HASH"; then
  log "creating .venv-labelstudio (Label Studio server)"
  [ -x .venv-labelstudio/bin/python ] || "$PY" -m venv .venv-labelstudio
  quiet_pip .venv-labelstudio/bin/pip install -q --disable-pip-version-check -r requirements-labelstudio.txt
  echo "$LS_HASH" > .venv-labelstudio/.synsetforge-stamp
fi

# 4. WordNet 3.0 for nltk, offline: arrange Debian's files as an nltk corpora/wordnet folder.
WN=.nltk_data/corpora/wordnet
if [ ! -f "$WN/data.noun" ] || [ -L "$WN/data.noun" ] || [ ! -f "$WN/lexnames" ]; then
  rm -rf "$WN"; mkdir -p "$WN"
  if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/index.sense ]; then
    log "copying Debian's WordNet 3.0 into $WN (nltk refuses symlinks that leave its data folder)"
    for f in /usr/share/wordnet/*; do [ -f "$f" ] && cp "$f" "$WN/"; done
    cp infra/wordnet-lexnames "$WN/lexnames"  # not shipped by Debian; see lexnames(5WN)
  else
    log "no Debian WordNet; downloading with nltk"
    rm -rf "$WN"
    .venv/bin/python -c "import nltk, sys; sys.exit(0 if nltk.download('wordnet', download_dir='$ROOT/.nltk_data', quiet=True) else 1)"
    [ -f .nltk_data/corpora/wordnet.zip ] && (cd .nltk_data/corpora && .venv/bin/python -m zipfile -e wordnet.zip .)
  fi
fi
log "ready: .venv, .venv-labelstudio, WordNet at $ROOT/$WN"
