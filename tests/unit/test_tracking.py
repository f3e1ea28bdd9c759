"""heygen_ray.tracking against a real MLflow sqlite store in tmp_path (no server, no globals)."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from heygen_ray.config import TrackingSpec
from heygen_ray.models import create_model
from heygen_ray.tracking import (
    MAX_PARAM_VALUE,
    TRUNCATION_MARKER,
    LoggedModel,
    NullTracker,
    Tracker,
    default_artifact_root,
    flatten,
    load_model,
    load_model_and_config,
    load_pyfunc,
    log_model,
    make_tracker,
    resolve_model_uri,
    resolve_spec,
    resolve_tracking_uri,
    set_alias,
)

SVG = "{http://www.w3.org/2000/svg}"


def client_for(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture
def run_dir(tmp_path, no_env_uri):
    """A run directory; its default store (`<run_dir>/mlflow.db`) is seeded on first use."""
    d = tmp_path / "run"
    d.mkdir()
    return d


# -- flatten ---------------------------------------------------------------------------------------


def test_flatten_by_hand():
    spec = {
        "lr": 0.001,
        "model": {"name": "vit_micro", "overrides": {"depth": 2, "drop": None}},
        "sizes": [1, 2, {"a": 3}],
        "tags": {},
        "ok": True,
    }
    assert flatten(spec) == {
        "lr": "0.001",
        "model.name": "vit_micro",
        "model.overrides.depth": "2",
        "model.overrides.drop": "None",
        "sizes": '[1, 2, {"a": 3}]',
        "tags": "{}",
        "ok": "True",
    }
    assert flatten({"a": {"b": 1}}, prefix="train") == {"train.a.b": "1"}


def test_flatten_truncates_at_mlflow_limit():
    exact = "x" * MAX_PARAM_VALUE
    long = "y" * (MAX_PARAM_VALUE + 1)
    out = flatten({"exact": exact, "long": long, "list": list(range(3000))})
    assert out["exact"] == exact  # at the limit: untouched
    assert len(out["long"]) == MAX_PARAM_VALUE and out["long"].endswith(TRUNCATION_MARKER)
    assert out["long"].startswith("y" * 100)
    assert len(out["list"]) == MAX_PARAM_VALUE and out["list"].startswith("[0, 1, 2")


# -- URIs ------------------------------------------------------------------------------------------


def test_uri_resolution_order(tmp_path, monkeypatch, no_env_uri):
    monkeypatch.chdir(tmp_path)
    # default: sqlite under the *absolute* run dir, even when given relative
    assert resolve_tracking_uri(TrackingSpec(), "runs/a") == f"sqlite:///{tmp_path}/runs/a/mlflow.db"
    # env beats the default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert resolve_tracking_uri(None, "runs/a") == "http://127.0.0.1:9"
    # the spec beats the env; dicts are accepted (specs cross processes as dicts)
    assert resolve_tracking_uri({"tracking_uri": "https://mlflow.example"}, "runs/a") == "https://mlflow.example"
    # a relative sqlite path is made absolute (workers chdir), absolute ones are kept
    assert resolve_tracking_uri({"tracking_uri": "sqlite:///db/x.db"}, "r") == f"sqlite:///{tmp_path}/db/x.db"
    assert resolve_tracking_uri({"tracking_uri": "sqlite:////abs/x.db"}, "r") == "sqlite:////abs/x.db"
    resolved = resolve_spec({"experiment": "e"}, "runs/a")
    assert isinstance(resolved, TrackingSpec) and resolved.tracking_uri == "http://127.0.0.1:9"
    assert resolved.experiment == "e"


def test_default_artifact_root():
    assert default_artifact_root("http://127.0.0.1:5000", "/r") is None  # the server decides (proxied)
    assert default_artifact_root("sqlite:////data/db/mlflow.db", "/r") == "/data/db/mlartifacts"
    assert default_artifact_root("postgresql://u@h/db", "/r") == "/r/mlartifacts"


# -- NullTracker / rank-zero discipline --------------------------------------------------------------


def test_null_tracker_accepts_everything_and_writes_nothing(tmp_path, no_env_uri):
    run_dir = tmp_path / "run"
    assert isinstance(make_tracker({}, str(run_dir), rank=1, run_name="r"), NullTracker)
    t = make_tracker({"enabled": False}, str(run_dir), rank=0, run_name="r")
    assert isinstance(t, NullTracker)
    with t as same:
        assert same is t and t.run_id is None
        t.log_params({"a": {"b": 1}})
        t.log_metrics({"loss": 1.0}, step=3)
        t.set_tags({"k": "v"})
        t.log_text("x", "a.txt")
        t.log_dict({"a": 1}, "a.json")
        t.log_artifact(__file__)
        assert t.log_curve_plot({"loss": [(0, 1.0)]}, "c.png") is None
        assert t.log_confusion_matrix([[1]], ["a"], "cm") == []
        assert isinstance(t.child("c"), NullTracker)
        assert log_model(t, create_model("vit_micro"), model_name="vit_micro") is None
    t.end("FAILED")
    assert not run_dir.exists()


# -- runs ------------------------------------------------------------------------------------------


def test_tracker_run_has_what_was_logged(tmp_path, run_dir, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # artifacts must not land relative to the CWD
    note = tmp_path / "note.txt"
    note.write_text("hello")
    history = {"train/loss": [(0, 2.0), (10, 1.0), (20, 0.5)], "val/acc": [(10, 0.25), (20, float("nan")), (20, 0.5)]}

    t = make_tracker({"experiment": "exp-a", "tags": {"team": "video"}}, str(run_dir), rank=0, run_name="train")
    assert isinstance(t, Tracker) and t.run_id is None
    with t:
        t.log_params({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "model": "vit_micro"})
        for step, (loss, _) in enumerate([(2.0, 0), (1.0, 0)]):
            t.log_metrics({"train/loss": loss, "lr": torch.tensor(0.1 * (step + 1))}, step=step)
        t.set_tags({"stage": "train"})
        t.log_text("some text", "notes/readme.txt")
        t.log_dict({"a": [1, 2]}, "spec/resolved.json")
        t.log_dict({"a": 1}, "spec/resolved.yaml")
        t.log_artifact(str(note), "files")
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "a.txt").write_text("A")
        t.log_artifact(str(tmp_path / "folder"), "tree")  # a directory: its contents
        svg = t.log_curve_plot(history, "plots/curves.svg")
        cm = t.log_confusion_matrix(np.array([[5, 1], [2, 7]]), ["cat", "dog"], "eval/confusion", image_format="svg")

    c = client_for(t.tracking_uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    assert run.data.params == {"optim.lr": "0.1", "optim.betas": "[0.9, 0.99]", "model": "vit_micro"}
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "train/loss")] == [(0, 2.0), (1, 1.0)]
    assert run.data.metrics["lr"] == pytest.approx(0.2)
    assert run.data.tags["team"] == "video" and run.data.tags["stage"] == "train"
    assert c.get_experiment(run.info.experiment_id).name == "exp-a"

    # artifacts: under <run_dir>/mlartifacts (beside the sqlite db), nothing in the CWD
    assert run.info.artifact_uri.startswith(str(run_dir / "mlartifacts"))
    assert os.listdir(cwd) == []
    root = run.info.artifact_uri

    def read(rel):
        with open(os.path.join(root, rel)) as f:
            return f.read()

    assert read("notes/readme.txt") == "some text"
    assert json.loads(read("spec/resolved.json")) == {"a": [1, 2]}
    assert read("spec/resolved.yaml").strip() == "a: 1"
    assert read("files/note.txt") == "hello" and read("tree/a.txt") == "A"
    assert svg == "plots/curves.svg" and cm == ["eval/confusion.csv", "eval/confusion.svg"]
    curves = ET.fromstring(read(svg))
    assert len(curves.findall(f"{SVG}polyline")) == 2  # one line per metric (NaN point dropped)
    assert "train/loss (last 0.5)" in "".join(curves.itertext())
    rows = list(csv.reader(io.StringIO(read("eval/confusion.csv"))))
    assert rows == [["true\\predicted", "cat", "dog"], ["cat", "5", "1"], ["dog", "2", "7"]]
    heat = ET.fromstring(read("eval/confusion.svg"))
    assert len([r for r in heat.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]) == 4

    import mlflow

    assert not mlflow.is_tracking_uri_set() and mlflow.active_run() is None  # no global state touched


def test_importing_tracking_imports_neither_mlflow_nor_torch():
    code = ("import sys, heygen_ray.tracking, heygen_ray.tracking.pyfunc; "
            "print(sorted(m for m in ('mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plot_format_png_or_svg_fallback(run_dir, monkeypatch):
    t = make_tracker({}, str(run_dir), rank=0, run_name="plots").start()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "not installed": import raises ImportError
    assert t.log_curve_plot({"loss": [(0, 1.0), (1, 0.5)]}, "curves.png") == "curves.svg"
    assert t.log_confusion_matrix([[1, 0], [0, 1]], None, "cm")[1] == "cm.svg"
    monkeypatch.delitem(sys.modules, "matplotlib")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        have_mpl = False
    else:
        have_mpl = True
    if have_mpl:
        assert t.log_curve_plot({"loss": [(0, 1.0), (1, 0.5)]}, "curves.png") == "curves.png"
        root = client_for(t.tracking_uri).get_run(t.run_id).info.artifact_uri
        with open(os.path.join(root, "curves.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="square"):
        t.log_confusion_matrix([[1, 2]], ["a"], "bad")
    t.end()


def test_nested_child_run_and_failed_status(run_dir):
    run_dir = str(run_dir)
    with make_tracker({}, run_dir, rank=0, run_name="pipeline") as parent:
        with pytest.raises(RuntimeError):
            with make_tracker({}, run_dir, rank=0, run_name="train", nested_under=parent) as child:
                child.log_metrics({"x": 1.0}, step=0)
                raise RuntimeError("boom")
        # the parent id can also travel in the spec (as a dict, through a process boundary)
        spec = {"parent_run_id": parent.run_id}
        grandchild = pickle.loads(pickle.dumps(make_tracker(spec, run_dir, rank=0, run_name="eval").start()))
        grandchild.log_metrics({"y": 2.0})  # a tracker pickled after start() keeps logging to its run
        grandchild.end("KILLED")
        sub = parent.child("compress").start()
        sub.end()
    c = client_for(parent.tracking_uri)
    assert c.get_run(parent.run_id).info.status == "FINISHED"
    failed = c.get_run(child.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["mlflow.parentRunId"] == parent.run_id
    killed = c.get_run(grandchild.run_id)
    assert killed.info.status == "KILLED" and killed.data.metrics == {"y": 2.0}
    assert killed.data.tags["mlflow.parentRunId"] == parent.run_id
    assert c.get_run(sub.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in c.get_run(parent.run_id).data.tags


def test_attach_to_an_existing_run(run_dir):
    """The driver opens the run; a worker (any attempt) logs into it by id; the driver closes it."""
    owner = make_tracker({}, str(run_dir), rank=0, run_name="driver").start()
    worker = make_tracker({}, str(run_dir), rank=0, run_id=owner.run_id)
    assert isinstance(make_tracker({}, str(run_dir), rank=1, run_id=owner.run_id), NullTracker)
    worker.log_metrics({"m": 1.0}, step=5)
    assert worker.run_id == owner.run_id and worker.experiment_id == owner.experiment_id
    make_tracker({}, str(run_dir), rank=0, run_name="", run_id=owner.run_id).end("FAILED")
    run = client_for(owner.tracking_uri).get_run(owner.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"m": 1.0} and run.info.run_name == "driver"
    assert len(client_for(owner.tracking_uri).search_runs([owner.experiment_id])) == 1


# -- models ----------------------------------------------------------------------------------------

NAME = "conv_video_encoder_micro"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two versions of one registered model (different weights), logged from one run."""
    run_dir = tmp_path_factory.mktemp("registry")
    spec = {"experiment": "models", "tracking_uri": f"sqlite:///{run_dir}/mlflow.db"}  # explicit: ignore the env
    t = make_tracker(spec, str(run_dir), rank=0, run_name="train")
    models, logged = [], []
    with t:
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = create_model(NAME, num_classes=5)
            m.train()  # log_model must not leave it in eval mode, nor depend on the mode
            info = log_model(t, m, model_name=NAME, model_overrides={"num_classes": 5}, registered_model_name="video-cls",
                             extra={"label_names": ["a", "b", "c", "d", "e"], "precision": "fp32"})
            assert m.training
            models.append(m.eval())
            logged.append(info)
    example = models[0].example_inputs(2)
    return t.tracking_uri, models, logged, example


