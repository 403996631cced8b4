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

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 worker
COPY --from=build /src/target/release/usage-worker /usr/local/bin/usage-worker
COPY config /app/config
WORKDIR /app
USER worker
# The HTTP API (HTTP_ADDR).
EXPOSE 8080
ENTRYPOINT ["usage-worker"]
CMD ["run"]
