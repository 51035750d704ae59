# Multi-stage build of the `holdfast` binary; the runtime image runs as a non-root user.
#   docker build -t holdfast .
#   docker run -p 8000:8000 -v $PWD/config.toml:/etc/holdfast/config.toml holdfast
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin holdfast

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin holdfast
COPY --from=build /src/target/release/holdfast /usr/local/bin/holdfast
USER holdfast
EXPOSE 8000
ENV HOLDFAST_CONFIG=/etc/holdfast/config.toml
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["holdfast", "health", "--url", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["holdfast"]
CMD ["serve"]
