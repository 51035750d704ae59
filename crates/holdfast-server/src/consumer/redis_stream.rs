//! The Redis Stream consumer (`type = "redis_stream"`): a consumer group per stream, entries
//! with a method and a payload field (or, in publication data mode, the data and the
//! publication's fields). An entry is XACKed only after its command's publication is stored;
//! its idempotency key is `<consumer>:<stream>:<entry id>`.
//!
//! Each worker first runs the entries still pending on its own consumer name (a restart after
//! a crash), then claims entries idle longer than `visibility_timeout` on other consumers
//! (XAUTOCLAIM: a node that went away), then reads new entries. A temporary failure or a
//! failure under `max_attempts` sends the worker back to its pending entries after a backoff,
//! so nothing overtakes an entry within one worker (`num_workers = 1` keeps a stream in order).
//! Entries failing `max_attempts` times go to `<stream>:dead_letter` and are acknowledged.

use super::{Backoff, Ctx, publication_command};
use crate::api::Applied;
use redis::Value;
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Entries read per call.
const COUNT: usize = 100;
/// Longest block of a read for new entries.
const BLOCK_MS: u64 = 1000;
/// Entries kept in a dead-letter stream at most (approximately).
const DEAD_LETTER_MAXLEN: usize = 100_000;

pub(super) fn start(ctx: Ctx) {
    let r = &ctx.cfg.redis_stream;
    for stream in &r.streams {
        for w in 0..r.num_workers {
            ctx.tasks.spawn(worker(ctx.clone(), stream.clone(), w));
        }
    }
    ctx.tasks.spawn(sample_lag(ctx.clone()));
}

async fn connect(ctx: &Ctx, blocking: bool) -> Result<MultiplexedConnection, redis::RedisError> {
    let client = redis::Client::open(ctx.cfg.redis_stream.address[0].as_str())?;
    let mut cfg =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Some(Duration::from_secs(5)));
    // A blocking read waits up to BLOCK_MS; the timeout only catches a dead server.
    cfg = cfg.set_response_timeout(Some(if blocking {
        Duration::from_millis(BLOCK_MS + 5000)
    } else {
        Duration::from_secs(5)
    }));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// One stream entry: its id and fields (`None` when the entry was deleted while pending).
type Entry = (String, Option<Vec<(String, Vec<u8>)>>);

async fn worker(ctx: Ctx, stream: String, w: u32) {
    let cfg = &ctx.cfg.redis_stream;
    let group = cfg.consumer_group.clone();
    let me = format!("holdfast-{}-{w}", ctx.state.node.name());
    let mut backoff = Backoff::new();
    let mut attempts: HashMap<String, u32> = HashMap::new();
    while !ctx.stop.is_cancelled() {
        let mut conn = match connect(&ctx, true).await {
            Ok(c) => c,
            Err(e) => {
                source_error(&ctx, &stream, &e, &mut backoff).await;
                continue;
            }
        };
        // From the stream's start: entries added before the first start are not lost.
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(&group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            source_error(&ctx, &stream, &e, &mut backoff).await;
            continue;
        }
        ctx.status.worker_up();
        tracing::info!(consumer = %ctx.cfg.name, stream, group, name = me, "stream worker connected");
        let mut pending_from = Some("0".to_owned());
        let mut last_claim = Instant::now() - cfg.visibility_timeout;
        let result: redis::RedisResult<()> = async {
            while !ctx.stop.is_cancelled() {
                let entries = if let Some(from) = &pending_from {
                    let e = read(&mut conn, &stream, &group, &me, from, None).await?;
                    pending_from = e.last().map(|(id, _)| id.clone());
                    e
                } else if last_claim.elapsed() >= cfg.visibility_timeout / 2 {
                    last_claim = Instant::now();
                    claim(&mut conn, &stream, &group, &me, cfg.visibility_timeout).await?
                } else {
                    tokio::select! {
                        r = read(&mut conn, &stream, &group, &me, ">", Some(BLOCK_MS)) => r?,
                        _ = ctx.stop.cancelled() => break,
                    }
                };
                let mut blocked = false;
                for (id, fields) in entries {
                    // `None`: deleted while pending, nothing to run.
                    let step = match &fields {
                        Some(f) => run(&ctx, &stream, &id, f, &mut attempts).await,
                        None => Step::Ack(None),
                    };
                    match step {
                        Step::Ack(dead) => {
                            if let Some(why) = dead
                                && let Some(f) = &fields
                            {
                                dead_letter(&mut conn, &stream, &id, &why, f).await?;
                            }
                            redis::cmd("XACK")
                                .arg(&stream)
                                .arg(&group)
                                .arg(&id)
                                .query_async::<Value>(&mut conn)
                                .await?;
                            backoff.reset();
                        }
                        Step::Again => {
                            blocked = true;
                            break;
                        }
                    }
                }
                if blocked {
                    // Back to the pending entries, in order, after a pause.
                    pending_from = Some("0".to_owned());
                    if !ctx.pause(backoff.step()).await {
                        break;
                    }
                }
            }
            Ok(())
        }
        .await;
        ctx.status.worker_down();
        if let Err(e) = result {
            source_error(&ctx, &stream, &e, &mut backoff).await;
        }
    }
}