def test_log_model_registers_versions_and_aliases_resolve(registry):
    uri, models, (v1, v2), _ = registry
    assert isinstance(v1, LoggedModel) and (v1.version, v2.version) == ("1", "2")
    assert v1.registered_name == "video-cls" and v1.model_uri.startswith("models:/m-") and v1.model_uri != v2.model_uri
    assert v1.run_id == v2.run_id and v1.registry_uri == "models:/video-cls/1"
    set_alias("video-cls", "champion", v1.version, tracking_uri=uri)
    ref = resolve_model_uri("models:/video-cls@champion", tracking_uri=uri)
    assert (ref.name, ref.version, ref.run_id) == ("video-cls", "1", v1.run_id)
    set_alias("video-cls", "champion", 2, tracking_uri=uri)  # moving an alias; ints are accepted
    name, version, run_id, source = resolve_model_uri("models:/video-cls@champion", tracking_uri=uri)
    assert (name, version, run_id) == ("video-cls", "2", v2.run_id) and source
    assert resolve_model_uri("models:/video-cls/1", tracking_uri=uri).version == "1"
    assert resolve_model_uri(v2.model_uri, tracking_uri=uri) == (None, None, v2.run_id, v2.model_uri)
    version = client_for(uri).get_model_version("video-cls", "2")
    assert version.tags["heygen_ray.model_id"] == v2.model_id
    with pytest.raises(ValueError, match="models:/"):
        resolve_model_uri("runs:/abc/model", tracking_uri=uri)


