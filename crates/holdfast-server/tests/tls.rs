//! TLS on the public listener: WSS works, SIGHUP swaps the certificate for new handshakes
//! without dropping open connections, and a broken certificate file keeps the previous one.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Cert {
    pem: String,
    key: String,
    der: CertificateDer<'static>,
}

fn cert() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Cert {
        pem: ck.cert.pem(),
        key: ck.signing_key.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

fn install(dir: &Path, c: &Cert) {
    std::fs::write(dir.join("cert.pem"), &c.pem).unwrap();
    std::fs::write(dir.join("key.pem"), &c.key).unwrap();
}

fn connector(trusted: &[&Cert]) -> TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(c.der.clone()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

async fn handshake(srv: &TestServer, tls: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tls.connect(name, tcp).await.unwrap()
}

fn served_cert(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

async fn wss(srv: &TestServer, tls: &TlsConnector) -> TestClient {
    let stream = handshake(srv, tls).await;
    let url = format!("wss://localhost:{}/connection/websocket", srv.addr.port());
    let req = url.into_client_request().unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Rustls(stream))
            .await
            .unwrap();
    TestClient::from_ws(ws)
}

fn hup() {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn wss_and_certificate_reload_on_sighup() {
    let dir = tempdir();
    let (c1, c2) = (cert(), cert());
    install(&dir, &c1);
    let mut cfg = base_config();
    cfg.client.insecure = true;
    cfg.http_server.tls.enabled = true;
    cfg.http_server.tls.server_cert_pem_file = dir.join("cert.pem").display().to_string();
    cfg.http_server.tls.server_key_pem_file = dir.join("key.pem").display().to_string();
    let srv = TestServer::start(cfg).await;
    let tls = connector(&[&c1, &c2]);
    assert_eq!(served_cert(&handshake(&srv, &tls).await), c1.der);

    let mut old = wss(&srv, &tls).await;
    old.connect_token("").await;
    old.call("subscribe", json!({"channel": "news"})).await;

    install(&dir, &c2);
    hup();
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_cert(&handshake(&srv, &tls).await) != c2.der {
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate not reloaded"
        );
    }
    // The connection opened before the reload still works both ways.
    publish(&srv, "news", json!({"n": 1})).await;
    let p = old.push().await;
    assert_eq!(p["pub"]["data"], json!({"n": 1}));
    let r = old.call("presence_stats", json!({"channel": "news"})).await;
    assert!(r.get("id").is_some());

    // A broken file is refused and the current certificate stays.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    hup();
    eventually("failed reload counted", || {
        srv.state
            .metrics
            .render()
            .contains("holdfast_tls_reloads_total{result=\"error\"} 1")
    })
    .await;
    assert_eq!(served_cert(&handshake(&srv, &tls).await), c2.der);
    let mut fresh = wss(&srv, &tls).await;
    let r = fresh.connect_token("").await;
    assert!(r.get("connect").is_some(), "{r}");
    srv.stop().await;
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("holdfast-tls-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn https_negotiates_http2_by_alpn_and_serves_sse_over_it() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // Its own files: the other test rewrites its certificate and sends SIGHUP to the process.
    let dir = tempdir().join("h2");
    std::fs::create_dir_all(&dir).unwrap();
    let c = cert();
    install(&dir, &c);
    let mut cfg = base_config();
    cfg.client.insecure = true;
    cfg.uni_sse.enabled = true;
    cfg.http_server.tls.enabled = true;
    cfg.http_server.tls.server_cert_pem_file = dir.join("cert.pem").display().to_string();
    cfg.http_server.tls.server_key_pem_file = dir.join("key.pem").display().to_string();
    let srv = TestServer::start(cfg).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.der.clone()).unwrap();
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = TlsConnector::from(Arc::new(client));
    let stream = handshake(&srv, &tls).await;
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 by ALPN"
    );
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let url = format!("https://localhost:{}/connection/uni_sse", srv.addr.port());
    let resp = send
        .send_request(
            hyper::Request::get(url)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut text = String::new();
    while !text.contains("\"connect\"") {
        let f = tokio::time::timeout(WAIT, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(d) = f.into_data() {
            text.push_str(std::str::from_utf8(&d).unwrap());
        }
    }
    assert!(text.starts_with("\r\ndata: {\"connect\":"), "{text:?}");
    srv.stop().await;
}
