//! Server API methods of map channels: `map_publish`, `map_remove`, `map_read_state`,
//! `map_read_stream`, `map_stats`, `map_clear` (Centrifugo's names and shapes).

use crate::api::{ApiError, ApiResult, bad, required, write_api_publication};
use crate::server::AppState;
use base64::Engine as _;
use bytes::Bytes;
use holdfast_core::engine::map::{KeyMode, MapOutcome, MapWrite, StateQuery};
use holdfast_protocol::json::{raw_to_bytes, write_str};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `map_publish` and `map_remove`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct MapWriteReq<'a> {
    channel: String,
    key: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    b64data: String,
    tags: BTreeMap<String, String>,
    /// Set by consumers from the source position when the command has none.
    pub(crate) idempotency_key: String,
    version: u64,
    version_epoch: String,
    key_mode: String,
}

/// `map_read_state`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct MapStateReq {
    channel: String,
    cursor: String,
    limit: i64,
    key: String,
    revision_offset: u64,
    revision_epoch: String,
}

/// `map_read_stream`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct MapStreamReq {
    channel: String,
    since_offset: Option<u64>,
    since_epoch: String,
    limit: i64,
    reverse: bool,
}

/// `map_stats` and `map_clear`.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct MapChannelReq {
    channel: String,
}

fn checked_lengths(r: &MapWriteReq<'_>) -> Result<(), ApiError> {
    required(&r.channel, "channel")?;
    required(&r.key, "key")?;
    if r.idempotency_key.len() > 256 {
        return Err(bad("idempotency_key too long"));
    }
    if r.version_epoch.len() > 64 {
        return Err(bad("version_epoch too long"));
    }
    Ok(())
}

/// `map_publish` (`removed` = false) or `map_remove`.
pub(crate) async fn write(state: &AppState, r: &MapWriteReq<'_>, removed: bool) -> ApiResult {
    checked_lengths(r)?;
    let (data, binary) = if removed {
        (Bytes::new(), false)
    } else if let Some(d) = r.data.filter(|d| d.get() != "null") {
        (raw_to_bytes(d), false)
    } else if !r.b64data.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&r.b64data)
            .map_err(|_| bad("b64data is not base64"))?;
        let binary = !holdfast_protocol::json::is_json(&raw);
        (Bytes::from(raw), binary)
    } else {
        return Err(bad("data required"));
    };
    let key_mode = match r.key_mode.as_str() {
        "" => KeyMode::Any,
        "if_new" => KeyMode::IfNew,
        "if_exists" => KeyMode::IfExists,
        _ => return Err(bad("key_mode must be if_new or if_exists")),
    };
    let w = MapWrite {
        key: r.key.clone(),
        data,
        removed,
        info: None,
        tags: (!r.tags.is_empty()).then(|| Arc::new(r.tags.clone())),
        binary,
        idempotency_key: (!r.idempotency_key.is_empty()).then(|| r.idempotency_key.clone()),
        idempotency_ttl: std::time::Duration::ZERO,
        version: r.version,
        version_epoch: r.version_epoch.clone(),
        key_mode,
    };
    let out = state.node.map_publish(&r.channel, w).await?;
    Ok(outcome(&out))
}

fn outcome(out: &MapOutcome) -> Vec<u8> {
    let mut o = format!("{{\"offset\":{},\"epoch\":", out.position.offset).into_bytes();
    write_str(&mut o, &out.position.epoch);
    if let Some(s) = out.suppressed {
        o.extend_from_slice(b",\"suppressed\":true,\"suppress_reason\":");
        write_str(&mut o, s.reason());
    }
    o.push(b'}');
    o
}

fn entries(out: &mut Vec<u8>, pubs: &[Arc<holdfast_protocol::Publication>]) {
    out.extend_from_slice(b"\"entries\":[");
    for (i, p) in pubs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_api_publication(out, p);
    }
    out.push(b']');
}

/// `map_read_state`.
pub(crate) async fn read_state(state: &AppState, r: &MapStateReq) -> ApiResult {
    required(&r.channel, "channel")?;
    if r.limit < 0 {
        return Err(bad("limit must not be negative"));
    }
    if r.cursor.len() > 1024 || r.key.len() > 1024 || r.revision_epoch.len() > 64 {
        return Err(bad("cursor, key or revision_epoch too long"));
    }
    let q = StateQuery {
        cursor: r.cursor.clone(),
        limit: usize::try_from(r.limit).unwrap_or(0),
        revision: (!r.revision_epoch.is_empty())
            .then(|| (r.revision_offset, r.revision_epoch.clone())),
        key: (!r.key.is_empty()).then(|| r.key.clone()),
    };
    let page = state.node.map_read_state(&r.channel, q).await?;
    let mut out = b"{".to_vec();
    entries(&mut out, &page.entries);
    out.extend_from_slice(format!(",\"offset\":{},\"epoch\":", page.top.offset).as_bytes());
    write_str(&mut out, &page.top.epoch);
    if !page.cursor.is_empty() {
        out.extend_from_slice(b",\"cursor\":");
        write_str(&mut out, &page.cursor);
    }
    out.push(b'}');
    Ok(out)
}

/// `map_read_stream`.
pub(crate) async fn read_stream(state: &AppState, r: &MapStreamReq) -> ApiResult {
    required(&r.channel, "channel")?;
    if r.since_epoch.len() > 64 {
        return Err(bad("since_epoch too long"));
    }
    let since = r
        .since_offset
        .map(|o| (o, r.since_epoch.clone()))
        .or_else(|| (!r.since_epoch.is_empty()).then(|| (0, r.since_epoch.clone())));
    if r.reverse && since.as_ref().is_some_and(|(o, _)| *o == 0) {
        return Err(bad("reverse reads need since_offset above 0"));
    }
    let limit = match r.limit {
        l if l < 0 => None,
        l => Some(usize::try_from(l).unwrap_or(0)),
    };
    let page = state
        .node
        .map_read_stream(&r.channel, since, limit, r.reverse)
        .await?;
    let mut out = b"{".to_vec();
    entries(&mut out, &page.publications);
    out.extend_from_slice(format!(",\"offset\":{},\"epoch\":", page.top.offset).as_bytes());
    write_str(&mut out, &page.top.epoch);
    out.push(b'}');
    Ok(out)
}

/// `map_stats`.
pub(crate) async fn stats(state: &AppState, r: &MapChannelReq) -> ApiResult {
    required(&r.channel, "channel")?;
    let n = state.node.map_num_keys(&r.channel).await?;
    Ok(format!("{{\"num_keys\":{n}}}").into_bytes())
}

/// `map_clear`.
pub(crate) async fn clear(state: &AppState, r: &MapChannelReq) -> ApiResult {
    required(&r.channel, "channel")?;
    state.node.map_clear(&r.channel).await?;
    Ok(b"{}".to_vec())
}
