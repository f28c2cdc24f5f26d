#!/usr/bin/env python3
"""Writes a one-layer OCI image archive that `ctr -n k8s.io images import`
reads, from files on this machine: no registry, no image builder.

    oci_archive.py --name registry.k8s.io/pause:3.10 --out pause.tar \
        --entrypoint /pause /path/to/pause:/pause

Each FILE is SRC:DEST (mode taken from SRC); SRC may be a symbolic-link
spec written as @TARGET:DEST. The layer is reproducible (fixed times and
owners), so the same inputs give the same image digest.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def layer(files):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = set()
        for src, dest in files:
            parts = dest.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
            info = tarfile.TarInfo(dest.strip("/"))
            info.mtime = 0
            if src.startswith("@"):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, src[1:], 0o777
                tar.addfile(info)
            else:
                with open(src, "rb") as f:
                    data = f.read()
                info.size, info.mode = len(data), os.stat(src).st_mode & 0o7777
                tar.addfile(info, io.BytesIO(data))
    diff = raw.getvalue()
    gz = gzip.compress(diff, mtime=0)
    return diff, gz


def blob(tar, data):
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--entrypoint", action="append", required=True, help="repeat for each word")
    ap.add_argument("--user", default="")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("files", nargs="+", help="SRC:DEST")
    args = ap.parse_args()
    files = []
    for spec in args.files:
        src, sep, dest = spec.rpartition(":")
        if not sep or not src or not dest:
            sys.exit(f"not SRC:DEST: {spec}")
        files.append((src, dest))
    diff, gz = layer(files)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": args.entrypoint, "User": args.user, "Env": args.env},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(diff).hexdigest()]},
    }
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        cfg = json.dumps(config, sort_keys=True).encode()
        cfg_digest = blob(tar, cfg)
        layer_digest = blob(tar, gz)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cfg_digest, "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": len(gz)}],
        }, sort_keys=True).encode()
        man_digest = blob(tar, manifest)
        index = json.dumps({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": man_digest, "size": len(manifest),
                           "annotations": {"io.containerd.image.name": args.name,
                                           "org.opencontainers.image.ref.name": args.name}}],
        }).encode()
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
