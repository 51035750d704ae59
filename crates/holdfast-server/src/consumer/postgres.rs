//! The PostgreSQL outbox consumer (`type = "postgresql"`), Centrifugo's table and locking: a
//! backend inserts `(method, payload, partition)` rows in the transaction that changes its own
//! data; each partition is processed in id order inside one transaction holding the
//! partition's advisory lock (so several nodes share a table, each row run by one of them), and
//! the rows run are deleted in that transaction.
//!
//! A row is deleted only after its command's publication is stored; the publication's
//! idempotency key is `<consumer>:<partition>:<id>`, so a crash before the commit runs the row
//! again without a second publication. A row failing `max_attempts` times with a permanent
//! error moves to `<outbox>_dead_letter` (created when missing; logged and dropped when it
//! cannot be created). A temporary failure stops the partition's pass, which is retried with
//! backoff: nothing behind it overtakes it.

use super::{Backoff, Ctx, error_chain};
use crate::api::Applied;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};

/// The statements of one consumer (its table name is validated: letters, digits, `_`, `.`).
struct Sql {
    select: String,
    delete: String,
    dead_letter_create: String,
    dead_letter_insert: String,
    dead_letter_table: String,
    lag: String,
    count: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let dl = format!("{table}_dead_letter");
        Self {
            select: format!(
                "SELECT id::bigint, method::text, payload::text FROM {table} \
                 WHERE partition = $1::integer ORDER BY id ASC LIMIT $2::bigint"
            ),
            delete: format!("DELETE FROM {table} WHERE id = ANY($1::bigint[])"),
            dead_letter_create: format!(
                "CREATE TABLE IF NOT EXISTS {dl} (id bigint PRIMARY KEY, method text NOT NULL, \
                 payload text NOT NULL, partition integer NOT NULL, created_at timestamptz, \
                 error text NOT NULL, failed_at timestamptz NOT NULL DEFAULT now())"
            ),
            dead_letter_insert: format!(
                "INSERT INTO {dl} (id, method, payload, partition, created_at, error) \
                 SELECT id::bigint, method::text, payload::text, partition::integer, created_at, $2::text \
                 FROM {table} WHERE id = $1::bigint ON CONFLICT (id) DO NOTHING"
            ),
            dead_letter_table: dl,
            lag: format!(
                "SELECT count(*)::bigint, COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 \
                 FROM (SELECT created_at FROM {table} ORDER BY id LIMIT 1000000) s"
            ),
            count: format!("SELECT count(*)::bigint FROM (SELECT 1 FROM {table} LIMIT 1000000) s"),
        }
    }
}

/// Starts the partitions, the `LISTEN` task and the lag sampler.
pub(super) fn start(ctx: Ctx) {
    let cfg = &ctx.cfg.postgresql;
    let tls = match Tls::new(&cfg.tls) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::error!(consumer = %ctx.cfg.name, error = %e, "outbox consumer not started: TLS configuration");
            ctx.status.error(&format!("tls: {e}"));
            return;
        }
    };
    let sql = Arc::new(Sql::new(&cfg.outbox_table_name));
    let wakers: Arc<Vec<Notify>> =
        Arc::new((0..cfg.num_partitions).map(|_| Notify::new()).collect());
    if !cfg.partition_notification_channel.is_empty() {
        ctx.tasks
            .spawn(listen(ctx.clone(), wakers.clone(), tls.clone()));
    }
    ctx.tasks
        .spawn(sample_lag(ctx.clone(), sql.clone(), tls.clone()));
    for p in 0..cfg.num_partitions {
        ctx.tasks.spawn(partition(
            ctx.clone(),
            p,
            wakers.clone(),
            sql.clone(),
            tls.clone(),
        ));
    }
}

