# Build the release binary. The dependencies are built first, from the
# manifests alone, in a layer of their own: a source change rebuilds only
# the crates. (script/check-docker-context checks that the files copied here
# build them; CI runs it.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates/core/Cargo.toml crates/core/
COPY crates/broker/Cargo.toml crates/broker/
COPY crates/fanout/Cargo.toml crates/fanout/
COPY crates/service/Cargo.toml crates/service/
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/pipeline.rs \
 && mkdir -p crates/core/src crates/broker/src crates/fanout/src crates/service/src \
 && touch crates/core/src/lib.rs crates/broker/src/lib.rs \
      crates/fanout/src/lib.rs crates/service/src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src benches crates/*/src target/release/quotebridge* \
      target/release/deps/quotebridge* target/release/deps/libquotebridge* \
      target/release/.fingerprint/quotebridge*
COPY src src
COPY crates crates
COPY assets assets
COPY benches benches
COPY config config
COPY data data
RUN cargo build --release --locked

# Run it from a slim image as an unprivileged user, with the sample quotes
# for the feeder. The health check is the binary itself (the image has no curl).
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin quotebridge
COPY --from=build /src/target/release/quotebridge /usr/local/bin/quotebridge
COPY data /usr/share/quotebridge/data
ENV QUOTEBRIDGE__SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080
USER quotebridge
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["quotebridge", "health"]
ENTRYPOINT ["quotebridge"]
CMD ["serve"]
