# syntax=docker/dockerfile:1
# The OrderFlow image: one binary, `orderflow`, for every role (workers, API, gateway,
# migrations, topics, load). Built by docker-compose.yml; `docker build -t orderflow .`
# alone works too.

FROM rust:1.95-slim-bookworm AS build
# rdkafka builds its bundled librdkafka with configure, make and the C/C++ compilers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ make perl python3 pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY schemas ./schemas
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin orderflow \
    && cp target/release/orderflow /usr/local/bin/orderflow

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/orderflow --create-home orderflow
COPY --from=build /usr/local/bin/orderflow /usr/local/bin/orderflow
USER orderflow
WORKDIR /var/lib/orderflow
# Workers keep their partitions' state files here (a cache: rebuilt from the changelogs).
ENV ORDERFLOW_STATE_DIR=/var/lib/orderflow/state \
    ORDERFLOW_HTTP_ADDR=0.0.0.0:9464 \
    ORDERFLOW_API_ADDR=0.0.0.0:8080
EXPOSE 9464 8080 8081
ENTRYPOINT ["orderflow"]
CMD ["run"]
