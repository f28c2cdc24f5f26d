# syntax=docker/dockerfile:1
#
# tokenpolicy: one image for the operator and the token services it runs.
#
#   docker build -t tokenpolicy:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#   docker run --rm tokenpolicy:0.1.0 --help
#
# The bases are build arguments: their defaults are the upstream images (for
# a machine with a registry); tests/image/build.sh sets both to local bases
# made from Debian's packages, for a machine without one.
#
# Build stage: Debian bookworm, the same glibc (2.36) as the runtime image.
ARG BUILD_BASE=rust:1.95.0-bookworm
# Runtime: distroless cc (glibc, libgcc, CA certificates, tzdata, passwd with
# `nonroot` = 65532); no shell, no package manager.
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_BASE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock askama.toml ./
COPY src ./src
# Cargo reads every target that Cargo.toml names, the bench included.
COPY benches ./benches
# The registry and target caches survive between builds (BuildKit); the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,id=tokenpolicy-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=tokenpolicy-target,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && install -D -m 0755 target/release/tokenpolicy /out/tokenpolicy

# Not a static musl binary on scratch: musl's allocator is slow under the
# multi-threaded load of a token service (tokio, password hashing), and
# scratch has no CA bundle.
FROM ${RUNTIME_BASE}

ARG RUNTIME_BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="tokenpolicy" \
      org.opencontainers.image.description="TokenPolicy operator and token service: session, token and one-time refresh limits, forward-auth for ingress controllers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${RUNTIME_BASE}"

COPY --from=build /out/tokenpolicy /usr/local/bin/tokenpolicy
USER 65532:65532
# 8080: token service (serve); 8081: operator metrics and probes.
EXPOSE 8080 8081
ENTRYPOINT ["tokenpolicy"]
CMD ["--help"]
