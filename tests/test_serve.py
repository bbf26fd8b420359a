"""Ray Serve endpoint: real HTTP to 127.0.0.1, every kind of bad input, hot reload,
the config file against Serve's own schema, and HTTP == Predictor probabilities."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
import yaml
from conftest import ROOT, encode, free_port

from protein_ray.checkpoint import CheckpointError, ModelCard, save_checkpoint
from protein_ray.imaging import Preprocessing
from protein_ray.labels import CLASS_NAMES
from protein_ray.model import create_model
from protein_ray.predictor import Predictor

pytestmark = pytest.mark.ray

MAX_BODY = 2 * 1024 * 1024
MAX_IMAGES = 4
MAX_PIXELS = 1_000_000


def rgb_png(seed: int = 0, size: int = 96) -> bytes:
    return encode(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "PNG")


def tiny_checkpoint(directory: Path, image_size: int = 64, macro_f1: float = 0.1, seed: int = 0) -> str:
    import torch

    torch.manual_seed(seed)
    card = ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=image_size), metrics={"macro_f1": macro_f1})
    return str(save_checkpoint(directory, create_model("test_resnet"), card))


# --------------------------------------------------------------------------
# Fixtures: one Serve instance for the module, one small app on "/"


@pytest.fixture(scope="module")
def serve_port(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()  # other test modules share this Ray instance


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("serve-checkpoints")
    return {
        "main": tiny_checkpoint(base / "run" / "epoch_001", macro_f1=0.3),
        "other_size": tiny_checkpoint(base / "other" / "epoch_001", image_size=48, seed=1),
    }


def deploy(checkpoint: str, name: str, route_prefix: str, **args) -> None:
    """serve.run of the builder's app, as the demo helper and notebooks do."""
    from ray import serve

    from protein_ray.serve import compose_app
    from protein_ray.serve_settings import AppArgs

    one = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.5}}
    serve.run(compose_app(AppArgs(checkpoint=checkpoint, **args), one), name=name, route_prefix=route_prefix)


