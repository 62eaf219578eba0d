#!/usr/bin/env bash
# chatprobe's two set-up commands (see README):
#   bash dev.sh demo   - install into .venv, start the reference chat service, probe it
#   bash dev.sh test   - install into .venv (with test tools), run ruff, mypy and the test suite
# Anything after the command is passed on (e.g. `bash dev.sh test -k ledger`).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}

ensure_venv() {
    local extras=$1
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)-$extras"
    if [[ -x $VENV/bin/python && -f $VENV/.chatprobe-installed && "$(cat $VENV/.chatprobe-installed)" == "$want" ]]; then
        return
    fi
    echo "chatprobe: installing into $VENV (first run takes a minute; log: $VENV/install.log)" >&2
    if [[ ! -x $VENV/bin/python ]]; then
        "$PY" -m venv "$VENV"
    fi
    if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
           && "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".$extras"; } \
           > "$VENV/install.log" 2>&1; then
        tail -n 30 "$VENV/install.log" >&2
        echo "chatprobe: installation failed; full log in $VENV/install.log" >&2
        exit 3
    fi
    echo "$want" > "$VENV/.chatprobe-installed"
}

command=${1:-}
shift || true
case "$command" in
    demo)
        ensure_venv "[test]"
        exec "$VENV/bin/chatprobe" demo "$@"
        ;;
    test)
        ensure_venv "[test]"
        "$VENV/bin/ruff" check chatprobe tests
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest -n "${CHATPROBE_TEST_WORKERS:-auto}" "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
