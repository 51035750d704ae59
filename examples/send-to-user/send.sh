#!/usr/bin/env bash
# Usage: send.sh USER TEXT — what an application backend does: publish to the user's channel.
# Works whether or not the user is connected. Prints the API result ({"offset":N,"epoch":"…"}).
set -euo pipefail
user="$1"; text="$2"
url="${SERVER_URL:-http://127.0.0.1:8000}"
curl -sS --fail-with-body -X POST "$url/api/publish" \
  -H "X-API-Key: ${SERVER_API_KEY:-example-api-key-change-me}" \
  -H "Content-Type: application/json" \
  -d "{\"channel\":\"#$user\",\"data\":{\"text\":\"$text\"},\"idempotency_key\":\"$(date +%s%N)\"}"
echo
