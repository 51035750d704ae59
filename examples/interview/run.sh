#!/usr/bin/env bash
# Runs the interview example: holdfast on :8000 and the FastAPI backend on :8080.
# Open http://127.0.0.1:8080/?role=interviewer&user=ann&interview=demo and
#      http://127.0.0.1:8080/?role=candidate&user=carl&interview=demo side by side.
exec "$(dirname "$0")/../serve.sh" interview
