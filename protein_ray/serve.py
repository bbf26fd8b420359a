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
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from protein_ray import __version__, storage
from protein_ray.imaging import TIFF_MAGIC, ImageDecodeError, decode_image, preprocess_batch
from protein_ray.model import CONFIG_FILE, CheckpointError, ModelCard
from protein_ray.predictor import Predictor, model_summary

logger = logging.getLogger(__name__)

CHECKPOINT_ENV = "PROTEIN_RAY_CHECKPOINT"
# Where `make demo` trains (DESIGN.md, README): the default when nothing else is given.
DEMO_RUN_DIR = "runs/demo/train/cpu-demo"
CLASSIFIER_NAME = "ProteinClassifier"
INGRESS_NAME = "ProteinApi"

RAW_CONTENT_TYPES = frozenset(
    {"image/png", "image/tiff", "image/tif", "image/jpeg", "image/jpg", "application/octet-stream"}
)
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", *TIFF_MAGIC)
# Status for each ImageDecodeError reason: bytes that are no supported image are
# an unsupported media type; a too-large image is 413; a damaged or unusable image
# is well-formed HTTP with unprocessable content (422).
DECODE_ERROR_STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "too_large": 413,
    "truncated": 422,
    "channels": 422,
    "bit_depth": 422,
    "shape_mismatch": 422,
}


# --------------------------------------------------------------------------
# Settings


class AppArgs(BaseModel):
    """The ``args:`` of ``serve_config.yaml`` (and of ``serve run protein_ray.serve:build_app k=v``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="checkpoint dir or run dir (best epoch is used); local or s3://")
    device: str | None = Field(None, description="cpu / cuda; default: cuda when the replica has a GPU")
    tta: bool = False
    num_gpus: float | str = Field("auto", description="GPUs per model replica; auto = 1 when the cluster has GPUs")
    thresholds: list[float] | None = Field(None, description="one per class; default: the checkpoint's tuned ones")
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_images: int = Field(16, ge=1, description="images per request")
    max_pixels: int = Field(4096 * 4096, ge=1, description="pixels per image, checked before decoding")


class LiveSettings(BaseModel):
    """What ``user_config`` may change on running classifier replicas. Keys left
    out of a ``user_config`` keep the values the app was built with."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    thresholds: list[float] | None = None
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    def updated(self, user_config: dict | None) -> "LiveSettings":
        return LiveSettings.model_validate({**self.model_dump(), **(user_config or {})})


class Limits(BaseModel):
    max_body_bytes: int
    max_images: int
    max_pixels: int


# --------------------------------------------------------------------------
# Checkpoint resolution


def best_checkpoint_in(run_dir: str) -> str | None:
    """The ``epoch_*`` checkpoint under ``run_dir`` with the highest macro F1."""
    try:
        configs = [f for f in storage.list_files(run_dir, recursive=True) if f.endswith("/" + CONFIG_FILE)]
    except storage.StorageError:
        return None
    scored = []
    for config in configs:
        checkpoint = config[: -len(CONFIG_FILE) - 1]
        if Path(checkpoint).name.startswith("epoch_"):
            card = ModelCard.from_json(storage.read_text(config))
            scored.append((card.metrics.get("macro_f1", -1.0), checkpoint))
    return max(scored)[1] if scored else None


def resolve_checkpoint(checkpoint: str | None) -> str:
    """A usable checkpoint URI from args, ``$PROTEIN_RAY_CHECKPOINT`` or the demo run.

    A run directory stands for its best epoch. The result is absolute so replicas
    with another working directory find the same files.
    """
    given = checkpoint or os.environ.get(CHECKPOINT_ENV) or DEMO_RUN_DIR
    uri = storage.absolute(given)
    if storage.exists(storage.join(uri, CONFIG_FILE)):
        return uri
    best = best_checkpoint_in(uri)
    if best:
        return best
    source = "args.checkpoint" if checkpoint else (f"${CHECKPOINT_ENV}" if os.environ.get(CHECKPOINT_ENV) else "the default")
    raise CheckpointError(
        f"no protein-ray checkpoint at {uri} (from {source}). Make one with `make demo` "
        f"(trains into {DEMO_RUN_DIR}) or `protein-ray train`, then pass it as "
        f"args.checkpoint in serve_config.yaml or as ${CHECKPOINT_ENV}."
    )


