#!/usr/bin/env bash
# chatprobe's two set-up commands (see README):
#   bash dev.sh demo   - install into .venv, start the reference chat service, run a short
#                        promotion swarm against it, build the HTML report (Node.js 20)
#   bash dev.sh test   - install into .venv (with test tools), run ruff, mypy and the test suite
# Anything after the command is passed on (e.g. `bash dev.sh test -k ledger`).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}

ensure_venv() {
    local extras=$1
    local want
    # The compiled engine is built at install: a change to its source installs again.
    want="$(cat pyproject.toml chatprobe/swarm/*.c chatprobe/swarm/*.h | sha256sum | cut -c1-16)-$extras"
    if [[ -x $VENV/bin/python && -f $VENV/.chatprobe-installed && "$(cat $VENV/.chatprobe-installed)" == "$want" ]]; then
        return
    fi
    echo "chatprobe: installing into $VENV (first run takes a minute; log: $VENV/install.log)" >&2
    if [[ ! -x $VENV/bin/python ]]; then
        "$PY" -m venv "$VENV"
    fi
    # The compiled engine is built in place; an old build must not outlive a failed one.
    rm -f chatprobe/swarm/_fastref*.so
    if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
           && "$VENV/bin/python" -m pip install --disable-pip-version-check -e ".$extras"; } \
           > "$VENV/install.log" 2>&1; then
        tail -n 30 "$VENV/install.log" >&2
        echo "chatprobe: installation failed; full log in $VENV/install.log" >&2
        exit 3
    fi
    echo "$want" > "$VENV/.chatprobe-installed"
}

# The compiled swarm engine is optional for chatprobe (swarms then run the Python engine),
# not for its tests.
compiled_engine_built() {
    "$VENV/bin/python" -c "import chatprobe.swarm._fastref" 2>/dev/null
}

# Third-party chat servers the test suite probes (docs: shared design real-targets.md);
# nftables: nft for the kernel layer of network profiles (docs/kernel.md, tests as root);
# prometheus-pushgateway for the canary's metrics; chromium to open the HTML report.
TEST_DEBIAN_PACKAGES=(prosody ejabberd prometheus-pushgateway nftables chromium)

ensure_debian_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if ! command -v sudo >/dev/null; then
            echo "chatprobe: cannot install ${missing[*]} (not root, no sudo); their tests will be skipped" >&2
            return
        fi
        sudo=(sudo)
    fi
    echo "chatprobe: installing Debian packages ${missing[*]} (log: $VENV/apt.log)" >&2
    # Keep the packages' own system services from starting on their default ports: tests
    # run their own instances on loopback.
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q)
    if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >> "$VENV/apt.log" 2>&1; then
        "${apt[@]}" update >> "$VENV/apt.log" 2>&1 || true
        "${apt[@]}" install --no-install-recommends "${missing[@]}" >> "$VENV/apt.log" 2>&1 \
            || { tail -n 20 "$VENV/apt.log" >&2; echo "chatprobe: apt-get failed" >&2; exit 3; }
    fi
    [[ $created_policy -eq 1 ]] && "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
    return 0
}

# Synapse (Matrix) lives in a venv of its own: its pinned dependencies stay out of ours.
SYNAPSE_VENV=.venv-synapse
ensure_synapse() {
    local want="matrix-synapse"
    if [[ -x $SYNAPSE_VENV/bin/python && -f $SYNAPSE_VENV/.installed ]]; then
        return
    fi
    echo "chatprobe: installing Synapse into $SYNAPSE_VENV for the Matrix tests (log: $SYNAPSE_VENV.log)" >&2
    rm -rf "$SYNAPSE_VENV"
    if ! { "$PY" -m venv "$SYNAPSE_VENV" \
           && "$SYNAPSE_VENV/bin/python" -m pip install --disable-pip-version-check "$want"; } \
           > "$SYNAPSE_VENV.log" 2>&1; then
        tail -n 20 "$SYNAPSE_VENV.log" >&2
        echo "chatprobe: Synapse installation failed" >&2
        exit 3
    fi
    touch "$SYNAPSE_VENV/.installed"
}

command=${1:-}
shift || true
case "$command" in
    demo)
        ensure_venv "[test]"
        compiled_engine_built || echo "chatprobe: the compiled swarm engine did not build (it needs gcc and the Python headers; see $VENV/install.log): the swarm runs the Python engine" >&2
        exec "$VENV/bin/chatprobe" demo "$@"
        ;;
    test)
        ensure_venv "[test]"
        if ! compiled_engine_built; then
            grep -iE -m 5 "error" "$VENV/install.log" >&2 || true
            echo "chatprobe: the compiled swarm engine did not build (it needs gcc and the Python headers; full log: $VENV/install.log)" >&2
            rm -f "$VENV/.chatprobe-installed"  # the next run tries again
            exit 3
        fi
        ensure_debian_packages "${TEST_DEBIAN_PACKAGES[@]}"
        ensure_synapse
        "$VENV/bin/ruff" check chatprobe tests benchmarks loadtests probes
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest -n "${CHATPROBE_TEST_WORKERS:-auto}" "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
