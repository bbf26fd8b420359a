"""The model stages of the scoring pipeline: the classes Ray Data runs in its actors.

An actor imports this module to unpickle its class, before the class's ``__init__``
runs; so the module itself imports nothing heavy, and torch, timm and the decoder
are imported in ``__init__`` as long-lived set-up, with the cyclic garbage collector
paused (``runtime.long_lived_setup``). Measured on 2 cores on 2026-12-06, in a
process with ray.data imported (as an actor is): importing the decode module (torch)
and then the predictor (timm) took 3.9-4.1 s of CPU with the collector running,
3.1-3.2 s with it paused; every actor of a job pays this before its first batch.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from protein_ray.runtime import keep_freed_memory_for_reuse, long_lived_setup


class ModelStage:
    """Ray Data callable class: the model, loaded once per actor, on its GPU if it has one."""

    def __init__(self, checkpoint: str, tta: bool, threads: int | None, actors: int, embeddings: bool):
        with long_lived_setup():
            import torch

            from protein_ray.predictor import Predictor

            self.predictor = Predictor(checkpoint, tta=tta)
        if self.predictor.device.type == "cpu":
            keep_freed_memory_for_reuse()
            # Ray starts actors with one thread per reserved CPU; the model is the slow
            # stage on CPU, so by default it gets the node's cores (shared by the actors).
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // actors))
        self.threads = torch.get_num_threads()
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


class DecodeAndModelStage(ModelStage):
    """A CPU actor that decodes its own images (``decode`` holds ``decode_chunks``'
    arguments), taking turns with the model on its threads: each item is one model
    batch. A decode task beside the model contends for the same cores: measured on 2
    cores on 2026-12-04, the model's two threads then ran at half speed (10.1-10.6
    images/s against 21.4 alone) for as long as the decoder ran, as each waited for
    the one it had preempted."""

    def __init__(self, decode: dict, **model):
        with long_lived_setup():
            from protein_ray.scoring.decode import decode_chunks
        super().__init__(**model)
        self.decode_chunks = functools.partial(decode_chunks, **decode, threads=self.threads)

    def __call__(self, batch: dict):
        for block in self.decode_chunks(batch):
            yield super().__call__(block)