def test_load_model_returns_same_class_and_outputs(registry):
    uri, (m1, m2), (v1, v2), x = registry
    set_alias("video-cls", "prod", v1.version, tracking_uri=uri)
    with torch.no_grad():
        want1, want2 = m1(**x), m2(**x)
    assert not torch.allclose(want1, want2)  # the two versions really differ
    loaded, config = load_model_and_config("models:/video-cls@prod", tracking_uri=uri)
    assert type(loaded) is type(m1) and not loaded.training
    assert config["registry_name"] == NAME and config["overrides"] == {"num_classes": 5}
    assert config["extra"]["label_names"] == ["a", "b", "c", "d", "e"] and config["input_names"] == ["video"]
    with torch.no_grad():
        assert torch.equal(loaded(**x), want1)
        assert torch.equal(load_model("models:/video-cls/2", tracking_uri=uri)(**x), want2)
        assert torch.equal(load_model(v2.model_uri, tracking_uri=uri)(**x), want2)


def test_pyfunc_predict_matches_torch(registry, monkeypatch):
    uri, (_, m2), (_, v2), x = registry
    set_alias("video-cls", "serving", v2.version, tracking_uri=uri)
    with torch.no_grad():
        want = m2(**x).numpy()
    inputs = {k: v.numpy() for k, v in x.items()}
    pm = load_pyfunc("models:/video-cls@serving", tracking_uri=uri)
    np.testing.assert_allclose(pm.predict(inputs), want, rtol=1e-5, atol=1e-5)
    # plain MLflow, resolving the registry through the environment (as `mlflow models serve` does)
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pm = mlflow.pyfunc.load_model("models:/video-cls@serving")
    out = pm.predict(inputs)
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    spec = pm.metadata.get_input_schema().inputs[0]
    assert spec.name == "video" and spec.shape == (-1, *x["video"].shape[1:]) and spec.type == np.float32


