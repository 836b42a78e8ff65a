#!/usr/bin/env bash
# Installs what tests/browser/test_frontend.py needs; safe to run again (it installs only what is missing):
#   - Debian's chromium (/usr/bin/chromium; a test tool's own browser download does not work here),
#   - Node.js + npm when there is no `node` (the machines have Node 20 already),
#   - playwright-core from tests/browser/package-lock.json (`npm ci`) into tests/browser/node_modules.
# apt-get needs root (or password-less sudo).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
    export DEBIAN_FRONTEND=noninteractive
    # try without refreshing the package lists first (fast when they are current)
    $sudo apt-get install -y --no-install-recommends "$@" || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "$@"; }
}

if [ ! -x "$CHROMIUM" ]; then
    echo "setup.sh: installing Debian's chromium"
    apt_install chromium fonts-liberation
fi

if ! command -v node >/dev/null 2>&1; then
    echo "setup.sh: installing Node.js and npm"
    apt_install nodejs npm
fi

want="$(node -e 'console.log(require(process.argv[1]).packages["node_modules/playwright-core"].version)' "$HERE/package-lock.json")"
have="$(node -e 'try{console.log(require(process.argv[1]).version)}catch{console.log("")}' "$HERE/node_modules/playwright-core/package.json")"
if [ "$want" != "$have" ]; then
    echo "setup.sh: npm ci in tests/browser (playwright-core $want)"
    (cd "$HERE" && npm ci --no-audit --no-fund)
fi
echo "setup.sh: ready: $("$CHROMIUM" --version 2>/dev/null | head -1), node $(node --version), playwright-core $want"
