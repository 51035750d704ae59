"""Unidirectional transports with no SDK at all: Python `httpx` streaming and `curl -N` against a
real holdfast process (uni_http_stream, uni_sse): the connect push, bare pushes, recovery from
the positions a client kept, and a refused connect told as a disconnect."""

import json
import subprocess
import urllib.parse

import httpx
import pytest

from conftest import CONFIG
from harness import API_KEY, Server, token

UNI = CONFIG + """
[uni_http_stream]
enabled = true

[uni_sse]
enabled = true
"""


@pytest.fixture(scope="module")
def uni():
    with Server(UNI) as s:
        yield s


def publish(server, channel, data):
    r = httpx.post(f"{server.api}/publish", headers={"X-API-Key": API_KEY},
                   json={"channel": channel, "data": data})
    return r.json()["result"]


def wanted(m):
    """Connect, publications and disconnects; not pings (`{}`) nor joins and leaves (this
    configuration pushes them)."""
    return any(k in m for k in ("connect", "pub", "disconnect"))


def lines(resp):
    """Messages of a uni_http_stream response: one JSON object per line."""
    for line in resp.iter_lines():
        if line.strip() and wanted(m := json.loads(line)):
            yield m


def events(resp):
    """Messages of an SSE response (`data:` events)."""
    for line in resp.iter_lines():
        if line.startswith("data: ") and wanted(m := json.loads(line[len("data: "):])):
            yield m


@pytest.mark.compat("plain HTTP (httpx, curl)", "uni_http_stream: connect push, personal channel, recovery from kept positions")
def test_uni_http_stream_with_httpx(uni):
    body = {"token": token("py1")}
    with httpx.stream("POST", f"{uni.http}/connection/uni_http_stream", json=body, timeout=10) as r:
        assert r.status_code == 200
        msgs = lines(r)
        connect = next(msgs)["connect"]
        sub = connect["subs"]["#py1"]
        assert "pong" not in connect and connect["session"]
        for n in (1, 2):
            publish(uni, "#py1", {"n": n})
        got = [next(msgs) for _ in range(2)]
        assert got == [{"channel": "#py1", "pub": {"data": {"n": n}, "offset": n}} for n in (1, 2)]
    # Gone; two more are published; back with the position it kept.
    for n in (3, 4):
        publish(uni, "#py1", {"n": n})
    body["subs"] = {"#py1": {"recover": True, "offset": 2, "epoch": sub["epoch"]}}
    with httpx.stream("POST", f"{uni.http}/connection/uni_http_stream", json=body, timeout=10) as r:
        sub = next(lines(r))["connect"]["subs"]["#py1"]
        assert sub["recovered"] is True
        assert [p["data"]["n"] for p in sub["publications"]] == [3, 4]


@pytest.mark.compat("plain HTTP (httpx, curl)", "uni_sse: EventSource stream, refused connect as a disconnect")
def test_uni_sse_with_httpx(uni):
    query = urllib.parse.quote(json.dumps({"token": token("py2")}))
    with httpx.stream("GET", f"{uni.http}/connection/uni_sse?cf_connect={query}", timeout=10) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        msgs = events(r)
        assert "#py2" in next(msgs)["connect"]["subs"]
        publish(uni, "#py2", "hello")
        assert next(msgs) == {"channel": "#py2", "pub": {"data": "hello", "offset": 1}}
    query = urllib.parse.quote(json.dumps({"token": "not-a-token"}))
    with httpx.stream("GET", f"{uni.http}/connection/uni_sse?cf_connect={query}", timeout=10) as r:
        assert list(events(r)) == [{"disconnect": {"code": 3500, "reason": "invalid token"}}]


@pytest.mark.compat("plain HTTP (httpx, curl)", "curl -N on uni_http_stream")
def test_uni_http_stream_with_curl(uni):
    proc = subprocess.Popen(
        ["curl", "-sN", "-X", "POST", f"{uni.http}/connection/uni_http_stream",
         "-d", json.dumps({"token": token("py3")})],
        stdout=subprocess.PIPE, text=True)
    try:
        assert "#py3" in json.loads(proc.stdout.readline())["connect"]["subs"]
        publish(uni, "#py3", {"via": "curl"})
        line = proc.stdout.readline()
        while not wanted(json.loads(line)):
            line = proc.stdout.readline()
        assert json.loads(line) == {"channel": "#py3", "pub": {"data": {"via": "curl"}, "offset": 1}}
    finally:
        proc.kill()
        proc.wait()
