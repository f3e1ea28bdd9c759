"""cluster/: every manifest parses; the ones in cluster/kuberay/ validate against the project's schema
cluster/kuberay/schema/kuberay.schema.yaml, derived from the KubeRay v1.7.0 CRDs (types, required fields,
enums, and no key the schema lacks, as `kubectl --validate=strict`); the `ray up` YAML validates with Ray's
own schema; every path a manifest names exists; image, Ray and Python versions agree with pyproject.toml
and requirements/."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import jsonschema
import pytest
import tomllib
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMA = KUBERAY / "schema/kuberay.schema.yaml"


# ---------------------------------------------------------------------------------------------- loading
def manifest_files() -> List[Path]:
    # launcher/: ray up (checked against Ray's schema below); serve/: a Serve deploy config (checked
    # against ServeDeploySchema in tests/unit/test_serve_units.py); kuberay/schema/: the schema the
    # kuberay/ manifests are checked with; runtime_env.yaml: not a manifest
    return sorted(p for p in CLUSTER.rglob("*.yaml")
                  if p.parent.name not in ("launcher", "serve") and p.parent != SCHEMA.parent
                  and p.name != "runtime_env.yaml")


def documents() -> List[Tuple[Path, Dict[str, Any]]]:
    out = []
    for path in manifest_files():
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def ray_documents() -> List[Tuple[Path, Dict[str, Any]]]:
    return [(p, d) for p, d in documents() if d["apiVersion"] == "ray.io/v1"]


def kuberay_documents() -> List[Tuple[Path, Dict[str, Any]]]:
    return [(p, d) for p, d in documents() if p.parent == KUBERAY]


def cluster_specs(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The RayClusterSpec(s) inside a RayCluster / RayJob / RayService (none for a RayJob on an existing cluster)."""
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return [spec]
    return [s for s in (spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s]


def ray_containers(cspec: Dict[str, Any]) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(pod spec, container) for the Ray container of the head and of every worker group."""
    for group in [cspec["headGroupSpec"], *cspec.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        yield pod, pod["containers"][0]


# ---------------------------------------------------------------------------------------------- strict
@functools.lru_cache(maxsize=None)
def manifest_schema() -> Dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-map-keys: the API server rejects two entries of a map-type list with the same key."""
    if not validator.is_type(instance, "array"):
        return
    first: Dict[Tuple[Any, ...], int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in first:
            named = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
            yield jsonschema.ValidationError(f"duplicate entry ({named}), already at [{first[key]}]",
                                             path=[i], instance=item)
        first.setdefault(key, i)


ManifestValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


def field_path(parts: Any) -> str:
    """The field path of an error: spec.workerGroupSpecs[0].template, metadata.labels["ray.io/cluster"]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in part or "/" in part:
            out += f'["{part}"]'
        else:
            out += f".{part}" if out else part
    return out or "(document)"


def validate_manifest(doc: Dict[str, Any]) -> List[str]:
    """One 'field.path: problem' line per error, [] when the manifest is valid."""
    errors = []
    found = ManifestValidator(manifest_schema()).iter_errors(doc)
    for e in sorted(found, key=lambda e: list(map(str, e.absolute_path))):
        parent = list(e.absolute_path)
        if e.validator == "additionalProperties":  # name each unknown key, not just its parent
            known = e.schema.get("properties", {})
            errors += [f"{field_path(parent + [k])}: unknown field, not in the {doc.get('kind')} schema"
                       for k in e.instance if k not in known]
        elif e.validator == "required":
            errors += [f"{field_path(parent + [k])}: required field missing"
                       for k in e.validator_value if k not in e.instance]
        elif e.validator == "const":
            errors.append(f"{field_path(parent)}: {e.instance!r}, expected {e.validator_value!r}")
        elif e.validator == "pattern" and e.schema.get("x-kubernetes-int-or-string"):
            errors.append(f"{field_path(parent)}: {e.instance!r} is not a quantity (such as 2, 500m, 8Gi)")
        else:
            errors.append(f"{field_path(parent)}: {e.message}")
    return list(dict.fromkeys(errors))


# ---------------------------------------------------------------------------------------------- versions
def pins() -> Dict[str, str]:
    out = {}
    for line in (REPO / "requirements/base.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s#]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(3)
    return out


def pyproject() -> Dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def image_versions() -> Tuple[str, str, str]:
    """(project version, ray version, python 'X.Y') the project image must carry."""
    ray = pins()["ray"]
    from_line = next(line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    m = re.fullmatch(r"FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cpu", from_line.strip())
    assert m, f"cluster/Dockerfile base image not rayproject/ray:<ray>-py<XY>-cpu: {from_line}"
    assert m.group(1) == ray, f"cluster/Dockerfile base has Ray {m.group(1)}, requirements pin {ray}"
    return pyproject()["project"]["version"], ray, f"{m.group(2)}.{m.group(3)}"


# ================================================================================================ tests
def test_every_manifest_parses_and_names_its_kind():
    docs = documents()
    kinds = sorted({d["kind"] for _, d in docs})
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim"} <= set(kinds)
    for path, d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), path
    jobs = {d["metadata"]["name"] for _, d in docs if d["kind"] == "RayJob"}
    assert jobs == {f"heygen-ray-{s}" for s in ("pipeline", "data", "train", "tune", "compress", "serve")}
    for path in [CLUSTER / "launcher/aws.yaml", CLUSTER / "runtime_env.yaml"]:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_the_schema_is_valid_and_covers_every_kuberay_manifest():
    schema = manifest_schema()
    ManifestValidator.check_schema(schema)
    kinds = schema["properties"]["kind"]["enum"]
    docs = kuberay_documents()
    assert {d["kind"] for _, d in docs} == set(kinds)  # no kind left unchecked, no definition left unused
    assert {d["kind"] for _, d in docs if d["apiVersion"] == "ray.io/v1"} == {"RayCluster", "RayJob", "RayService"}
    for kind in kinds:
        assert schema["$defs"][kind]["additionalProperties"] is False, kind
    header = SCHEMA.read_text().split("\n$schema:", 1)[0]  # what it derives from, and how to extend it
    assert "Derived from the KubeRay v1.7.0 CRDs" in header and "check_against_crds.py" in header
    assert (SCHEMA.parent / "check_against_crds.py").is_file()


@pytest.mark.parametrize("path_doc", kuberay_documents(), ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_kuberay_manifest_validates_strictly_against_the_schema(path_doc):
    path, doc = path_doc
    assert doc["apiVersion"] == ("v1" if doc["kind"] == "PersistentVolumeClaim" else "ray.io/v1")
    assert validate_manifest(doc) == [], path


def test_the_strict_crd_check_catches_typos_and_wrong_types():
    (doc,) = [d for p, d in ray_documents() if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    typo["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = validate_manifest(typo)
    assert any("headGroupSpec.rayStartParam:" in e for e in errors)
    assert any("containers[0].volumeMount:" in e for e in errors)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    wrong["spec"]["authOptions"]["mode"] = "tokens"
    errors = validate_manifest(wrong)
    assert any("replicas" in e and "integer" in e for e in errors)
    assert any("authOptions.mode" in e for e in errors)


_DELETE = object()


def _set(doc: Dict[str, Any], path: str, value: Any) -> None:
    """Set (or delete) doc at a '/'-separated path; '~' stands for a '/' inside a key."""
    *parents, last = [int(p) if p.isdigit() else p.replace("~", "/") for p in path.split("/")]
    target = functools.reduce(lambda node, key: node[key], parents, doc)
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value


WORKER = "spec/workerGroupSpecs/0"
HEAD_CONTAINER = "spec/headGroupSpec/template/spec/containers/0"
# (manifest, path to change, new value or _DELETE, the one error expected: field path, then the problem)
MUTATIONS = [
    # misspelled fields
    ("raycluster.yaml", f"{WORKER}/minReplica", 1, "spec.workerGroupSpecs[0].minReplica: unknown field"),
    ("raycluster.yaml", "spec/enableInTreeAutoscale", True, "spec.enableInTreeAutoscale: unknown field"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/resources/request", {},
     "spec.headGroupSpec.template.spec.containers[0].resources.request: unknown field"),
    ("raycluster.yaml", "metadata/lables", {}, "metadata.lables: unknown field"),
    ("rayjob-pipeline.yaml", "spec/shutdownAfterJobFinish", True, "spec.shutdownAfterJobFinish: unknown field"),
    ("rayjob-train.yaml", "spec/entryPoint", "python x.py", "spec.entryPoint: unknown field"),
    ("rayservice.yaml", "spec/upgradeStrategy/Type", "NewCluster", "spec.upgradeStrategy.Type: unknown field"),
    ("storage.yaml", "spec/accessMode", ["ReadWriteMany"], "spec.accessMode: unknown field"),
    # wrong types and values
    ("raycluster.yaml", f"{WORKER}/maxReplicas", "8",
     "spec.workerGroupSpecs[0].maxReplicas: '8' is not of type 'integer'"),
    ("raycluster.yaml", f"{WORKER}/maxReplicas", 2**31, "spec.workerGroupSpecs[0].maxReplicas: 2147483648 is greater"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/ports/0/containerPort", "6379",
     "spec.headGroupSpec.template.spec.containers[0].ports[0].containerPort: '6379' is not of type 'integer'"),
    ("raycluster.yaml", "spec/headGroupSpec/rayStartParams/num-cpus", 0,
     "spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/resources/limits/memory", "8 GiB",
     "spec.headGroupSpec.template.spec.containers[0].resources.limits.memory: '8 GiB' is not a quantity"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/env/1/value", 0,
     "spec.headGroupSpec.template.spec.containers[0].env[1].value: 0 is not of type 'string'"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/env/1/name", "MLFLOW_TRACKING_URI",
     "spec.headGroupSpec.template.spec.containers[0].env[1]: duplicate entry (name='MLFLOW_TRACKING_URI')"),
    ("raycluster.yaml", "spec/authOptions/mode", "Token", "spec.authOptions.mode: 'Token' is not one of"),
    ("raycluster.yaml", "metadata/labels/ray.io~cluster", 1, 'metadata.labels["ray.io/cluster"]: 1 is not of type'),
    ("raycluster.yaml", "apiVersion", "ray.io/v1alpha1", "apiVersion: 'ray.io/v1alpha1', expected 'ray.io/v1'"),
    ("rayjob-data.yaml", "spec/entrypointNumCpus", "1", "spec.entrypointNumCpus: '1' is not of type 'number'"),
    ("rayjob-data.yaml", "spec/clusterSelector", "heygen-ray",
     "spec.clusterSelector: 'heygen-ray' is not of type 'object'"),
    ("rayservice.yaml", "spec/excludeHeadPodFromServeSvc", "true",
     "spec.excludeHeadPodFromServeSvc: 'true' is not of type 'boolean'"),
    ("storage.yaml", "spec/resources/requests/storage", "100 Gi",
     "spec.resources.requests.storage: '100 Gi' is not a quantity"),
    # missing required fields
    ("raycluster.yaml", f"{WORKER}/maxReplicas", _DELETE,
     "spec.workerGroupSpecs[0].maxReplicas: required field missing"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/name", _DELETE,
     "spec.headGroupSpec.template.spec.containers[0].name: required field missing"),
    ("raycluster.yaml", f"{HEAD_CONTAINER}/volumeMounts/0/mountPath", _DELETE,
     "spec.headGroupSpec.template.spec.containers[0].volumeMounts[0].mountPath: required field missing"),
    ("rayjob-pipeline.yaml", "spec/rayClusterSpec/headGroupSpec", _DELETE,
     "spec.rayClusterSpec.headGroupSpec: required field missing"),
    ("rayservice.yaml", "spec/rayClusterConfig", _DELETE, "spec.rayClusterConfig: required field missing"),
    ("storage.yaml", "metadata/name", _DELETE, "metadata.name: required field missing"),
]


def _mutation_id(m: Tuple[str, str, Any, str]) -> str:
    problem = m[3].split(": ", 1)[1]
    kind = next((k for k in ("unknown", "duplicate") if problem.startswith(k)),
                "missing" if problem.startswith("required") else "invalid")
    return f"{m[0]}:{m[1].rsplit('/', 1)[-1].replace('~', '/')}:{kind}"


@pytest.mark.parametrize("name, path, value, expected", MUTATIONS, ids=[_mutation_id(m) for m in MUTATIONS])
def test_a_mutated_manifest_is_rejected_naming_the_field_path(name, path, value, expected):
    (doc,) = [d for p, d in kuberay_documents() if p.name == name]
    assert validate_manifest(doc) == []
    bad = copy.deepcopy(doc)
    _set(bad, path, value)
    errors = validate_manifest(bad)
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_token_auth_on_and_head_free_of_training_work_in_every_ray_cluster():
    specs = [(p, s) for p, d in ray_documents() for s in cluster_specs(d)]
    assert len(specs) == 3  # the RayCluster, the pipeline RayJob's own cluster, the RayService's
    for path, cspec in specs:
        assert cspec["authOptions"] == {"mode": "token", "secretName": "heygen-ray-auth"}, path
        assert cspec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", path
        for group in cspec.get("workerGroupSpecs", []):
            assert "num-cpus" not in group["rayStartParams"] or group["rayStartParams"]["num-cpus"] != "0"


def test_every_ray_pod_reaches_the_shared_storage_and_the_mlflow_server():
    docs = documents()
    pvcs = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    (svc,) = [d for _, d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"]
    port = svc["spec"]["ports"][0]["port"]
    for path, doc in ray_documents():
        for cspec in cluster_specs(doc):
            for pod, container in ray_containers(cspec):
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env["MLFLOW_TRACKING_URI"] == f"http://{svc['metadata']['name']}:{port}", path
                # the storage root: a submitted job's relative runs/ and data/ land on the shared volume,
                # not in its temporary copy of the code
                storage = env["HEYGEN_RAY_STORAGE"]
                volumes = {v["name"]: v for v in pod["volumes"]}
                mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
                for target in (f"{storage}/runs", f"{storage}/data"):  # the shipped configs' runs/ and data/
                    claim = volumes[mounts[target]["name"]]["persistentVolumeClaim"]["claimName"]
                    assert claim == "heygen-ray-shared" and claim in pvcs, (path, target)
                assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes.values())


def test_mlflow_server_deployment_uses_a_sql_backend_and_proxied_artifacts():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in documents()}
    server = docs[("Deployment", "mlflow")]
    pg = docs[("Deployment", "mlflow-postgres")]
    for name, dep in (("mlflow", server), ("mlflow-postgres", pg)):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = docs[("Service", name)]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no pod of its Deployment"
        named = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named
        for v in dep["spec"]["template"]["spec"].get("volumes", []):
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in docs
    (c,) = server["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert "@mlflow-postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
    # env referenced as $(VAR) must be defined before use (Kubernetes expands only earlier entries)
    names = [e["name"] for e in c["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    cmd = " ".join(c["args"])
    assert "--serve-artifacts" in cmd and "--artifacts-destination" in cmd and "--host 0.0.0.0" in cmd
    for var in re.findall(r"\$(\w+)", cmd):
        assert var in env, f"mlflow server command uses ${var}, not set in its env"
    secret = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    pg_env = {e["name"]: e for e in pg["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret


def test_rayservice_serve_config_is_a_valid_serve_config_for_the_app():
    from ray.serve.schema import ServeDeploySchema

    (doc,) = [d for _, d in ray_documents() if d["kind"] == "RayService"]
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # raises on a wrong key or type
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "heygen_ray.serve.app:build_app"
    assert app["args"]["config"] == "configs/serve/quickstart.yaml"
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"  # reachable through the serve Service
    # so every endpoint but /healthz needs a token, from files of a Secret mounted on every worker pod
    assert app["args"]["auth.inference"] is True
    files = [app["args"][f"auth.{k}_token_file"] for k in ("admin", "inference")]
    for group in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if m["name"] in secrets}
        assert all(any(f.startswith(path + "/") for path in mounts) for f in files), (group["groupName"], mounts)


def test_rayservice_import_path_names_the_apps_builder():
    module, attr = "heygen_ray.serve.app:build_app".split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def entrypoints() -> List[Tuple[str, List[str]]]:
    out = []
    for path, doc in ray_documents():
        if doc["kind"] == "RayJob":
            out.append((f"{path.name}", shlex.split(doc["spec"]["entrypoint"])))
    return out


def named_paths() -> List[Tuple[str, str]]:
    """(where, repo-relative path) for every file a manifest, the launcher or a Dockerfile names."""
    out = []
    for where, argv in entrypoints():
        assert argv[0] == "python", where
        out.append((where, argv[1]))
        out += [(where, argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
    (svc,) = [d for _, d in ray_documents() if d["kind"] == "RayService"]
    for app in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]:
        out.append(("rayservice.yaml", app["args"]["config"]))
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            out += [("Dockerfile", p.rstrip("/")) for p in line.split()[1:-1] if not p.startswith("--")]
    launcher = yaml.safe_load((CLUSTER / "launcher/aws.yaml").read_text())
    for cmd in launcher["setup_commands"]:
        out += [("launcher/aws.yaml", m) for m in re.findall(r"/home/ray/heygen_ray/(\S+)", cmd)]
    return out


def test_every_entrypoint_and_config_a_manifest_names_exists():
    missing = sorted({p for _, p in named_paths() if not (REPO / p).exists()})
    assert not missing, f"named in cluster/ but missing: {missing}"
    for where, argv in entrypoints():
        assert argv[1] in {"jobs/pipeline.py", "jobs/data.py", "jobs/train.py", "jobs/tune.py",
                           "jobs/compress.py", "jobs/serve.py"}, where
    pipeline = [argv for where, argv in entrypoints() if where == "rayjob-pipeline.yaml"]
    assert pipeline == [["python", "jobs/pipeline.py", "--config", "configs/pipeline/quickstart.yaml"]]


def test_every_config_an_entrypoint_names_validates_with_its_overrides():
    from heygen_ray.config import load_spec, spec_kind_for

    checked = 0
    for where, argv in entrypoints():
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a and not a.startswith("-")]
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            load_spec(spec_kind_for(Path(config)), Path(config), overrides)
        finally:
            os.chdir(cwd)
        checked += 1
    assert checked >= 5


def test_stage_jobs_select_the_raycluster_and_the_pipeline_job_brings_its_own():
    docs = {d["metadata"]["name"]: d for _, d in ray_documents()}
    labels = docs["heygen-ray"]["metadata"]["labels"]
    for name, doc in docs.items():
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        if name == "heygen-ray-pipeline":
            assert spec["rayClusterSpec"] and spec["shutdownAfterJobFinishes"] is True
        else:
            assert "rayClusterSpec" not in spec and spec["clusterSelector"].items() <= labels.items(), name
            assert not spec.get("shutdownAfterJobFinishes"), name


def test_image_ray_and_python_versions_agree_with_pyproject_and_requirements():
    version, ray, python = image_versions()
    project = pyproject()["project"]
    assert Version(python) in SpecifierSet(project["requires-python"])
    ray_dep = next(d for d in project["dependencies"] if d.startswith("ray["))
    assert Version(ray) in SpecifierSet(ray_dep.split("]", 1)[1])
    constraints = (REPO / "requirements/constraints.txt").read_text()
    assert re.search(rf"^ray(\[[^\]]*\])?=={re.escape(ray)}$", constraints, re.M)
    expected = f"heygen-ray:{version}-ray{ray}-py{python.replace('.', '')}-cpu"
    seen = 0
    for path, doc in ray_documents():
        for cspec in cluster_specs(doc):
            assert cspec["rayVersion"] == ray, path
            for _, container in ray_containers(cspec):
                assert container["image"] == expected, (path, container["name"])
                seen += 1
    assert seen == 6
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"torch=={pins()['torch']}" in dockerfile
    launcher = yaml.safe_load((CLUSTER / "launcher/aws.yaml").read_text())
    assert launcher["docker"]["image"] == f"rayproject/ray:{ray}-py{python.replace('.', '')}-cpu"
    assert any(f"torch=={pins()['torch']}" in c for c in launcher["setup_commands"])
    mlflow = pins()["mlflow"]
    assert f"FROM ghcr.io/mlflow/mlflow:v{mlflow}" in (CLUSTER / "mlflow/Dockerfile").read_text()
    (server,) = [d for _, d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    assert server["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{mlflow}")


# ---------------------------------------------------------------------------------------------- ray up
def validate_launcher(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What `ray up` does before touching the cloud: fill defaults, then validate with ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_up_config_validates_with_rays_own_schema():
    import ray.autoscaler

    cfg = yaml.safe_load((CLUSTER / "launcher/aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written
    prepared = validate_launcher(cfg)  # and as `ray up` fills it out
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"] == {"CPU": 0}
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["ray.worker.cpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(bad)


def test_ray_up_keeps_token_auth_on_and_installs_the_project():
    cfg = yaml.safe_load((CLUSTER / "launcher/aws.yaml").read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "--num-cpus=0" in cfg["head_start_ray_commands"][-1]
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # the launcher does not copy it
    assert cfg["file_mounts"]["/home/ray/heygen_ray"] == "."
    assert any(re.search(r"pip install .*-e /home/ray/heygen_ray$", c) for c in cfg["setup_commands"])
    assert ".venv" in cfg["rsync_exclude"]


def test_ray_up_gives_every_node_the_storage_root_and_the_tracking_server():
    cfg = yaml.safe_load((CLUSTER / "launcher/aws.yaml").read_text())
    env = dict(opt.split()[1].split("=", 1) for opt in cfg["docker"]["run_options"] if opt.startswith("--env "))
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    # the storage root is where the project and its shared runs/ and data/ are mounted on every node
    assert env["HEYGEN_RAY_STORAGE"] == "/home/ray/heygen_ray" and env["HEYGEN_RAY_STORAGE"] in cfg["file_mounts"]
