"""Painting one Human Protein Atlas–like field of view: cells, stains and camera.

A field shows a few cells: a textured blue nucleus with dark nucleoli, red
microtubules radiating from the centrosome, and a green protein whose pattern is
set by the labels (one painter per class; several labels add up); HPA's fourth
stain, a yellow endoplasmic reticulum, is available through ``render_stains``. Images are
dark, like real HPA PNGs, and brightness, cell count, blur and noise vary so
that only the spatial pattern tells the classes apart. Everything here is a
pure function of the ``numpy`` generator it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from protein_ray.labels import NUM_CLASSES, validate_ids


# ----------------------------------------------------------------------------- geometry
@dataclass
class Field:
    """Per-pixel maps of one field plus per-cell facts the painters need."""

    size: int
    scale: float  # size / 512: every length below is given at 512 px and scaled
    owner: np.ndarray  # cell index per pixel, -1 for background
    nucleus: np.ndarray  # bool
    nucleoli: np.ndarray  # float 0..1, soft blobs inside nuclei
    nucleolus_centres: np.ndarray  # (k, 2) y, x
    edge_distance: np.ndarray  # px to the nearest cell boundary
    perinuclear: np.ndarray  # 1 at the nucleus rim, falling to 0 at the cell edge
    nucleus_centres: np.ndarray  # (n, 2)
    nucleus_radii: np.ndarray  # (n,) mean radius
    mtoc: np.ndarray  # (n, 2) centrosome position, just outside the nucleus
    mtoc_angle: np.ndarray  # (n,) direction from nucleus centre to the centrosome
    cell_radii: np.ndarray  # (n,)

    @property
    def cytoplasm(self) -> np.ndarray:
        return (self.owner >= 0) & ~self.nucleus

    @property
    def n_cells(self) -> int:
        return len(self.cell_radii)


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(sigma, 0.3))
    return field / (field.std() + 1e-8)


def _place_cells(size: int, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres and radii; cells may touch and run off the frame, nuclei never overlap."""
    wanted = int(rng.integers(3, 13))
    mean_radius = rng.uniform(55, 80) * scale
    centres, radii = [], []
    for _ in range(40 * wanted):
        if len(centres) == wanted:
            break
        radius = mean_radius * rng.uniform(0.8, 1.2)
        centre = rng.uniform(-0.05 * size, 1.05 * size, 2)
        if all(np.hypot(*(centre - c)) > 0.8 * (radius + r) for c, r in zip(centres, radii)):
            centres.append(centre)
            radii.append(radius)
    return np.array(centres), np.array(radii)


