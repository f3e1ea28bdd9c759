"""The Serve application: a FastAPI ingress (here) and one deployment per task model
(:mod:`heygen_ray.serve.deployments`, computing with :mod:`heygen_ray.serve.forward`).

    ingress (FastAPI, validation, lineage headers)
      |-- ClassifyModel   POST /v1/videos/classify   video_classification   @serve.batch
      |-- GenerateModel   POST /v1/videos/generate   text_to_video          @serve.batch
      |-- CompleteModel   POST /v1/text/complete     language_modeling      @serve.batch (left-padded)
      '-- MatchModel      POST /v1/match             video_text_matching    @serve.batch
    GET /healthz, GET /v1/models, POST /v1/admin/reload (admin: a bearer token, :mod:`heygen_ray.serve.auth`)

Each model deployment loads ``models:/<name>@<alias>`` through :func:`heygen_ray.serve.loader.load_variant`
and serves the variants of its endpoint by multiplexed model id (``@serve.multiplexed``; the
request picks one with the ``serve_multiplexed_model_id`` header or ``?variant=``; no id: the
endpoint's own model, id ``default``). Serve's batcher splits a batch by model id, so one batch
always runs one variant. Preprocessing is the training code itself: PyAV decoding
(`data.decode.decode_clip`), `data.transforms.video_to_float`, the BPE tokenizer and
`data.text.encode_captions`, with the clip shape / tokenizer recorded by training in model.json.

Reload: a loaded variant lives in a :class:`Slot`; reloading loads the new version first and then
swaps the slot's contents, so requests already running finish on the objects they took. A reload
reaches every replica through a small named coordinator actor (a generation counter the replicas
poll), and each replica can also re-resolve its aliases every ``reload_period_s``.
"""


import asyncio
import base64
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from heygen_ray import fsutil
from heygen_ray.config import SERVE_ENDPOINTS, ServeEndpointSpec, ServeSpec, load_spec
from heygen_ray.serve.auth import TokenGuard
from heygen_ray.serve.deployments import (
    COORDINATOR_NAMESPACE,
    DEFAULT_ID,
    DEPLOYMENTS,
    MULTIPLEX_HEADER,
    _ReloadCoordinator,
    coordinator_name,
)
from heygen_ray.serve.inputs import (
    VIDEO_TYPES,
    content_type,
    parse_multipart,
    probe_frames,
    read_body,
    read_video_uri,
    upload_from_multipart,
)
from heygen_ray.serve.loader import lineage_headers
from heygen_ray.serve.schemas import (
    BadInputError,
    CompleteRequest,
    GenerateRequest,
    MatchRequest,
    VideoURIRequest,
    check_captions,
    check_complete,
    check_prompt,
    validate_body,
)

log = logging.getLogger(__name__)

ROUTES = {"classify": "/v1/videos/classify", "generate": "/v1/videos/generate", "complete": "/v1/text/complete",
          "match": "/v1/match"}
TASKS = {"classify": "video_classification", "generate": "text_to_video", "complete": "language_modeling",
         "match": "video_text_matching"}


# --------------------------------------------------------------------------------------------------
# Ingress
# --------------------------------------------------------------------------------------------------

api = FastAPI(title="heygen_ray serving", description="Models from the MLflow registry on Ray Serve")


