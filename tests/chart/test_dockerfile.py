"""The Dockerfile, linted (hadolint, every rule, labels checked) and read:
no Docker engine runs here, so the image is never built by these tests."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess

from chart_support import HERE, ROOT, cargo_version, hadolint_binary

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        op, _, args = full.strip().partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--config", str(HERE / "hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text(), "justify any ignore in a comment"


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM (what a FROM line may name), with their defaults."""
    out = {}
    for op, args in instructions():
        if op == "FROM":
            break
        if op == "ARG" and "=" in args:
            k, v = args.split("=", 1)
            out[k] = v
    return out


def test_multi_stage_with_pinned_images():
    defaults = global_args()
    # The bases are build arguments (tests/image/build.sh sets local ones);
    # their defaults are the upstream images.
    assert set(defaults) >= {"BUILD_BASE", "RUNTIME_BASE"}, defaults
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args)
             for op, args in instructions() if op == "FROM"]
    assert len(froms) == 2, froms
    build, runtime = froms
    image = build.split()[0]
    assert re.fullmatch(r"rust:\d+\.\d+\.\d+-bookworm", image), f"pin the builder: {image}"
    # The binary links glibc dynamically: build on the runtime's Debian release.
    assert runtime == "gcr.io/distroless/cc-debian12:nonroot"
    for ref in (image, runtime):
        assert ":" in ref and not ref.endswith(":latest"), ref


def test_release_build_from_the_lock_file():
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert "cargo build --release --locked" in runs


def test_runs_as_numeric_non_root_with_the_binary_as_entrypoint():
    ops = instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 65532, users[-1]
    (entrypoint,) = [args for op, args in ops if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tokenpolicy"]
    copies = [args for op, args in ops if op == "COPY" and args.startswith("--from=")]
    assert any(c.endswith(" /usr/local/bin/tokenpolicy") for c in copies), copies


def test_oci_labels_and_version():
    ops = instructions()
    labels = " ".join(args for op, args in ops if op == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "created", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    args = dict(a.split("=", 1) for op, a in ops if op == "ARG" and "=" in a)
    assert args["VERSION"] == cargo_version(), "Dockerfile ARG VERSION must follow Cargo.toml"


def test_dockerignore_sends_only_the_build_inputs():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "ignore everything, then allow the build inputs back"

    def sent(path: str) -> bool:
        included = True
        for p in patterns:
            negate = p.startswith("!")
            pat = p[1:] if negate else p
            pat = pat.rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                included = negate
        return included

    copied = []
    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from="):
            copied += args.split()[:-1]
    assert copied
    for source in copied:
        assert sent(source.rstrip("/")), f"{source} is copied but ignored"
    for private in ("target/debug/tokenpolicy", ".git/config", "tests/run.sh", "bench/x", ".env"):
        assert not sent(private), private
