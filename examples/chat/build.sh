#!/usr/bin/env bash
# Bundles the React page (src/) into static/app.js with esbuild from examples/node_modules.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -x "$here/../node_modules/.bin/esbuild" ] || (cd "$here/.." && npm ci --no-audit --no-fund --loglevel=error)
"$here/../node_modules/.bin/esbuild" "$here/src/main.jsx" --bundle --minify --jsx=automatic \
  --define:process.env.NODE_ENV='"production"' --outfile="$here/static/app.js" --log-level=warning
