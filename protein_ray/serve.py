"""Ray Serve: an autoscaling, dynamically batched HTTP classifier.

``serve run serve_config.yaml`` calls ``build_app`` with the config's ``args`` and
deploys two deployments that scale separately:

- ``ProteinApi`` (HTTP ingress, FastAPI, CPU): reads and validates the request,
  decodes the images and preprocesses them with the checkpoint's settings (the
  one path of ``protein_ray.imaging``), then sends each image's small normalized
  array to the model through a ``DeploymentHandle``.
- ``ProteinClassifier`` (the model, on a GPU when the cluster has one): gathers
  images from many requests into batches with ``@serve.batch`` and runs the
  ``Predictor``.

Hot reload: the classifier's ``user_config`` (checkpoint, thresholds, batching)
is applied by ``reconfigure`` to running replicas. The new model is loaded next to
the old one and swapped in with one assignment, so requests in flight finish on
the model they started with and nothing is dropped.

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
from dataclasses import dataclass

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from protein_ray import __version__, defaults
from protein_ray.checkpoint import checkpoint_name, read_model_card, resolve_checkpoint
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
INGRESS_NAME = "ProteinApi"


# --------------------------------------------------------------------------
# The model deployment


@dataclass(frozen=True)
class PreparedImage:
    """One preprocessed image (C, S, S), tagged with how it was made so a replica
    that has just swapped to a checkpoint with other settings can refuse it."""

    preprocessing: Preprocessing
    pixels: np.ndarray


STALE = {"stale": True}  # a result the ingress must redo with fresh preprocessing


def image_prediction(predictor: Predictor, probs: np.ndarray, label_ids: list[int]) -> dict:
    names = predictor.card.class_names
    return {
        "labels": [names[i] for i in label_ids],
        "label_ids": label_ids,
        "probabilities": {name: float(p) for name, p in zip(names, probs)},
        "thresholds": {name: float(t) for name, t in zip(names, predictor.thresholds)},
    }


@serve.deployment(name=CLASSIFIER_NAME)
class ProteinClassifier:
    def __init__(self, settings: dict, device: str | None = None, tta: bool = False):
        self.defaults = LiveSettings.model_validate(settings)
        self.device, self.tta = device, tta
        self.batch_sizes: Counter[int] = Counter()
        self.reload_error: str | None = None  # why the last user_config was refused
        self.predictor: Predictor | None = None
        self.predictor = self.predictor_for(self.defaults)
        self.apply_batching(self.defaults)

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
        self.classify.set_max_batch_size(settings.max_batch_size)
        self.classify.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def summary(self) -> dict:
        predictor = self.predictor
        return {
            **model_summary(predictor.card, predictor.checkpoint, predictor.thresholds),
            "preprocessing": predictor.preprocessing,
            "device": str(predictor.device),
            "replica": serve.get_replica_context().replica_tag,  # which replica answered
            **self.batching,
            # Batches this replica has run, by size: shows whether dynamic batching fills them.
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
            "reload_error": self.reload_error,
        }

    @serve.batch(max_batch_size=defaults.SERVE_MAX_BATCH_SIZE, batch_wait_timeout_s=defaults.SERVE_BATCH_WAIT_S)
    async def classify(self, images: list[PreparedImage]) -> list[dict]:
        self.batch_sizes[len(images)] += 1
        predictor = self.predictor  # one snapshot for the whole batch
        expected = predictor.preprocessing
        fresh = [i for i, image in enumerate(images) if image.preprocessing == expected]
        results: list[dict] = [STALE] * len(images)
        if fresh:
            batch = np.stack([images[i].pixels for i in fresh])
            # In a thread so the event loop keeps queueing the next batch meanwhile.
            probs = await asyncio.to_thread(predictor.predict_batch, batch)
            for i, row, ids in zip(fresh, probs, predictor.label_ids(probs)):
                results[i] = image_prediction(predictor, row, ids)
        return results


# --------------------------------------------------------------------------
# The HTTP ingress


# FastAPI's app object is what @serve.ingress wraps; Serve copies it when the class
# below is defined, so the exception handlers must be registered before that.
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


@serve.deployment(name=INGRESS_NAME)
@serve.ingress(api)
class ProteinApi:
    def __init__(self, classifier: DeploymentHandle, limits: dict, preprocessing: Preprocessing):
        self.classifier = classifier
        self.limits = Limits.model_validate(limits)
        # Memory: at most max_decodes full-size images are decoded at once; a request
        # beyond max_waiting others is turned away at once instead of queueing without bound.
        self.decode_slots = asyncio.Semaphore(self.limits.max_decodes)
        self.decoding = 0  # requests decoding or waiting for a slot
        # The checkpoint's, given at build time; refreshed only if a hot reload changes it.
        self.preprocessing = preprocessing
        # Exported as ray_protein_ray_rejected_requests_total{error=...} next to Serve's own metrics.
        self.rejections = metrics.Counter(
            "protein_ray_rejected_requests", description="requests refused with a 4xx, by reason",
            tag_keys=("error",),
        )

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/model")
    async def model(self) -> dict:
        summary = await self.classifier.summary.remote()
        summary.pop("preprocessing")  # a Python object; its parts are in the summary already
        if not self.limits.show_checkpoint_uri:  # the run and epoch, not where the weights are stored
            summary["checkpoint"] = checkpoint_name(summary["checkpoint"])
        return {**summary, "server_version": __version__,
                "limits": self.limits.model_dump(exclude={"show_checkpoint_uri"})}

    @api.post("/predict", response_model=PredictResponse, openapi_extra=PREDICT_REQUEST_DOCS, responses=ERROR_DOCS)
    async def predict(self, request: Request) -> dict:
        try:
            uploads = await self.read_uploads(request)
            predictions = await self.classify(uploads)
        except RequestRejected as rejection:
            self.rejections.inc(tags={"error": rejection.error})
            raise
        return {"predictions": [{"id": upload.id, **p} for upload, p in zip(uploads, predictions)]}

    async def read_uploads(self, request: Request) -> list[Upload]:
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
            return merge_stain_uploads(parts, self.preprocessing.stain_names)
        return [Upload(id=0, data=body)]

    async def decode(self, uploads: list[Upload], preprocessing: Preprocessing) -> np.ndarray:
        """Decode in a thread (the event loop keeps reading other requests), at most
        ``max_decodes`` at once; with ``max_waiting`` more already queued, a 503."""
        if self.decoding >= self.limits.max_decodes + self.limits.max_waiting:
            raise RequestRejected(503, "busy", f"{self.decoding} requests are decoding or waiting to; retry shortly",
                                  retry_after_s=1)
        self.decoding += 1
        try:
            async with self.decode_slots:
                return await asyncio.to_thread(prepare_uploads, uploads, preprocessing, self.limits.max_pixels)
        finally:
            self.decoding -= 1

    async def classify(self, uploads: list[Upload]) -> list[dict]:
        """Decode and preprocess here (CPU), score on the classifier; if a replica
        swapped to a checkpoint with other preprocessing meanwhile, redo once with
        its settings."""
        for _ in range(2):
            preprocessing = self.preprocessing
            batch = await self.decode(uploads, preprocessing)
            results = await asyncio.gather(
                *(self.classifier.classify.remote(PreparedImage(preprocessing, pixels)) for pixels in batch)
            )
            if not any(result.get("stale") for result in results):
                return results
            self.preprocessing = (await self.classifier.summary.remote())["preprocessing"]
        raise RequestRejected(503, "model_reloading", "the model is being reloaded; retry the request")


# --------------------------------------------------------------------------
# Building the application


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def classifier_options(args: AppArgs) -> dict:
    """Defaults that serve_config.yaml's ``deployments:`` may override."""
    num_gpus = (1 if cluster_has_gpus() else 0) if args.num_gpus == "auto" else float(args.num_gpus)
    return {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus},
        # Room for a full batch being scored plus the next one filling up.
        "max_ongoing_requests": 4 * args.max_batch_size,
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": defaults.CLASSIFIER_MAX_REPLICAS,
            "target_ongoing_requests": args.max_batch_size,
        },
        # Present (even empty) so that removing a user_config from the YAML
        # reverts the replicas to the args through reconfigure.
        "user_config": {},
    }


def ingress_options(args: AppArgs) -> dict:
    return {
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": defaults.INGRESS_MAX_ONGOING_REQUESTS,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": defaults.INGRESS_MAX_REPLICAS,
                               "target_ongoing_requests": defaults.INGRESS_MAX_ONGOING_REQUESTS // 4},
    }


def compose_app(args: AppArgs, classifier_overrides: dict | None = None, ingress_overrides: dict | None = None):
    """The two deployments bound together; overrides replace whole options
    (tests and the benchmark use them for replica counts and user_config)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    live = LiveSettings(checkpoint=checkpoint, thresholds=args.thresholds,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    classifier = ProteinClassifier.options(**{**classifier_options(args), **(classifier_overrides or {})})
    ingress = ProteinApi.options(**{**ingress_options(args), **(ingress_overrides or {})})
    limits = Limits.model_validate(args.model_dump(include=set(Limits.model_fields)))
    logger.info("serving %s", checkpoint)
    preprocessing = read_model_card(checkpoint).preprocessing
    return ingress.bind(classifier.bind(live.model_dump(), args.device, args.tta), limits.model_dump(), preprocessing)


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
