"""A node killed mid-job on a real two-node Ray cluster.

A head (``ray start --head``, 3 CPUs) and a worker node (``ray start --address``, 4
CPUs) on this machine. Each test adds a fresh worker node, waits until the job has
put work on it, then SIGKILLs every process of that node (raylet, agents, workers),
as when a machine dies, and checks what the user gets:

1. bulk scoring finishes with every input exactly once in its outputs, none failed;
2. training (``max_failures`` 2) continues from its latest checkpoint, on a
   replacement node (as the autoscaler or KubeRay would bring one);
3. Serve replaces the classifier replica that was on the node, and every request
   sent once the replacement is up succeeds.

Drivers run as separate processes on the head, as `ray job submit` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from ray_cluster import (
    BIN,
    FAST_FAILURE_DETECTION,
    ROOT,
    LocalCluster,
    cli_env,
    haproxy_listens_on,
    read_json_lines,
    run,
    serve_high_throughput_env,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster(head_cpus=3, extra_env=FAST_FAILURE_DETECTION | serve_high_throughput_env()).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def start_driver(args: list[str], cluster: LocalCluster, log: Path) -> subprocess.Popen:
    """A protein-ray command as a driver process joined to the cluster."""
    command = [sys.executable, "-m", "protein_ray.cli", *args, "--address", cluster.address]
    return subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_while_running(driver: subprocess.Popen, log: Path, ready, what: str, timeout_s: float = 300) -> None:
    """Wait for ``ready()`` while the driver runs; a driver that ends first fails the test."""
    def check() -> bool:
        assert driver.poll() is None, f"the driver ended before {what}:\n{log.read_text()[-4000:]}"
        return ready()

    wait_until(check, timeout_s, what, every_s=0.2)


def finish(driver: subprocess.Popen, log: Path, timeout_s: int) -> str:
    try:
        driver.wait(timeout=timeout_s)
    finally:
        driver.kill()
    output = log.read_text()
    assert driver.returncode == 0, output[-5000:]
    return output


def ran_work(killed: list[str], marker: str) -> bool:
    """Whether a killed worker process was running a task or actor named like ``marker``
    (Ray names worker processes after what they run: ``ray::MapBatches(...)``)."""
    return any(name.startswith("ray::") and marker in name for name in killed)


# Decode tasks feeding model actors (the GPU layout), and CPU actors that decode their
# own images (4 of them: the head's 3 CPUs cannot hold them all, so one is on the node).
LAYOUTS = {
    "decode-tasks": (["--decode-tasks", "3"], "MapBatches", "decoding on the worker node"),
    "actors-decode": (["--actors", "4"], "DecodeAndModelStage", "a decoding model actor on the worker node"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scoring_completes_with_every_image_once_when_a_node_dies(cluster, smoke_checkpoint, tmp_path, layout):
    from protein_ray import synthetic

    options, marker, what = LAYOUTS[layout]
    plate = tmp_path / "plate"
    synthetic.write_plate_dataset(plate, wells=96, fields=8, size=96, seed=3, progress=False)
    inputs = {p.relative_to(plate).with_suffix("").as_posix() for p in plate.rglob("*.png")}
    node = cluster.add_node(num_cpus=4)
    out, log = tmp_path / "scores", tmp_path / "predict.log"
    driver = start_driver(["predict", "--checkpoint", smoke_checkpoint, "--input", str(plate),
                           "--output", str(out), "--chunk-size", "32", "--decode-batch", "8", *options],
                          cluster, log)
    # Killed while the node decodes, some seconds in: work it finished is then lost
    # from its object store, and work it is doing is lost mid-task.
    wait_while_running(driver, log, lambda: ran_work(node.running(), marker), what)
    time.sleep(3)
    killed_at = time.monotonic()
    killed = node.kill()
    output = finish(driver, log, timeout_s=600)

    assert ran_work(killed, marker), killed
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == len(inputs) == 768
    assert set(predictions["image_id"]) == inputs and predictions["image_id"].is_unique
    assert predictions["error"].isna().all(), predictions["error"].value_counts()
    print(f"scoring: node killed with {len(killed)} processes; finished {time.monotonic() - killed_at:.0f} s later, "
          f"0 rows lost\n{output.splitlines()[-3]}")


def test_training_continues_from_its_latest_checkpoint_when_a_node_dies(cluster, tmp_path):
    node = cluster.add_node(num_cpus=4)
    runs, log = tmp_path / "runs", tmp_path / "train.log"
    # 2 workers x 2 CPUs do not fit the head's 3: Train's PACK placement puts both on the node.
    driver = start_driver(["train", "--config", "configs/smoke.yaml", "--set", f"data.synthetic_dir={tmp_path}/data",
                           "--set", f"run.storage_path={runs}", "--set", "optim.epochs=4",
                           "--set", "run.max_failures=2"], cluster, log)
    history = runs / "smoke" / "history.jsonl"
    # Train has committed a checkpoint once its manager's snapshot lists it.
    snapshot = runs / "smoke" / "checkpoint_manager_snapshot.json"
    wait_while_running(driver, log, lambda: "epoch_000" in snapshot.read_text(), "the first epoch's checkpoint",
                       timeout_s=600)
    killed = node.kill()
    killed_at = time.monotonic()
    replacement = cluster.add_node(num_cpus=4)
    output = finish(driver, log, timeout_s=600)
    replacement.kill()  # the next test's node must be the only one beside the head

    assert ran_work(killed, "RayTrainWorker"), killed
    epochs = [entry["epoch"] for entry in read_json_lines(history)]
    assert epochs[0] == 0 and epochs.count(0) == 1 and epochs[-1] == 3, epochs  # never started over
    assert set(epochs) == {0, 1, 2, 3}
    assert "resuming from the checkpoint of epoch" in output, output[-3000:]
    assert (runs / "smoke" / "epoch_003").is_dir()
    print(f"training: node killed with {len(killed)} processes; finished {time.monotonic() - killed_at:.0f} s "
          f"later, epochs logged {epochs}")


def serve_config(tmp_path: Path, checkpoint: str, port: int) -> Path:
    """serve_config.yaml with two classifier replicas (Serve spreads them over the nodes)
    and the proxy on the head only (both nodes share this machine's ports)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    app = config["applications"][0]
    app["args"]["checkpoint"] = checkpoint
    for deployment in app["deployments"]:
        # Fixed counts through the autoscaling bounds: the builder's autoscaling_config
        # would outrank a num_replicas given here.
        replicas = 2 if deployment["name"] == "ProteinClassifier" else 1
        deployment["autoscaling_config"].update(min_replicas=replicas, max_replicas=replicas)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CLASSIFIER = "ServeReplica:protein-ray:ProteinClassifier"


def classifier_actors(cluster: LocalCluster, state: str) -> int:
    output = run([str(BIN / "ray"), "list", "actors", "--address", cluster.dashboard, "--format", "json",
                  "--filter", f"class_name={CLASSIFIER}", "--filter", f"state={state}"], cli_env(), timeout=60)
    return len(json.loads(output[output.index("["):]))


def running_classifiers(cluster: LocalCluster) -> int:
    """Classifier replicas Serve reports running (and the deployment healthy)."""
    output = run([str(BIN / "serve"), "status", "--address", cluster.dashboard], cli_env(), timeout=60)
    app = yaml.safe_load(output)["applications"]["protein-ray"]
    assert app["status"] != "DEPLOY_FAILED", app["message"]
    deployment = app["deployments"]["ProteinClassifier"]
    return deployment["replica_states"].get("RUNNING", 0) if deployment["status"] == "HEALTHY" else 0


def test_serve_replaces_a_replica_lost_with_its_node(cluster, smoke_checkpoint, tmp_path):
    from conftest import free_port

    from protein_ray import synthetic

    synthetic.write_kaggle_dataset(tmp_path / "kaggle", n_train=0, n_test=4, size=96, seed=1, progress=False)
    image = next((tmp_path / "kaggle" / "test").glob("*.png")).read_bytes()
    node = cluster.add_node(num_cpus=4)
    port = free_port()
    run([str(BIN / "serve"), "deploy", str(serve_config(tmp_path, smoke_checkpoint, port)),
         "--address", cluster.dashboard], cli_env(), timeout=180)
    wait_until(lambda: running_classifiers(cluster) == 2, 300, "two classifier replicas running", every_s=2)

    def predict() -> int:
        return httpx.post(f"http://127.0.0.1:{port}/predict", content=image,
                          headers={"Content-Type": "image/png"}, timeout=30).status_code

    assert predict() == 200 and haproxy_listens_on(port)  # served as cluster.yaml's nodes serve
    # Serve spreads replicas over nodes; this node must hold one before it dies.
    wait_until(lambda: ran_work(node.running(), CLASSIFIER), 60, "a classifier replica on the worker node")
    killed = node.kill()
    killed_at = time.monotonic()
    assert ran_work(killed, CLASSIFIER), killed
    # Serve has started a replacement once a third classifier actor exists (the lost one is
    # DEAD); then it is up when Serve reports two running again.
    wait_until(lambda: classifier_actors(cluster, "DEAD") == 1 and classifier_actors(cluster, "ALIVE") == 2, 120,
               "a replacement replica started", every_s=1)
    wait_until(lambda: running_classifiers(cluster) == 2, 300, "the replacement replica running", every_s=1)
    recovered_s = time.monotonic() - killed_at
    codes = [predict() for _ in range(20)]
    assert codes == [200] * 20, codes
    print(f"serve: classifier replica replaced {recovered_s:.0f} s after its node was killed; 20/20 requests OK")
