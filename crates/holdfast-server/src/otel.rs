//! OpenTelemetry traces over OTLP/HTTP (protobuf): a span per server API call (continuing the
//! caller's `traceparent`) and per proxy request (whose `traceparent` header the backend gets).
//! Off by default (`opentelemetry.enabled`).
//!
//! Spans wait in a bounded queue ([`QUEUE`]) and leave in batches; a full queue or a collector
//! that cannot be reached drops spans (counted in `holdfast_otel_spans_dropped_total`), never
//! slows a request down.

use crate::config::OpenTelemetryConfig;
use prost::Message;
use rand::Rng;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Spans waiting for export at most.
const QUEUE: usize = 4096;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How long a span waits for its batch at most.
const FLUSH: Duration = Duration::from_secs(1);

/// The OTLP messages Holdfast sends (field numbers of opentelemetry-proto's trace.proto,
/// common.proto and resource.proto).
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub(crate) resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub(crate) resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub(crate) scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub(crate) attributes: Vec<KeyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub(crate) scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub(crate) spans: Vec<Span>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub(crate) name: String,
        #[prost(string, tag = "2")]
        pub(crate) version: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Span {
        #[prost(bytes = "vec", tag = "1")]
        pub(crate) trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub(crate) span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub(crate) parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub(crate) name: String,
        #[prost(int32, tag = "6")]
        pub(crate) kind: i32,
        #[prost(fixed64, tag = "7")]
        pub(crate) start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub(crate) end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub(crate) attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub(crate) status: Option<Status>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Status {
        #[prost(string, tag = "2")]
        pub(crate) message: String,
        #[prost(int32, tag = "3")]
        pub(crate) code: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct KeyValue {
        #[prost(string, tag = "1")]
        pub(crate) key: String,
        #[prost(message, optional, tag = "2")]
        pub(crate) value: Option<AnyValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct AnyValue {
        #[prost(oneof = "Value", tags = "1, 3")]
        pub(crate) value: Option<Value>,
    }
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Value {
        #[prost(string, tag = "1")]
        String(String),
        #[prost(int64, tag = "3")]
        Int(i64),
    }
}

/// Span kinds (OTLP `Span.SpanKind`).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Serving a request (server API).
    Server = 2,
    /// Calling out (proxy requests).
    Client = 3,
}

/// A trace context: W3C `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// Span id.
    pub span_id: [u8; 8],
    /// The caller samples this trace (flag 01); an unsampled caller's spans are not exported.
    pub sampled: bool,
}

