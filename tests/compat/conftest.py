import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from harness import API_KEY, SECRET, Server  # noqa: E402

CONFIG = f"""
[client.token]
hmac_secret_key = "{SECRET}"

[client.subscribe_to_user_personal_channel]
enabled = true

[http_api]
key = "{API_KEY}"

[engine]
type = "memory"

[channel.without_namespace]
presence = true
join_leave = true
force_push_join_leave = true
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_presence_for_subscriber = true
allow_history_for_subscriber = true

[[channel.namespaces]]
name = "private"

[[channel.namespaces]]
name = "delta"
allowed_delta_types = ["fossil"]
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "tags"
allow_tags_filter = true
history_size = 100
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true

[[channel.namespaces]]
name = "smallhistory"
history_size = 2
history_ttl = "300s"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true
"""


@pytest.fixture(scope="session")
def server():
    with Server(CONFIG) as s:
        yield s
        assert s.proc is not None and s.proc.poll() is None, f"server died:\n{s.log()}"


# Compatibility matrix rows: tests marked @pytest.mark.compat(client, feature) and parametrized by
# `encoding` each add (client, feature, encoding, pass/fail) to artifacts/compat/python.json.
ROWS: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "compat(client, feature): a row of docs/COMPAT.md")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("compat")
    if marker is None or report.when != "call":
        return
    client, feature = marker.args
    encoding = item.callspec.params.get("encoding", "http") if hasattr(item, "callspec") else "http"
    ROWS.append({"client": client, "feature": feature, "encoding": encoding,
                 "status": "pass" if report.passed else "fail"})


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    out = pathlib.Path(__file__).resolve().parents[2] / "artifacts" / "compat"
    out.mkdir(parents=True, exist_ok=True)
    (out / "python.json").write_text(json.dumps(ROWS, indent=2))
