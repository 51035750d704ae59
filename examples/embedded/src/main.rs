//! Run with: `cargo run -p holdfast-example-embedded` (see the library docs).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let (app, node, _handler) = holdfast_example_embedded::build()?;
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://127.0.0.1:{port} (WebSocket at /connection/websocket)");
    let shutdown_node = node.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown_node
                .shutdown(std::time::Duration::from_secs(10))
                .await;
        })
        .await?;
    Ok(())
}
