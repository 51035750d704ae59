#!/usr/bin/env bash
# Runs the agents example: holdfast on :8000 (rpc proxy → :8080) and the FastAPI backend on :8080.
# Open http://127.0.0.1:8080/?user=alice in several windows and ask something.
exec "$(dirname "$0")/../serve.sh" agents
