"""The runnable examples stay runnable."""

import os
import pathlib
import subprocess

from harness import BIN, ROOT, free_port


def test_send_to_user_example():
    port = free_port()
    out = subprocess.run(
        [str(ROOT / "examples" / "send-to-user" / "run.sh")],
        env={**os.environ, "PORT": str(port), "HOLDFAST_BINARY_PATH": str(BIN)},
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "subscribed to #42: recovered=True" in lines, out.stdout
    assert [l for l in lines if l.startswith("message ")] == [
        "message 1 on #42: hello 1",
        "message 2 on #42: hello 2",
        "message 3 on #42: hello 3",
    ], out.stdout
