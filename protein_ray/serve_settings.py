"""The Serve application's settings: ``args`` of serve_config.yaml, the live
``user_config`` of the classifier, and its request limits."""

from pydantic import BaseModel, ConfigDict, Field

from protein_ray import defaults

# Ray Serve's high-throughput mode (Ray's guide "Enable High Throughput on Ray Serve with
# KubeRay"): HAProxy takes HTTP straight to the replicas instead of Ray's Python proxy,
# and the router runs in its own event loop, which keeps handles usable from plain
# synchronous code (drivers, notebooks). Ray reads these where it starts, so the cluster
# paths set them on every node (cluster.yaml's `ray start`, the RayService's pods; tests
# keep both equal to this); a local `serve run` leaves them to the user (README,
# "Serving"). Measured on 2 cores on 2026-12-06: batched Serve at 1.01-1.22x the plain
# loop against 0.75-0.91x through the Python proxy (benchmarks/serve_load.py).
HIGH_THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
}


class AppArgs(BaseModel):
    """The ``args:`` of ``serve_config.yaml`` (and of ``serve run protein_ray.serve:build_app k=v``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="checkpoint dir or run dir (best epoch is used); local or s3://")
    device: str | None = Field(None, description="cpu / cuda; default: cuda when the replica has a GPU")
    tta: bool = False
    num_gpus: float | str = Field("auto", description="GPUs per model replica; auto = 1 when the cluster has GPUs")
    thresholds: list[float] | None = Field(None, description="one per class; default: the checkpoint's tuned ones")
    max_batch_size: int = Field(defaults.SERVE_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(defaults.SERVE_BATCH_WAIT_S, ge=0)
    max_body_bytes: int = Field(defaults.SERVE_MAX_BODY_BYTES, ge=1)
    max_images: int = Field(defaults.SERVE_MAX_IMAGES, ge=1, description="images per request")
    max_pixels: int = Field(defaults.SERVE_MAX_PIXELS, ge=1, description="pixels per image, checked before decoding")
    show_checkpoint_uri: bool = Field(False, description="GET /model shows the checkpoint's full URI, not its name")
    max_decodes: int | None = Field(None, ge=1, description="images decoded at once per replica (bounds its "
                                    "memory); default: the CPUs the replica reserves")
    max_waiting: int = Field(defaults.SERVE_MAX_WAITING, ge=0,
                             description="requests waiting to decode per replica; more get 503 + Retry-After")
    body_timeout_s: float = Field(defaults.SERVE_BODY_TIMEOUT_S, gt=0, description="time to send the body -> 408")


class LiveSettings(BaseModel):
    """What ``user_config`` may change on running classifier replicas. Keys left
    out of a ``user_config`` keep the values the app was built with."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    thresholds: list[float] | None = None
    max_batch_size: int = Field(defaults.SERVE_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(defaults.SERVE_BATCH_WAIT_S, ge=0)

    def updated(self, user_config: dict | None) -> "LiveSettings":
        return LiveSettings.model_validate({**self.model_dump(), **(user_config or {})})


class Limits(BaseModel):
    max_body_bytes: int
    max_images: int
    max_pixels: int
    show_checkpoint_uri: bool
    max_decodes: int | None
    max_waiting: int
    body_timeout_s: float

