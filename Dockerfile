# Base images are pinned to exact versions (the toolchain of
# rust-toolchain.toml, a Debian point release): a rebuild gets the same bases.
# Build stage: librdkafka is compiled from source by rdkafka-sys.
FROM rust:1.95.0-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The workspace's manifests (the test kit and the lab are members), but only
# the service binary is built and shipped.
COPY Cargo.toml Cargo.lock rust-toolchain.toml build.rs ./
COPY crates ./crates
COPY tests ./tests
COPY src ./src
COPY migrations ./migrations
COPY config ./config
RUN cargo build --release --locked --package usage-worker --bin usage-worker

FROM debian:12.12-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 worker
COPY --from=build /src/target/release/usage-worker /usr/local/bin/usage-worker
COPY config /app/config
WORKDIR /app
USER worker
# The HTTP API (HTTP_ADDR).
EXPOSE 8080
# Liveness: `usage-worker healthcheck` GETs /healthz on HTTP_ADDR's port (the
# image has no curl). Not /readyz: a database outage makes every replica
# unready at once, and restarting them would not help (docs/operations.md).
HEALTHCHECK --interval=15s --timeout=6s --start-period=60s --retries=3 \
    CMD ["usage-worker", "healthcheck", "--timeout", "5"]
ENTRYPOINT ["usage-worker"]
CMD ["run"]