def deploy_config(args: dict, user_config: dict, timeout_s: float = 300) -> None:
    """Deploy the way `serve deploy` / `serve run serve_config.yaml` do: Serve's
    controller builds the app from a config, and a change to user_config alone is
    applied to the running replicas by reconfigure()."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    one_replica = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.5}}
    config = {"applications": [{
        "name": "default", "route_prefix": "/", "import_path": "protein_ray.serve:build_app", "args": args,
        "deployments": [{"name": "ProteinClassifier", **one_replica, "user_config": user_config}],
    }]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    # Generous: replicas start slowly on a busy 2-core machine.
    wait_until(lambda: serve.status().applications["default"].status == "RUNNING", timeout_s)


def wait_until(condition, timeout_s: float = 120, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout_s} s")
        time.sleep(every_s)


@pytest.fixture(scope="module")
def base_args(checkpoints) -> dict:
    return {"checkpoint": checkpoints["main"], "max_body_bytes": MAX_BODY, "max_images": MAX_IMAGES, "max_pixels": MAX_PIXELS}


# A generous batch wait, so that requests sent together are batched even on a busy machine.
BASE_USER_CONFIG = {"max_batch_size": 8, "batch_wait_timeout_s": 0.1}


@pytest.fixture(scope="module")
def client(serve_port, base_args):
    deploy_config(base_args, BASE_USER_CONFIG)
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=60) as http:
        yield http


def post_image(client: httpx.Client, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return client.post("/predict", content=data, headers={"Content-Type": content_type})


def assert_prediction_shape(prediction: dict) -> None:
    assert set(prediction["probabilities"]) == set(CLASS_NAMES)
    assert set(prediction["thresholds"]) == set(CLASS_NAMES)
    assert prediction["labels"] == [CLASS_NAMES[i] for i in prediction["label_ids"]]
    assert prediction["label_ids"], "the checkpoint says never_empty"
    assert all(0.0 <= p <= 1.0 for p in prediction["probabilities"].values())


# --------------------------------------------------------------------------
# Happy paths


def test_healthz_and_model(client, checkpoints):
    assert client.get("/healthz").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["classes"] == list(CLASS_NAMES)
    assert model["backbone"] == "test_resnet" and model["image_size"] == 64
    assert model["checkpoint"] == "run/epoch_001"  # its name: the storage layout stays private
    assert checkpoints["main"] not in client.get("/model").text
    assert model["thresholds"] == [0.5] * 10 and model["package_version"]
    assert model["max_batch_size"] == 8


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/healthz", "/model"} <= set(paths)
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_raw_png_body(client):
    response = post_image(client, rgb_png())
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert prediction["id"] == 0
    assert_prediction_shape(prediction)


def test_raw_16bit_tiff_body(client, real_nucleus_tif):
    nucleus = tifffile.imread(io.BytesIO(real_nucleus_tif))
    rgb16 = encode(np.stack([nucleus // 2, nucleus // 3, nucleus], axis=-1), "TIFF", photometric="rgb")
    response = post_image(client, rgb16, "image/tiff")
    assert response.status_code == 200, response.text
    assert_prediction_shape(response.json()["predictions"][0])


def test_multipart_keeps_order_and_names(client):
    files = [("file", (f"cell_{i}.png", rgb_png(i), "image/png")) for i in range(3)]
    files.append(("file", ("cell_3.jpg", encode(np.full((64, 64, 3), 90, np.uint8), "JPEG"), "image/jpeg")))
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["id"] for p in predictions] == ["cell_0.png", "cell_1.png", "cell_2.png", "cell_3.jpg"]
    single = post_image(client, rgb_png(1)).json()["predictions"][0]
    np.testing.assert_allclose(list(predictions[1]["probabilities"].values()),
                               list(single["probabilities"].values()), atol=1e-6)


def test_concurrent_requests_are_batched_and_all_answered(client):
    from concurrent.futures import ThreadPoolExecutor

    before = client.get("/model").json()["batch_sizes"]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda seed: post_image(client, rgb_png(seed)).status_code, range(24)))
    assert statuses == [200] * 24
    after = client.get("/model").json()["batch_sizes"]
    ran = {int(size): count - before.get(size, 0) for size, count in after.items()}
    assert sum(size * count for size, count in ran.items()) == 24  # every image scored once
    assert max(size for size, count in ran.items() if count) > 1, ran  # and some together
    assert max(ran) <= 8  # never past max_batch_size


def test_requests_that_arrive_while_the_model_runs_join_the_next_batch(serve_port):
    """In a real replica: one request starts a 2-s model batch; 8 more come 30 ms
    apart while it runs. With a 10-ms batch wait, Ray's batcher alone closes 8 batches
    of one behind the model; held until it is free, they fill batches of 5, then 3."""
    from ray import serve

    from protein_ray.serve import ModelBatcher

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    class SlowModel:
        def __init__(self):
            self.batcher = ModelBatcher(self.score)
            self.batcher.configure(max_batch_size=5, batch_wait_timeout_s=0.01)

        @staticmethod
        def score(items: list[int]) -> list[int]:
            time.sleep(2.0)
            return [item * 10 for item in items]

        async def __call__(self, item: int, delay_s: float) -> int:
            await asyncio.sleep(delay_s)
            return await self.batcher.submit(item)

        def model_busy(self) -> bool:
            return not self.batcher.model_free.is_set()

        def batch_sizes(self) -> dict[int, int]:
            return dict(self.batcher.batch_sizes)

    handle = serve.run(SlowModel.bind(), name="slow-model", route_prefix=None)
    try:
        first = handle.remote(0, 0.0)
        wait_until(lambda: handle.model_busy.remote().result(timeout_s=10), timeout_s=30, every_s=0.05)
        later = [handle.remote(item, 0.03 * item) for item in range(1, 9)]
        assert [first.result(timeout_s=60)] + [r.result(timeout_s=60) for r in later] == [i * 10 for i in range(9)]
        assert handle.batch_sizes.remote().result(timeout_s=10) == {1: 1, 5: 1, 3: 1}
    finally:
        serve.delete("slow-model")


# --------------------------------------------------------------------------
# Bad input: the right 4xx, a JSON reason, and the server keeps serving


def grey_png() -> bytes:
    return encode(np.zeros((32, 32), np.uint8), "PNG")


def multipart(*parts: tuple[str, str, bytes, str]) -> dict:
    return {"files": [(field, (name, data, kind)) for field, name, data, kind in parts]}


def chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"\x89PNG\r\n\x1a\n" + bytes(65528)


BAD_REQUESTS = {
    "empty body": (lambda: dict(content=b"", headers={"Content-Type": "image/png"}), 400, "empty"),
    "text content type": (lambda: dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
    "curl's default form type": (lambda: dict(content=rgb_png(), headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type"),
    "non-image bytes": (lambda: dict(content=b"GIF89a not what we take", headers={"Content-Type": "image/png"}), 415, "not_an_image"),
    "truncated png": (lambda: dict(content=rgb_png()[:600], headers={"Content-Type": "image/png"}), 422, "truncated"),
    "one channel png": (lambda: dict(content=grey_png(), headers={"Content-Type": "image/png"}), 422, "channels"),
    "float tiff": (lambda: dict(content=encode(np.zeros((16, 16, 3), np.float32), "TIFF"), headers={"Content-Type": "image/tiff"}), 422, "bit_depth"),
    "too many pixels (bomb)": (lambda: dict(content=encode(np.zeros((1100, 1000, 3), np.uint8), "PNG"), headers={"Content-Type": "image/png"}), 413, "too_large"),
    "body over the limit": (lambda: dict(content=b"\xff\xd8\xff" + bytes(MAX_BODY), headers={"Content-Type": "image/jpeg"}), 413, "body_too_large"),
    "chunked body over the limit": (lambda: dict(content=chunks(MAX_BODY + 1), headers={"Content-Type": "image/png"}), 413, "body_too_large"),
    "too many images": (lambda: multipart(*[("file", f"{i}.png", rgb_png(i, 16), "image/png") for i in range(MAX_IMAGES + 1)]), 413, "too_many_images"),
    "one bad file among good": (lambda: multipart(("file", "good.png", rgb_png(), "image/png"), ("file", "bad.png", rgb_png()[:300], "image/png")), 422, "truncated"),
    "empty file part": (lambda: multipart(("file", "empty.png", b"", "image/png")), 400, "empty"),
    "text form field": (lambda: dict(data={"image": "not a file"}, files=[("file", ("a.png", rgb_png(), "image/png"))]), 400, "not_a_file"),
    "file part of text type": (lambda: multipart(("file", "notes.txt", b"hello", "text/plain")), 415, "unsupported_media_type"),
    "multipart without boundary": (lambda: dict(content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}), 400, "bad_multipart"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx(client, case):
    make_request, status, error = BAD_REQUESTS[case]
    response = client.post("/predict", **make_request())
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["detail"]
    if case == "one bad file among good":
        assert body["file"] == "bad.png"  # the whole request is refused, naming the culprit
    assert client.get("/healthz").status_code == 200
    assert post_image(client, rgb_png(7)).status_code == 200


def test_wrong_method_and_path_use_the_error_shape(client):
    assert client.get("/predict").json()["error"] == "method_not_allowed"
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


# --------------------------------------------------------------------------
# Hot reload through user_config


class Traffic:
    """Requests sent continuously from a thread while the deployment changes."""

    def __init__(self, client: httpx.Client, path: str):
        self.client, self.path, self.statuses, self.stop = client, path, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                response = self.client.post(self.path, content=rgb_png(3), headers={"Content-Type": "image/png"})
                self.statuses.append(response.status_code)
            except httpx.HTTPError as error:  # a dropped connection counts as a failure too
                self.statuses.append(type(error).__name__)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)


def test_hot_reload_through_user_config_keeps_replicas_and_requests(client, checkpoints, base_args):
    def model():
        return client.get("/model").json()

    def predict():
        return post_image(client, rgb_png()).json()["predictions"][0]

    before, low = model(), [0.01] * 10
    try:
        with Traffic(client, "/predict") as traffic:
            deploy_config(base_args, {**BASE_USER_CONFIG, "thresholds": low})
            wait_until(lambda: model()["thresholds"] == pytest.approx(low))
            after_thresholds, prediction = model(), predict()
            deploy_config(base_args, {"checkpoint": checkpoints["other_size"]})
            wait_until(lambda: model()["checkpoint"] == "other/epoch_001")
            after_checkpoint, swapped = model(), predict()
    finally:
        deploy_config(base_args, BASE_USER_CONFIG)
    restored = model()

    assert len(traffic.statuses) > 5 and set(traffic.statuses) == {200}, traffic.statuses
    assert list(prediction["thresholds"].values()) == pytest.approx(low)
    assert prediction["label_ids"] == list(range(10))  # every probability clears 0.01
    # Keys left out of user_config fall back to the args and the checkpoint.
    assert after_checkpoint["image_size"] == 48 and after_checkpoint["max_batch_size"] == 16
    assert after_checkpoint["thresholds"] == [0.5] * 10 and swapped["label_ids"]
    assert restored["checkpoint"] == "run/epoch_001" and restored["max_batch_size"] == 8
    # Reconfigured in place: the same replica answered throughout.
    replicas = {m["replica"] for m in (before, after_thresholds, after_checkpoint, restored)}
    assert replicas == {before["replica"]}


def test_a_bad_reload_keeps_the_serving_model_and_says_why(client, checkpoints, base_args, tmp_path):
    def model():
        return client.get("/model").json()

    before = model()
    bad_configs = [({**BASE_USER_CONFIG, "checkpoint": str(tmp_path / "nothing")}, "no protein-ray checkpoint"),
                   ({**BASE_USER_CONFIG, "thresholds": [0.5] * 3}, "thresholds must be 10 numbers")]
    try:
        for user_config, reason in bad_configs:
            deploy_config(base_args, user_config)
            wait_until(lambda: reason in (model()["reload_error"] or ""))
            assert post_image(client, rgb_png()).status_code == 200  # still answering, with the old model
            now = model()
            assert (now["checkpoint"], now["replica"]) == (before["checkpoint"], before["replica"])
    finally:
        deploy_config(base_args, BASE_USER_CONFIG)
    wait_until(lambda: model()["reload_error"] is None)  # a good config clears it


# --------------------------------------------------------------------------
# Config file, builder and checkpoint resolution


def test_serve_config_validates_with_serves_schema_and_builds(checkpoints):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from protein_ray.serve import CLASSIFIER_NAME

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    [application] = config.applications
    args = {**application.args, "checkpoint": checkpoints["main"]}
    app = call_user_app_builder_with_args_if_necessary(import_attr(application.import_path), args)
    assert isinstance(app, Application)
    [classifier] = application.deployments
    assert classifier.name == CLASSIFIER_NAME
    assert classifier.max_ongoing_requests >= classifier.user_config["max_batch_size"]
    assert classifier.autoscaling_config["max_replicas"] >= classifier.autoscaling_config["min_replicas"]


def test_serve_build_target_is_built_on_lookup_not_import(checkpoints, monkeypatch):
    """`serve build protein_ray.serve:app` needs an Application object, not a builder."""
    from ray.serve import Application
    from ray.serve._private.utils import import_attr

    monkeypatch.setenv("PROTEIN_RAY_CHECKPOINT", checkpoints["main"])
    assert isinstance(import_attr("protein_ray.serve:app"), Application)


def test_missing_checkpoint_says_how_to_make_one(tmp_path, monkeypatch):
    from protein_ray.serve import build_app

    monkeypatch.delenv("PROTEIN_RAY_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    with pytest.raises(CheckpointError, match="make demo.*protein-ray train"):
        build_app({})
    with pytest.raises(CheckpointError, match="args.checkpoint"):
        build_app({"checkpoint": str(tmp_path / "nothing")})


def test_checkpoint_from_env_and_best_epoch_of_a_run(tmp_path, monkeypatch):
    from protein_ray.checkpoint import resolve_checkpoint

    run = tmp_path / "runs" / "demo" / "train" / "cpu-demo"
    for epoch, f1 in [(1, 0.2), (2, 0.6), (3, 0.4)]:
        tiny_checkpoint(run / f"epoch_{epoch:03d}", macro_f1=f1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROTEIN_RAY_CHECKPOINT", raising=False)
    assert resolve_checkpoint(None) == str(run / "epoch_002")  # the demo default
    monkeypatch.setenv("PROTEIN_RAY_CHECKPOINT", str(run / "epoch_003"))
    assert resolve_checkpoint(None) == str(run / "epoch_003")
    assert resolve_checkpoint(str(run)) == str(run / "epoch_002")


def test_unknown_args_are_refused():
    from pydantic import ValidationError

    from protein_ray.serve import build_app

    with pytest.raises(ValidationError, match="max_batch"):
        build_app({"max_batch": 4})


# --------------------------------------------------------------------------
# The same bytes give the same probabilities over HTTP and through the Predictor


@pytest.mark.slow
def test_http_matches_predictor_on_trained_checkpoint(client, serve_port, smoke_checkpoint, real_nucleus_tif):
    deploy(smoke_checkpoint, name="smoke", route_prefix="/smoke")
    nucleus = tifffile.imread(io.BytesIO(real_nucleus_tif))
    images = [rgb_png(11, 128), encode(np.stack([nucleus // 4, nucleus // 2, nucleus], axis=-1), "TIFF", photometric="rgb")]
    files = [("file", (f"img{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = client.post("/smoke/predict", files=files)
    assert response.status_code == 200, response.text
    served = [list(p["probabilities"].values()) for p in response.json()["predictions"]]
    direct = Predictor(smoke_checkpoint, device="cpu").predict_bytes(images)
    np.testing.assert_allclose(served, [r.probabilities for r in direct], atol=1e-5)
    predictor_labels = [r.label_ids for r in direct]
    assert [p["label_ids"] for p in response.json()["predictions"]] == predictor_labels


def test_serve_demo_prediction_returns_the_json(client, checkpoints, tmp_path):
    from protein_ray.demo import serve_demo_prediction

    image = tmp_path / "cell.png"
    image.write_bytes(rgb_png(5))
    result = serve_demo_prediction(checkpoints["main"], str(image))
    assert_prediction_shape(result["predictions"][0])
    assert client.get("/healthz").status_code == 200  # the running app was left alone


def test_serve_config_yaml_states_the_code_defaults():
    """serve_config.yaml spells the defaults out for users; they must be the code's."""
    import yaml

    from protein_ray import defaults
    from protein_ray.serve_settings import AppArgs

    [app] = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    args = AppArgs.model_validate(app["args"])
    assert args == AppArgs(checkpoint=args.checkpoint)  # every arg in the file is the default
    deployments = {d["name"]: d for d in app["deployments"]}
    classifier = deployments["ProteinClassifier"]
    assert classifier["max_ongoing_requests"] == defaults.SERVE_MAX_ONGOING_REQUESTS
    assert classifier["autoscaling_config"]["max_replicas"] == defaults.CLASSIFIER_MAX_REPLICAS
    assert classifier["user_config"]["max_batch_size"] == defaults.SERVE_MAX_BATCH_SIZE
    assert classifier["user_config"]["batch_wait_timeout_s"] == defaults.SERVE_BATCH_WAIT_S


