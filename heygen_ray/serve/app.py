"""The Serve application: a FastAPI ingress and one deployment per task model.

    ingress (FastAPI, validation, lineage headers)
      |-- ClassifyModel   POST /v1/videos/classify   video_classification   @serve.batch
      |-- GenerateModel   POST /v1/videos/generate   text_to_video          @serve.batch
      |-- CompleteModel   POST /v1/text/complete     language_modeling      @serve.batch (left-padded)
      '-- MatchModel      POST /v1/match             video_text_matching    @serve.batch
    GET /healthz, GET /v1/models, POST /v1/admin/reload

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
import collections
import json
import logging
import os
import time
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from heygen_ray.config import SERVE_ENDPOINTS, ServeEndpointSpec, ServeLimitsSpec, ServeSpec, load_spec
from heygen_ray.serve.inputs import (
    VIDEO_TYPES,
    content_type,
    parse_multipart,
    probe_frames,
    read_body,
    read_video_uri,
    upload_from_multipart,
)
from heygen_ray.serve.loader import lineage_headers, public_info
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
DEFAULT_ID = "default"
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
COORDINATOR_NAMESPACE = "heygen_serve"
WATCH_POLL_S = 1.0


# --------------------------------------------------------------------------------------------------
# Preprocessing and model calls (pure functions over the training code)
# --------------------------------------------------------------------------------------------------


class Prep:
    """What turns a request into model inputs for one loaded model: the clip shape, tokenizer and
    label names recorded by training (model.json ``data_info``), gaps filled by the endpoint's
    ``preprocess`` section, then by the architecture itself."""

    def __init__(self, info: Dict[str, Any], cfg: ServeEndpointSpec, task: str) -> None:
        di, pp, arch = info.get("data_info") or {}, cfg.preprocess, info.get("arch")
        self.resize, self.fps = pp.resize, pp.fps
        self.label_names = di.get("label_names") or pp.label_names
        self.clip_frames = self.height = self.width = None
        if task in ("classify", "match"):
            dims = [di.get(k) or getattr(pp, k) for k in ("clip_frames", "height", "width")]
            if not all(dims):  # the architecture's own clip shape: (1, C, T, H, W)
                shape = tuple(arch.example_inputs(1)["video"].shape)[2:]
                dims = [d or s for d, s in zip(dims, shape)]
            self.clip_frames, self.height, self.width = (int(d) for d in dims)
        self.tokenizer = None
        if task in ("generate", "complete", "match"):
            from heygen_ray.data.text import TextTokenizer

            tok_dir = pp.tokenizer_dir or di.get("tokenizer_dir")
            if not tok_dir:
                raise ValueError(f"{info.get('uri')}: no tokenizer (model.json has no data_info.tokenizer_dir; "
                                 f"set {task}.preprocess.tokenizer_dir)")
            self.tokenizer = TextTokenizer.load(tok_dir)
        max_len = getattr(arch, "max_sequence_length", None)
        self.caption_tokens = int(di.get("caption_tokens") or pp.caption_tokens or max_len or 24)
        self.seq_len = int(di.get("seq_len") or max_len or 64)

    def decode(self, data: bytes) -> np.ndarray:
        """Video bytes -> uint8 (T, H, W, 3), exactly as the evaluation pipeline decodes (uniform sampling)."""
        from heygen_ray.data.decode import DecodeError, decode_clip

        try:
            clip, _ = decode_clip(data, self.clip_frames, self.height, self.width, sampling="uniform",
                                  short_clips="pad", resize=self.resize)
        except DecodeError as err:
            raise BadInputError("video", f"cannot decode the video: {err}") from None
        return clip

    def captions(self, texts: List[str]):
        import torch

        from heygen_ray.data.text import encode_captions

        ids, mask = encode_captions(self.tokenizer, texts, self.caption_tokens)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)


def _video(clips: List[np.ndarray]):
    import torch

    from heygen_ray.data.transforms import video_to_float

    return video_to_float(torch.from_numpy(np.stack(clips)))


def classify_forward(runnable: Any, clips: List[np.ndarray]) -> np.ndarray:
    """uint8 clips -> class probabilities (B, K)."""
    import torch

    with torch.inference_mode():
        return torch.softmax(runnable(video=_video(clips)).float(), dim=-1).numpy()


def generate_forward(runnable: Any, prep: Prep, prompts: List[str]) -> List[np.ndarray]:
    """prompts -> uint8 clips (T, H, W, 3)."""
    import torch

    from heygen_ray.data.media import to_uint8

    ids, mask = prep.captions(prompts)
    with torch.inference_mode():
        video = runnable(input_ids=ids, attention_mask=mask).float().numpy()
    return [to_uint8(v) for v in video]


def match_forward(runnable: Any, prep: Prep, clips: List[np.ndarray], captions: List[List[str]]) -> List[List[Dict[str, float]]]:
    """Each clip against its captions -> per caption the match probability (the fused match head)
    and the scaled cosine similarity of the two embeddings."""
    import torch

    video = _video(clips)
    index = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    ids, mask = prep.captions([c for cs in captions for c in cs])
    with torch.inference_mode():
        scores = runnable(video=video[index], input_ids=ids, attention_mask=mask).float()  # (N, 2)
    prob, sim = torch.sigmoid(scores[:, 0]).tolist(), scores[:, 1].tolist()
    out, k = [], 0
    for cs in captions:
        out.append([{"caption": c, "match_probability": prob[k + j], "similarity": sim[k + j]} for j, c in enumerate(cs)])
        k += len(cs)
    return out


def complete_forward(runnable: Any, prep: Prep, prompts: List[List[int]], max_tokens: List[int],
                     temperatures: List[float], seeds: List[Optional[int]]) -> List[List[int]]:
    """Batched sampling from a causal LM: prompts left-padded with an attention mask (padding is
    no key), each row with its own length, temperature (0: greedy) and seed; stops at <eos>."""
    import torch

    tok = prep.tokenizer
    gens = [torch.Generator().manual_seed(int(s)) if s is not None else None for s in seeds]
    seqs = [list(p) for p in prompts]
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with torch.inference_mode():
        for _ in range(max(max_tokens)):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            ctx = [seqs[i][-prep.seq_len:] for i in active]
            width = max(len(c) for c in ctx)
            ids = torch.full((len(active), width), tok.pad_id, dtype=torch.int64)
            mask = torch.zeros((len(active), width), dtype=torch.bool)
            for j, c in enumerate(ctx):
                ids[j, width - len(c):] = torch.tensor(c)
                mask[j, width - len(c):] = True
            logits = runnable(input_ids=ids, attention_mask=mask)[:, -1].float()  # (B, V)
            for j, i in enumerate(active):
                t = temperatures[i]
                if t < 1e-3:  # (near) zero: greedy, and no overflow in logits / t
                    nxt = int(logits[j].argmax())
                else:
                    probs = torch.softmax(logits[j] / t, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gens[i]))
                if nxt == tok.eos_id:
                    done[i] = True
                    continue
                seqs[i].append(nxt)
                out[i].append(nxt)
                if len(out[i]) >= max_tokens[i]:
                    done[i] = True
    return out


# --------------------------------------------------------------------------------------------------
# Model deployments
# --------------------------------------------------------------------------------------------------


def _decode_then(prep: Prep, videos: List[bytes], forward: Any, pass_index: bool = False) -> Tuple[Any, Dict[int, BadInputError]]:
    """Decode each video; run ``forward`` on the decodable ones -> (its result, {index: error})."""
    clips, keep, errors = [], [], {}
    for i, data in enumerate(videos):
        try:
            clips.append(prep.decode(data))
            keep.append(i)
        except BadInputError as err:
            errors[i] = err
    if not clips:
        return [], errors
    return (forward(clips, keep) if pass_index else forward(clips)), errors


def _raise_error(result: Dict[str, Any]) -> Dict[str, Any]:
    """A batch answers a bad item with {"error": BadInputError}: raise it for that request only."""
    if "error" in result:
        raise result["error"]
    return result


class Slot:
    """One loaded variant. :meth:`swap` replaces what it holds; callers take a :meth:`snapshot`."""

    def __init__(self, model_id: str, spec_value: str, runnable: Any, info: Dict[str, Any], prep: Prep) -> None:
        self.model_id, self.spec_value = model_id, spec_value
        self.swap(runnable, info, prep)

    def swap(self, runnable: Any, info: Dict[str, Any], prep: Prep) -> None:
        self._state = (runnable, info, prep)  # one assignment: readers see old or new, never a mix

    def snapshot(self) -> Tuple[Any, Dict[str, Any], Prep]:
        return self._state


class _ReloadCoordinator:
    """A generation counter: POST /v1/admin/reload bumps it; every model replica polls it."""

    def __init__(self) -> None:
        self.gen = 0

    def bump(self) -> int:
        self.gen += 1
        return self.gen

    def generation(self) -> int:
        return self.gen


def coordinator_name(app_name: str) -> str:
    return f"heygen-reload-{app_name}"


class TaskModel:
    """Base of the four model deployments (one per task)."""

    endpoint = ""

    def __init__(self, endpoint: Dict[str, Any], tracking_uri: Optional[str], limits: Dict[str, Any],
                 app_name: str = "heygen", reload_period_s: Optional[float] = None) -> None:
        self.cfg = ServeEndpointSpec.from_dict(endpoint, source=f"serve.{self.endpoint}")
        self.limits = ServeLimitsSpec.from_dict(limits)
        self.tracking_uri, self.app_name, self.reload_period_s = tracking_uri, app_name, reload_period_s
        self.slots: "weakref.WeakValueDictionary[str, Slot]" = weakref.WeakValueDictionary()
        self.batch_sizes: collections.Counter = collections.Counter()
        self.reloads: List[Dict[str, Any]] = []
        self._reload_lock: Optional[asyncio.Lock] = None
        self._watch_task: Optional[asyncio.Task] = None
        batched = getattr(self, "_batch", None)
        if batched is not None:
            batched.set_max_batch_size(self.cfg.batching.max_batch_size)
            batched.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)

        async def load(model_id: str) -> Slot:
            return await self._load_slot(model_id)

        self._get_slot = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
        # the default model loads now: a replica is healthy only once it can answer
        self._default = self._load_sync(DEFAULT_ID)

    # -- loading --------------------------------------------------------------------------------
    def _target(self, model_id: str) -> Tuple[str, Optional[str], str]:
        from heygen_ray.serve.loader import resolve_variant_uri

        if model_id == DEFAULT_ID:
            return self.cfg.model, None, self.cfg.model
        if model_id not in self.cfg.variants:
            raise BadInputError(MULTIPLEX_HEADER, f"unknown variant {model_id!r} for {self.endpoint}; "
                                f"known: {', '.join([DEFAULT_ID, *self.cfg.variants])}", 404)
        value = self.cfg.variants[model_id]
        uri, precision = resolve_variant_uri(self.cfg.model, value, tracking_uri=self.tracking_uri)
        return uri, precision, value

    def _load_runnable(self, model_id: str) -> Tuple[Any, Dict[str, Any], Prep, str]:
        from heygen_ray.serve.loader import load_variant

        uri, precision, value = self._target(model_id)
        runnable, info = load_variant(uri, tracking_uri=self.tracking_uri, precision=precision,
                                      compile_int8=self.cfg.compile_int8)
        info["model_id"] = model_id
        return runnable, info, Prep(info, self.cfg, self.endpoint), value

    def _load_sync(self, model_id: str) -> Slot:
        runnable, info, prep, value = self._load_runnable(model_id)
        slot = Slot(model_id, value, runnable, info, prep)
        self.slots[model_id] = slot
        log.info("%s: loaded %s -> %s", self.endpoint, model_id, public_info(info))
        return slot

    async def _load_slot(self, model_id: str) -> Slot:
        if model_id == DEFAULT_ID and self._default is not None:
            return self._default
        return await asyncio.to_thread(self._load_sync, model_id)

    async def _slot(self) -> Slot:
        self._ensure_watch()
        return await self._get_slot(serve.get_multiplexed_model_id() or DEFAULT_ID)

    # -- reload ---------------------------------------------------------------------------------
    async def reload(self) -> Dict[str, Any]:
        """Re-resolve every loaded variant; load and swap those whose version moved."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            changed = {}
            for model_id, slot in list(self.slots.items()):
                _, info, _ = slot.snapshot()
                try:
                    from heygen_ray.tracking import resolve_model_uri

                    uri, _, _ = await asyncio.to_thread(self._target, model_id)
                    ref = await asyncio.to_thread(resolve_model_uri, uri, tracking_uri=self.tracking_uri)
                    if (ref.name, ref.version) == (info.get("name"), info.get("version")):
                        continue
                    runnable, new_info, prep, _ = await asyncio.to_thread(self._load_runnable, model_id)
                except Exception as err:  # keep serving the old version; report the failure
                    log.error("%s: reload of %s failed: %s", self.endpoint, model_id, err)
                    changed[model_id] = {"error": f"{type(err).__name__}: {err}"}
                    continue
                slot.swap(runnable, new_info, prep)
                changed[model_id] = {"from": info.get("version"), "to": new_info.get("version")}
            if changed:
                self.reloads.append({"time": time.time(), "changed": changed})
            return {"changed": changed, "versions": {k: s.snapshot()[1].get("version") for k, s in self.slots.items()}}

    def _ensure_watch(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        import ray

        seen: Optional[int] = None
        last = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_POLL_S)
            gen = None
            try:
                actor = ray.get_actor(coordinator_name(self.app_name), namespace=COORDINATOR_NAMESPACE)
                gen = await actor.generation.remote()
            except Exception:  # no ingress yet / restarting: try again later
                pass
            due = self.reload_period_s is not None and time.monotonic() - last >= self.reload_period_s
            if (gen is not None and seen is not None and gen != seen) or due:
                last = time.monotonic()
                try:
                    await self.reload()
                except Exception as err:  # pragma: no cover - logged, never fatal
                    log.error("%s: periodic reload failed: %s", self.endpoint, err)
            if gen is not None:
                seen = gen

    # -- introspection --------------------------------------------------------------------------
    async def check_health(self) -> None:
        self._ensure_watch()
        if self._default is None or self._default.snapshot()[0] is None:
            raise RuntimeError(f"{self.endpoint}: default model not loaded")

    def _describe_unloaded(self, model_id: str) -> Dict[str, Any]:
        from heygen_ray.tracking import load_model_config, resolve_model_uri

        try:
            uri, precision, _ = self._target(model_id)
            ref = resolve_model_uri(uri, tracking_uri=self.tracking_uri)
            extra = load_model_config(uri, tracking_uri=self.tracking_uri).get("extra") or {}
            int8 = extra.get("int8_artifact")
            prec = precision or ("int8_static" if str(int8).endswith(".pt2") else "int8_dynamic" if int8 else "fp32")
            alias = uri.split("@", 1)[1] if "@" in uri else None
            variant = str(extra.get("variant") or "fp32")
            if precision == "bf16":  # named as load_variant names a cast
                variant = "bf16" if variant in ("fp32", "bf16") else f"{variant}+bf16"
            return {"name": ref.name, "version": ref.version, "alias": alias, "run_id": ref.run_id, "uri": uri,
                    "variant": variant, "precision": prec, "loaded": False}
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}", "loaded": False}

    async def describe(self) -> Dict[str, Any]:
        out = {}
        for model_id in [DEFAULT_ID, *self.cfg.variants]:
            slot = self.slots.get(model_id)
            if slot is not None:
                out[model_id] = dict(public_info(slot.snapshot()[1]), loaded=True)
            else:
                out[model_id] = await asyncio.to_thread(self._describe_unloaded, model_id)
        return {"variants": out, "batch_sizes": dict(self.batch_sizes), "reloads": self.reloads[-5:],
                "batching": self.cfg.batching.to_dict()}

    def _record(self, n: int) -> None:
        self.batch_sizes[n] += 1

    @staticmethod
    def _meta(info: Dict[str, Any], n: int) -> Dict[str, Any]:
        return {"info": public_info(info), "batch_size": n}


