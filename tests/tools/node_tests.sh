#!/usr/bin/env bash
# The JS client's unit tests (tests/js/*.test.mjs) with Node's own test runner (Node >= 20).
# Without Node they are skipped with a line saying so; the browser tests still cover the client.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v node >/dev/null; then
  echo "SKIPPED: JS client unit tests: 'node' not found (Debian: apt-get install -y nodejs; Node >= 20)"
  exit 0
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  echo "SKIPPED: JS client unit tests need Node >= 20 (mock timers); found $(node --version)"
  exit 0
fi
exec node --test --test-reporter=spec tests/js/