def test_four_stain_model_takes_one_part_per_stain(client, serve_port, tmp_path):
    """A multi-stain model gets one file per stain as multipart parts named after
    the stains; GET /model says which stains (and classes) it expects."""
    import torch

    torch.manual_seed(4)
    spec = Preprocessing(48, mean=(0.1,) * 4, std=(0.2,) * 4, stains=("red", "green", "blue", "yellow"))
    checkpoint = str(save_checkpoint(tmp_path / "rgby", create_model("test_resnet", in_chans=4),
                                     ModelCard(backbone="test_resnet", preprocessing=spec)))
    deploy(checkpoint, name="rgby", route_prefix="/rgby")
    model = client.get("/rgby/model").json()
    assert [stain["name"] for stain in model["stains"]] == ["red", "green", "blue", "yellow"]
    assert model["classes"] == list(CLASS_NAMES)

    rng = np.random.default_rng(5)
    stains = {name: encode(rng.integers(0, 4096, (40, 40), dtype=np.uint16), "TIFF")
              for name in ("yellow", "red", "blue", "green")}  # any order: the names decide
    response = client.post("/rgby/predict", files=[(name, (f"{name}.tif", data, "image/tiff"))
                                                   for name, data in stains.items()])
    assert response.status_code == 200, response.text
    [served] = response.json()["predictions"]
    direct = Predictor(checkpoint, device="cpu").predict_bytes([[stains[s] for s in spec.stain_names]])[0]
    np.testing.assert_allclose(list(served["probabilities"].values()), direct.probabilities, atol=1e-5)

    missing = client.post("/rgby/predict", files=[(name, (name, stains[name], "image/tiff"))
                                                  for name in ("red", "green", "blue")])
    assert missing.status_code == 400 and missing.json()["error"] == "missing_stain"
    assert "yellow" in missing.json()["detail"]
    merged_rgb = client.post("/rgby/predict", content=rgb_png(), headers={"Content-Type": "image/png"})
    assert merged_rgb.status_code == 422 and merged_rgb.json()["error"] == "channels"


