# syntax=docker/dockerfile:1
#
# tokenpolicy: one image for the operator and the token services it runs.
#
#   docker build -t tokenpolicy:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#   docker run --rm tokenpolicy:0.1.0 --help
#
# Build stage: Debian bookworm, the same glibc (2.36) as the runtime image.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds (BuildKit); the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && install -D -m 0755 target/release/tokenpolicy /out/tokenpolicy

# Runtime: distroless cc (glibc, libgcc, CA certificates, tzdata, passwd with
# `nonroot` = 65532); no shell, no package manager. Not a static musl binary
# on scratch: musl's allocator is slow under the multi-threaded load of a
# token service (tokio, password hashing), and scratch has no CA bundle.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="tokenpolicy" \
      org.opencontainers.image.description="TokenPolicy operator and token service: session, token and one-time refresh limits, forward-auth for ingress controllers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=build /out/tokenpolicy /usr/local/bin/tokenpolicy
USER 65532:65532
# 8080: token service (serve); 8081: operator metrics and probes.
EXPOSE 8080 8081
ENTRYPOINT ["tokenpolicy"]
CMD ["--help"]
