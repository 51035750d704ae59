#!/usr/bin/env bash
# Runs the chat example: holdfast on :8000 and the FastAPI backend on :8080 (builds the page).
# Open http://127.0.0.1:8080/?user=alice and ?user=bob side by side.
exec "$(dirname "$0")/../serve.sh" chat