@api.exception_handler(BadInputError)
async def _bad_input(request: Request, err: BadInputError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse({"detail": err.detail()}, status_code=err.status, headers=headers)


def _cause(err: BaseException) -> Optional[BadInputError]:
    """A BadInputError raised in a model replica arrives wrapped by Ray: unwrap it."""
    for e in (err, getattr(err, "cause", None), getattr(err, "__cause__", None)):
        if isinstance(e, BadInputError) and hasattr(e, "status"):
            return e
        if isinstance(e, BadInputError):
            return BadInputError(*e.args[:3]) if len(e.args) >= 2 else BadInputError("", str(e))
    return None


def _headers(meta: Dict[str, Any], extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    h = lineage_headers(meta["info"])
    h["x-batch-size"] = str(meta["batch_size"])
    h.update(extra or {})
    return h


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, spec: Dict[str, Any], handles: Dict[str, Any]) -> None:
        import ray

        self.spec = ServeSpec.from_dict(spec, source="serve spec")
        self.limits = self.spec.limits
        self.handles = handles
        self.guard = TokenGuard.from_spec(self.spec.auth)  # the tokens as this replica's process sees them
        self.coordinator = ray.remote(num_cpus=0)(_ReloadCoordinator).options(
            name=coordinator_name(self.spec.name), namespace=COORDINATOR_NAMESPACE, get_if_exists=True).remote()

    # -- helpers --------------------------------------------------------------------------------
    def _handle(self, endpoint: str, request: Request):
        self.guard.inference(request.headers)  # first: nothing about the app is told without a token
        if endpoint not in self.handles:
            raise BadInputError("", f"endpoint {ROUTES[endpoint]} is not enabled on this server", 404)
        mid = request.headers.get(MULTIPLEX_HEADER) or request.query_params.get("variant") or DEFAULT_ID
        known = [DEFAULT_ID, *getattr(self.spec, endpoint).variants]
        if mid not in known:
            raise BadInputError(MULTIPLEX_HEADER, f"unknown variant {mid!r} for {endpoint}; known: {', '.join(known)}", 404)
        return self.handles[endpoint].options(multiplexed_model_id=mid)

    async def _call(self, response) -> Any:
        try:
            return await response
        except Exception as err:
            bad = _cause(err)
            if bad is not None:
                raise bad from None
            raise

    async def _json(self, request: Request, model):
        ctype = content_type(request.headers)
        if ctype != "application/json":
            raise BadInputError("content-type", f"expected application/json, got {ctype or 'none'!r}", 415)
        body = await read_body(request, self.limits.max_body_bytes)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInputError("body", f"malformed JSON: {err}", 400) from None
        return validate_body(model, data)

    async def _video_bytes(self, data: bytes) -> bytes:
        n = await asyncio.to_thread(probe_frames, data)
        if n > self.limits.max_frames:
            raise BadInputError("video", f"{n} frames > the limit of {self.limits.max_frames}", 413)
        return data

    async def _video_request(self, request: Request, with_captions: bool) -> Tuple[bytes, Optional[List[str]]]:
        """A video from multipart (field ``video``; ``captions``: a JSON list or repeated fields),
        a raw video body, or JSON ``{"uri": ...}`` (+ ``captions``)."""
        ctype = content_type(request.headers)
        captions = None
        if ctype == "multipart/form-data":
            body = await read_body(request, self.limits.max_upload_bytes)
            fields = await asyncio.to_thread(parse_multipart, body, request.headers.get("content-type", ""))
            data = upload_from_multipart(fields)
            if with_captions:
                raw = [d.decode("utf-8", "replace") for _, _, d in fields.get("captions", []) + fields.get("caption", [])]
                if len(raw) == 1 and raw[0].lstrip().startswith("["):
                    try:
                        raw = json.loads(raw[0])
                    except json.JSONDecodeError as err:
                        raise BadInputError("captions", f"malformed JSON list: {err}", 400) from None
                    if not isinstance(raw, list):
                        raise BadInputError("captions", "expected a list of strings")
                captions = raw
        elif ctype in VIDEO_TYPES and not with_captions:
            data = await read_body(request, self.limits.max_upload_bytes)
            if not data:
                raise BadInputError("video", "empty body")
        elif ctype == "application/json":
            req = await self._json(request, MatchRequest if with_captions else VideoURIRequest)
            data = await asyncio.to_thread(read_video_uri, req.uri, self.spec.allowed_uri_root, self.limits.max_upload_bytes)
            captions = req.captions if with_captions else None
        else:
            allowed = "multipart/form-data or application/json" + ("" if with_captions else " or video/mp4")
            raise BadInputError("content-type", f"expected {allowed}, got {ctype or 'none'!r}", 415)
        if with_captions:
            check_captions(captions or [], self.limits)
        return await self._video_bytes(data), captions

    # -- routes ---------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        return {"status": "ok", "endpoints": {e: ROUTES[e] for e in self.handles}}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Dict[str, Any]:
        self.guard.inference(request.headers)
        out = {}
        for e, h in self.handles.items():
            d = await h.describe.remote()
            cfg = getattr(self.spec, e)
            out[e] = {"path": ROUTES[e], "task": TASKS[e], "model": cfg.model, "default": d["variants"][DEFAULT_ID],
                      "variants": d["variants"], "batching": d["batching"]}
        return {"endpoints": out}

    @api.post("/v1/admin/reload")
    async def reload(self, request: Request) -> Dict[str, Any]:
        """Move every replica to the versions the aliases point at now (in-flight requests finish
        on the old ones). One replica per endpoint answers here; the others follow within seconds.
        Needs the admin token."""
        self.guard.admin(request.headers)
        results = {}
        for e, h in self.handles.items():
            results[e] = await h.reload.remote()
        gen = await self.coordinator.bump.remote()  # after: the other replicas follow what this one did
        return {"generation": gen, "endpoints": results}

    @api.post("/v1/videos/classify")
    async def classify(self, request: Request) -> JSONResponse:
        handle = self._handle("classify", request)
        data, _ = await self._video_request(request, with_captions=False)
        res = await self._call(handle.classify.remote(data))
        meta = {"info": res.pop("info"), "batch_size": res.pop("batch_size")}
        return JSONResponse(res, headers=_headers(meta))

    @api.post("/v1/videos/generate")
    async def generate(self, request: Request) -> Response:
        handle = self._handle("generate", request)
        req: GenerateRequest = await self._json(request, GenerateRequest)
        check_prompt(req.prompt, self.limits)
        want_json = req.format == "gif" or "application/json" in (request.headers.get("accept") or "")
        fmt = "gif" if want_json else "mp4"
        res = await self._call(handle.generate.remote(req.prompt, fmt))
        meta = {"info": res["info"], "batch_size": res["batch_size"]}
        extra = {"x-seed": str(req.seed)} if req.seed is not None else {}
        if fmt == "gif":
            body = {"format": "gif", "gif_base64": base64.b64encode(res["gif"]).decode(), "fps": res["fps"],
                    "frames": res["shape"][0], "height": res["shape"][1], "width": res["shape"][2], "seed": req.seed}
            return JSONResponse(body, headers=_headers(meta, extra))
        return Response(res["mp4"], media_type="video/mp4", headers=_headers(meta, extra))

    @api.post("/v1/text/complete")
    async def complete(self, request: Request) -> JSONResponse:
        handle = self._handle("complete", request)
        req: CompleteRequest = await self._json(request, CompleteRequest)
        check_complete(req, self.limits)
        res = await self._call(handle.complete.remote(req.prompt, req.max_tokens, req.temperature, req.seed))
        meta = {"info": res.pop("info"), "batch_size": res.pop("batch_size")}
        return JSONResponse(res, headers=_headers(meta))

    @api.post("/v1/match")
    async def match(self, request: Request) -> JSONResponse:
        handle = self._handle("match", request)
        data, captions = await self._video_request(request, with_captions=True)
        res = await self._call(handle.match.remote(data, captions))
        meta = {"info": res.pop("info"), "batch_size": res.pop("batch_size")}
        return JSONResponse(res, headers=_headers(meta))


# --------------------------------------------------------------------------------------------------
# Building the application
# --------------------------------------------------------------------------------------------------


def _options(cfg: ServeEndpointSpec, name: str) -> Dict[str, Any]:
    opts: Dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": cfg.num_cpus},
        "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.batching.max_batch_size),
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = cfg.autoscaling.to_dict()
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def resolve_tracking_uri(spec: ServeSpec) -> Optional[str]:
    return spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def app_from_spec(spec: ServeSpec):
    """The bound application of a validated spec (endpoints without a model are left out)."""
    tracking_uri = resolve_tracking_uri(spec)
    # replicas run in other working directories: local paths made absolute here
    data = spec.to_dict()
    root = spec.allowed_uri_root
    if root is not None and "://" not in root and not os.path.isabs(root):
        data["allowed_uri_root"] = fsutil.absolute(root)
    for key in ("admin_token_file", "inference_token_file"):
        if data["auth"][key]:
            data["auth"][key] = os.path.abspath(data["auth"][key])
    spec = ServeSpec.from_dict(data)
    handles = {}
    for e in spec.enabled():
        cfg = getattr(spec, e)
        handles[e] = DEPLOYMENTS[e].options(**_options(cfg, e)).bind(
            cfg.to_dict(), tracking_uri, spec.limits.to_dict(), spec.name, spec.reload_period_s)
    return Ingress.options(num_replicas=spec.ingress_replicas, ray_actor_options={"num_cpus": spec.ingress_num_cpus},
                           max_ongoing_requests=1024, graceful_shutdown_timeout_s=5.0).bind(spec.to_dict(), handles)


def spec_from_args(args: Mapping[str, Any]) -> ServeSpec:
    """``{"config": <serve yaml>, "<dotted.key>": value, ...}`` -> ServeSpec (values from the
    ``serve run`` command line arrive as strings and are parsed as YAML, like CLI overrides)."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]
    return load_spec(ServeSpec, path, overrides)


def build_app(args: Dict[str, Any]):
    """Entry point for ``serve run heygen_ray.serve.app:build_app config=configs/serve/x.yaml``,
    ``serve deploy`` and a RayService ``serveConfigV2`` (``import_path`` + ``args``)."""
    return app_from_spec(spec_from_args(args))


__all__ = ["build_app", "app_from_spec", "spec_from_args", "ROUTES", "TASKS", "SERVE_ENDPOINTS"]

