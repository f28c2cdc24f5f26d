#!/usr/bin/env bash
# Builds the repository's Dockerfile with buildah, on a machine with no
# Docker engine and no registry: both stages start from local bases made
# from Debian's packages, cached under /var/tmp/tokenpolicy-image and keyed
# by what went into them.
#
#   build base    a Debian root filesystem (debootstrap --variant=minbase, the
#                 compiler and linker the crates need), laid out as Rust's
#                 image (cargo in PATH, CARGO_HOME=/usr/local/cargo), with
#                 this machine's Rust toolchain mounted at build time;
#   runtime base  what distroless cc holds: glibc, libgcc, the CA bundle,
#                 tzdata, /etc/passwd and /etc/group with nonroot = 65532, and
#                 no shell, unpacked from the same suite's .deb files.
#
# Then `buildah build` of ./Dockerfile with BUILD_BASE and RUNTIME_BASE set
# to those, the cargo registry and target directory kept between builds in
# buildah's cache mounts (under /var/tmp). Prints the image name on stdout;
# timings and sizes go to stderr.
#
# Environment: TOKENPOLICY_IMAGE (default localhost/tokenpolicy:test),
# DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE="${TOKENPOLICY_IMAGE:-localhost/tokenpolicy:test}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE=/var/tmp/tokenpolicy-image
# runc, not crun: crun refuses this machine's hybrid cgroup layout (v1
# controllers beside an empty v2 hierarchy), and so would fail every RUN.
RUNTIME="${TOKENPOLICY_OCI_RUNTIME:-runc}"
# What the crates' build scripts need (ring compiles C and assembly).
BUILD_PACKAGES="build-essential,pkg-config,ca-certificates"
# distroless cc, from Debian's packages (ca-certificates only for its bundle).
RUNTIME_PACKAGES="libc6 libgcc-s1 ca-certificates tzdata netbase base-files"

log() { printf '[image] %s\n' "$*" >&2; }
. scripts/lib.sh

# ---------------------------------------------------------------- tools
missing=()
for tool in buildah:buildah podman:podman debootstrap:debootstrap runc:runc skopeo:skopeo; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[ -x /usr/bin/fuse-overlayfs ] || missing+=(fuse-overlayfs)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
mkdir -p "$CACHE"

# The toolchain the machine builds with (rustup's, or any rustc in PATH).
SYSROOT=$(rustc --print sysroot)
RUST_VERSION=$(rustc -vV | sed -n 's/^release: //p')
key() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