# --------------------------------------------------------------------------
# The model deployment


@dataclass(frozen=True)
class Preprocessing:
    """How the ingress must turn a decoded image into the model's input."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, card: ModelCard) -> "Preprocessing":
        return cls(card.image_size, tuple(card.mean), tuple(card.std))


@dataclass(frozen=True)
class PreparedImage:
    """One preprocessed image (3, S, S), tagged with how it was made so a replica
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
        self.predictor: Predictor | None = None
        self.predictor = self.predictor_for(self.defaults)
        self.apply_batching(self.defaults)

    async def reconfigure(self, user_config: dict | None) -> None:
        """Hot reload: build the new predictor off the event loop, then swap it in."""
        settings = self.defaults.updated(user_config)
        predictor = await asyncio.to_thread(self.predictor_for, settings)
        self.apply_batching(settings)
        self.predictor = predictor
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
            "preprocessing": Preprocessing.of(predictor.card),
            "device": str(predictor.device),
            "replica": serve.get_replica_context().replica_tag,  # which replica answered
            **self.batching,
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, images: list[PreparedImage]) -> list[dict]:
        predictor = self.predictor  # one snapshot for the whole batch
        expected = Preprocessing.of(predictor.card)
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
# Request validation (pure functions, run on the ingress)


class RequestRejected(Exception):
    """A request we refuse; becomes a 4xx ``{"error", "detail"[, "file"]}``."""

    def __init__(self, status: int, error: str, detail: str, file: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.file = status, error, detail, file

    def body(self) -> dict:
        body = {"error": self.error, "detail": self.detail}
        if self.file is not None:
            body["file"] = self.file
        return body


@dataclass
class Upload:
    id: str | int
    data: bytes
    name: str | None = None  # the multipart filename, only for error messages


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_raw_content_type(content_type: str | None) -> None:
    kind = media_type(content_type)
    if kind and kind not in RAW_CONTENT_TYPES:
        raise RequestRejected(
            415, "unsupported_media_type",
            f"Content-Type {kind!r} is not supported. Send one image as the body with Content-Type "
            "image/png, image/tiff, image/jpeg or application/octet-stream "
            "(curl --data-binary @cell.png -H 'Content-Type: image/png'), "
            "or several as multipart/form-data files (curl -F file=@a.png -F file=@b.png).",
        )


def check_declared_length(headers: Headers, limit: int) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(int(declared), limit)


def body_too_large(size: int, limit: int) -> RequestRejected:
    return RequestRejected(413, "body_too_large", f"request body has {size:,}+ bytes; the limit is {limit:,}")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refusing it as soon as it passes ``limit`` (chunked uploads
    carry no Content-Length, so the header alone is not enough)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise body_too_large(size, limit)
        parts.append(chunk)
    return b"".join(parts)


async def replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def parse_multipart(headers: Headers, body: bytes, max_images: int) -> list[Upload]:
    parser = MultiPartParser(headers, replay(body), max_files=max_images, max_fields=max_images)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        if error.message.startswith("Too many files"):
            raise RequestRejected(413, "too_many_images", f"at most {max_images} images per request") from None
        raise RequestRejected(400, "bad_multipart", f"cannot parse the multipart body: {error.message}") from None
    try:
        uploads = [await upload_from_part(index, name, value) for index, (name, value) in enumerate(form.multi_items())]
    finally:
        await form.close()
    if not uploads:
        raise RequestRejected(400, "no_images", "the multipart body holds no files; send images as file parts")
    return uploads


async def upload_from_part(index: int, field: str, value: UploadFile | str) -> Upload:
    if not isinstance(value, UploadFile):
        raise RequestRejected(
            400, "not_a_file", f"form field {field!r} is not a file; send images as files (curl -F {field}=@cell.png)"
        )
    kind = media_type(value.content_type)
    if kind and kind not in RAW_CONTENT_TYPES:
        raise RequestRejected(
            415, "unsupported_media_type", f"file part has Content-Type {kind!r}; expected a PNG, TIFF or JPEG image",
            file=value.filename or str(index),
        )
    return Upload(id=value.filename or index, data=await value.read(), name=value.filename)


def decode_upload(upload: Upload, max_pixels: int) -> np.ndarray:
    """One upload -> float (H, W, 3), or RequestRejected naming the upload."""
    where = upload.name if upload.name is not None else str(upload.id)
    if upload.data and not upload.data.startswith(IMAGE_MAGIC):
        raise RequestRejected(415, "not_an_image", "the bytes are not a PNG, TIFF or JPEG image", file=where)
    try:
        return decode_image(upload.data, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise RequestRejected(DECODE_ERROR_STATUS.get(error.reason, 422), error.reason, error.args[0], file=where) from None
    except Exception as error:  # any other failure on untrusted bytes is still the input's fault
        logger.warning("unexpected decode failure for %s: %r", where, error)
        raise RequestRejected(422, "undecodable", f"cannot decode the image ({type(error).__name__})", file=where) from None


def prepare_uploads(uploads: Sequence[Upload], preprocessing: "Preprocessing", max_pixels: int) -> np.ndarray:
    """Uploads -> the model's input (N, 3, S, S). One image at a time, so at most
    one full-size decoded image is held per request, however many were sent."""
    size, mean, std = preprocessing.image_size, preprocessing.mean, preprocessing.std
    return np.concatenate([preprocess_batch([decode_upload(u, max_pixels)], size, mean, std) for u in uploads])


# --------------------------------------------------------------------------
# The HTTP ingress


class ImagePrediction(BaseModel):
    id: str | int = Field(description="the multipart filename, or the image's index in the request")
    labels: list[str]
    label_ids: list[int]
    probabilities: dict[str, float] = Field(description="per class name")
    thresholds: dict[str, float] = Field(description="the per-class thresholds these labels were chosen with")


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]


class ErrorResponse(BaseModel):
    error: str
    detail: str
    file: str | None = None


PREDICT_REQUEST_DOCS = {
    "requestBody": {
        "description": "One image as the raw body, or several as multipart/form-data file parts.",
        "content": {
            **{kind: {"schema": {"type": "string", "format": "binary"}} for kind in ("image/png", "image/tiff", "image/jpeg")},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
        },
    }
}
ERROR_DOCS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty body, bad multipart, a form field that is not a file",
        413: "body, image count or pixel count over the limit",
        415: "unsupported Content-Type or bytes that are not PNG/TIFF/JPEG",
        422: "truncated or corrupt image, wrong channel count, unsupported bit depth",
    }.items()
}