/// Plain text, or TLS verified against the configured CA (never a fallback to plain).
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    fn new(cfg: &crate::config::consumers::PgTlsConfig) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        if !cfg.enabled {
            return Ok(Tls::Plain);
        }
        let mut roots = rustls::RootCertStore::empty();
        let mut cas: Vec<CertificateDer<'static>> = Vec::new();
        if !cfg.server_ca_pem_file.is_empty() {
            for c in CertificateDer::pem_file_iter(&cfg.server_ca_pem_file)
                .map_err(|e| format!("{}: {e}", cfg.server_ca_pem_file))?
            {
                cas.push(c.map_err(|e| format!("{}: {e}", cfg.server_ca_pem_file))?);
            }
        }
        for c in CertificateDer::pem_slice_iter(cfg.server_ca_pem.as_bytes()) {
            cas.push(c.map_err(|e| format!("server_ca_pem: {e}"))?);
        }
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err("no CA certificate found".into());
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = if cfg.cert_pem_file.is_empty() {
            builder.with_no_client_auth()
        } else {
            let chain = CertificateDer::pem_file_iter(&cfg.cert_pem_file)
                .map_err(|e| format!("{}: {e}", cfg.cert_pem_file))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cfg.cert_pem_file))?;
            let key = PrivateKeyDer::from_pem_file(&cfg.key_pem_file)
                .map_err(|e| format!("{}: {e}", cfg.key_pem_file))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        };
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
    }
}

/// Connects with the consumer's DSN (a 5 s connect timeout and an application name unless the
/// DSN sets them).
async fn connect(ctx: &Ctx, tls: &Tls) -> Result<Client, tokio_postgres::Error> {
    let cfg = config(ctx, tls)?;
    let client = match tls {
        Tls::Plain => {
            let (client, conn) = cfg.connect(NoTls).await?;
            drive(conn);
            client
        }
        Tls::Rustls(make) => {
            let (client, conn) = cfg.connect(make.clone()).await?;
            drive(conn);
            client
        }
    };
    Ok(client)
}

fn drive<S, T>(conn: Connection<S, T>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgresql connection closed");
        }
    });
}

fn config(ctx: &Ctx, tls: &Tls) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut c: tokio_postgres::Config = ctx.cfg.postgresql.dsn.parse()?;
    if matches!(tls, Tls::Rustls(_)) {
        c.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(5));
    }
    if c.get_application_name().is_none() {
        c.application_name(format!("holdfast-consumer-{}", ctx.cfg.name));
    }
    Ok(c)
}

/// How a pass ended.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    /// A full page was run: run the next at once.
    Full,
    /// Fewer rows than the limit (or the partition is locked elsewhere): wait for a wake-up.
    Idle,
    /// A row could not run yet (temporary failure, or a failure under `max_attempts`).
    Blocked,
}

async fn partition(ctx: Ctx, p: u32, wakers: Arc<Vec<Notify>>, sql: Arc<Sql>, tls: Arc<Tls>) {
    let name = ctx.cfg.name.clone();
    let poll = ctx.cfg.postgresql.partition_poll_interval;
    let mut backoff = Backoff::new();
    let mut attempts: HashMap<i64, u32> = HashMap::new();
    while !ctx.stop.is_cancelled() {
        let mut client = match connect(&ctx, &tls).await {
            Ok(c) => c,
            Err(e) => {
                let wait = backoff.step();
                let e = error_chain(&e);
                tracing::warn!(consumer = %name, partition = p, error = %e, retry_in_ms = wait.as_millis() as u64, "outbox: cannot connect to PostgreSQL");
                ctx.status.error(&format!("connect: {e}"));
                if !ctx.pause(wait).await {
                    return;
                }
                continue;
            }
        };
        let dead_letter = ensure_dead_letter(&client, &sql, &name).await;
        tracing::info!(consumer = %name, partition = p, "outbox partition connected");
        // Counted up while passes succeed: a missing table or a lost permission shows in
        // /health as a partition down, not only as a growing error count.
        let mut up = false;
        loop {
            let r = pass(&ctx, &mut client, p, &sql, &mut attempts, dead_letter).await;
            if r.is_ok() != up {
                up = r.is_ok();
                if up {
                    ctx.status.worker_up();
                } else {
                    ctx.status.worker_down();
                }
            }
            match r {
                Ok(Pass::Full) => backoff.reset(),
                Ok(Pass::Idle) => {
                    backoff.reset();
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = wakers[p as usize].notified() => {}
                        _ = ctx.stop.cancelled() => {}
                    }
                }
                Ok(Pass::Blocked) => {
                    if !ctx.pause(backoff.step()).await {
                        break;
                    }
                }
                Err(e) => {
                    let wait = backoff.step();
                    let e = error_chain(&e);
                    tracing::warn!(consumer = %name, partition = p, error = %e, retry_in_ms = wait.as_millis() as u64, "outbox pass failed");
                    ctx.status.error(&format!("partition {p}: {e}"));
                    if client.is_closed() {
                        break;
                    }
                    // A notification (a row inserted: the table is back) ends the wait early.
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = wakers[p as usize].notified() => {}
                        _ = ctx.stop.cancelled() => {}
                    }
                }
            }
            if ctx.stop.is_cancelled() {
                break;
            }
        }
        if up {
            ctx.status.worker_down();
        }
    }
}