def test_a_full_ingress_answers_503_with_retry_after_and_a_slow_body_408(client, serve_port, checkpoints):
    """Decoding is bounded per replica (max_decodes at once, max_waiting queued):
    a burst past that is turned away at once, not queued in memory without bound."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    deploy(checkpoints["main"], name="tight", route_prefix="/tight", max_decodes=1, max_waiting=0,
           body_timeout_s=2.0, max_pixels=4096 * 4096)
    # A small body (~100 KB) that is slow to decode: 3000 x 3000 16-bit pixels to inflate, convert, resize.
    big = encode(np.zeros((3000, 3000, 3), np.uint16), "TIFF", photometric="rgb", compression="zlib")

    def send(_):
        response = client.post("/tight/predict", content=big, headers={"Content-Type": "image/tiff"})
        return response.status_code, response.headers.get("retry-after"), response.json().get("error")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert {status for status, _, _ in answers} <= {200, 503}, answers
    busy = [answer for answer in answers if answer[0] == 503]
    assert busy and all(answer[1:] == ("1", "busy") for answer in busy), answers
    assert any(status == 200 for status, _, _ in answers)

    with socket.create_connection(("127.0.0.1", serve_port), timeout=30) as sock:
        sock.sendall(b"POST /tight/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + rgb_png()[:1000])  # then nothing more
        reply = b""
        while b"}" not in reply and (chunk := sock.recv(4096)):  # the status line, then the JSON body
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in reply, reply[:300]