def _wobbly_radius(angle: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """1 + a few random low harmonics: turns circles into irregular blobs."""
    wobble = np.ones_like(angle)
    for order in (2, 3, 4, 5):
        wobble += amount / order * rng.uniform(0.3, 1) * np.cos(order * angle + rng.uniform(0, 2 * np.pi))
    return wobble


def _ellipse_distance(dy, dx, radius, elongation, tilt, rng, wobble):
    """Normalised distance (1 on the boundary) of an irregular, tilted ellipse."""
    cos_t, sin_t = math.cos(tilt), math.sin(tilt)
    u = (dx * cos_t + dy * sin_t) / elongation
    v = (-dx * sin_t + dy * cos_t) * elongation
    return np.hypot(u, v) / (radius * _wobbly_radius(np.arctan2(v, u), rng, wobble))


def _shape_distance(size, centre, radius, wobble, rng, max_elongation):
    """Normalised distance to an irregular ellipse, computed only in the window that can hold it."""
    elongation, tilt = rng.uniform(1, max_elongation), rng.uniform(0, np.pi)
    reach = radius * max_elongation * (1 + wobble)
    lo = np.clip(np.floor(centre - reach), 0, size).astype(int)
    hi = np.clip(np.ceil(centre + reach) + 1, 0, size).astype(int)
    window = slice(lo[0], hi[0]), slice(lo[1], hi[1])
    yy, xx = np.ogrid[window[0], window[1]]
    return window, _ellipse_distance(yy - centre[0], xx - centre[1], radius, elongation, tilt, rng, wobble)


def _build_field(size: int, rng: np.random.Generator) -> Field:
    scale = size / 512
    centres, radii = _place_cells(size, scale, rng)
    n = len(centres)
    best = np.full((size, size), np.inf, np.float32)
    owner = np.full((size, size), -1, np.int32)
    nucleus = np.zeros((size, size), bool)
    nuc_centres = centres + rng.normal(0, 0.08, (n, 2)) * radii[:, None]
    nuc_radii = radii * rng.uniform(0.42, 0.52, n)
    for k in range(n):
        # Each pixel goes to the cell whose (normalised) boundary is farthest: touching cells split.
        window, cell_d = _shape_distance(size, centres[k], radii[k], 0.35, rng, 1.35)
        closer = (cell_d < 1) & (cell_d < best[window])
        best[window][closer] = cell_d[closer]
        owner[window][closer] = k
        window, nuc_d = _shape_distance(size, nuc_centres[k], nuc_radii[k], 0.12, rng, 1.3)
        nucleus[window] |= nuc_d < 1
        owner[window][nuc_d < 1] = k  # a nucleus always belongs to its own cell
    nucleoli, nucleolus_centres = _nucleoli(nucleus, nuc_centres, nuc_radii, scale, rng)
    boundary = (owner != np.roll(owner, 1, 0)) | (owner != np.roll(owner, 1, 1))
    edge_distance = ndimage.distance_transform_edt(~boundary).astype(np.float32)
    from_nucleus = ndimage.distance_transform_edt(~nucleus).astype(np.float32)
    perinuclear = np.where(owner >= 0, edge_distance / (edge_distance + from_nucleus + 1e-3), 0)
    angles = rng.uniform(0, 2 * np.pi, n)
    direction = np.stack([np.sin(angles), np.cos(angles)], 1)
    mtoc = nuc_centres + direction * (nuc_radii * 1.05 + 6 * scale)[:, None]
    return Field(size, scale, owner, nucleus, nucleoli, nucleolus_centres, edge_distance,
                 perinuclear.astype(np.float32), nuc_centres, nuc_radii, mtoc, angles, radii)


def _nucleoli(nucleus, nuc_centres, nuc_radii, scale, rng):
    """2–4 irregular blobs per nucleus: always there (dark in blue), green only if labelled."""
    points = []
    for centre, radius in zip(nuc_centres, nuc_radii):
        count = int(rng.integers(2, 5))
        angle = rng.uniform(0, 2 * np.pi, count)
        reach = radius * rng.uniform(0.05, 0.5, count)
        points.append(centre + np.stack([np.sin(angle), np.cos(angle)], 1) * reach[:, None])
    centres = np.concatenate(points) if points else np.zeros((0, 2))
    # Thresholding Gaussians of random height gives blobs of varied size that merge when close.
    blobs = _spots(nucleus.shape, centres, rng.uniform(0.7, 1.4, len(centres)), 8 * scale)
    soft = np.clip((blobs - 0.4) / 0.3, 0, 1) * nucleus
    return soft.astype(np.float32), centres


# ----------------------------------------------------------------------------- drawing helpers
def _spots(shape, points, weights, sigma: float) -> np.ndarray:
    """Gaussian spots at ``points`` whose peaks equal ``weights`` (spots add up)."""
    image = np.zeros(shape, np.float32)
    if len(points) == 0:
        return image
    ij = np.rint(points).astype(int)
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < shape[0]) & (ij[:, 1] >= 0) & (ij[:, 1] < shape[1])
    np.add.at(image, (ij[inside, 0], ij[inside, 1]), np.asarray(weights, np.float32)[inside])
    sigma = max(sigma, 0.4)
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    peak = (1 / kernel.sum()) ** 2  # the value a unit impulse has after filtering
    return ndimage.gaussian_filter(image, sigma) / peak


