//! `holdfast-bench verify --source postgres|redis-stream|nats`: publications enter through a
//! consumer's source instead of the HTTP API. One writer per channel inserts rows (PostgreSQL
//! transactions, a fraction rolled back), stream entries (Redis: a fraction discarded in
//! MULTI/DISCARD) or JetStream messages, each carrying `{"p":"src","s":<seq>,"rb":<rolled
//! back>}`; at the end every channel's history is read back: each committed write must be there
//! once and in order, no rolled-back write ever.
//!
//! The server runs the matching consumer (scripts/verify.sh passes it in `HOLDFAST_CONSUMERS`):
//! table `holdfast_outbox`, stream `holdfast-verify` (group `holdfast`), JetStream stream
//! `HOLDFAST_VERIFY` on subjects `holdfast-verify.>`.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Where publications enter.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Rows in the `holdfast_outbox` table.
    Postgres,
    /// Entries of the `holdfast-verify` stream.
    RedisStream,
    /// Messages on `holdfast-verify.<channel index>` in JetStream stream `HOLDFAST_VERIFY`.
    Nats,
}

/// The stream and subjects the NATS writer publishes to (created when missing).
pub const NATS_STREAM: &str = "HOLDFAST_VERIFY";
/// The Redis stream the writers add to.
pub const REDIS_STREAM: &str = "holdfast-verify";

/// A connection to the source.
#[derive(Debug)]
pub enum Writer {
    /// PostgreSQL.
    Pg(tokio_postgres::Client),
    /// Redis.
    Redis(redis::aio::MultiplexedConnection),
    /// NATS JetStream.
    Nats(async_nats::jetstream::Context),
}

impl Writer {
    /// Connects (one connection per channel writer: a Redis MULTI needs its own).
    pub async fn connect(source: Source, url: &str) -> anyhow::Result<Self> {
        Ok(match source {
            Source::Postgres => {
                let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .context("connecting to PostgreSQL")?;
                tokio::spawn(conn);
                Writer::Pg(c)
            }
            Source::RedisStream => Writer::Redis(
                redis::Client::open(url)?
                    .get_multiplexed_async_connection()
                    .await
                    .context("connecting to Redis")?,
            ),
            Source::Nats => {
                let js = async_nats::jetstream::new(
                    async_nats::connect(url)
                        .await
                        .context("connecting to NATS")?,
                );
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: NATS_STREAM.into(),
                    subjects: vec!["holdfast-verify.>".into()],
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating the JetStream stream: {e}"))?;
                Writer::Nats(js)
            }
        })
    }

    /// Writes one publish command for `channel`; `rollback` aborts the transaction instead of
    /// committing (PostgreSQL, Redis). `Ok(true)`: committed.
    pub async fn write(
        &mut self,
        k: usize,
        partitions: usize,
        command: &serde_json::Value,
        rollback: bool,
    ) -> anyhow::Result<bool> {
        let payload = command.to_string();
        match self {
            Writer::Pg(c) => {
                let tx = c.transaction().await?;
                tx.execute(
                    "INSERT INTO holdfast_outbox (method, payload, partition) VALUES ('publish', $1::text::jsonb, $2)",
                    &[&payload, &((k % partitions.max(1)) as i32)],
                )
                .await?;
                if rollback {
                    tx.rollback().await?;
                    return Ok(false);
                }
                tx.commit().await?;
                Ok(true)
            }
            Writer::Redis(c) => {
                let mut xadd = redis::cmd("XADD");
                xadd.arg(REDIS_STREAM)
                    .arg("*")
                    .arg("method")
                    .arg("publish")
                    .arg("payload")
                    .arg(&payload);
                if rollback {
                    redis::cmd("MULTI").query_async::<()>(c).await?;
                    xadd.query_async::<redis::Value>(c).await?;
                    redis::cmd("DISCARD").query_async::<()>(c).await?;
                    return Ok(false);
                }
                xadd.query_async::<String>(c).await?;
                Ok(true)
            }
            Writer::Nats(js) => {
                let mut h = async_nats::HeaderMap::new();
                h.insert("centrifugo-method", "publish");
                js.publish_with_headers(format!("holdfast-verify.{k}"), h, payload.into())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(true)
            }
        }
    }
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct Written {
    /// Channel → sequence numbers committed, in order.
    pub committed: BTreeMap<String, Vec<u64>>,
    /// Channel → sequence numbers whose write failed (the commit may or may not have happened).
    pub uncertain: BTreeMap<String, BTreeSet<u64>>,
    /// Writes rolled back.
    pub rolled_back: u64,
}

/// The source account of a run.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct SourceReport {
    /// Writes committed.
    pub committed: u64,
    /// Writes rolled back (never to be published).
    pub rolled_back: u64,
    /// Writes that failed without knowing whether they committed (not counted as lost).
    pub uncertain: u64,
    /// Committed writes found in the channels' history.
    pub stored: u64,
    /// Committed writes missing from the history.
    pub lost: u64,
    /// Writes published more than once.
    pub duplicated: u64,
    /// Writes published before an earlier write of the same channel.
    pub out_of_order: u64,
    /// Rolled-back writes that were published anyway.
    pub rolled_back_delivered: u64,
    /// Milliseconds from the end of writing until every committed write was stored.
    pub drain_ms: u64,
}