/// Creates the dead-letter table when missing; `false` when it cannot be (then poison rows are
/// logged with their content and dropped).
async fn ensure_dead_letter(client: &Client, sql: &Sql, name: &str) -> bool {
    if table_exists(client, &sql.dead_letter_table).await {
        return true;
    }
    match client.batch_execute(&sql.dead_letter_create).await {
        Ok(()) => true,
        // Several nodes creating it at once: one wins, the others see it exist.
        Err(_) if table_exists(client, &sql.dead_letter_table).await => true,
        Err(e) => {
            tracing::warn!(consumer = %name, table = %sql.dead_letter_table, error = %error_chain(&e), "outbox: cannot create the dead-letter table; poison rows will be logged and dropped");
            false
        }
    }
}

async fn table_exists(client: &Client, table: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&table])
        .await
        .is_ok_and(|r| r.get::<_, bool>(0))
}

async fn pass(
    ctx: &Ctx,
    client: &mut Client,
    p: u32,
    sql: &Sql,
    attempts: &mut HashMap<i64, u32>,
    dead_letter: bool,
) -> Result<Pass, tokio_postgres::Error> {
    let cfg = &ctx.cfg.postgresql;
    let name = &ctx.cfg.name;
    let limit = cfg.partition_select_limit as usize;
    let tx = client.transaction().await?;
    // Centrifugo's lock key, so Holdfast and Centrifugo nodes can share a table while migrating.
    let lock = format!("centrifugo_partition_lock_{name}{p}");
    if cfg.use_try_lock {
        let row = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock(hashtext($1::text))",
                &[&lock],
            )
            .await?;
        if !row.try_get::<_, bool>(0)? {
            tx.rollback().await?;
            return Ok(Pass::Idle);
        }
    } else {
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1::text))", &[&lock])
            .await?;
    }
    let rows = tx
        .query(&sql.select, &[&(p as i32), &(limit as i64)])
        .await?;
    let mut outcome = if rows.len() >= limit {
        Pass::Full
    } else {
        Pass::Idle
    };
    let mut done: Vec<i64> = Vec::with_capacity(rows.len());
    let mut dead: Vec<(i64, String)> = Vec::new();
    for row in &rows {
        let id: i64 = row.try_get(0)?;
        let method: String = row.try_get(1)?;
        let payload: String = row.try_get(2)?;
        let key = format!("{name}:{p}:{id}");
        match ctx.apply(&method, payload.as_bytes(), &key).await {
            Applied::Done => {
                attempts.remove(&id);
                done.push(id);
            }
            Applied::Retry(_) => {
                outcome = Pass::Blocked;
                break;
            }
            Applied::Poison(why) => {
                let a = attempts.entry(id).or_insert(0);
                *a += 1;
                if *a >= ctx.cfg.max_attempts {
                    attempts.remove(&id);
                    if dead_letter {
                        tx.execute(&sql.dead_letter_insert, &[&id, &why]).await?;
                    } else {
                        tracing::error!(consumer = %name, key, method, payload = %truncate(&payload, 1024), "dropping a poison row (no dead-letter table)");
                    }
                    dead.push((id, why));
                } else {
                    tracing::warn!(consumer = %name, key, why, attempt = *a, max_attempts = ctx.cfg.max_attempts, "outbox row failed: trying again");
                    ctx.status.error(&format!("{key}: {why}"));
                    outcome = Pass::Blocked;
                    break;
                }
            }
        }
    }
    if done.is_empty() && dead.is_empty() {
        tx.rollback().await?;
        return Ok(outcome);
    }
    let ids: Vec<i64> = done
        .iter()
        .copied()
        .chain(dead.iter().map(|d| d.0))
        .collect();
    tx.execute(&sql.delete, &[&ids]).await?;
    tx.commit().await?;
    let moved_to = if dead_letter {
        sql.dead_letter_table.as_str()
    } else {
        "log"
    };
    for (id, why) in dead {
        ctx.poisoned(&format!("{name}:{p}:{id}"), &why, moved_to);
    }
    Ok(outcome)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `LISTEN`s on `partition_notification_channel` and wakes the partition a notification names