@serve.deployment(name="classify")
class ClassifyModel(TaskModel):
    endpoint = "classify"

    async def classify(self, data: bytes) -> Dict[str, Any]:
        self._ensure_watch()
        return _raise_error(await self._batch(data))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, videos: List[bytes]) -> List[Dict[str, Any]]:
        runnable, info, prep = (await self._slot()).snapshot()
        # one thread hop per batch: decode every clip (the training decoder), then one forward
        probs, errors = await asyncio.to_thread(_decode_then, prep, videos, lambda clips: classify_forward(runnable, clips))
        n = len(videos) - len(errors)
        self._record(n)
        names = prep.label_names or []
        if n and len(names) != probs.shape[1]:
            names = [str(i) for i in range(probs.shape[1])]
        out, k = [], 0
        for i in range(len(videos)):
            if i in errors:
                out.append({"error": errors[i]})
                continue
            p = probs[k]
            k += 1
            j = int(p.argmax())
            out.append({"label": j, "label_name": names[j], "probabilities": {c: float(v) for c, v in zip(names, p)},
                        **self._meta(info, n)})
        return out


@serve.deployment(name="generate")
class GenerateModel(TaskModel):
    endpoint = "generate"

    async def generate(self, prompt: str, fmt: str) -> Dict[str, Any]:
        from heygen_ray.data.media import encode_gif, encode_mp4

        res = await self._batch(prompt)
        frames, fps = res.pop("frames"), res["fps"]
        if fmt == "gif":
            res["gif"] = await asyncio.to_thread(encode_gif, frames, fps)
        else:
            res["mp4"] = await asyncio.to_thread(encode_mp4, frames, fps)
        res["shape"] = list(frames.shape)
        return res

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, prompts: List[str]) -> List[Dict[str, Any]]:
        runnable, info, prep = (await self._slot()).snapshot()
        clips = await asyncio.to_thread(generate_forward, runnable, prep, prompts)
        self._record(len(prompts))
        return [{"frames": c, "fps": prep.fps, **self._meta(info, len(prompts))} for c in clips]


