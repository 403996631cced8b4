# Build stage: librdkafka is compiled from source by rdkafka-sys.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY config ./config
RUN cargo build --release --locked

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