def _random_points_in(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    where = np.flatnonzero(mask)
    if len(where) == 0 or count <= 0:
        return np.zeros((0, 2))
    picks = rng.choice(where, size=count)
    return np.stack(np.unravel_index(picks, mask.shape), 1) + rng.uniform(-0.5, 0.5, (count, 2))


def _jitter_cluster(points, copies: int, spread: float, rng) -> np.ndarray:
    """Each point becomes a small irregular clump of ``copies`` points."""
    repeated = np.repeat(points, copies, axis=0)
    return repeated + rng.normal(0, spread, repeated.shape)


# ----------------------------------------------------------------------------- green painters
# Each painter returns the class's green signal with a peak near 1; lengths are at 512 px.
def _mitochondria(field: Field, rng) -> np.ndarray:
    # Zero crossings of smooth noise form a net of threads; dense around the nucleus.
    noise = _smooth_noise((field.size,) * 2, 4 * field.scale, rng)
    threads = np.exp(-((noise / 0.45) ** 2))
    threads *= np.clip(_smooth_noise((field.size,) * 2, 6 * field.scale, rng) + 0.6, 0, 1)  # break the net into tubules
    grains = np.clip(_smooth_noise((field.size,) * 2, 1.5 * field.scale, rng), 0, None) * 0.3
    density = 0.35 + 0.65 * field.perinuclear
    return (threads + grains) * density * field.cytoplasm


def _nuclear_bodies(field: Field, rng) -> np.ndarray:
    # A few (2-5) large, round, saturated dots per nucleus.
    count = int(rng.integers(2, 6, field.n_cells).sum())
    points = _random_points_in(field.nucleus & (field.nucleoli < 0.1) & (field.edge_distance > 5 * field.scale), count, rng)
    return _spots(field.nucleus.shape, points, rng.uniform(2.0, 2.5, len(points)), 6.0 * field.scale)


def _nucleoli_signal(field: Field, rng) -> np.ndarray:
    texture = 1 + 0.15 * _smooth_noise((field.size,) * 2, 2 * field.scale, rng)
    return field.nucleoli * texture * 0.9


def _golgi(field: Field, rng) -> np.ndarray:
    # A crescent of stacks hugging the nucleus on the centrosome side.
    points = []
    for k in range(field.n_cells):
        count = int(rng.integers(10, 18))
        angle = field.mtoc_angle[k] + rng.normal(0, 0.5, count)
        reach = field.nucleus_radii[k] + rng.uniform(2, 18, count) * field.scale
        points.append(field.nucleus_centres[k] + np.stack([np.sin(angle), np.cos(angle)], 1) * reach[:, None])
    points = np.concatenate(points)
    signal = _spots(field.nucleus.shape, points, rng.uniform(0.6, 1.0, len(points)), 3.5 * field.scale)
    return np.minimum(signal, 1.5) * (field.owner >= 0)


def _nucleoplasm(field: Field, rng) -> np.ndarray:
    texture = 1 + 0.12 * _smooth_noise((field.size,) * 2, 2 * field.scale, rng)
    return field.nucleus * (1 - 0.85 * field.nucleoli) * texture * 0.55


def _fibrillar_centers(field: Field, rng) -> np.ndarray:
    # Tiny bright dots inside each nucleolus (not filling it, unlike class 2).
    points = _jitter_cluster(field.nucleolus_centres, int(rng.integers(2, 4)), 3.5 * field.scale, rng)
    return _spots(field.nucleus.shape, points, rng.uniform(1.3, 1.7, len(points)), 3.0 * field.scale)


def _cytosol(field: Field, rng) -> np.ndarray:
    texture = 1 + 0.1 * _smooth_noise((field.size,) * 2, 6 * field.scale, rng)
    return field.cytoplasm * (0.35 + 0.25 * field.perinuclear) * texture


def _plasma_membrane(field: Field, rng) -> np.ndarray:
    width = 3.5 * field.scale
    outline = np.exp(-((field.edge_distance / max(width, 0.6)) ** 2))
    return (outline + 0.06) * (field.owner >= 0)


def _centrosome(field: Field, rng) -> np.ndarray:
    # One or two large, saturated dots right at the centrosome (Golgi is a crescent of many).
    pairs = rng.random(field.n_cells) < 0.6
    offsets = rng.normal(0, 1, (field.n_cells, 2))
    offsets *= (9 * field.scale / (np.linalg.norm(offsets, axis=1, keepdims=True) + 1e-6))
    points = np.concatenate([field.mtoc, (field.mtoc + offsets)[pairs]])
    return _spots(field.nucleus.shape, points, rng.uniform(2.5, 3.0, len(points)), 6.0 * field.scale)


def _nuclear_speckles(field: Field, rng) -> np.ndarray:
    # Many irregular clumps (vs. the few round dots of nuclear bodies), over a faint fill.
    count = int(rng.integers(6, 12, field.n_cells).sum())
    seeds = _random_points_in(field.nucleus & (field.nucleoli < 0.1), count, rng)
    points = _jitter_cluster(seeds, 4, 4.5 * field.scale, rng)
    spots = _spots(field.nucleus.shape, points, rng.uniform(0.7, 1.0, len(points)), 3.5 * field.scale)
    return (np.minimum(spots, 1.6) + 0.04) * field.nucleus * (1 - field.nucleoli)


PAINTERS: dict[int, Callable[[Field, np.random.Generator], np.ndarray]] = {
    0: _mitochondria, 1: _nuclear_bodies, 2: _nucleoli_signal, 3: _golgi, 4: _nucleoplasm,
    5: _fibrillar_centers, 6: _cytosol, 7: _plasma_membrane, 8: _centrosome, 9: _nuclear_speckles,
}
assert len(PAINTERS) == NUM_CLASSES


# ----------------------------------------------------------------------------- other stains
def _microtubules(field: Field, rng) -> np.ndarray:
    """Curving filaments that run outward from near the centrosome until they leave their cell."""
    size, step = field.size, 0.7  # step in px: dense enough to rasterise a continuous line
    step_at_512 = step / field.scale
    counts = rng.integers(60, 110, field.n_cells)
    cells = np.repeat(np.arange(field.n_cells), counts)
    spread = (0.35 * field.nucleus_radii)[cells, None]
    starts = field.mtoc[cells] + rng.normal(0, 1, (len(cells), 2)) * spread
    steps = int(2.6 * field.cell_radii.max() / step) + 1
    # Heading = random start + steady bend + random wiggle (per 512-px length, so size-independent).
    bend = rng.normal(0, 0.006, (len(cells), 1)) * step_at_512
    wiggle = rng.normal(0, math.sqrt(0.004 * step_at_512), (len(cells), steps))
    heading = rng.uniform(0, 2 * np.pi, (len(cells), 1)) + np.cumsum(bend + wiggle, axis=1)
    path = starts[:, None, :] + np.cumsum(step * np.stack([np.sin(heading), np.cos(heading)], -1), axis=1)
    ij = np.rint(path).astype(int)
    inside = (ij[..., 0] >= 0) & (ij[..., 0] < size) & (ij[..., 1] >= 0) & (ij[..., 1] < size)
    ij = np.where(inside[..., None], ij, 0)
    # A filament is kept only while it stays in its own cell (it stops at the membrane).
    own = np.cumprod(inside & (field.owner[ij[..., 0], ij[..., 1]] == cells[:, None]), axis=1).astype(bool)
    brightness = np.broadcast_to(rng.uniform(0.3, 1, len(cells))[:, None], own.shape)
    image = np.bincount((ij[..., 0] * size + ij[..., 1])[own], brightness[own], size * size)
    image = ndimage.gaussian_filter(image.reshape(size, size).astype(np.float32), max(0.8 * field.scale, 0.4))
    in_cells = field.owner >= 0
    image /= (np.percentile(image[in_cells], 95) if in_cells.any() else 0) + 1e-6
    return np.minimum(image, 1.3) * (1 - 0.6 * field.nucleus) + 0.2 * in_cells


def _dna(field: Field, rng) -> np.ndarray:
    """Nuclear stain: textured chromatin, a brighter rim, dark nucleoli, per-cell brightness."""
    per_cell = rng.uniform(0.55, 1.0, field.n_cells + 1)[field.owner]
    texture = 1 + 0.18 * _smooth_noise((field.size,) * 2, 1.5 * field.scale, rng)
    rim = 1 + 0.15 * np.exp(-field.edge_distance / (4 * field.scale + 0.5))
    return field.nucleus * per_cell * texture * rim * (1 - 0.65 * field.nucleoli)


def _green(field: Field, labels: Sequence[int], rng) -> np.ndarray:
    green = np.zeros((field.size,) * 2, np.float32)
    for class_id in labels:
        green += rng.uniform(0.55, 1.0) * PAINTERS[class_id](field, rng)
    per_cell = rng.uniform(0.5, 1.1, field.n_cells + 1)[field.owner]  # expression varies by cell
    haze = rng.uniform(0.0, 0.06) * (field.owner >= 0)  # unspecific background staining
    return green * per_cell + haze


def _camera(image: np.ndarray, scale: float, rng, defocus: float = 0.0) -> np.ndarray:
    """Optics and sensor: blur, offset, shot noise and read noise.

    ``defocus`` (px at 512) widens the optical blur; noise is added after it, as on a real
    sensor, so a defocused field keeps its pixel noise (QC must see through that).
    """
    blur = math.hypot(rng.uniform(0.4, 1.0) * scale * 2, defocus * scale)
    if blur > 0.3:
        image = ndimage.gaussian_filter(image, (blur, blur, 0))
    image = image + rng.uniform(0.003, 0.02, image.shape[-1])
    # Shot noise (Gaussian approximation of Poisson: much faster) plus read noise.
    photons, read_noise = rng.uniform(150, 600), rng.uniform(0.002, 0.008)
    sigma = np.sqrt(np.clip(image, 0, None) / photons + read_noise**2)
    image = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 1).astype(np.float32)


