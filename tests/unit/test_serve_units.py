"""Serve pieces that need no Ray: the spec, request validation, multipart, URI roots, the configs."""

from __future__ import annotations

import os

import pytest

from heygen_ray.config import ConfigError, ServeSpec, load_spec
from heygen_ray.serve.inputs import parse_multipart, probe_frames, read_video_uri, upload_from_multipart
from heygen_ray.serve.schemas import BadInputError, CompleteRequest, GenerateRequest, check_complete, validate_body

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_spec_validates_and_disables_endpoints():
    spec = ServeSpec.from_dict({"classify": {"model": "models:/cls@champion"}, "generate": {"model": None}})
    assert spec.enabled() == ["classify"] and spec.port == 8000 and spec.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="no endpoint has a model"):
        ServeSpec.from_dict({})
    with pytest.raises(ConfigError, match=r"classify.model: .*models:/"):
        ServeSpec.from_dict({"classify": {"model": "/tmp/model"}})
    with pytest.raises(ConfigError, match=r"classify.batching.max_batch_sise: unknown field \(did you mean 'max_batch_size'"):
        ServeSpec.from_dict({"classify": {"model": "models:/c@a", "batching": {"max_batch_sise": 4}}})
    with pytest.raises(ConfigError, match="classify.variants"):
        ServeSpec.from_dict({"classify": {"model": "models:/c@a", "variants": {"default": "bf16"}}})
    with pytest.raises(ConfigError, match="max_replicas"):
        ServeSpec.from_dict({"classify": {"model": "models:/c@a", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_quickstart_config_and_overrides():
    spec = load_spec(ServeSpec, os.path.join(ROOT, "configs/serve/quickstart.yaml"),
                     ["classify.model=models:/mine@champion", "match.model=null", "port=9123"])
    assert spec.classify.model == "models:/mine@champion" and spec.port == 9123
    assert spec.enabled() == ["classify", "generate", "complete"]
    assert spec.classify.variants["int8"] == "pruned_distilled_int8_dynamic"


def test_build_app_binds_only_enabled_endpoints(tmp_path):
    from ray.serve import Application

    from heygen_ray.serve.app import build_app, spec_from_args

    args = {"config": os.path.join(ROOT, "configs/serve/quickstart.yaml"), "generate.model": None,
            "complete.model": "null", "classify.batching.max_batch_size": "4"}
    spec = spec_from_args(args)
    assert spec.enabled() == ["classify", "match"] and spec.classify.batching.max_batch_size == 4
    app = build_app(args)
    assert isinstance(app, Application)
    handles = app._bound_deployment.init_args[1]
    assert sorted(handles) == ["classify", "match"]
    # a relative token file is resolved where the app is built (replicas run in other directories)
    bound = build_app({**args, "auth.admin_token_file": "secrets/admin"})._bound_deployment.init_args[0]
    assert bound["auth"]["admin_token_file"] == os.path.join(os.getcwd(), "secrets", "admin")


def test_cluster_serve_config_is_a_valid_serve_deploy_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster/serve/serve_config.yaml")))
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    app = schema.applications[0]
    assert app.import_path == "heygen_ray.serve.app:build_app" and schema.http_options.host == "0.0.0.0"
    names = {d.name for d in app.deployments}
    assert names == {"ingress", "classify", "generate", "complete", "match"}
    spec = spec_from_args_for(app.args)
    assert spec.allowed_uri_root == "/data/videos"
    # bound to 0.0.0.0: every endpoint but /healthz needs a token, read from files (a mounted Secret)
    assert spec.auth.inference and spec.auth.admin_token_file and spec.auth.inference_token_file


def spec_from_args_for(args):
    from heygen_ray.serve.app import spec_from_args

    args = dict(args)
    args["config"] = os.path.join(ROOT, args["config"])
    return spec_from_args(args)


def test_request_bodies_name_the_field():
    with pytest.raises(BadInputError) as e:
        validate_body(CompleteRequest, {"prompt": "a", "max_tokens": "3"})
    assert e.value.field == "max_tokens" and e.value.status == 422
    with pytest.raises(BadInputError) as e:
        validate_body(CompleteRequest, {"prompt": "a", "max_tokens": 3, "temp": 1})
    assert e.value.field == "temp" and "unknown field" in e.value.message
    with pytest.raises(BadInputError) as e:
        validate_body(GenerateRequest, {"prompt": "a", "format": "avi"})
    assert e.value.field == "format"
    with pytest.raises(BadInputError, match="temperature: Input should be a finite number"):
        validate_body(CompleteRequest, __import__("json").loads('{"prompt": "a", "max_tokens": 2, "temperature": NaN}'))
    from heygen_ray.config import ServeLimitsSpec

    with pytest.raises(BadInputError, match="max_tokens: 99 > the limit of 16"):
        check_complete(CompleteRequest(prompt="a", max_tokens=99), ServeLimitsSpec(max_tokens=16))
    assert BadInputError("video", "bad").detail() == [{"loc": ["body", "video"], "msg": "bad", "type": "value_error"}]


def test_multipart_and_uri_root(tmp_path):
    from heygen_ray.serve.runner import multipart, sample_video

    video = sample_video()
    body, ctype = multipart({"video": ("a.mp4", "video/mp4", video), "captions": (None, "text/plain", b'["x"]')})
    fields = parse_multipart(body, ctype)
    assert upload_from_multipart(fields) == video and fields["captions"][0][2] == b'["x"]'
    assert probe_frames(video) == 8
    with pytest.raises(BadInputError, match="cannot decode"):
        probe_frames(b"not a video at all" * 10)
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.mp4").write_bytes(video)
    (tmp_path / "secret.mp4").write_bytes(video)
    os.symlink(tmp_path / "secret.mp4", root / "link.mp4")
    assert read_video_uri(str(root / "a.mp4"), str(root), 10**6) == video
    assert read_video_uri(f"file://{root}/a.mp4", str(root), 10**6) == video
    for bad, status in [(str(root / "link.mp4"), 403), (str(root) + "/a\x00.mp4", 422), (f"{root}/../secret.mp4", 403), ("a.mp4", 422),
                        ("s3://elsewhere/a.mp4", 403), (str(root / "none.mp4"), 404)]:
        with pytest.raises(BadInputError) as e:
            read_video_uri(bad, str(root), 10**6)
        assert e.value.status == status and e.value.field == "uri", bad
    with pytest.raises(BadInputError) as e:
        read_video_uri(str(root / "a.mp4"), None, 10**6)
    assert e.value.status == 403
    with pytest.raises(BadInputError) as e:
        read_video_uri(str(root / "a.mp4"), str(root), 10)
    assert e.value.status == 413


def test_a_bad_video_in_a_batch_fails_only_its_request():
    from heygen_ray.config import ServeEndpointSpec
    from heygen_ray.serve.deployments import _decode_then, _raise_error
    from heygen_ray.serve.forward import Prep
    from heygen_ray.serve.runner import sample_video

    prep = Prep({"data_info": {"clip_frames": 4, "height": 16, "width": 16}}, ServeEndpointSpec(model="models:/m@a"), "classify")
    seen = []
    out, errors = _decode_then(prep, [sample_video(), b"garbage" * 50, sample_video()], lambda clips: seen.append(len(clips)) or "ok")
    assert out == "ok" and seen == [2] and list(errors) == [1]
    assert errors[1].field == "video" and errors[1].status == 422 and "cannot decode" in errors[1].message
    with pytest.raises(BadInputError):
        _raise_error({"error": errors[1]})
    assert prep.decode(sample_video()).shape == (4, 16, 16, 3)


def test_reload_reports_a_swap_done_while_it_waited(monkeypatch):
    """Two reloads at once (POST /v1/admin/reload and a replica's own generation watch): the second
    waits for the lock and finds nothing left to swap, but must still report the version that moved
    while it waited. The registry lookup is replaced by a dict here: this tests the lock and the
    report; the real registry path runs in tests/integration/test_serve.py."""
    import asyncio
    import types

    import heygen_ray.tracking as tracking
    from heygen_ray.serve.deployments import Slot, TaskModel

    registry = {"version": "1"}
    monkeypatch.setattr(tracking, "resolve_model_uri",
                        lambda uri, tracking_uri=None: types.SimpleNamespace(name="cls", version=registry["version"]))
    model = TaskModel.__new__(TaskModel)
    model.endpoint, model.tracking_uri, model.reloads, model._reload_lock = "classify", None, [], None
    slot = Slot("default", "models:/cls@champion", object(), {"name": "cls", "version": "1"}, None)
    model.slots = {"default": slot}
    model._target = lambda model_id: ("models:/cls@champion", None, "models:/cls@champion")

    def load(model_id):
        import time

        time.sleep(0.2)  # a load takes long enough for the second call to queue on the lock
        return object(), {"name": "cls", "version": registry["version"]}, None, None

    model._load_runnable = load

    async def both():
        registry["version"] = "2"
        return await asyncio.gather(model.reload(), model.reload())

    first, second = asyncio.run(both())
    assert first["changed"] == {"default": {"from": "1", "to": "2"}}
    assert second["changed"] == {"default": {"from": "1", "to": "2"}} and second["versions"] == {"default": "2"}
    assert len(model.reloads) == 1  # one swap happened, recorded once
    assert asyncio.run(model.reload())["changed"] == {}  # nothing moved since


# -- bearer tokens ------------------------------------------------------------------------------


def test_a_token_comes_from_its_file_first_then_the_environment_and_a_bad_file_is_an_error(tmp_path, monkeypatch):
    from heygen_ray.serve.auth import read_token

    monkeypatch.setenv("HR_TEST_TOKEN", "  from-env\n")
    assert read_token(None, "HR_TEST_TOKEN") == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(str(tmp_path / "t"), "HR_TEST_TOKEN") == "from-file"
    monkeypatch.setenv("HR_TEST_TOKEN", " ")
    assert read_token(None, "HR_TEST_TOKEN") is None and read_token(None, "HR_TEST_UNSET_VARIABLE") is None
    with pytest.raises(ValueError, match=r"cannot read the token file .*/nope"):
        read_token(str(tmp_path / "nope"), "HR_TEST_TOKEN")  # never silently open
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="token file .*empty is empty"):
        read_token(str(tmp_path / "empty"), "HR_TEST_TOKEN")


def test_the_token_guard_refuses_missing_wrong_and_unconfigured_tokens():
    from heygen_ray.serve.auth import TokenGuard, bearer
    from heygen_ray.serve.schemas import BadInputError

    assert bearer({"authorization": "Bearer abc"}) == "abc" and bearer({"authorization": "bearer  abc "}) == "abc"
    assert bearer({"authorization": "Basic abc"}) is None and bearer({}) is None and bearer({"authorization": "Bearer "}) is None

    def status(check, headers):
        try:
            check(headers)
        except BadInputError as err:
            assert err.field == "authorization"
            return err.status, err.message
        return 200, ""

    g = TokenGuard(admin="adm", inference="inf", inference_required=False)
    assert status(g.admin, {"authorization": "Bearer adm"})[0] == 200
    assert status(g.admin, {})[0] == 401 and "bearer token" in status(g.admin, {})[1]
    assert status(g.admin, {"authorization": "Bearer inf"}) == (401, "invalid token")  # the inference token is not admin
    assert status(g.admin, {"authorization": "Bearer admx"}) == (401, "invalid token")
    assert status(g.inference, {})[0] == 200  # inference tokens off: open

    g = TokenGuard(admin="adm", inference="inf", inference_required=True)
    assert status(g.inference, {})[0] == 401
    assert status(g.inference, {"authorization": "Bearer inf"})[0] == 200
    assert status(g.inference, {"authorization": "Bearer adm"})[0] == 200  # the admin token may call the models
    assert status(g.inference, {"authorization": "Bearer nope"}) == (401, "invalid token")

    off = TokenGuard(admin=None, inference=None, inference_required=False)
    code, msg = status(off.admin, {"authorization": "Bearer x"})
    assert code == 403 and "admin endpoints are off" in msg
    with pytest.raises(ValueError, match="auth.inference is on but no token"):
        TokenGuard(admin=None, inference=None, inference_required=True)