def test_loading_reads_no_pickle(registry, tmp_path, monkeypatch):
    import mlflow.artifacts

    uri, (_, m2), (_, v2), x = registry
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=resolve_model_uri("models:/video-cls/2", tracking_uri=uri).source, dst_path=str(tmp_path / "dl"))
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
    assert "artifacts/model.safetensors" in files and "artifacts/model.json" in files and "MLmodel" in files
    allowed = (".safetensors", ".json", ".yaml", ".txt", ".py")
    # MLmodel is YAML; registered_model_meta is a YAML file MLflow drops beside a model fetched by
    # a models:/name URI (models_artifact_repo.py _add_registered_model_meta_file)
    yaml_without_suffix = ("MLmodel", "registered_model_meta")
    assert [f for f in files if f not in yaml_without_suffix and not f.endswith(allowed)] == [], files
    with open(os.path.join(local, "MLmodel")) as f:
        mlmodel = f.read()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel

    def no_pickle(*a, **k):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    with torch.no_grad():
        assert torch.equal(load_model(local)(**x), m2(**x))
        out = load_pyfunc(local).predict({k: v.numpy() for k, v in x.items()})
    assert out.shape == (2, 5)


def test_text_model_tied_weights_bf16_and_resized_head(run_dir):
    """No per-architecture code: sequence inputs get variable lengths; a shared (tied) tensor is
    stored once and restored; the dtype and a head resized after creation come back."""
    m = create_model("text_decoder_micro")
    m.reset_classifier(300)  # not expressible by the overrides: recorded as num_classes
    m = m.to(torch.bfloat16).eval()
    shared = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16))
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.weight.shape == (64, 64)]
    linears[0].weight = shared
    linears[1].weight = shared  # two names, one tensor
    x = m.example_inputs(2)
    with make_tracker({}, str(run_dir), rank=0, run_name="lm") as t:
        info = log_model(t, m, model_name="text_decoder_micro", model_overrides={}, registered_model_name=None)
    assert info.version is None and info.registered_name is None
    loaded, config = load_model_and_config(info.model_uri, tracking_uri=t.tracking_uri)
    assert config["dtype"] == "bfloat16" and config["num_classes"] == 300
    assert next(loaded.parameters()).dtype == torch.bfloat16 and loaded.num_classes == 300
    with torch.no_grad():
        assert torch.equal(loaded(**x), m(**x))
    pm = load_pyfunc(info.model_uri, tracking_uri=t.tracking_uri)
    schema = {s.name: s.shape for s in pm.metadata.get_input_schema().inputs}
    assert schema == {"input_ids": (-1, -1), "attention_mask": (-1, -1)}
    short = {k: v[:, :16].numpy() for k, v in x.items()}  # another sequence length is accepted
    with torch.no_grad():
        want = m(**{k: torch.from_numpy(v) for k, v in short.items()}).float().numpy()
    out = pm.predict(short)
    assert out.dtype == np.float32 and out.shape == (2, 16, 300)
    np.testing.assert_allclose(out, want, rtol=1e-2, atol=1e-2)


