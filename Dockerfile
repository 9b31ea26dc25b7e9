# Build the release binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY assets assets
COPY benches benches
COPY config config
COPY data data
RUN cargo build --release --locked

# Run it from a slim image, with the sample quotes for the feeder.
FROM debian:bookworm-slim
COPY --from=build /src/target/release/quotebridge /usr/local/bin/quotebridge
COPY data /usr/share/quotebridge/data
ENV QUOTEBRIDGE__SERVER__LISTEN=0.0.0.0:8080
EXPOSE 8080
USER nobody
ENTRYPOINT ["quotebridge"]
CMD ["serve"]