@serve.deployment(name="complete")
class CompleteModel(TaskModel):
    endpoint = "complete"

    async def complete(self, prompt: str, max_tokens: int, temperature: float, seed: Optional[int]) -> Dict[str, Any]:
        return await self._batch((prompt, max_tokens, temperature, seed))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, reqs: List[Tuple[str, int, float, Optional[int]]]) -> List[Dict[str, Any]]:
        runnable, info, prep = (await self._slot()).snapshot()
        ids = [prep.tokenizer.encode(p) for p, *_ in reqs]
        outs = await asyncio.to_thread(complete_forward, runnable, prep, ids, [r[1] for r in reqs],
                                       [r[2] for r in reqs], [r[3] for r in reqs])
        self._record(len(reqs))
        return [{"text": prep.tokenizer.decode(o), "prompt_tokens": len(i), "completion_tokens": len(o),
                 **self._meta(info, len(reqs))} for i, o in zip(ids, outs)]


@serve.deployment(name="match")
class MatchModel(TaskModel):
    endpoint = "match"

    async def match(self, data: bytes, captions: List[str]) -> Dict[str, Any]:
        self._ensure_watch()
        return _raise_error(await self._batch((data, list(captions))))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, reqs: List[Tuple[bytes, List[str]]]) -> List[Dict[str, Any]]:
        runnable, info, prep = (await self._slot()).snapshot()
        caps = [r[1] for r in reqs]

        def forward(clips: List[np.ndarray], keep: List[int]) -> List[List[Dict[str, float]]]:
            return match_forward(runnable, prep, clips, [caps[i] for i in keep])

        scores, errors = await asyncio.to_thread(_decode_then, prep, [r[0] for r in reqs], forward, True)
        n = len(reqs) - len(errors)
        self._record(n)
        it = iter(scores)
        return [{"error": errors[i]} if i in errors else {"scores": next(it), **self._meta(info, n)} for i in range(len(reqs))]


