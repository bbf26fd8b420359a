"""End to end on a real Ray cluster started the way a user starts one.

``ray start --head`` on 127.0.0.1, then, through the Jobs CLI with
``--working-dir .``: training (smoke preset) and bulk scoring; then
``serve deploy serve_config.yaml`` and a prediction over HTTP. Data, checkpoints
and outputs live on the local S3 server as ``s3://`` URIs, as they would on AWS.
Nothing here shares the test session's in-process Ray instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.cluster]


def cli_env(address: str) -> dict:
    env = dict(os.environ)
    # A local ray.init() earlier in this session created ~/.ray/auth_token, so the
    # cluster runs with token auth: every client must say so explicitly.
    env.update(RAY_AUTH_MODE="token", RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(command: list[str], env: dict, timeout: int, retry_if: str | None = None) -> str:
    """Run a CLI; with ``retry_if``, retry for up to a minute while its output says so."""
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        if result.returncode == 0 or not retry_if or retry_if not in output or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head node on 127.0.0.1 with the dashboard (the Jobs API) on a free port."""
    gcs_port, dashboard_port, serve_port = free_port(), free_port(), free_port()
    # Short on purpose: Ray's dashboard puts AF_UNIX sockets (107-byte path limit) under
    # <temp-dir>/session_<date>_<pid>/sockets/, which pytest's deep tmp paths overflow.
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    env = cli_env(f"http://127.0.0.1:{dashboard_port}")
    env.pop("RAY_ADDRESS")
    run([str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--num-cpus=6",
         # Free ports for the node's agents too: their defaults (52365, ...) are taken by the
         # test session's own Ray instance, and a head whose job agent cannot bind accepts no jobs.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"], env, timeout=180)
    try:
        wait_for_port(dashboard_port, timeout_s=60)
        yield {"jobs": f"http://127.0.0.1:{dashboard_port}", "serve_port": serve_port}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: str) -> None:
    """Kill this cluster's processes only: `ray stop` would also kill the test
    session's own Ray instance. Its daemons name the temp dir on their command
    line; its workers are their descendants."""
    import psutil

    daemons = []
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            daemons.append(process)
    doomed = {p.pid: p for d in daemons for p in [d, *d.children(recursive=True)]}
    for process in doomed.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(doomed.values()), timeout=30)


def submit(cluster: dict, args: list[str], timeout: int) -> str:
    """`ray job submit --working-dir . -- python ...`, waiting for SUCCEEDED."""
    env = cli_env(cluster["jobs"])
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

    config_path = tmp_path / "serve_config.yaml"
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = cluster["serve_port"]
    config["applications"][0]["args"]["checkpoint"] = checkpoint
    config_path.write_text(yaml.safe_dump(config))
    run([str(BIN / "serve"), "deploy", str(config_path), "--address", cluster["jobs"]], cli_env(cluster["jobs"]), 180)

    image = next((tmp_path / "kaggle" / "test").glob("*.png")).read_bytes()
    url = f"http://127.0.0.1:{cluster['serve_port']}"
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
    print(f"cluster end-to-end: {time.perf_counter() - started:.0f} s")