def _endoplasmic_reticulum(field: Field, rng) -> np.ndarray:
    """ER stain, the same whatever the labels: a mesh of tubules through the cytoplasm.

    Zero crossings of two smooth noise fields overlap into a polygonal net; the net, a few
    sheets and the nuclear envelope (continuous with the ER) make it brightest near the nucleus.
    """
    shape = (field.size,) * 2
    mesh = np.zeros(shape, np.float32)
    for sigma in (3.0, 5.0):
        mesh = np.maximum(mesh, np.exp(-((_smooth_noise(shape, sigma * field.scale, rng) / 0.4) ** 2)))
    sheets = 0.3 * np.clip(_smooth_noise(shape, 8 * field.scale, rng), 0, None) * field.perinuclear
    envelope = 0.5 * field.perinuclear**12
    density = 0.25 + 0.75 * field.perinuclear**1.5
    per_cell = rng.uniform(0.6, 1.1, field.n_cells + 1)[field.owner]
    return (mesh * density + sheets + envelope + 0.05) * per_cell * field.cytoplasm


def _render_rgb(labels: Sequence[int], size: int, rng: np.random.Generator,
                defocus: float = 0.0) -> tuple[Field, np.ndarray]:
    """The field's geometry and its 3-stain picture (the draws that fix ``render_field``'s output)."""
    labels = validate_ids(labels)
    field = _build_field(size, rng)
    gains = rng.lognormal(np.log([0.54, 0.68, 0.72]), 0.3)  # exposure per channel
    red = _microtubules(field, rng) * rng.uniform(0.6, 1.1, field.n_cells + 1)[field.owner]
    image = np.stack([red * gains[0], _green(field, labels, rng) * gains[1], _dna(field, rng) * gains[2]], -1)
    return field, _camera(image, field.scale, rng, defocus)


def render_field(labels: Sequence[int], size: int, rng: np.random.Generator, defocus: float = 0.0) -> np.ndarray:
    """One field of view as float32 (size, size, 3) in 0..1: R microtubules, G protein, B DNA.

    ``defocus`` > 0 (a Gaussian sigma in px at 512, scaled with ``size``) renders the field out of focus.
    """
    return _render_rgb(labels, size, rng, defocus)[1]


def render_background(size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """A field with no cells (float32 (size, size, channels)): only the camera's offset and noise."""
    return _camera(np.zeros((size, size, channels), np.float32), size / 512, rng)


def render_stains(labels: Sequence[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """HPA's four stains as float32 (size, size, 4) in 0..1: red, green, blue, yellow (ER).

    The first three equal ``render_field`` with the same ``rng``. The yellow stain draws from
    a child generator (``rng.spawn``), so it does not depend on the labels either.
    """
    field, rgb = _render_rgb(labels, size, rng)
    er_rng = rng.spawn(1)[0]
    yellow = _endoplasmic_reticulum(field, er_rng) * er_rng.lognormal(np.log(0.6), 0.3)
    return np.concatenate([rgb, _camera(yellow[..., None], field.scale, er_rng)], -1)
