#!/usr/bin/env bash
# Make sure a Chromium for the browser tests (tests/test_report.py) is on this machine.
#
# Installs Debian's `chromium` package with apt-get when /usr/bin/chromium (or the browser named
# by $PREDICTOR_CHROMIUM) is missing. Never downloads a browser of its own, never fails the build:
# when Chromium cannot be installed it prints a warning and exits 0, and the browser tests skip
# with a message that points here.
set -u

want="${PREDICTOR_CHROMIUM:-/usr/bin/chromium}"
warn() { echo "ensure-chromium: warning: $*; the browser tests will be skipped." >&2; exit 0; }

if [ -x "$want" ]; then
    exit 0
fi
for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done

command -v apt-get >/dev/null 2>&1 || warn "no $want and no apt-get to install Debian's chromium"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        warn "no $want, and installing chromium needs root (run: sudo apt-get install chromium)"
    fi
fi

echo "ensure-chromium: installing Debian's chromium with apt-get ..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || warn "apt-get could not install chromium"
fi
if [ -x /usr/bin/chromium ]; then
    echo "ensure-chromium: $(/usr/bin/chromium --version 2>/dev/null || echo chromium installed)" >&2
else
    warn "chromium installed, but /usr/bin/chromium is missing"
fi
