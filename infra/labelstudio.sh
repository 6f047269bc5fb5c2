#!/usr/bin/env bash
# Start a local Label Studio (from .venv-labelstudio) the way crowd/server.py does, from a shell.
#   infra/labelstudio.sh [DATA_DIR] [PORT]          (defaults: .labelstudio and a free port)
# Environment: SYNSETFORGE__CROWD__TOKEN (admin API token; generated and saved in DATA_DIR/admin-token if unset),
# LS_FILES_ROOT (LOCAL_FILES_DOCUMENT_ROOT; default: the store folder, SYNSETFORGE__STORE__URL or ./data).
# It runs in the foreground; Ctrl-C stops it. Its PID is written to DATA_DIR/label-studio.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
LS=$(pwd)/.venv-labelstudio/bin/label-studio
[ -x "$LS" ] || { echo "Label Studio not installed: run infra/setup.sh" >&2; exit 2; }
DATA_DIR=$(realpath -m "${1:-.labelstudio}")
PORT=${2:-$(.venv/bin/python -c 'from pipeline.services import free_port; print(free_port())')}
mkdir -p "$DATA_DIR"
TOKEN_FILE="$DATA_DIR/admin-token"
if [ -n "${SYNSETFORGE__CROWD__TOKEN:-}" ]; then TOKEN=$SYNSETFORGE__CROWD__TOKEN
elif [ -f "$TOKEN_FILE" ]; then TOKEN=$(cat "$TOKEN_FILE")
else TOKEN=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(20))'); fi
( umask 077; printf '%s' "$TOKEN" > "$TOKEN_FILE" )
PASS_FILE="$DATA_DIR/admin-password"
[ -f "$PASS_FILE" ] || ( umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(16))' > "$PASS_FILE" )
FILES_ROOT=$(realpath -m "${LS_FILES_ROOT:-${SYNSETFORGE__STORE__URL:-data}}")
mkdir -p "$FILES_ROOT"

export LABEL_STUDIO_BASE_DATA_DIR="$DATA_DIR" LABEL_STUDIO_USERNAME=admin@synsetforge.local
export LABEL_STUDIO_PASSWORD=$(cat "$PASS_FILE") LABEL_STUDIO_USER_TOKEN="$TOKEN"
export LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true LABEL_STUDIO_LATEST_VERSION_CHECK=false
export LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true COLLECT_ANALYTICS=false SENTRY_DSN= FRONTEND_SENTRY_DSN=
export LOCAL_FILES_SERVING_ENABLED=true LOCAL_FILES_DOCUMENT_ROOT="$FILES_ROOT"

echo "Label Studio on http://127.0.0.1:$PORT (data $DATA_DIR, images under $FILES_ROOT); wait for /health to say UP"
echo "export SYNSETFORGE__CROWD__URL=http://127.0.0.1:$PORT SYNSETFORGE__CROWD__TOKEN=\$(cat $TOKEN_FILE)"
cd "$DATA_DIR"
"$LS" start --no-browser --internal-host 127.0.0.1 --port "$PORT" --data-dir "$DATA_DIR" --log-level WARNING &
PID=$!
echo "$PID" > "$DATA_DIR/label-studio.pid"
trap 'kill -TERM "$PID" 2>/dev/null; wait "$PID"' INT TERM
wait "$PID"