impl Context {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; None when malformed or all zero.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || flags.len() != 2 {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        hex(version)?;
        let flags = hex(flags)?.first().copied()?;
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` value naming this span.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The exporter: spans go to the collector in batches.
#[derive(Debug)]
pub struct Otel {
    tx: mpsc::Sender<pb::Span>,
    /// `opentelemetry.api`.
    pub api: bool,
    /// `opentelemetry.proxy`.
    pub proxy: bool,
}

/// A span being timed; sent when [`SpanGuard::end`] is called (dropped without it: not sent).
#[derive(Debug)]
pub struct SpanGuard {
    span: pb::Span,
    /// This span's context (for `traceparent` to the next hop).
    pub context: Context,
}

impl SpanGuard {
    /// Adds a string attribute.
    pub fn attr(&mut self, key: &str, value: impl Into<String>) {
        self.span.attributes.push(pb::KeyValue {
            key: key.to_owned(),
            value: Some(pb::AnyValue {
                value: Some(pb::Value::String(value.into())),
            }),
        });
    }

    /// Adds an integer attribute.
    pub fn attr_int(&mut self, key: &str, value: i64) {
        self.span.attributes.push(pb::KeyValue {
            key: key.to_owned(),
            value: Some(pb::AnyValue {
                value: Some(pb::Value::Int(value)),
            }),
        });
    }

    /// Ends the span: `error` set marks it failed (status ERROR with that message; a success
    /// leaves the status unset, as the conventions ask of instrumentation). Spans of a trace the
    /// caller does not sample are not exported.
    pub fn end(mut self, otel: &Otel, error: Option<String>) {
        if !self.context.sampled {
            return;
        }
        self.span.end_time_unix_nano = now_nanos();
        self.span.status = error.map(|message| pb::Status { message, code: 2 });
        if otel.tx.try_send(self.span).is_err() {
            metrics::counter!("holdfast_otel_spans_dropped_total", "reason" => "queue")
                .increment(1);
        }
    }
}

impl Otel {
    /// Starts the exporter when `opentelemetry.enabled` (inside a Tokio runtime).
    pub fn start(cfg: &OpenTelemetryConfig, node: &str) -> Option<std::sync::Arc<Self>> {
        if !cfg.enabled {
            return None;
        }
        let endpoint = cfg.traces_endpoint();
        let service = cfg.service_name();
        tracing::info!(endpoint = %endpoint, service = %service, api = cfg.api, proxy = cfg.proxy, "OpenTelemetry traces over OTLP/HTTP");
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = pb::Resource {
            attributes: [
                ("service.name", service),
                ("service.version", env!("CARGO_PKG_VERSION").to_owned()),
                ("service.instance.id", node.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| pb::KeyValue {
                key: k.into(),
                value: Some(pb::AnyValue {
                    value: Some(pb::Value::String(v)),
                }),
            })
            .collect(),
        };
        tokio::spawn(export(rx, endpoint, resource, cfg.export_headers()));
        for m in ["queue", "export"] {
            metrics::counter!("holdfast_otel_spans_dropped_total", "reason" => m).increment(0);
        }
        Some(std::sync::Arc::new(Self {
            tx,
            api: cfg.api,
            proxy: cfg.proxy,
        }))
    }

    /// Starts a span named `name`, a child of `parent` (a new trace without one).
    pub fn span(&self, name: &str, kind: Kind, parent: Option<Context>) -> SpanGuard {
        let mut rng = rand::rng();
        let span_id: [u8; 8] = loop {
            let id: [u8; 8] = rng.random();
            if id != [0; 8] {
                break id;
            }
        };
        let trace_id = parent.map_or_else(
            || loop {
                let id: [u8; 16] = rng.random();
                if id != [0; 16] {
                    break id;
                }
            },
            |p| p.trace_id,
        );
        SpanGuard {
            span: pb::Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                parent_span_id: parent.map(|p| p.span_id.to_vec()).unwrap_or_default(),
                name: name.to_owned(),
                kind: kind as i32,
                start_time_unix_nano: now_nanos(),
                ..Default::default()
            },
            context: Context {
                trace_id,
                span_id,
                sampled: parent.is_none_or(|p| p.sampled),
            },
        }
    }
}

async fn export(
    mut rx: mpsc::Receiver<pb::Span>,
    endpoint: String,
    resource: pb::Resource,
    headers: std::collections::BTreeMap<String, String>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut warned = false;
    loop {
        // Wait for the first span, then up to FLUSH for the rest of the batch.
        match rx.recv().await {
            Some(s) => batch.push(s),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        let body = pb::ExportTraceServiceRequest {
            resource_spans: vec![pb::ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![pb::ScopeSpans {
                    scope: Some(pb::InstrumentationScope {
                        name: "holdfast".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: std::mem::take(&mut batch),
                }],
            }],
        }
        .encode_to_vec();
        let mut req = http
            .post(&endpoint)
            .header("content-type", "application/x-protobuf")
            .body(body);
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let failed = match req.send().await {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
            Err(e) => Some(e.to_string()),
        };
        match failed {
            None => {
                metrics::counter!("holdfast_otel_spans_exported_total").increment(n as u64);
                if warned {
                    tracing::info!(endpoint = %endpoint, "OpenTelemetry collector reachable again");
                    warned = false;
                }
            }
            Some(why) => {
                metrics::counter!("holdfast_otel_spans_dropped_total", "reason" => "export")
                    .increment(n as u64);
                if !warned {
                    tracing::warn!(endpoint = %endpoint, error = %why, spans = n, "OpenTelemetry export failed: spans dropped (logged once until it works again)");
                    warned = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly() {
        let c = Context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(c.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(c.sampled);
        let unsampled = Context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .expect("valid");
        assert!(!unsampled.sampled);
        assert!(unsampled.header().ends_with("-00"));
        assert_eq!(
            c.header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(Context::parse(bad).is_none(), "{bad}");
        }
    }
}