impl SourceReport {
    /// 0 lost, 0 duplicated, 0 out of order, 0 rolled back delivered.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.rolled_back_delivered == 0
    }
}

/// Accounts one channel: `history` is the `(s, rb)` of its publications written by the source
/// writers, oldest first.
pub fn account_channel(
    committed: &[u64],
    uncertain: &BTreeSet<u64>,
    history: &[(u64, bool)],
    r: &mut SourceReport,
) {
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let mut last = 0u64;
    for &(s, rb) in history {
        if rb {
            r.rolled_back_delivered += 1;
            continue;
        }
        let n = seen.entry(s).or_default();
        *n += 1;
        if *n > 1 {
            r.duplicated += 1;
            continue;
        }
        if s < last {
            r.out_of_order += 1;
        }
        last = last.max(s);
    }
    r.committed += committed.len() as u64;
    r.uncertain += uncertain.len() as u64;
    for s in committed {
        if seen.contains_key(s) {
            r.stored += 1;
        } else {
            r.lost += 1;
        }
    }
}

/// Reads the channels' histories until every committed write is there (or `drain` passes),
/// then accounts them. `history` fetches one channel's publications' data, oldest first.
pub async fn account<F, Fut>(written: &Written, drain: Duration, mut history: F) -> SourceReport
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<serde_json::Value>>>,
{
    let started = Instant::now();
    let empty = BTreeSet::new();
    loop {
        let mut r = SourceReport {
            rolled_back: written.rolled_back,
            ..Default::default()
        };
        let mut complete = true;
        for (ch, committed) in &written.committed {
            let data = match history(ch.clone()).await {
                Ok(d) => d,
                Err(_) => {
                    complete = false;
                    continue;
                }
            };
            let h: Vec<(u64, bool)> = data
                .iter()
                .filter(|d| d["p"] == "src")
                .filter_map(|d| Some((d["s"].as_u64()?, d["rb"].as_bool().unwrap_or(false))))
                .collect();
            let uncertain = written.uncertain.get(ch).unwrap_or(&empty);
            account_channel(committed, uncertain, &h, &mut r);
        }
        r.drain_ms = started.elapsed().as_millis() as u64;
        if (complete && r.lost == 0) || started.elapsed() >= drain {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_account_names_every_failure() {
        let mut r = SourceReport::default();
        let none = BTreeSet::new();
        account_channel(
            &[1, 2, 3],
            &none,
            &[(1, false), (2, false), (3, false)],
            &mut r,
        );
        assert!(r.ok() && r.stored == 3);
        let mut r = SourceReport::default();
        // 2 lost, 1 twice, 4 before 3, a rolled-back write published.
        account_channel(
            &[1, 2, 3, 4],
            &BTreeSet::from([5]),
            &[(1, false), (1, false), (4, false), (3, false), (9, true)],
            &mut r,
        );
        assert_eq!(
            r,
            SourceReport {
                committed: 4,
                uncertain: 1,
                stored: 3,
                lost: 1,
                duplicated: 1,
                out_of_order: 1,
                rolled_back_delivered: 1,
                ..Default::default()
            }
        );
        assert!(!r.ok());
    }
}
