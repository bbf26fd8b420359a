"""The Predictor: checkpoint -> probabilities, shared by batch scoring and Serve.

It owns the model and the checkpoint's model card and uses the one decode and
preprocess path (``protein_ray.imaging``), so an image scored by the bulk job,
over HTTP, or in a notebook gets the same probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from protein_ray.checkpoint import ModelCard, load_checkpoint, resolve_checkpoint
from protein_ray.imaging import ImageDecodeError, Preprocessing, decode_image, normalize_batch, preprocess_batch
from protein_ray.metrics import apply_thresholds
from protein_ray.model import autocast_context, prepare_for_inference

logger = logging.getLogger(__name__)


@dataclass
class ImageResult:
    """One image's outcome: probabilities and labels, or the reason it failed."""

    probabilities: np.ndarray | None = None
    label_ids: list[int] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """Flips and 90-degree turns: cells have no orientation, so each view is as
    valid as the original and averaging them reduces variance."""
    return [batch, batch.flip(-1), batch.flip(-2), batch.rot90(1, dims=(-2, -1))]


class Predictor:
    def __init__(self, checkpoint: str, device: str | None = None, tta: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint = checkpoint
        model, self.card = load_checkpoint(checkpoint, self.device)
        size, channels = self.card.image_size, self.card.preprocessing.channels
        example = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
        self.model = prepare_for_inference(model, self.device, example)
        # On GPU: bf16/fp16 autocast, as in training; nothing changes on CPU.
        self.autocast, _ = autocast_context(self.device, enabled=True)
        self.tta = tta
        self.thresholds = np.asarray(self.card.thresholds, dtype=np.float32)
        logger.info("loaded %s (%s, %d px) on %s", checkpoint, self.card.backbone, self.card.image_size, self.device)

    @classmethod
    def from_checkpoint(cls, uri: str | None = None, **options) -> "Predictor":
        """A Predictor for a checkpoint folder or a run folder (its best epoch), local or
        ``s3://``; None: ``$PROTEIN_RAY_CHECKPOINT`` or the demo's run. ``options``: device, tta.

        >>> predictor = Predictor.from_checkpoint("runs/train/smoke", tta=True)
        >>> result = predictor.predict_bytes([Path("cell.png").read_bytes()])[0]
        >>> result.probabilities, [predictor.card.class_names[i] for i in result.label_ids]
        """
        return cls(resolve_checkpoint(uri), **options)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.card.preprocessing

    @property
    def num_classes(self) -> int:
        return len(self.card.class_names)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        thresholds = np.asarray(thresholds, dtype=np.float32)
        if thresholds.shape != (self.num_classes,) or not ((0 < thresholds) & (thresholds < 1)).all():
            raise ValueError(f"thresholds must be {self.num_classes} numbers strictly between 0 and 1")
        self.thresholds = thresholds

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded float images -> normalized (N, C, S, S) with the checkpoint's settings."""
        return preprocess_batch(images, self.preprocessing)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """Model pixels from ``imaging.prepare_batch`` (what the decode stages send)
        -> the normalized (N, C, S, S) that ``predict_batch`` takes."""
        return normalize_batch(pixels, self.preprocessing)

    def model_input(self, batch: np.ndarray) -> torch.Tensor:
        """(N, C, S, S) numpy -> the model's device and channels-last layout."""
        return torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed (N, C, S, S) -> probabilities (N, classes)."""
        tensor = self.model_input(batch)
        views = tta_views(tensor) if self.tta else [tensor]
        with self.autocast:
            logits = [self.model(view).float() for view in views]
        return torch.stack([torch.sigmoid(view_logits) for view_logits in logits]).mean(dim=0).cpu().numpy()

    @torch.inference_mode()
    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """Penultimate-layer features (N, D), for downstream profiling."""
        tensor = self.model_input(batch)
        with self.autocast:
            features = self.model.forward_head(self.model.forward_features(tensor), pre_logits=True)
        return features.float().cpu().numpy()

    def label_ids(self, probs: np.ndarray) -> list[list[int]]:
        chosen = apply_thresholds(probs, self.thresholds, never_empty=self.card.never_empty)
        return [np.flatnonzero(row).tolist() for row in chosen]

    def predict_bytes(self, encoded: Sequence[bytes]) -> list[ImageResult]:
        """Encoded images -> one result per input, in order; bad bytes give an error
        result instead of failing the others."""
        results: list[ImageResult] = [ImageResult() for _ in encoded]
        decoded, positions = [], []
        for position, data in enumerate(encoded):
            try:
                decoded.append(decode_image(data, self.preprocessing.stains))
                positions.append(position)
            except ImageDecodeError as error:
                results[position].error = str(error)
        if decoded:
            probs = self.predict_batch(self.preprocess(decoded))
            for position, row, ids in zip(positions, probs, self.label_ids(probs)):
                results[position] = ImageResult(probabilities=row, label_ids=ids)
        return results


def model_summary(card: ModelCard, checkpoint: str, thresholds: np.ndarray) -> dict:
    """What ``GET /model`` and the bulk job's outputs say about the model."""
    return {
        "checkpoint": checkpoint,
        "backbone": card.backbone,
        "image_size": card.image_size,
        "classes": list(card.class_names),
        # What to send: one merged image with these channels, or one multipart part per stain name.
        "stains": [asdict(stain) for stain in card.preprocessing.stains],
        "thresholds": [round(float(t), 4) for t in thresholds],  # float32 -> readable JSON
        "never_empty": card.never_empty,
        "epoch": card.epoch,
        "metrics": {k: card.metrics.get(k) for k in ("macro_f1", "micro_f1", "mAP") if k in card.metrics},
        "package_version": card.package_version,
    }
