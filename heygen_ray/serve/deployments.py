"""The model deployments behind the ingress, one per task (``ClassifyModel``, ``GenerateModel``,
``CompleteModel``, ``MatchModel``), on a shared :class:`TaskModel`: multiplexed variants, batching
(``@serve.batch``), and reloads that swap a :class:`Slot`'s contents after loading the new version
(coordinated across replicas by a small named actor)."""


import asyncio
import collections
import logging
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from ray import serve

from heygen_ray.config import ServeEndpointSpec, ServeLimitsSpec
from heygen_ray.serve.forward import Prep, classify_forward, complete_forward, generate_forward, match_forward
from heygen_ray.serve.loader import public_info
from heygen_ray.serve.schemas import BadInputError

log = logging.getLogger(__name__)

DEFAULT_ID = "default"  # the endpoint's own model among its multiplexed variants
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
COORDINATOR_NAMESPACE = "heygen_serve"
WATCH_POLL_S = 1.0


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
    def _versions(self) -> Dict[str, Any]:
        return {k: s.snapshot()[1].get("version") for k, s in self.slots.items()}

    async def reload(self) -> Dict[str, Any]:
        """Re-resolve every loaded variant; load and swap those whose version moved.

        ``changed`` reports every version that moved between this call's arrival and its answer,
        also when another reload (the generation watch or the periodic one) did the swap while this
        call waited for the lock."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        arrived = self._versions()
        async with self._reload_lock:
            changed: Dict[str, Dict[str, Any]] = {}
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
            now = self._versions()
            for model_id, version in now.items():  # swapped by a reload that ran while this one waited
                if model_id not in changed and model_id in arrived and arrived[model_id] != version:
                    changed[model_id] = {"from": arrived[model_id], "to": version}
            return {"changed": changed, "versions": now}

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