def test_log_model_rejects_unknown_inputs_and_non_json(run_dir):
    m = create_model("vit_micro")
    with make_tracker({}, str(run_dir), rank=0, run_name="bad") as t:
        with pytest.raises(ValueError, match="does not take"):
            log_model(t, m, model_name="vit_micro", input_example={"video": torch.zeros(1, 3, 8, 32, 32)})
        with pytest.raises(TypeError, match="JSON"):
            log_model(t, m, model_name="vit_micro", extra={"path": object()})


def test_every_micro_model_of_the_zoo_round_trips(run_dir):
    """One code path for all architectures: log, load as the same class, same outputs (torch and pyfunc)."""
    from heygen_ray.models import list_models

    names = list_models("_micro")
    assert len(names) >= 5
    with make_tracker({}, str(run_dir), rank=0, run_name="zoo") as t:
        for name in names:
            torch.manual_seed(0)
            m = create_model(name).eval()
            x = m.example_inputs(2)
            info = log_model(t, m, model_name=name)
            loaded = load_model(info.model_uri, tracking_uri=t.tracking_uri)
            out = load_pyfunc(info.model_uri, tracking_uri=t.tracking_uri).predict({k: v.numpy() for k, v in x.items()})
            with torch.no_grad():
                want = m(**x)
                assert type(loaded) is type(m) and torch.equal(loaded(**x), want), name
            np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_recorded_values_follow_a_variant_to_its_parent(registry, tmp_path):
    """A compressed variant's model.json carries its lineage, not the training's task and data: both
    are read from the parent it names (and a missing parent gives None, not an error)."""
    from heygen_ray.tracking import load_model_config, recorded, recorded_data_info

    uri = registry[0]
    parent = load_model_config("models:/video-cls/1", tracking_uri=uri)
    assert recorded(parent, "precision") == "fp32" and recorded(parent, "task") is None
    child = {"extra": {"variant": "int8", "lineage": {"parent_uri": "models:/video-cls/1"}}}
    assert recorded(child, "label_names", tracking_uri=uri) == ["a", "b", "c", "d", "e"]
    assert recorded({"extra": {"data_info": {"height": 32}}}, "data_info") == {"height": 32}
    assert recorded_data_info(child, tracking_uri=uri) == {}  # the parent records none
    gone = {"extra": {"lineage": {"parent_uri": "models:/video-cls/99"}}}
    assert recorded(gone, "label_names", tracking_uri=uri) is None


def test_a_new_sqlite_store_is_seeded_from_the_cached_empty_one(tmp_path, monkeypatch):
    """A new store is a copy of the migrated empty store of this MLflow version: the same schema
    revision as a store MLflow creates itself, its Default experiment beside the database, and a
    second creator of the same file finds it made."""
    import sqlite3

    from heygen_ray.tracking.runs import _template_path, ensure_experiment, seed_sqlite_store

    monkeypatch.setenv("HEYGEN_RAY_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "a" / "mlflow.db"
    exp = ensure_experiment(f"sqlite:///{db}", "seeded", str(tmp_path / "a" / "mlartifacts"))
    assert os.path.isfile(_template_path()) and db.is_file()
    assert not seed_sqlite_store(str(db))  # exists: left alone
    native = tmp_path / "native.db"
    client_for(f"sqlite:///{native}").search_experiments()  # MLflow's own creation, for comparison

    def revision(path):
        with sqlite3.connect(path) as con:
            return con.execute("SELECT version_num FROM alembic_version").fetchall()

    assert revision(db) == revision(native)
    client = client_for(f"sqlite:///{db}")
    default = client.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "a" / "mlartifacts" / "0")
    assert client.get_experiment(exp).name == "seeded"
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 0.5
    assert [p.name for p in db.parent.iterdir() if p.name.endswith(".tmp")] == []  # no leftovers
