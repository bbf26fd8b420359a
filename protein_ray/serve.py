"""Ray Serve: an autoscaling, dynamically batched HTTP classifier.

``serve run serve_config.yaml`` calls ``build_app`` with the config's ``args`` and
deploys one deployment, ``ProteinClassifier``: each replica is the HTTP ingress
(FastAPI), decodes and resizes the uploads with its model's settings (the one path
of ``protein_ray.imaging``, in a thread so the event loop keeps reading other
requests), gathers the images of many requests into batches with ``@serve.batch``
and runs the ``Predictor`` on them, on a GPU when its node has one.

Why decoding sits next to the model rather than in a separate deployment: on
2 cores a separate ingress ran at 0.66x the rate of this design (11.3 vs 17.0
requests/s, benchmarks/serve_load.py): every request then paid a second Serve hop
(its decoded pixels through the object store, a second replica's request
handling), and that CPU came out of the model's share. Replicas scale out with the
load instead; on a GPU node give each replica the cores that decode for it
(``ray_actor_options: {num_cpus: 8, num_gpus: 1}``): it decodes ``max_decodes``
images at once (default: its CPUs) and runs torch on as many threads as it reserves
CPUs (Ray's rule).

Hot reload: ``user_config`` (checkpoint, thresholds, batching) is applied by
``reconfigure`` to running replicas. The new model is loaded next to the old one
and swapped in with one assignment; an image is scored by the predictor whose
preprocessing decoded it, so requests in flight finish on the model they started
with and nothing is dropped or mixed.

Errors: every problem with a request is a 4xx JSON ``{"error": code, "detail":
message}`` (plus ``"file"`` when one upload is at fault). A multipart request with
one bad file is rejected whole, naming the file: a client gets either all its
predictions or one clear reason, never a partial answer to reconcile.
"""

# No `from __future__ import annotations` here: Serve ships a pickled copy of the
# FastAPI app to the replicas, where FastAPI must still resolve `Request` and the
# response models from real annotations, not strings.
import asyncio
import copy
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from protein_ray import __version__, defaults
from protein_ray.checkpoint import checkpoint_name, resolve_checkpoint
from protein_ray.imaging import Preprocessing
from protein_ray.predictor import Predictor, model_summary
from protein_ray.serve_settings import AppArgs, Limits, LiveSettings
from protein_ray.uploads import (
    ERROR_DOCS,
    PREDICT_REQUEST_DOCS,
    PredictResponse,
    RequestRejected,
    Upload,
    check_declared_length,
    check_raw_content_type,
    media_type,
    merge_stain_uploads,
    parse_multipart,
    prepare_uploads,
    read_limited,
)

logger = logging.getLogger(__name__)

CLASSIFIER_NAME = "ProteinClassifier"


# --------------------------------------------------------------------------
# The deployment


@dataclass(frozen=True)
class PreparedImage:
    """One image's model pixels (C, S, S) and the predictor whose preprocessing made
    them: a batch scores each image with that predictor, even if a hot reload has
    swapped in another meanwhile."""

    predictor: Predictor
    pixels: np.ndarray


def image_prediction(predictor: Predictor, probs: np.ndarray, label_ids: list[int]) -> dict:
    names = predictor.card.class_names
    return {
        "labels": [names[i] for i in label_ids],
        "label_ids": label_ids,
        "probabilities": {name: float(p) for name, p in zip(names, probs)},
        "thresholds": {name: float(t) for name, t in zip(names, predictor.thresholds)},
    }


def score_batch(images: list[PreparedImage]) -> list[dict]:
    """Each image's prediction, one model call per predictor in the batch (one,
    except across a hot reload)."""
    results: list[dict] = [{}] * len(images)
    for predictor in {id(image.predictor): image.predictor for image in images}.values():
        positions = [i for i, image in enumerate(images) if image.predictor is predictor]
        pixels = np.stack([images[i].pixels for i in positions])
        probs = predictor.predict_batch(predictor.normalize(pixels))
        for i, row, ids in zip(positions, probs, predictor.label_ids(probs)):
            results[i] = image_prediction(predictor, row, ids)
    return results


class ModelBatcher:
    """Dynamic batching for one model: Ray's ``@serve.batch``, fed only while the model
    is free. Ray's batcher closes a batch when its wait ends, even while the model still
    runs the last one, so under load it queued batches of 1-3 behind the model (resnet34
    at 96 px on 2 cores: batched 1.04x unbatched). Held until the model is free, the
    requests that came meanwhile join one batch (1.56x)."""

    def __init__(self, score: Callable[[list], list]):
        self.score = score  # items -> results, in order; run in a thread
        self.batch_sizes: Counter[int] = Counter()  # batches run, by size
        self.model_free = asyncio.Event()
        self.model_free.set()

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def submit(self, item):
        """One item's result, scored in a batch with the items waiting beside it."""
        await self.model_free.wait()
        return await self.run_batch(item)

    @serve.batch(max_batch_size=defaults.SERVE_MAX_BATCH_SIZE, batch_wait_timeout_s=defaults.SERVE_BATCH_WAIT_S)
    async def run_batch(self, items: list) -> list:
        self.batch_sizes[len(items)] += 1
        self.model_free.clear()
        try:  # in a thread, so that the event loop keeps reading requests for the next batch
            return await asyncio.to_thread(self.score, items)
        finally:
            self.model_free.set()


