"""End to end on a real Ray cluster started the way a user starts one.

``ray start --head`` on 127.0.0.1, then, through the Jobs CLI with
``--working-dir .``: training (smoke preset) and bulk scoring; then
``serve deploy serve_config.yaml`` and a prediction over HTTP, through HAProxy as on a
cluster from cluster.yaml (Serve's high-throughput mode). Data, checkpoints
and outputs live on the local S3 server as ``s3://`` URIs, as they would on AWS.
Nothing here shares the test session's in-process Ray instance.
"""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from conftest import free_port
from ray_cluster import BIN, ROOT, LocalCluster, cli_env, haproxy_listens_on, run, serve_high_throughput_env

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head node on 127.0.0.1 with the dashboard (the Jobs API) on a free port,
    started as cluster.yaml starts its nodes."""
    cluster = LocalCluster(head_cpus=6, extra_env=serve_high_throughput_env()).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(cluster: LocalCluster, args: list[str], timeout: int) -> str:
    """`ray job submit --working-dir . -- python ...`, waiting for SUCCEEDED."""
    env = cli_env(cluster.dashboard)
    # The head's job agent registers a few seconds after the dashboard port opens.
    output = run([str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", *args], env, timeout,
                 retry_if="No available agent to submit job")
    assert "succeeded" in output.lower(), output[-3000:]
    return output


def test_train_score_and_serve_on_a_cluster_with_s3(cluster, s3_bucket, tmp_path):
    from protein_ray import storage, synthetic

    # The user's data, on S3: a small synthetic Kaggle root and a plate.
    synthetic.write_kaggle_dataset(tmp_path / "kaggle", n_train=300, n_test=20, size=96, seed=5, progress=False)
    synthetic.write_plate_dataset(tmp_path / "plate", wells=96, fields=1, size=96, seed=5, progress=False)
    for local, remote in ((tmp_path / "kaggle", "kaggle"), (tmp_path / "plate", "plate")):
        for path in local.rglob("*"):
            if path.is_file():
                storage.write_bytes(f"{s3_bucket}/{remote}/{path.relative_to(local)}", path.read_bytes())

    started = time.perf_counter()
    train_output = submit(cluster, [
        "ray_jobs/train.py", "--config", "configs/smoke.yaml",
        "--set", f"data.path={s3_bucket}/kaggle", "--set", f"run.storage_path={s3_bucket}/runs",
        "--set", "optim.epochs=2",
    ], timeout=900)
    checkpoint = [line for line in train_output.splitlines() if line.startswith("s3://")][-1].strip()
    assert checkpoint.startswith(f"{s3_bucket}/runs/smoke/epoch_")
    assert storage.exists(f"{checkpoint}/model.safetensors")

    submit(cluster, [
        "ray_jobs/predict.py", "--checkpoint", checkpoint,
        "--input", f"{s3_bucket}/plate", "--output", f"{s3_bucket}/scores",
    ], timeout=600)
    assert storage.exists(f"{s3_bucket}/scores/predictions.parquet")

    config_path, serve_port = tmp_path / "serve_config.yaml", free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = serve_port
    config["applications"][0]["args"]["checkpoint"] = checkpoint
    config_path.write_text(yaml.safe_dump(config))
    run([str(BIN / "serve"), "deploy", str(config_path), "--address", cluster.dashboard], cli_env(), 180)

    image = next((tmp_path / "kaggle" / "test").glob("*.png")).read_bytes()
    url = f"http://127.0.0.1:{serve_port}"
    deadline = time.monotonic() + 240
    response = None
    while time.monotonic() < deadline:
        try:
            response = httpx.post(f"{url}/predict", content=image, headers={"Content-Type": "image/png"}, timeout=30)
            if response.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    assert response is not None and response.status_code == 200, getattr(response, "text", "no response")
    body = response.json()
    assert len(body["predictions"][0]["probabilities"]) == 10
    assert haproxy_listens_on(serve_port)  # the answer came through HAProxy, not Ray's Python proxy
    print(f"cluster end-to-end: {time.perf_counter() - started:.0f} s")
