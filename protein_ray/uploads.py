"""HTTP requests to the classifier: reading, validating and decoding uploads.

Pure functions and response models, run on the Serve ingress (``protein_ray.serve``).
Every problem with a request becomes a ``RequestRejected``: a 4xx JSON
``{"error": code, "detail": message}`` (plus ``"file"`` when one upload is at fault).
"""

# No `from __future__ import annotations`: FastAPI resolves the response models'
# annotations on the replicas, where they must be real types, not strings.
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from protein_ray.imaging import TIFF_MAGIC, ImageDecodeError, Preprocessing, decode_image, prepare_batch

logger = logging.getLogger(__name__)

RAW_CONTENT_TYPES = frozenset(
    {"image/png", "image/tiff", "image/tif", "image/jpeg", "image/jpg", "application/octet-stream"}
)


CONTENT_TYPE_BY_SUFFIX = {".png": "image/png", ".tif": "image/tiff", ".tiff": "image/tiff",
                          ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
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


class RequestRejected(Exception):
    """A request we refuse; becomes a 4xx (or a 503 with ``Retry-After``) JSON
    ``{"error", "detail"[, "file"]}``."""

    def __init__(self, status: int, error: str, detail: str, file: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.file = status, error, detail, file
        self.retry_after_s = retry_after_s

    def headers(self) -> dict | None:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None

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
    field: str | None = None  # the multipart field name: a stain name for multi-stain images
    stains: list[bytes] | None = None  # one file per stain, in the model's order (then ``data`` is unused)


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
    return Upload(id=value.filename or index, data=await value.read(), name=value.filename, field=field)


def merge_stain_uploads(uploads: list[Upload], stains: Sequence[str]) -> list[Upload]:
    """Multipart parts named after the model's stains (``-F red=@r.tif -F green=@g.tif
    ...``) are one image, its stains in the model's order; any other parts are one
    image each. A stain part missing, or two parts for one stain, is a 400."""
    named = [upload for upload in uploads if upload.field in stains]
    if not named:
        return uploads
    if len(named) != len(uploads):
        other = next(upload.field for upload in uploads if upload.field not in stains)
        raise RequestRejected(400, "mixed_parts", f"part {other!r} is not a stain of this model ({', '.join(stains)}); "
                              "send one image per request as stain parts, or images as parts named file")
    by_stain = {}
    for upload in named:
        if upload.field in by_stain:
            raise RequestRejected(400, "duplicate_stain", f"two parts for stain {upload.field!r}")
        by_stain[upload.field] = upload
    missing = [stain for stain in stains if stain not in by_stain]
    if missing:
        raise RequestRejected(400, "missing_stain", f"no part for stain(s) {', '.join(missing)}; this model takes "
                              f"{', '.join(stains)} (curl -F {stains[0]}=@{stains[0]}.tif ...)")
    first = by_stain[stains[0]]
    return [Upload(id=first.name or 0, data=b"", name=first.name, stains=[by_stain[s].data for s in stains])]


def decode_upload(upload: Upload, preprocessing: Preprocessing, max_pixels: int) -> np.ndarray:
    """One upload -> float (H, W, C), or RequestRejected naming the upload."""
    where = upload.name if upload.name is not None else str(upload.id)
    files = upload.stains or [upload.data]
    if any(data and not data.startswith(IMAGE_MAGIC) for data in files):
        raise RequestRejected(415, "not_an_image", "the bytes are not a PNG, TIFF or JPEG image", file=where)
    try:
        return decode_image(files, preprocessing.stains, max_pixels)
    except ImageDecodeError as error:
        raise RequestRejected(DECODE_ERROR_STATUS.get(error.reason, 422), error.reason, error.args[0], file=where) from None
    except Exception as error:  # any other failure on untrusted bytes is still the input's fault
        logger.warning("unexpected decode failure for %s: %r", where, error)
        raise RequestRejected(422, "undecodable", f"cannot decode the image ({type(error).__name__})", file=where) from None


def prepare_uploads(uploads: Sequence[Upload], preprocessing: Preprocessing, max_pixels: int) -> np.ndarray:
    """Uploads -> model pixels (N, C, S, S) (``imaging.prepare_batch``). One image at
    a time, so at most one full-size decoded image is held per request, however many
    were sent."""
    return np.concatenate([prepare_batch([decode_upload(u, preprocessing, max_pixels)], preprocessing)
                           for u in uploads])


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