# FastAPI's app object is what @serve.ingress wraps; Serve copies it when the class
# below is defined, so the exception handlers must be registered before that.
api = FastAPI(
    title="protein-ray",
    version=__version__,
    description="Protein localisation in microscopy images (10 classes, multi-label).",
)


@api.exception_handler(RequestRejected)
async def rejected_request(request: Request, error: RequestRejected) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


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
    def __init__(self, classifier: DeploymentHandle, limits: dict):
        self.classifier = classifier
        self.limits = Limits.model_validate(limits)
        self.preprocessing: Preprocessing | None = None  # learnt from the classifier, refreshed on reload
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
        preprocessing = summary.pop("preprocessing")
        return {**summary, "image_size": preprocessing.image_size, "server_version": __version__,
                "limits": self.limits.model_dump()}

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
        body = await read_limited(request.stream(), limits.max_body_bytes)
        if not body:
            raise RequestRejected(400, "empty", "the request body is empty; send an image")
        if is_multipart:
            return await parse_multipart(request.headers, body, limits.max_images)
        return [Upload(id=0, data=body)]

    async def classify(self, uploads: list[Upload]) -> list[dict]:
        """Decode and preprocess here (CPU), score on the classifier; if a replica
        swapped to a checkpoint with other preprocessing meanwhile, redo once with
        its settings."""
        for _ in range(2):
            preprocessing = self.preprocessing or await self.fetch_preprocessing()
            # In a thread: decoding is the CPU-heavy part and the event loop must
            # keep reading other requests meanwhile.
            batch = await asyncio.to_thread(prepare_uploads, uploads, preprocessing, self.limits.max_pixels)
            results = await asyncio.gather(
                *(self.classifier.classify.remote(PreparedImage(preprocessing, pixels)) for pixels in batch)
            )
            if not any(result.get("stale") for result in results):
                return results
            self.preprocessing = None
        raise RequestRejected(503, "model_reloading", "the model is being reloaded; retry the request")

    async def fetch_preprocessing(self) -> Preprocessing:
        self.preprocessing = (await self.classifier.summary.remote())["preprocessing"]
        return self.preprocessing