async fn source_error(ctx: &Ctx, stream: &str, e: &redis::RedisError, backoff: &mut Backoff) {
    let wait = backoff.step();
    tracing::warn!(consumer = %ctx.cfg.name, stream, error = %e, retry_in_ms = wait.as_millis() as u64, "redis stream consumer: source error");
    ctx.status.error(&format!("{stream}: {e}"));
    ctx.pause(wait).await;
}

/// What to do with an entry after running it.
enum Step {
    /// Acknowledge (after moving it to the dead-letter stream with this error when given).
    Ack(Option<String>),
    /// Not yet: back to the pending entries after a pause.
    Again,
}

/// Runs one entry.
async fn run(
    ctx: &Ctx,
    stream: &str,
    id: &str,
    fields: &[(String, Vec<u8>)],
    attempts: &mut HashMap<String, u32>,
) -> Step {
    let cfg = &ctx.cfg.redis_stream;
    let key = format!("{}:{stream}:{id}", ctx.cfg.name);
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let payload = fields
        .iter()
        .find(|(k, _)| *k == cfg.payload_value)
        .map(|(_, v)| v.as_slice());
    let command = if cfg.publication_data_mode.enabled {
        let mode = &cfg.publication_data_mode;
        let tags = fields
            .iter()
            .filter_map(|(k, v)| {
                let t = k.strip_prefix(mode.tags_value_prefix.as_str())?;
                Some((t.to_owned(), String::from_utf8_lossy(v).into_owned()))
            })
            .collect();
        publication_command(mode, get, tags, payload.unwrap_or_default())
            .map(|(m, p)| (m.to_owned(), p))
    } else {
        match (get(&cfg.method_value), payload) {
            (Some(m), Some(p)) => Ok((m, p.to_vec())),
            _ => Err(format!(
                "no {:?} or {:?} field",
                cfg.method_value, cfg.payload_value
            )),
        }
    };
    let outcome = match command {
        Ok((method, payload)) => ctx.apply(&method, &payload, &key).await,
        Err(why) => Applied::Poison(why),
    };
    match outcome {
        Applied::Done => {
            attempts.remove(id);
            Step::Ack(None)
        }
        Applied::Retry(_) => Step::Again,
        Applied::Poison(why) => {
            let a = attempts.entry(id.to_owned()).or_insert(0);
            *a += 1;
            if *a >= ctx.cfg.max_attempts {
                attempts.remove(id);
                ctx.poisoned(&key, &why, &format!("{stream}:dead_letter"));
                Step::Ack(Some(why))
            } else {
                tracing::warn!(consumer = %ctx.cfg.name, key, why, attempt = *a, "stream entry failed: trying again");
                ctx.status.error(&format!("{key}: {why}"));
                Step::Again
            }
        }
    }
}

