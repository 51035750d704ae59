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
