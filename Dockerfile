# Multi-stage build: compile in the Rust image, run the static-ish binary as non-root on a
# slim Debian with only CA certificates (for an https CRM) and curl (for the health check).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY benches ./benches
COPY config.toml ./
RUN cargo build --release --locked --bin pos-crm-proxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/pos-crm-proxy --shell /usr/sbin/nologin proxy \
 && mkdir -p /var/lib/pos-crm-proxy/data \
 && chown -R proxy /var/lib/pos-crm-proxy
COPY --from=build /src/target/release/pos-crm-proxy /usr/local/bin/pos-crm-proxy
COPY config.toml /etc/pos-crm-proxy/config.toml
USER proxy
# Listen on all interfaces inside the container; the admin listener stays on loopback.
ENV PROXY_LISTEN=0.0.0.0:8080 \
    PROXY_DATA_DIR=/var/lib/pos-crm-proxy/data
VOLUME ["/var/lib/pos-crm-proxy/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/pos-crm-proxy", "--config", "/etc/pos-crm-proxy/config.toml"]