async fn dead_letter(
    conn: &mut MultiplexedConnection,
    stream: &str,
    id: &str,
    why: &str,
    fields: &[(String, Vec<u8>)],
) -> redis::RedisResult<()> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(format!("{stream}:dead_letter"))
        .arg("MAXLEN")
        .arg("~")
        .arg(DEAD_LETTER_MAXLEN)
        .arg("*")
        .arg("holdfast-source-id")
        .arg(id)
        .arg("holdfast-error")
        .arg(why);
    for (k, v) in fields {
        cmd.arg(k).arg(v.as_slice());
    }
    cmd.query_async::<Value>(conn).await.map(|_| ())
}

/// XREADGROUP from `from` (`0`-based ids for pending entries, `>` for new ones).
async fn read(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    me: &str,
    from: &str,
    block_ms: Option<u64>,
) -> redis::RedisResult<Vec<Entry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(me).arg("COUNT").arg(COUNT);
    if let Some(b) = block_ms {
        cmd.arg("BLOCK").arg(b);
    }
    cmd.arg("STREAMS").arg(stream).arg(from);
    let v: Value = cmd.query_async(conn).await?;
    // [[stream, [entry…]]] (or nil when the block timed out)
    let mut out = Vec::new();
    for s in items(v) {
        if let Some(entries) = items(s).into_iter().nth(1) {
            out.extend(items(entries).into_iter().filter_map(entry));
        }
    }
    Ok(out)
}

/// XAUTOCLAIM of entries idle longer than `idle` on any consumer of the group.
async fn claim(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    me: &str,
    idle: Duration,
) -> redis::RedisResult<Vec<Entry>> {
    let v: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(me)
        .arg(idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(COUNT)
        .query_async(conn)
        .await?;
    // [next-start, [entry…], [deleted id…]]
    let mut parts = items(v).into_iter();
    let _next = parts.next();
    let entries = parts.next().map(items).unwrap_or_default();
    let claimed: Vec<Entry> = entries.into_iter().filter_map(entry).collect();
    if !claimed.is_empty() {
        tracing::info!(
            stream,
            claimed = claimed.len(),
            "claimed entries idle on another consumer"
        );
    }
    Ok(claimed)
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn entry(v: Value) -> Option<Entry> {
    let mut it = items(v).into_iter();
    let id = text(it.next()?)?;
    let fields = match it.next() {
        Some(Value::Nil) | None => None,
        Some(f) => {
            let flat = items(f);
            let mut out = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let v = match v {
                    Value::BulkString(b) => b,
                    other => text(other).unwrap_or_default().into_bytes(),
                };
                out.push((text(k)?, v));
            }
            Some(out)
        }
    };
    Some((id, fields))
}

/// Samples entries not yet delivered plus entries pending, every two seconds (XINFO GROUPS).
async fn sample_lag(ctx: Ctx) {
    let cfg = &ctx.cfg.redis_stream;
    let mut conn: Option<MultiplexedConnection> = None;
    loop {
        if conn.is_none() {
            conn = connect(&ctx, false).await.ok();
        }
        if let Some(c) = &mut conn {
            let mut total = 0i64;
            for s in &cfg.streams {
                let r: redis::RedisResult<Value> = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(s)
                    .query_async(c)
                    .await;
                let Ok(v) = r else {
                    conn = None;
                    break;
                };
                for g in items(v) {
                    let mut it = items(g).into_iter();
                    let mut fields = HashMap::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        if let Some(k) = text(k) {
                            fields.insert(k, v);
                        }
                    }
                    if fields.remove("name").and_then(text).as_deref() != Some(&cfg.consumer_group)
                    {
                        continue;
                    }
                    for f in ["lag", "pending"] {
                        if let Some(Value::Int(n)) = fields.remove(f) {
                            total += n;
                        }
                    }
                }
            }
            if conn.is_some() {
                ctx.status.set_lag(total, None);
            }
        }
        if !ctx.pause(Duration::from_secs(2)).await {
            return;
        }
    }
}
