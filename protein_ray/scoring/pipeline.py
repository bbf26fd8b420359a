"""The Ray Data pipeline: decode tasks feeding a model actor pool, and its resources."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import torch

from protein_ray.imaging import Preprocessing
from protein_ray.predictor import Predictor
from protein_ray.scoring.decode import decode_chunks
from protein_ray.scoring.options import PredictJobError, PredictOptions


class ModelStage:
    """Ray Data callable class: the model, loaded once per actor, on its GPU if it has one."""

    def __init__(self, checkpoint: str, tta: bool, threads: int | None, actors: int, embeddings: bool):
        self.predictor = Predictor(checkpoint, tta=tta)
        if self.predictor.device.type == "cpu":
            # Ray starts actors with one thread per reserved CPU; the model is the slow
            # stage on CPU, so by default it gets the node's cores (shared by the actors).
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // actors))
        spec = self.predictor.preprocessing
        blank = np.zeros((1, spec.channels, spec.image_size, spec.image_size), np.float32)
        # Known up front so that a batch with no decodable image still has the column's width.
        self.embedding_width = self.predictor.embed_batch(blank).shape[1] if embeddings else 0

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not reason for reason in batch["error"]], dtype=bool)
        probs = np.full((len(ok), self.predictor.num_classes), np.nan, np.float32)
        out = {"row": batch["row"], "error": batch["error"], "detail": batch["detail"], "probs": probs}
        if "qc" in batch:
            out["qc"] = batch["qc"]
        if self.embedding_width:
            out["embedding"] = np.full((len(ok), self.embedding_width), np.nan, np.float32)
        if ok.any():
            inputs = self.predictor.normalize(batch["pixels"][ok])
            probs[ok] = self.predictor.predict_batch(inputs)
            if self.embedding_width:
                out["embedding"][ok] = self.predictor.embed_batch(inputs)
        return out


@dataclass
class Resources:
    actors: int
    num_gpus: float
    cpus_per_actor: float
    actor_memory: int


def plan_resources(options: PredictOptions, cluster: dict, checkpoint_bytes: int, spec: Preprocessing) -> Resources:
    """Defaults from the cluster's resources (``ray.cluster_resources()``): one actor
    per GPU when there are GPUs, else one CPU actor. The decode tasks must keep at
    least one CPU, or nothing feeds the model."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if num_gpus > gpus:
        raise PredictJobError(f"--num-gpus {num_gpus} per actor, but the cluster has {gpus:g} GPU(s)")
    actors = options.actors or (max(1, int(gpus // num_gpus)) if num_gpus > 0 else 1)
    if actors * options.cpus_per_actor > cpus - 1:
        raise PredictJobError(
            f"{actors} actor(s) x {options.cpus_per_actor:g} CPU(s) leave no CPU of {cpus:g} for decoding; "
            "lower --actors or --cpus-per-actor"
        )
    # Room for the weights (and their copy while loading) and a batch with its TTA views.
    batch_bytes = options.batch_size * spec.channels * spec.image_size**2 * 4 * (5 if options.tta else 2)
    memory = 3 * checkpoint_bytes + batch_bytes + 768 * 2**20  # torch and timm alone take ~500 MB
    return Resources(actors, num_gpus, options.cpus_per_actor, int(memory))


def scoring_dataset(work_items: list[dict], options: PredictOptions, preprocessing: Preprocessing,
                    resources: Resources):
    """The lazy Ray Dataset: chunk items -> decoded rows (tasks) -> probabilities (actors)."""
    items = ray.data.from_items(work_items, override_num_blocks=len(work_items))
    decoded = items.map_batches(
        decode_chunks,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"preprocessing": preprocessing, "max_pixels": options.max_pixels,
                   "decode_batch": options.decode_batch, "measure_qc": options.qc},
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=options.decode_tasks) if options.decode_tasks else None,
    )
    # The model stage's memory request also differs from the decode tasks' resources,
    # which keeps Ray Data from fusing decoding into the actors (it fuses adjacent maps
    # with equal resources), where it would run in series with the model.
    return decoded.map_batches(
        ModelStage,
        batch_size=options.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"checkpoint": options.checkpoint, "tta": options.tta,
                               "threads": options.threads_per_actor, "actors": resources.actors,
                               "embeddings": options.embeddings},
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.num_gpus or None,
        memory=resources.actor_memory,
    )
