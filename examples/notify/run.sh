#!/usr/bin/env bash
# Runs the notify example: holdfast on :8000 and the FastAPI backend on :8080.
# Before opening http://127.0.0.1:8080/?user=alice, send alice something:
#   curl -X POST localhost:8080/api/notify/alice -H 'content-type: application/json' -d '{"text":"hi"}'
exec "$(dirname "$0")/../serve.sh" notify