/// (every partition after (re)connecting, for rows inserted while not listening).
async fn listen(ctx: Ctx, wakers: Arc<Vec<Notify>>, tls: Arc<Tls>) {
    let name = ctx.cfg.name.clone();
    let channel = ctx.cfg.postgresql.partition_notification_channel.clone();
    let mut backoff = Backoff::new();
    while !ctx.stop.is_cancelled() {
        let connected = match config(&ctx, &tls) {
            Ok(c) => match &*tls {
                Tls::Plain => c
                    .connect(NoTls)
                    .await
                    .map(|(client, conn)| (client, read_notifications(conn, &wakers, &name))),
                Tls::Rustls(make) => c
                    .connect(make.clone())
                    .await
                    .map(|(client, conn)| (client, read_notifications(conn, &wakers, &name))),
            },
            Err(e) => Err(e),
        };
        let (client, reader) = match connected {
            Ok(x) => x,
            Err(e) => {
                let wait = backoff.step();
                let e = error_chain(&e);
                tracing::warn!(consumer = %name, error = %e, "outbox: cannot connect for LISTEN");
                ctx.status.error(&format!("listen: {e}"));
                if !ctx.pause(wait).await {
                    return;
                }
                continue;
            }
        };
        match client.batch_execute(&format!("LISTEN {channel}")).await {
            Ok(()) => {
                backoff.reset();
                wakers.iter().for_each(Notify::notify_one);
                tracing::info!(consumer = %name, channel, "outbox: listening for notifications");
                tokio::select! {
                    _ = ctx.stop.cancelled() => {}
                    _ = reader => {}
                }
            }
            Err(e) => {
                reader.abort();
                ctx.status.error(&format!("listen: {e}"));
                if !ctx.pause(backoff.step()).await {
                    return;
                }
            }
        }
        drop(client);
    }
}

/// Drives a `LISTEN` connection, waking the partition each notification names.
fn read_notifications<S, T>(
    mut conn: Connection<S, T>,
    wakers: &Arc<Vec<Notify>>,
    name: &str,
) -> tokio::task::JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let w = wakers.clone();
    let n = name.to_owned();
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(note)) => {
                    match note
                        .payload()
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .and_then(|p| w.get(p))
                    {
                        Some(waker) => waker.notify_one(),
                        // Not a partition of ours: wake all rather than miss rows.
                        None => w.iter().for_each(Notify::notify_one),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(consumer = %n, error = %e, "outbox LISTEN connection lost");
                    break;
                }
            }
        }
    })
}

/// Samples the rows waiting and the age of the oldest every two seconds.
async fn sample_lag(ctx: Ctx, sql: Arc<Sql>, tls: Arc<Tls>) {
    let mut client: Option<Client> = None;
    let mut with_age = true;
    loop {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = connect(&ctx, &tls).await.ok();
        }
        if let Some(c) = &client {
            if with_age {
                match c.query_one(&sql.lag, &[]).await {
                    Ok(r) => {
                        let n: i64 = r.try_get(0).unwrap_or(-1);
                        let age: f64 = r.try_get(1).unwrap_or(0.0);
                        let age = Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default();
                        ctx.status.set_lag(n, Some(age));
                    }
                    // No `created_at` column: count only (other errors: try again next time).
                    Err(e) => {
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) {
                            with_age = false;
                        }
                    }
                }
            } else if let Ok(r) = c.query_one(&sql.count, &[]).await {
                ctx.status.set_lag(r.try_get(0).unwrap_or(-1), None);
            }
        }
        if !ctx.pause(Duration::from_secs(2)).await {
            return;
        }
    }
}