def reserved_cpus() -> int:
    """The CPUs Ray reserved for this replica (at least one): how many images it decodes at once by default."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


# FastAPI's app object is what @serve.ingress wraps; Serve copies it (and what the
# class refers to) when the class below is defined, so the exception handlers and
# helpers must be defined before that.
api = FastAPI(
    title="protein-ray",
    version=__version__,
    description="Protein localisation in microscopy images (10 classes, multi-label).",
)


@api.exception_handler(RequestRejected)
async def rejected_request(request: Request, error: RequestRejected) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """404/405 and friends in the same ``{"error", "detail"}`` shape."""
    code = str(error.detail).lower().replace(" ", "_") if error.status_code < 500 else "server_error"
    return JSONResponse({"error": code, "detail": str(error.detail)}, status_code=error.status_code,
                        headers=getattr(error, "headers", None))


@api.exception_handler(Exception)
async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"error": "internal_error", "detail": f"{type(error).__name__}; see the replica log"},
                        status_code=500)


@serve.deployment(name=CLASSIFIER_NAME)
@serve.ingress(api)
class ProteinClassifier:
    def __init__(self, settings: dict, limits: dict, device: str | None = None, tta: bool = False):
        self.defaults = LiveSettings.model_validate(settings)
        self.limits = Limits.model_validate(limits)
        self.device, self.tta = device, tta
        self.batcher = ModelBatcher(score_batch)
        self.reload_error: str | None = None  # why the last user_config was refused
        self.predictor: Predictor | None = None
        self.predictor = self.predictor_for(self.defaults)
        self.apply_batching(self.defaults)
        # Memory: at most max_decodes full-size images are decoded at once; a request
        # beyond max_waiting others is turned away at once instead of queueing without bound.
        self.max_decodes = self.limits.max_decodes or reserved_cpus()
        self.decode_slots = asyncio.Semaphore(self.max_decodes)
        self.decoding = 0  # requests decoding or waiting for a slot
        # Exported as ray_protein_ray_rejected_requests_total{error=...} next to Serve's own metrics.
        self.rejections = metrics.Counter(
            "protein_ray_rejected_requests", description="requests refused with a 4xx, by reason",
            tag_keys=("error",),
        )

    async def reconfigure(self, user_config: dict | None) -> None:
        """Hot reload: validate and build the new predictor off the event loop, then
        swap it in. A bad user_config (no checkpoint there, wrong threshold count,
        unknown key) keeps the model that is serving and says why in ``GET /model``:
        raising here would make Serve replace the replica, which would fail the same
        way, and the classifier would go down."""
        try:
            settings = self.defaults.updated(user_config)
            predictor = await asyncio.to_thread(self.predictor_for, settings)
        except Exception as error:  # any failure: the running model stays
            self.reload_error = f"{type(error).__name__}: {error}"
            logger.error("user_config %s refused, still serving %s: %s", user_config, self.predictor.checkpoint,
                         self.reload_error)
            return
        self.apply_batching(settings)
        self.predictor, self.reload_error = predictor, None
        logger.info("reconfigured: %s, thresholds %s", predictor.checkpoint, predictor.thresholds.tolist())

    def predictor_for(self, settings: LiveSettings) -> Predictor:
        """A predictor for ``settings``; reuses the loaded model when the checkpoint
        is unchanged. Never mutates the live predictor: batches in flight keep a
        consistent model and thresholds."""
        checkpoint = resolve_checkpoint(settings.checkpoint)
        current = self.predictor
        if current is not None and current.checkpoint == checkpoint:
            predictor = copy.copy(current)
        else:
            predictor = Predictor(checkpoint, device=self.device, tta=self.tta)
        predictor.set_thresholds(settings.thresholds or predictor.card.thresholds)
        return predictor

    def apply_batching(self, settings: LiveSettings) -> None:
        self.batching = {"max_batch_size": settings.max_batch_size,
                         "batch_wait_timeout_s": settings.batch_wait_timeout_s}
        self.batcher.configure(settings.max_batch_size, settings.batch_wait_timeout_s)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/model")
    async def model(self) -> dict:
        predictor = self.predictor
        checkpoint = predictor.checkpoint
        if not self.limits.show_checkpoint_uri:  # the run and epoch, not where the weights are stored
            checkpoint = checkpoint_name(checkpoint)
        return {
            **model_summary(predictor.card, predictor.checkpoint, predictor.thresholds),
            "checkpoint": checkpoint,
            "device": str(predictor.device),
            "replica": serve.get_replica_context().replica_tag,  # which replica answered
            **self.batching,
            # Batches this replica has run, by size: shows whether dynamic batching fills them.
            "batch_sizes": dict(sorted(self.batcher.batch_sizes.items())),
            "reload_error": self.reload_error,
            "server_version": __version__,
            "limits": {**self.limits.model_dump(exclude={"show_checkpoint_uri"}), "max_decodes": self.max_decodes},
        }

    @api.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_REQUEST_DOCS, responses=ERROR_DOCS)
    async def predict(self, request: Request) -> dict:
        try:
            predictor = self.predictor  # decode and score with the same model, across a hot reload
            uploads = await self.read_uploads(request, predictor.preprocessing)
            pixels = await self.decode(uploads, predictor.preprocessing)
        except RequestRejected as rejection:
            self.rejections.inc(tags={"error": rejection.error})
            raise
        predictions = await asyncio.gather(*(self.batcher.submit(PreparedImage(predictor, image)) for image in pixels))
        return {"predictions": [{"id": upload.id, **p} for upload, p in zip(uploads, predictions)]}

    async def read_uploads(self, request: Request, preprocessing: Preprocessing) -> list[Upload]:
        limits = self.limits
        is_multipart = media_type(request.headers.get("content-type")) == "multipart/form-data"
        if not is_multipart:
            check_raw_content_type(request.headers.get("content-type"))
        check_declared_length(request.headers, limits.max_body_bytes)
        try:  # a client that trickles its body must not hold the replica
            body = await asyncio.wait_for(read_limited(request.stream(), limits.max_body_bytes), limits.body_timeout_s)
        except TimeoutError:
            raise RequestRejected(408, "body_timeout", f"the body took over {limits.body_timeout_s:g} s") from None
        if not body:
            raise RequestRejected(400, "empty", "the request body is empty; send an image")
        if is_multipart:
            parts = await parse_multipart(request.headers, body, limits.max_images)
            return merge_stain_uploads(parts, preprocessing.stain_names)
        return [Upload(id=0, data=body)]

    async def decode(self, uploads: list[Upload], preprocessing: Preprocessing) -> np.ndarray:
        """Decode in a thread (the event loop keeps reading other requests), at most
        ``max_decodes`` at once; with ``max_waiting`` more already queued, a 503."""
        if self.decoding >= self.max_decodes + self.limits.max_waiting:
            raise RequestRejected(503, "busy", f"{self.decoding} requests are decoding or waiting to; retry shortly",
                                  retry_after_s=1)
        self.decoding += 1
        try:
            async with self.decode_slots:
                return await asyncio.to_thread(prepare_uploads, uploads, preprocessing, self.limits.max_pixels)
        finally:
            self.decoding -= 1


# --------------------------------------------------------------------------
# Building the application


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def replica_cpus(num_gpus: float) -> int:
    """A classifier replica's CPUs: one on CPU (Ray gives an actor as many torch threads as
    CPUs it reserves); a GPU replica needs cores to decode for it (PNG decode, not the
    model, limits it there)."""
    return defaults.GPU_REPLICA_CPUS if num_gpus else 1


def classifier_options(args: AppArgs) -> dict:
    """Defaults that serve_config.yaml's ``deployments:`` may override."""
    num_gpus = (1 if cluster_has_gpus() else 0) if args.num_gpus == "auto" else float(args.num_gpus)
    return {
        "ray_actor_options": {"num_cpus": replica_cpus(num_gpus), "num_gpus": num_gpus},
        # Room for batches to fill (it must exceed max_batch_size) and for requests
        # past max_decodes + max_waiting to reach the replica and get their 503.
        "max_ongoing_requests": defaults.SERVE_MAX_ONGOING_REQUESTS,
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": defaults.CLASSIFIER_MAX_REPLICAS,
            "target_ongoing_requests": args.max_batch_size,
        },
        # Present (even empty) so that removing a user_config from the YAML
        # reverts the replicas to the args through reconfigure.
        "user_config": {},
    }


def compose_app(args: AppArgs, overrides: dict | None = None):
    """The deployment bound to its arguments; ``overrides`` replace whole options
    (tests and the benchmarks use them for replica counts and user_config)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    live = LiveSettings(checkpoint=checkpoint, thresholds=args.thresholds,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    classifier = ProteinClassifier.options(**{**classifier_options(args), **(overrides or {})})
    limits = Limits.model_validate(args.model_dump(include=set(Limits.model_fields)))
    logger.info("serving %s", checkpoint)
    return classifier.bind(live.model_dump(), limits.model_dump(), args.device, args.tta)


def build_app(args: dict):
    """Serve's application builder (``import_path: protein_ray.serve:build_app``)."""
    return compose_app(AppArgs.model_validate(args or {}))


def __getattr__(name: str):
    """``protein_ray.serve:app``: the app with default args, built when first looked
    up rather than at import. For ``serve build``, which takes an application, not
    a builder with args (the checkpoint then comes from $PROTEIN_RAY_CHECKPOINT or
    the demo run)."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
