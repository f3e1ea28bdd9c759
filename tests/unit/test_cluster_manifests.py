"""cluster/: every manifest parses; the KubeRay ones validate against the KubeRay v1.7.0 CRD schemas
(types, required fields, and no key the schema lacks, as `kubectl --validate=strict`); the `ray up` YAML
validates with Ray's own schema; every path a manifest names exists; image, Ray and Python versions agree
with pyproject.toml and requirements/."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(os.environ.get("KUBERAY_CRD_DIR", "/work/shared/kuberay-crds"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}



# ---------------------------------------------------------------------------------------------- loading
def manifest_files() -> List[Path]:
    # launcher/: ray up (checked against Ray's schema below); serve/: a Serve deploy config (checked
    # against ServeDeploySchema in tests/unit/test_serve_units.py); runtime_env.yaml: not a manifest
    return sorted(p for p in CLUSTER.rglob("*.yaml")
                  if p.parent.name not in ("launcher", "serve") and p.name != "runtime_env.yaml")


def documents() -> List[Tuple[Path, Dict[str, Any]]]:
    out = []
    for path in manifest_files():
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def ray_documents() -> List[Tuple[Path, Dict[str, Any]]]:
    return [(p, d) for p, d in documents() if d["apiVersion"] == "ray.io/v1"]


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str) -> Dict[str, Any]:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        # the manifests are only worth shipping validated: a missing schema is an error, not a pass
        pytest.fail(f"KubeRay CRD schema {path} not found (set KUBERAY_CRD_DIR to the kuberay-crds folder)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB each
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


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
def unknown_keys(instance: Any, schema: Dict[str, Any], path: str = "") -> List[str]:
    """Keys the schema does not define (the API server drops them silently: a typo simply vanishes)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    errors = []
    if isinstance(instance, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                errors += unknown_keys(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += unknown_keys(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                errors.append(f"{path}.{key}".lstrip("."))
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            errors += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return errors


def validate_ray_manifest(doc: Dict[str, Any]) -> List[str]:
    schema = crd_schema(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"{k}: not in the {doc['kind']} schema" for k in unknown_keys(doc, schema)]


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


@pytest.mark.parametrize("path_doc", ray_documents(), ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_kuberay_manifest_validates_strictly_against_the_crd(path_doc):
    path, doc = path_doc
    assert doc["apiVersion"] == "ray.io/v1"
    assert validate_ray_manifest(doc) == [], path


def test_the_strict_crd_check_catches_typos_and_wrong_types():
    (doc,) = [d for p, d in ray_documents() if d["kind"] == "RayCluster"]
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    typo["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = validate_ray_manifest(typo)
    assert any("headGroupSpec.rayStartParam:" in e for e in errors)
    assert any("containers[0].volumeMount:" in e for e in errors)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    wrong["spec"]["authOptions"]["mode"] = "tokens"
    errors = validate_ray_manifest(wrong)
    assert any("replicas" in e and "integer" in e for e in errors)
    assert any("authOptions.mode" in e for e in errors)


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
                volumes = {v["name"]: v for v in pod["volumes"]}
                mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
                for target in ("/app/runs", "/app/data"):  # the shipped configs' runs/ and data/, from /app
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
    assert app["args"] == {"config": "configs/serve/quickstart.yaml"}
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"  # reachable through the serve Service


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
