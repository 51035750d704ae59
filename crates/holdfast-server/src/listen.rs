//! The HTTP/1.1 accept loop for both listeners: optional TLS (certificates re-read on SIGHUP
//! without touching open connections), header read timeout and head size limit against
//! slow or oversized requests, keep-alive control, the peer address for per-IP limits, and a
//! graceful stop.

use crate::config::{HttpServerConfig, TlsConfig};
use anyhow::Context;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// A certificate and key read from PEM files, swapped in place on [`CertStore::reload`].
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

fn load(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificates from {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key from {}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .with_context(|| format!("unsupported private key in {}", key.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .with_context(|| format!("{} does not belong to {}", key.display(), cert.display()))?;
    Ok(ck)
}

impl CertStore {
    /// Reads the files once (an error here stops the server from starting).
    pub fn open(cfg: &TlsConfig) -> anyhow::Result<Arc<Self>> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = PathBuf::from(&cfg.server_cert_pem_file);
        let key = PathBuf::from(&cfg.server_key_pem_file);
        let ck = load(&cert, &key)?;
        Ok(Arc::new(Self {
            cert,
            key,
            current: RwLock::new(Arc::new(ck)),
        }))
    }

    /// Re-reads the files; on error the previous certificate stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let ck = load(&self.cert, &self.key)?;
        *self.current.write() = Arc::new(ck);
        Ok(())
    }

    fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // HTTP/2 first (a browser multiplexes its SSE and HTTP-streaming connections over one
        // TLS connection), HTTP/1.1 for everything else.
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// How one listener serves HTTP.
#[derive(Debug, Clone)]
pub struct Listener {
    /// TLS certificates, when the listener speaks TLS.
    pub tls: Option<Arc<CertStore>>,
    /// `http_server.*` limits.
    pub http: HttpServerConfig,
}

/// Opens a listener on `address:port` with an accept queue of `backlog` connections (0 = the
/// kernel's maximum, `net.core.somaxconn`; the kernel caps larger values at it too).
pub async fn bind(address: &str, port: u16, backlog: u32) -> anyhow::Result<TcpListener> {
    let backlog = if backlog == 0 { somaxconn() } else { backlog };
    let mut last = None;
    for addr in tokio::net::lookup_host((address, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let listener = socket.and_then(|s| {
            #[cfg(unix)]
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(backlog)
        });
        match listener {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => anyhow::anyhow!("{address} resolves to no address"),
    })
}

/// The kernel's cap on accept queues (`/proc/sys/net/core/somaxconn`), 4096 where unreadable.
fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n > 0)
        .unwrap_or(4096)
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting, lets requests
/// in flight finish (idle keep-alive connections close at once) and returns within `drain`.
/// Upgraded WebSocket connections are not waited for here: the node closes them.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    how: Listener,
    stop: CancellationToken,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    let acceptor = how.tls.as_ref().map(CertStore::acceptor);
    // HTTP/1.1, and HTTP/2 (h2 by ALPN over TLS, h2c with prior knowledge in plain text),
    // with RFC 8441 extended CONNECT so WebSocket runs over an HTTP/2 stream too.
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(how.http.header_read_timeout)
        .max_buf_size(how.http.max_header_size)
        .keep_alive(how.http.keep_alive);
    http.http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(how.http.http2_max_concurrent_streams)
        .max_header_list_size(how.http.max_header_size as u32)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let http = Arc::new(http);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    metrics::counter!("holdfast_accept_errors_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let http = http.clone();
        let acceptor = acceptor.clone();
        let stop = stop.clone();
        let handshake_timeout = how.http.tls_handshake_timeout;
        tracker.spawn(async move {
            match acceptor {
                None => serve_conn(&http, tcp, peer, app, stop).await,
                Some(acc) => match tokio::time::timeout(handshake_timeout, acc.accept(tcp)).await {
                    Ok(Ok(tls)) => serve_conn(&http, tls, peer, app, stop).await,
                    Ok(Err(e)) => {
                        metrics::counter!("holdfast_tls_handshake_errors_total").increment(1);
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("holdfast_tls_handshake_errors_total").increment(1);
                        tracing::debug!(peer = %peer, "TLS handshake timed out");
                    }
                },
            }
        });
    }
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("HTTP requests still running at the end of the drain period");
    }
}

async fn serve_conn<IO>(
    http: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    io: IO,
    peer: SocketAddr,
    app: Router,
    stop: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = http.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            metrics::counter!("holdfast_http_header_timeouts_total").increment(1);
        }
        tracing::debug!(peer = %peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Re-reads every certificate store on SIGHUP until `stop` is cancelled.
pub fn reload_on_sighup(stores: Vec<Arc<CertStore>>, stop: CancellationToken) {
    if stores.is_empty() {
        return;
    }
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: certificates will not be reloaded");
            return;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            for s in &stores {
                match s.reload() {
                    Ok(()) => {
                        metrics::counter!("holdfast_tls_reloads_total", "result" => "ok")
                            .increment(1);
                        tracing::info!(cert = %s.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        metrics::counter!("holdfast_tls_reloads_total", "result" => "error")
                            .increment(1);
                        tracing::error!(
                            error = format!("{e:#}"),
                            "TLS certificate reload failed; keeping the previous one"
                        );
                    }
                }
            }
        }
    });
}
