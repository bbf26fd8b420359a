"""The dataset spec: which classes, which stains, and how each stain's pixels scale.

The whole system takes classes and stains from one ``DatasetSpec``: training takes
it from ``data.spec`` (a preset name or a small YAML file), the checkpoint carries
it (class names in the card, stains and their scaling in ``Preprocessing``), and
bulk scoring, Serve and ``GET /model`` derive classes, stains, columns and the
model's channel count from the checkpoint alone.

A custom spec is a YAML file::

    name: my-screen
    classes: [Nucleus, Cytoplasm, Mitochondria]
    stains:
      - {name: dna, bits: 12}        # 12-bit camera data in 16-bit files: 0..4095 -> 0..1
      - {name: protein, bits: 12}
      - {name: actin, scaling: percentile}   # robust per image: 0.1th..99.9th percentile -> 0..1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from protein_ray.labels import CLASS_NAMES

SCALINGS = ("bits", "percentile")
# Channel statistics of the real Kaggle PNGs on a 0-1 scale (DESIGN.md section 9).
HPA_MEAN = (0.079, 0.053, 0.054)
HPA_STD = (0.149, 0.113, 0.156)
HPA_2018_CLASSES = (
    "Nucleoplasm", "Nuclear membrane", "Nucleoli", "Nucleoli fibrillar center", "Nuclear speckles",
    "Nuclear bodies", "Endoplasmic reticulum", "Golgi apparatus", "Peroxisomes", "Endosomes", "Lysosomes",
    "Intermediate filaments", "Actin filaments", "Focal adhesion sites", "Microtubules", "Microtubule ends",
    "Cytokinetic bridge", "Mitotic spindle", "Microtubule organizing center", "Centrosome", "Lipid droplets",
    "Plasma membrane", "Cell junctions", "Mitochondria", "Aggresome", "Cytosol", "Cytoplasmic bodies",
    "Rods & rings",
)


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Stain:
    """One input channel. ``bits`` says how 16-bit pixels scale to 0..1: divided
    by 2**bits - 1 (12-bit camera data in 16-bit files: ``bits=12``); None means
    the file's own depth (65535). 8-bit pixels always mean 0..255.
    ``scaling="percentile"`` instead stretches each image's 0.1th..99.9th
    percentile to 0..1 (for data whose exposure varies without a fixed range).
    Resized images travel between stages as uint8 when every stain is ``bits``
    scaling with ``bits`` None or 8, else as uint16 (``Preprocessing.pixel_dtype``):
    set ``bits`` for high-bit camera data to keep its finer levels."""

    name: str
    bits: int | None = None
    scaling: str = "bits"

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise SpecError(f"stain {self.name!r}: scaling must be one of {SCALINGS}, not {self.scaling!r}")
        if self.bits is not None and not 8 <= self.bits <= 16:
            raise SpecError(f"stain {self.name!r}: bits must be between 8 and 16, not {self.bits}")

    @classmethod
    def of(cls, value: str | dict | Stain) -> Stain:
        """A stain from its name, its dict form (JSON, YAML) or itself."""
        if isinstance(value, Stain):
            return value
        if isinstance(value, str):
            return cls(value)
        unknown = set(value) - {"name", "bits", "scaling"}
        if unknown or "name" not in value:
            raise SpecError(f"a stain needs a name and may have bits and scaling; got {value}")
        return cls(**value)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    stains: tuple[Stain, ...]
    mean: tuple[float, ...] | None = None  # per stain on the 0..1 scale; None: measured on the training data
    std: tuple[float, ...] | None = None
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "stains", tuple(Stain.of(s) for s in self.stains))
        if len(self.classes) < 1 or len(set(self.classes)) != len(self.classes):
            raise SpecError(f"spec {self.name!r}: classes must be a non-empty list of distinct names")
        names = [s.name for s in self.stains]
        if not names or len(set(names)) != len(names):
            raise SpecError(f"spec {self.name!r}: stains must be a non-empty list of distinct names")
        for stats in (self.mean, self.std):
            if stats is not None and len(stats) != len(names):
                raise SpecError(f"spec {self.name!r}: mean/std need one value per stain ({len(names)})")

    @property
    def stain_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stains)


RGB = (Stain("red"), Stain("green"), Stain("blue"))
PRESETS = {
    "hpa-z2g": DatasetSpec("hpa-z2g", CLASS_NAMES, RGB, mean=HPA_MEAN, std=HPA_STD,
                           notes="Kaggle 'Zero to GANs' HPA: 10 classes, RGB (the default)"),
    "hpa-rgby": DatasetSpec("hpa-rgby", CLASS_NAMES, (*RGB, Stain("yellow")),
                            notes="the same 10 classes with HPA's 4 stains (yellow = endoplasmic reticulum)"),
    "hpa-2018": DatasetSpec("hpa-2018", HPA_2018_CLASSES, (*RGB, Stain("yellow")),
                            notes="HPA 2018 (Kaggle 'Human Protein Atlas Image Classification'): 28 classes, 4 stains"),
}
DEFAULT_SPEC = "hpa-z2g"


def load_spec(name_or_path: str) -> DatasetSpec:
    """A preset by name, or a spec from a YAML file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.suffix.lower() in (".yaml", ".yml") or not path.is_file():
        raise SpecError(f"data.spec: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                        "nor a YAML file")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(document, dict) or not {"classes", "stains"} <= set(document):
        raise SpecError(f"{path}: a spec is a mapping with classes and stains (see protein_ray/spec.py)")
    unknown = set(document) - {"name", "classes", "stains", "mean", "std"}
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {sorted(unknown)}; a spec has name, classes, stains, mean, std")
    return DatasetSpec(name=document.get("name", path.stem), classes=tuple(map(str, document["classes"])),
                       stains=tuple(document["stains"]),
                       mean=tuple(document["mean"]) if document.get("mean") else None,
                       std=tuple(document["std"]) if document.get("std") else None)
