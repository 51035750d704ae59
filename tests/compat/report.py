"""Builds docs/COMPAT.md from the compatibility runs (artifacts/compat/*.json).

    python tests/compat/report.py            # write docs/COMPAT.md
    python tests/compat/report.py --check    # fail if docs/COMPAT.md is not what the run produced

The suites write the JSON files: tests/compat/js (node --test) and tests/compat (pytest), both
run by scripts/test.sh.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "artifacts" / "compat"
DOC = ROOT / "docs" / "COMPAT.md"
SUITES = ["js-node", "js-features", "js-map", "js-browser", "python"]
ENCODINGS = ["json", "protobuf", "http_stream (json)", "http_stream (protobuf)", "sse (json)", "http"]
MARK = {"pass": "✅ pass", "fail": "❌ fail", None: "— n/a"}

DIFFERENCES = """\
## Known differences from Centrifugo

Each is deliberate (a Holdfast guarantee) or not built yet; none breaks the clients above.

| Difference | Why |
|---|---|
| In a namespace with `delivery_cursor = true` (a Holdfast extension; `holdfast genconfig` sets it where personal channels live), a server-side subscription whose client presents no position recovers from the user's delivery cursor, or else from the stream start, so messages sent before the user connected are delivered on connect. Without the option such a client starts at the current top, as on Centrifugo. | Send-to-user without application retries ([SEND-TO-USER.md](SEND-TO-USER.md)); a Centrifugo configuration behaves as on Centrifugo. |
| Another user's personal channel (`#43` for user 42) is refused (103) for subscribe, history, presence and publish whatever the namespace's `allow_*` options say: the namespace holding personal channels is always user-limited. | A user's data is theirs under every configuration ([SECURITY.md](../SECURITY.md)). |
| Transports: WebSocket, HTTP-streaming and SSE with bidirectional emulation (`/emulation`), `uni_websocket`, `uni_sse`, `uni_http_stream`; no WebTransport, SockJS or `uni_grpc`. `/emulation` answers 404 with a JSON error for an unknown session (Centrifugo: 204) and 429 when the session's queue stays full; a unidirectional WebSocket's disconnect is a `disconnect` message followed by a close frame carrying the code (Centrifugo: the message, then a TCP close). | WebTransport, SockJS and gRPC are not built; the rest are clearer answers. |
| Map subscriptions are built: `subscription_type` `map`, and the presence maps `map_clients` and `map_users` (filled by the server from a stream namespace's `map_clients_presence_channel_prefix` / `map_users_presence_channel_prefix`); paged state, stream pages and the live phase; client writes allowed by `map.allow_publish_for_*` and `map.allow_remove_for_*`, never through the publish proxy; the server API's `map_publish`, `map_remove`, `map_read_state`, `map_read_stream`, `map_stats` and `map_clear`. Holdfast adds the bounds `map.max_keys` and `map.max_key_length`. The map broker (`map_broker.type`: `memory` or `redis`) defaults to the engine's: Redis with the Redis engine, where Centrifugo's default is memory (map channels shared by every node instead of one set per node); memory with the disk and memory engines, where a restart starts map channels over under new epochs (a recovering subscriber gets 112 and takes the state again, `persistent` maps included). Centrifugo's `map_broker.redis` cleanup options (`cleanup_interval`, `cleanup_batch_size`) and the `postgres` map broker are not built. Not built: shared polls (`subscription_type = "shared_poll"` is refused at start, a subscribe with `type` 4 gets 107), map publish and remove proxies, tag filters (107), delta compression and ordered maps (`asc`) on map subscriptions, client publish debounce, server-side subscriptions to map channels (refused), a map broker in the disk engine. | Not built yet / per node; a client is told (107, 112) instead of being given a stream or a position the server cannot continue. |
| Fossil deltas, tag filters (`allow_tags_filter`) and channel compaction (`allow_channel_compaction`, Centrifugo PRO) are built. Beyond open-source Centrifugo: deltas also in channels without history (each node chains the publications it fans out), a server-side tag filter per subscriber (subscription token or subscribe proxy `tf`) and-ed with the client's, filter bounds (depth 16, 128 nodes, 1,024 values: 107 beyond), API `unsubscribe` with `invalidate: true` (code 2502), and `suppressed: true` in the publish result of a stale `version`. The protobuf build of centrifuge-js is never given a compaction id (it compares int64 ids by identity and would drop every compacted push). | Stronger where it cannot surprise a Centrifugo client. |
| A connection whose client names itself `js` (centrifuge-js's default) gets one message per WebSocket frame or stream event; other clients get up to `client.max_messages_in_frame` (64) joined with `\\n`. Centrifugo PRO's `client.write_delay` is built (off by default); its channel batching options (`batch_max_size`, `batch_max_delay`, `batch_flush_latest`) and `reply_without_queue` are not. centrifuge-js 5.7 dispatches a joined frame's messages on a promise chain that the next frame's chain overtakes, so a joined frame followed closely by another reaches the application out of order (and breaks its delta decoding: seen in this suite). | The client's ordering bug; one message per frame avoids it. |
| Proxies are HTTP only (no gRPC proxies, no `subscribe_stream` proxies, no `binary_encoding` or `emulated_headers` options); without an RPC proxy or handler `rpc` answers 108 and `send` closes with 3508. RPC routing by method prefix (`rpc.routes`) and lifecycle webhooks are Holdfast additions. | Not built / additions. |
| Engines: the embedded durable engine (default), memory, and Redis for many nodes (one instance, independent sharded instances, a Redis Cluster with sharded pub/sub, or a master behind Redis Sentinel with `redis+sentinel://` addresses as Centrifugo writes them); TLS to Redis (`rediss://`, `engine.redis.tls` and `engine.redis.sentinel_tls` with Centrifugo's key names for the CA and client certificate); no Tarantool or NATS broker. | The disk engine goes beyond Centrifugo's memory engine: history survives restarts. |
| Async consumers: `postgresql` (outbox table, Centrifugo's layout and lock keys), `redis_stream` and `nats_jetstream`, with publication data mode. Beyond Centrifugo: exactly once into the channel (acknowledged after the store, idempotency keys from the source position), poison commands set aside after `max_attempts` (dead-letter table or stream, JetStream `Term`) instead of skipped, `/health` and metrics per consumer. Kafka, Google Pub/Sub, AWS SQS and Azure Service Bus are refused when enabled. Not yet: TLS options for the Redis Stream and NATS consumers (`rediss://` and `tls://` URLs are not configured). | No broker for those types runs where Holdfast is tested. |
| Server API: no `rpc` method, the `session` field is ignored; no gRPC API. `info` lists every live node (with the Redis engine, the nodes heard from in the last 7 s). `connections` (Centrifugo PRO) lists this node's connections only, filtered by `user` (no `expression` filters: refused with 107). The admin web UI has Centrifugo's keys (`admin.enabled`, `password`, `secret`, `insecure`, `external`) and its own pages; live tracing is per node. OpenTelemetry: `opentelemetry.enabled`/`api` as Centrifugo, plus spans for proxy requests; OTLP over HTTP only. | Not built / per node. |
| A binary publication (protobuf client, or API `b64data` that is not JSON) is shown by the server API's `history` as `b64data`. | JSON cannot carry raw bytes. |
| Configuration keys Holdfast does not implement (e.g. `channel_regex`, `map_broker.postgres`) are reported by name (`holdfast checkconfig`) instead of taking effect. | No silent no-op settings. |
"""


def load() -> list[dict]:
    rows = []
    for suite in SUITES:
        f = RESULTS / f"{suite}.json"
        if not f.exists():
            sys.exit(f"missing {f}: run the compatibility suites first (scripts/test.sh)")
        rows.extend(json.loads(f.read_text()))
    return rows


def render(rows: list[dict]) -> str:
    cells: dict[tuple[str, str], dict[str, str]] = {}
    order: list[tuple[str, str]] = []
    for r in rows:
        key = (r["client"], r["feature"])
        if key not in cells:
            cells[key] = {}
            order.append(key)
        prev = cells[key].get(r["encoding"])
        cells[key][r["encoding"]] = "fail" if "fail" in (prev, r["status"]) else r["status"]
    used = [e for e in ENCODINGS if any(e in c for c in cells.values())]
    passed = sum(1 for r in rows if r["status"] == "pass")
    out = [
        "# Compatibility with third-party clients",
        "",
        "Generated by `python tests/compat/report.py` from the compatibility suites that",
        "`scripts/test.sh` runs: the published clients, unmodified, against the real `holdfast`",
        "binary. `json` and `protobuf` are the encodings over WebSocket; `http_stream (…)` and",
        "`sse (json)` are the client's fallback transports forced alone (`/emulation` for the client's",
        "frames). `http` is the server API (no client protocol encoding).",
        "",
        f"Result: {passed} of {len(rows)} checks pass.",
        "",
        "| Client | Feature | " + " | ".join(used) + " |",
        "|---|---|" + "---|" * len(used),
    ]
    for client, feature in order:
        c = cells[(client, feature)]
        out.append(f"| {client} | {feature} | " + " | ".join(MARK[c.get(e)] for e in used) + " |")
    out += [
        "",
        "Clients: `centrifuge` 5.7.4 (npm) in Node with `ws` and `eventsource` 4.1.0 and bundled into",
        "a page in Debian's Chromium (playwright-core), `centrifuge-python` 0.7.0 and `cent` 5.2.0",
        "(PyPI); `httpx` 0.28.1 and curl on the unidirectional endpoints. Behind Debian's nginx over",
        "two nodes and Redis (`tests/compat/js/proxy.test.mjs`, not in this table): centrifuge-js on",
        "HTTP-streaming and SSE with `/emulation` requests on either node, and a rolling restart of",
        "both nodes under publications, every publication once, in order.",
        "",
        DIFFERENCES,
    ]
    return "\n".join(out)


def main() -> None:
    text = render(load())
    if "--check" in sys.argv:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            sys.exit("docs/COMPAT.md differs from this run: regenerate it with python tests/compat/report.py")
        print("docs/COMPAT.md matches the compatibility run")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
