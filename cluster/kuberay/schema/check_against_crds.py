"""Check kuberay.schema.yaml (next to this file) against the KubeRay CRDs it was derived from.

    python cluster/kuberay/schema/check_against_crds.py CRD_DIR

CRD_DIR holds ray.io_rayclusters.yaml, ray.io_rayjobs.yaml and ray.io_rayservices.yaml (KubeRay's
ray-operator/config/crd/bases/ at the version the schema names). The schema is walked alongside each
CRD's v1 openAPIV3Schema, field by field, and every field must exist in the CRD with the same type,
format, enum, pattern and list-map keys, and require at least what the CRD requires. Objects closed
here must be closed in the CRD too (listed properties, not x-kubernetes-preserve-unknown-fields).
Exits 1 on any difference; prints what the schema checks beyond the CRD as notes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml

SCHEMA = Path(__file__).with_name("kuberay.schema.yaml")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
COMPARED = ("type", "format", "enum", "pattern", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys")


def load_crd(crd_dir: Path, kind: str) -> Dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((crd_dir / CRD_FILES[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


class Checker:
    def __init__(self, schema: Dict[str, Any], object_meta: Dict[str, Any]):
        self.defs = schema["$defs"]
        self.object_meta = object_meta  # the CRDs' own root metadata is a bare `type: object`
        self.fields = 0
        self.errors: List[str] = []
        self.notes: List[str] = []

    def resolve(self, node: Dict[str, Any]) -> Dict[str, Any]:
        while "$ref" in node:
            node = self.defs[node["$ref"].rsplit("/", 1)[1]]
        return node

    def compare(self, ours: Dict[str, Any], crd: Dict[str, Any], path: str) -> None:
        ours = self.resolve(ours)
        self.fields += 1
        if path.endswith(".metadata") and path.count(".") == 1 and "properties" not in crd:
            crd = self.object_meta
        for key in COMPARED:
            if ours.get(key) != crd.get(key):
                self.errors.append(f"{path}: {key} {ours.get(key)!r} here, {crd.get(key)!r} in the CRD")
        if ours.get("anyOf") != crd.get("anyOf"):
            self.errors.append(f"{path}: anyOf {ours.get('anyOf')!r} here, {crd.get('anyOf')!r} in the CRD")
        missing = set(crd.get("required", [])) - set(ours.get("required", []))
        if missing:
            self.errors.append(f"{path}: the CRD requires {sorted(missing)}")
        extra = set(ours.get("required", [])) - set(crd.get("required", []))
        if extra:
            self.notes.append(f"{path}: requires {sorted(extra)} beyond the CRD")
        for key, sub in ours.get("properties", {}).items():
            if "const" in self.resolve(sub):  # apiVersion / kind: the API server checks them, not the CRD
                self.notes.append(f"{path}.{key}: must be {self.resolve(sub)['const']!r}")
            elif key not in crd.get("properties", {}):
                self.errors.append(f"{path}.{key}: not in the CRD")
            else:
                self.compare(sub, crd["properties"][key], f"{path}.{key}")
        extra_props = ours.get("additionalProperties", True)
        if extra_props is False and ("properties" not in crd or crd.get("x-kubernetes-preserve-unknown-fields")):
            self.errors.append(f"{path}: closed here, open in the CRD")
        if isinstance(extra_props, dict):
            if not isinstance(crd.get("additionalProperties"), dict):
                self.errors.append(f"{path}: a map here, not in the CRD")
            else:
                self.compare(extra_props, crd["additionalProperties"], f"{path}.*")
        if "items" in ours:
            if "items" not in crd:
                self.errors.append(f"{path}: a list here, not in the CRD")
            else:
                self.compare(ours["items"], crd["items"], f"{path}[]")


def main(argv: List[str]) -> int:
    if len(argv) != 2 or not Path(argv[1]).is_dir():
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    crd_dir = Path(argv[1])
    schema = yaml.safe_load(SCHEMA.read_text())
    crds = {kind: load_crd(crd_dir, kind) for kind in CRD_FILES}
    pod_spec = crds["RayCluster"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    object_meta = pod_spec["properties"]["metadata"]
    # storage.yaml's PersistentVolumeClaim: the claim template the CRDs embed (metadata + spec)
    claim = (pod_spec["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]["ephemeral"]
             ["properties"]["volumeClaimTemplate"])
    roots = {**crds, "PersistentVolumeClaim": claim}
    checker = Checker(schema, object_meta)
    kinds = schema["properties"]["kind"]["enum"]
    for kind in kinds:
        checker.compare(schema["$defs"][kind], roots[kind], kind)
    for note in checker.notes:
        print(f"note: {note}")
    for error in checker.errors:
        print(f"DIFFERS: {error}")
    print(f"{checker.fields} fields of {', '.join(kinds)} compared: {len(checker.errors)} difference(s) between"
          f" {SCHEMA.name} and the CRDs in {crd_dir}")
    return 1 if checker.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
