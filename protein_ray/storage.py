"""One filesystem layer for local paths and ``s3://`` URIs.

Every stage (shards, checkpoints, predictions) goes through these helpers so that
S3 and local disk share one code path. S3 is configured the standard way: the AWS
credential chain (environment, shared config, instance profile) and
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for non-AWS endpoints such as MinIO
or a local test server. Credentials never pass through this module's arguments.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs

S3_PREFIX = "s3://"
# Present in a folder while it is being written; removed last, so a crash never looks finished.
INCOMPLETE_MARKER = "_INCOMPLETE"
TEMPORARY_INFIX = ".tmp-"  # <file>.tmp-<hex>: a local write in progress (left behind only by a crash)


class StorageError(OSError):
    """A path or URI that cannot be read or written; the message names it."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_PREFIX)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem() -> pafs.S3FileSystem:
    # Short timeouts and few retries: an unreachable endpoint should fail in
    # seconds with a clear message, not hang a job for minutes.
    return pafs.S3FileSystem(
        endpoint_override=s3_endpoint(),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=5,
        request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` where ``path`` is what that filesystem expects."""
    text = str(uri)
    if is_s3(text):
        return _s3_filesystem(), text[len(S3_PREFIX):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())


def absolute(uri: str | os.PathLike) -> str:
    """A URI that means the same file from any process: relative local paths are
    resolved against this process's working directory (Ray workers have another)."""
    text = str(uri)
    return text if is_s3(text) else str(Path(text).expanduser().absolute())


def join(uri: str | os.PathLike, *parts: str) -> str:
    text = str(uri)
    if is_s3(text):
        return posixpath.join(text, *parts)
    return str(Path(text, *parts))


def display(fs: pafs.FileSystem, path: str) -> str:
    """The URI a user would type for ``path`` on ``fs``."""
    return S3_PREFIX + path if isinstance(fs, pafs.S3FileSystem) else path


def _storage_error(uri: str, error: Exception) -> StorageError:
    message = f"{uri}: {error}"
    if is_s3(uri) and ("connect" in str(error).lower() or "curl" in str(error).lower()):
        message = (
            f"cannot reach the S3 endpoint {s3_endpoint() or 'of AWS'} for {uri}: {error}. "
            "Check AWS_ENDPOINT_URL and your network."
        )
    return StorageError(message)


def file_info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as error:
        raise _storage_error(uri, error) from error


def exists(uri: str) -> bool:
    return file_info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return file_info(uri).type == pafs.FileType.Directory


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """URIs of all files under ``uri``, sorted (directories are not listed)."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such directory") from None
    except OSError as error:
        raise _storage_error(uri, error) from error
    return sorted(display(fs, i.path) for i in infos if i.type == pafs.FileType.File)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: file not found") from None
    except OSError as error:
        raise _storage_error(uri, error) from error


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: a reader (or a rerun after a crash) sees the old
    file or the new one, never half of it. An S3 object appears only once complete;
    a local file is written under a temporary name and renamed over the target."""
    fs, path = resolve(uri)
    target = path if is_s3(uri) else f"{path}{TEMPORARY_INFIX}{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(posixpath.dirname(path) if is_s3(uri) else str(Path(path).parent), recursive=True)
        with fs.open_output_stream(target) as stream:
            stream.write(data)
        if target != path:
            fs.move(target, path)
    except OSError as error:
        raise _storage_error(uri, error) from error
    finally:
        if target != path and Path(target).exists():
            Path(target).unlink()  # the write failed: drop the partial copy, keep the old file


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def make_dirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as error:
        raise _storage_error(uri, error) from error
