"""Shared test fixtures: one local Ray instance and one local S3 server per session.

The S3 server (moto's server mode on 127.0.0.1) starts before Ray, so Ray's worker
processes inherit the same ``AWS_*`` environment a user would set.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Tests on a separate `ray start --head` cluster run last, after everything that
    shares the session's in-process Ray instance."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    """An image array as the bytes of a PNG/TIFF/JPEG file, as a user would send it."""
    buffer = io.BytesIO()
    if fmt == "TIFF":
        tifffile.imwrite(buffer, array, **kwargs)
    else:
        Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol endpoint on 127.0.0.1, configured through the standard
    AWS environment variables (as a user would point at MinIO or AWS)."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        wait_for_port(port)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns its ``s3://`` URI."""
    import boto3

    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole session, with logical CPUs set so that
    Train workers and Data tasks cannot starve each other on a 2-core machine."""
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def real_nucleus_tif() -> bytes:
    path = SHARED_DATA / "dsb2018_nuclei_512_uint16.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path.read_bytes()


def smoke_config(tmp_path_factory, name: str, *extra: str):
    """configs/smoke.yaml with data and runs under this session's temp folder."""
    from protein_ray.config import load_config

    base = tmp_path_factory.getbasetemp()
    return load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"data.synthetic_dir={base / 'smoke-data'}", f"run.storage_path={base / 'runs'}", f"run.name={name}", *extra],
    )


def history(config) -> list[dict]:
    path = Path(config.run.storage_path) / config.run.name / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def smoke_run(ray_session, tmp_path_factory):
    """One real smoke training run per session: (config, best checkpoint URI).
    Training, batch scoring and Serve tests share its checkpoint."""
    from protein_ray.train import run_training

    config = smoke_config(tmp_path_factory, "smoke")
    return config, run_training(config)


@pytest.fixture(scope="session")
def smoke_checkpoint(smoke_run) -> str:
    return smoke_run[1]