DEPLOYMENTS = {"classify": ClassifyModel, "generate": GenerateModel, "complete": CompleteModel, "match": MatchModel}


# --------------------------------------------------------------------------------------------------
# Ingress
# --------------------------------------------------------------------------------------------------

api = FastAPI(title="heygen_ray serving", description="Models from the MLflow registry on Ray Serve")


@api.exception_handler(BadInputError)
async def _bad_input(request: Request, err: BadInputError) -> JSONResponse:
    return JSONResponse({"detail": err.detail()}, status_code=err.status)


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
        self.coordinator = ray.remote(num_cpus=0)(_ReloadCoordinator).options(
            name=coordinator_name(self.spec.name), namespace=COORDINATOR_NAMESPACE, get_if_exists=True).remote()

    # -- helpers --------------------------------------------------------------------------------
    def _handle(self, endpoint: str, request: Request):
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
    async def models(self) -> Dict[str, Any]:
        out = {}
        for e, h in self.handles.items():
            d = await h.describe.remote()
            cfg = getattr(self.spec, e)
            out[e] = {"path": ROUTES[e], "task": TASKS[e], "model": cfg.model, "default": d["variants"][DEFAULT_ID],
                      "variants": d["variants"], "batching": d["batching"]}
        return {"endpoints": out}

    @api.post("/v1/admin/reload")
    async def reload(self) -> Dict[str, Any]:
        """Move every replica to the versions the aliases point at now (in-flight requests finish
        on the old ones). One replica per endpoint answers here; the others follow within seconds."""
        gen = await self.coordinator.bump.remote()
        results = {}
        for e, h in self.handles.items():
            results[e] = await h.reload.remote()
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
    root = spec.allowed_uri_root
    if root is not None and "://" not in root and not os.path.isabs(root):  # replicas run elsewhere: absolute
        spec = ServeSpec.from_dict(dict(spec.to_dict(), allowed_uri_root=os.path.abspath(root)))
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