# An image from a directory: its files as one layer, then `buildah config`.
import_rootfs() {
  local dir=$1 image=$2; shift 2
  local c
  c=$(buildah from --quiet scratch)
  buildah copy --quiet "$c" "$dir" / >/dev/null
  buildah config "$@" "$c"
  buildah commit --quiet --rm "$c" "$image" >/dev/null
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- build base
# The toolchain is not copied into the base: `buildah build` mounts this
# machine's (read-only, at /usr/local/rust), which keeps 600 MB out of the
# cache and out of the image store. It is part of the build's inputs, and
# its version is printed with the timings.
build_key=$(key build-v1 "$SUITE" "$MIRROR" "$BUILD_PACKAGES")
BUILD_BASE="localhost/tokenpolicy-build-base:$build_key"
rootfs="$CACHE/build-$build_key"
debs_dir="$CACHE/debs-$build_key"
if [ ! -e "$rootfs/.done" ]; then
  start=$(date +%s)
  log "debootstrap $SUITE (minbase + $BUILD_PACKAGES) into $rootfs"
  $SUDO rm -rf "$rootfs" "$rootfs.tmp" "$debs_dir"
  $SUDO debootstrap --variant=minbase --include="$BUILD_PACKAGES,tzdata,netbase" \
    "$SUITE" "$rootfs.tmp" "$MIRROR" >"$CACHE/debootstrap-$build_key.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap-$build_key.log" >&2; exit 1; }
  # The runtime's .deb files, from the same suite and run; then the apt
  # cache and the documentation leave the build root filesystem.
  mkdir -p "$debs_dir"
  for p in $RUNTIME_PACKAGES; do
    f=$(find "$rootfs.tmp/var/cache/apt/archives" -name "${p}_*.deb" | head -1)
    [ -n "$f" ] || { echo "no $p .deb from debootstrap" >&2; exit 1; }
    cp "$f" "$debs_dir/"
  done
  $SUDO find "$rootfs.tmp/var/cache/apt/archives" -name '*.deb' -delete
  $SUDO rm -rf "$rootfs.tmp/usr/share/doc" "$rootfs.tmp/usr/share/man" "$rootfs.tmp/usr/share/locale" \
    "$rootfs.tmp/usr/share/info" "$rootfs.tmp/var/lib/apt/lists"/*_Packages
  $SUDO mkdir -p "$rootfs.tmp/usr/local/rust" "$rootfs.tmp/usr/local/cargo"
  $SUDO mv "$rootfs.tmp" "$rootfs"
  $SUDO touch "$rootfs/.done"
  log "build rootfs in $(( $(date +%s) - start )) s"
fi
if ! have_image "$BUILD_BASE"; then
  import_rootfs "$rootfs" "$BUILD_BASE" \
    --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo \
    --label org.opencontainers.image.description="Debian $SUITE minbase with a C toolchain; Rust mounted at /usr/local/rust"
fi
log "build base $BUILD_BASE"

# ---------------------------------------------------------------- runtime base
debs=()
for p in $RUNTIME_PACKAGES; do debs+=("$(ls "$debs_dir/${p}"_*.deb)"); done
runtime_key=$(key runtime-v2 "$SUITE" "$(sha256sum "${debs[@]}" | cut -d' ' -f1)")
RUNTIME_BASE="localhost/tokenpolicy-runtime-base:$runtime_key"
if ! have_image "$RUNTIME_BASE"; then
  dir="$CACHE/runtime-$runtime_key"
  rm -rf "$dir"; mkdir -p "$dir"
  for f in "${debs[@]}"; do dpkg-deb -x "$f" "$dir"; done
  # update-ca-certificates' bundle: every certificate the package ships.
  mkdir -p "$dir/etc/ssl/certs"
  find "$dir/usr/share/ca-certificates" -name '*.crt' | sort | xargs cat >"$dir/etc/ssl/certs/ca-certificates.crt"
  # No shell, no package manager, no maintainer scripts: only libraries and data.
  rm -rf "$dir/usr/sbin" "$dir/sbin" "$dir/usr/bin" "$dir/bin" "$dir/usr/share/doc" \
    "$dir/usr/share/man" "$dir/usr/share/lintian" "$dir/usr/share/info" "$dir/usr/share/ca-certificates" \
    "$dir/usr/lib/x86_64-linux-gnu/gconv" "$dir/usr/share/locale" "$dir/etc/init.d" "$dir/usr/libexec" \
    "$dir/etc/update-motd.d" "$dir/etc/profile.d" "$dir/etc/profile" "$dir/etc/bash.bashrc" "$dir/etc/skel"
  cat >"$dir/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
  cat >"$dir/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
GROUP
  mkdir -p "$dir/home/nonroot" "$dir/tmp" "$dir/root"
  chmod 1777 "$dir/tmp"; chmod 0700 "$dir/root"; chown 65532:65532 "$dir/home/nonroot"
  import_rootfs "$dir" "$RUNTIME_BASE" --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/bin:/usr/bin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label org.opencontainers.image.description="glibc, libgcc, CA certificates, tzdata and nonroot (65532) from Debian $SUITE"
  rm -rf "$dir"
fi
log "runtime base $RUNTIME_BASE"

# ---------------------------------------------------------------- the image
start=$(date +%s)
log "buildah build -t $IMAGE"
log "Rust $RUST_VERSION from $SYSROOT"
# The build stage downloads crates from crates.io (cached between builds):
# it trusts the CAs that this machine trusts (a proxy's, say), read-only and
# only while RUN steps run; the image keeps its own bundle.
CA_BUNDLE="${TOKENPOLICY_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
buildah build --quiet --layers --network host --runtime "$RUNTIME" \
  --volume "$SYSROOT:/usr/local/rust:ro" --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
  --build-arg BUILD_BASE="$BUILD_BASE" --build-arg RUNTIME_BASE="$RUNTIME_BASE" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -t "$IMAGE" -f Dockerfile . >/dev/null
log "image built in $(( $(date +%s) - start )) s; $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
echo "$IMAGE"