# --------------------------------------------------------------------------
# Building the application


def cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def classifier_options(args: AppArgs) -> dict:
    """Defaults that serve_config.yaml's ``deployments:`` may override."""
    num_gpus = (1 if cluster_has_gpus() else 0) if args.num_gpus == "auto" else float(args.num_gpus)
    return {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus},
        # Room for a full batch being scored plus the next one filling up.
        "max_ongoing_requests": 4 * args.max_batch_size,
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": args.max_batch_size,
        },
        # Present (even empty) so that removing a user_config from the YAML
        # reverts the replicas to the args through reconfigure.
        "user_config": {},
    }


def ingress_options(args: AppArgs) -> dict:
    return {
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": 64,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
    }


def compose_app(args: AppArgs, classifier_overrides: dict | None = None, ingress_overrides: dict | None = None):
    """The two deployments bound together; overrides replace whole options
    (tests and the benchmark use them for replica counts and user_config)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    live = LiveSettings(checkpoint=checkpoint, thresholds=args.thresholds,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
    classifier = ProteinClassifier.options(**{**classifier_options(args), **(classifier_overrides or {})})
    ingress = ProteinApi.options(**{**ingress_options(args), **(ingress_overrides or {})})
    limits = Limits(max_body_bytes=args.max_body_bytes, max_images=args.max_images, max_pixels=args.max_pixels)
    logger.info("serving %s", checkpoint)
    return ingress.bind(classifier.bind(live.model_dump(), args.device, args.tta), limits.model_dump())


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


# --------------------------------------------------------------------------
# One prediction over HTTP, for the demo


DEMO_APP_NAME = "protein-ray-demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_serve_port() -> int | None:
    """The HTTP port of a Serve instance already running in this cluster, if any.
    (Serve has no public call for this; its client object holds the config.)"""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return client.http_config.port if client is not None else None


CONTENT_TYPE_BY_SUFFIX = {".png": "image/png", ".tif": "image/tiff", ".tiff": "image/tiff",
                          ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def serve_demo_prediction(checkpoint: str, image_path: str, timeout_s: float = 120.0) -> dict:
    """Deploy the app on 127.0.0.1, POST one image over HTTP, tear down, return the JSON.

    Starts Serve on a free port (and Ray, if needed) and shuts Serve down after;
    if Serve already runs in this cluster, only the demo app is added and removed.
    """
    import httpx

    from protein_ray.runtime import init_ray

    init_ray()
    port = running_serve_port()
    started_here = port is None
    if started_here:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    route = "/" if started_here else f"/{DEMO_APP_NAME}"
    try:
        serve.run(build_app({"checkpoint": checkpoint}), name=DEMO_APP_NAME, route_prefix=route)
        url = f"http://127.0.0.1:{port}{route.rstrip('/')}/predict"
        content_type = CONTENT_TYPE_BY_SUFFIX.get(Path(image_path).suffix.lower(), "application/octet-stream")
        started = time.perf_counter()
        response = httpx.post(url, content=Path(image_path).read_bytes(),
                              headers={"Content-Type": content_type}, timeout=timeout_s)
        logger.info("POST %s -> %d in %.2f s", url, response.status_code, time.perf_counter() - started)
        response.raise_for_status()
        return response.json()
    finally:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(DEMO_APP_NAME)
