"""OpenTelemetry traces: holdfast exports OTLP/HTTP protobuf to a receiver that decodes it with
the official opentelemetry-proto definitions. API calls continue the caller's traceparent; proxy
requests are client spans whose traceparent reaches the backend; a collector that cannot be
reached costs dropped spans, not requests."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import websockets.sync.client as ws_client
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from harness import API_KEY, SECRET, Server, free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP receiver (POST /v1/traces) and a connect proxy backend (POST /connect)."""

    def __init__(self):
        self.spans: queue.Queue = queue.Queue()
        self.traceparents: queue.Queue = queue.Queue()
        self.content_types: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.path == "/v1/traces":
                    outer.content_types.append(self.headers.get("content-type", ""))
                    req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    for rs in req.resource_spans:
                        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                outer.spans.put((resource, ss.scope.name, s))
                    out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                    self.send_response(200)
                    self.send_header("content-type", "application/x-protobuf")
                    self.send_header("content-length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                elif self.path == "/connect":
                    outer.traceparents.put(self.headers.get("traceparent"))
                    out = json.dumps({"result": {"user": "otel-user"}}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                else:
                    self.send_response(404)
                    self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def span(self, predicate, timeout: float = 15.0):
        """The first span received that matches (others are kept aside)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching span; received: {[s.name for _, _, s in seen]}")
            try:
                item = self.spans.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(item[2]):
                for other in seen:
                    self.spans.put(other)
                return item
            seen.append(item)


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def config(endpoint: str, proxy: str) -> str:
    return f"""
[client.token]
hmac_secret_key = "{SECRET}"
[http_api]
key = "{API_KEY}"
[engine]
type = "memory"
[client.proxy.connect]
enabled = true
endpoint = "{proxy}"
[opentelemetry]
enabled = true
api = true
proxy = true
endpoint = "{endpoint}"
service_name = "holdfast-compat"
"""


def api(srv: Server, method: str, params: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{srv.api}/{method}",
        data=json.dumps(params).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_api_calls_continue_the_callers_trace(receiver):
    base = f"http://127.0.0.1:{receiver.port}"
    with Server(config(f"{base}/v1/traces", f"{base}/connect")) as srv:
        r = api(srv, "publish", {"channel": "news", "data": {"x": 1}},
                {"traceparent": f"00-{TRACE}-{PARENT}-01"})
        assert "error" not in r, r
        resource, scope, span = receiver.span(lambda s: s.trace_id.hex() == TRACE)
        assert span.name == "holdfast.api"
        assert span.parent_span_id.hex() == PARENT
        assert span.kind == 2  # SPAN_KIND_SERVER
        assert span.status.code == 0  # success leaves the status unset
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
        a = attrs(span)
        assert a["rpc.method"] == "publish"
        assert a["http.response.status_code"] == 200
        assert resource["service.name"] == "holdfast-compat"
        assert scope == "holdfast"
        assert all(ct == "application/x-protobuf" for ct in receiver.content_types)

        # A caller's unsampled trace is not exported (spans leave in order: the sampled call
        # made after it arrives, the unsampled one never did).
        unsampled, after = "1" * 32, "2" * 32
        api(srv, "publish", {"channel": "news", "data": {}}, {"traceparent": f"00-{unsampled}-{PARENT}-00"})
        api(srv, "publish", {"channel": "news", "data": {}}, {"traceparent": f"00-{after}-{PARENT}-01"})
        seen = []
        receiver.span(lambda s: seen.append(s.trace_id.hex()) or s.trace_id.hex() == after)
        assert unsampled not in seen, seen

        # An API error is an error span; a malformed traceparent starts a new trace.
        r = api(srv, "publish", {"channel": "", "data": {}}, {"traceparent": "00-zz-yy-01"})
        assert r["error"]["code"] == 107, r
        _, _, span = receiver.span(lambda s: s.status.code == 2)
        assert span.parent_span_id == b""
        assert attrs(span)["holdfast.error_code"] == 107


def test_proxy_requests_carry_traceparent_to_the_backend(receiver):
    base = f"http://127.0.0.1:{receiver.port}"
    with Server(config(f"{base}/v1/traces", f"{base}/connect")) as srv:
        with ws_client.connect(srv.ws) as ws:
            ws.send(json.dumps({"id": 1, "connect": {}}))
            reply = json.loads(ws.recv(timeout=10).splitlines()[0])
            assert reply["connect"]["client"], reply
        sent = receiver.traceparents.get(timeout=10)
        assert sent and sent.startswith("00-") and sent.endswith("-01"), sent
        _, trace, span_id, _ = sent.split("-")
        _, _, span = receiver.span(lambda s: s.name == "holdfast.proxy.connect")
        assert span.trace_id.hex() == trace
        assert span.span_id.hex() == span_id
        assert span.kind == 3  # SPAN_KIND_CLIENT
        assert span.status.code == 0
        assert attrs(span)["url.full"] == f"{base}/connect"


def test_an_unreachable_collector_drops_spans_not_requests(receiver):
    base = f"http://127.0.0.1:{receiver.port}"
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    with Server(config(dead, f"{base}/connect")) as srv:
        for i in range(5):
            assert "error" not in api(srv, "publish", {"channel": "news", "data": {"i": i}})
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"{srv.http}/metrics", timeout=5) as r:
                text = r.read().decode()
            dropped = [
                line for line in text.splitlines()
                if line.startswith("holdfast_otel_spans_dropped_total") and 'reason="export"' in line
            ]
            if dropped and float(dropped[0].split()[-1]) >= 5:
                break
            assert time.monotonic() < deadline, dropped
            time.sleep(0.1)
        assert "OpenTelemetry export failed" in srv.log()
