#!/usr/bin/env bash
# tsc --noEmit over the JS client's JSDoc types (tsconfig.json, strict). TypeScript is installed
# once from npm into .venv/node (make clean removes it); later runs need no network.
# Without node/npm it is skipped with a line saying so.
set -euo pipefail
cd "$(dirname "$0")/../.."
TYPESCRIPT=typescript@5.9.3
tsc=.venv/node/node_modules/.bin/tsc
if [ ! -x "$tsc" ]; then
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "SKIPPED: JS type check: node/npm not found (Debian: apt-get install -y nodejs npm)"
    exit 0
  fi
  echo "typecheck_js: installing $TYPESCRIPT into .venv/node (once)"
  npm install --prefix .venv/node --no-audit --no-fund --silent "$TYPESCRIPT"
fi
"$tsc" -p tsconfig.json
echo "tsc: no type errors in channel_registry/static/channel_registry/client.js (strict)"
