"""One synthetic case: the institution profiles (:class:`SiteProfile`, :func:`site_profiles`) and
the brain-tumour phantom of one case (:func:`synthesize_case`), deterministic in its generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secure_fl.data.datalist import site_name
from secure_fl.errors import ConfigError

#: Bumped whenever the generated arrays change; part of the manifest, so old caches are detected.
GENERATOR_VERSION = 1

_MAX_SITES = 64

_MIN_SIDE, _MAX_SIDE = 16, 256

# Tumour-core radius ranges, as fractions of the brain's smallest semi-axis, per size class.
_SIZE_CLASSES = ("small", "medium", "large")

_CORE_RADIUS = {"small": (0.10, 0.16), "medium": (0.16, 0.24), "large": (0.24, 0.34)}

FloatArray = npt.NDArray[np.float32]

ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SiteProfile:
    """The acquisition and population effects of one synthetic institution.

    ``scale`` and ``offset`` map the tissue model to scanner units (``scale * (x + offset)``);
    ``noise`` is the Gaussian noise std relative to white matter; ``bias`` the strength of a
    smooth multiplicative bias field (0: none; field range roughly ``exp(+-bias)``); ``blur`` the
    Gaussian blur sigma in voxels; ``outliers`` the number of saturated voxels per case;
    ``size_mix`` the probabilities of small / medium / large tumours.
    """

    name: str
    scale: float
    offset: float
    noise: float
    bias: float
    blur: float
    outliers: int
    size_mix: tuple[float, float, float]


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: ``image`` float32, ``label`` uint8 (0/1 oedema/2 core), ``brainmask``
    uint8 (0/1), all of the requested shape, and the tumour size class that was drawn."""

    image: FloatArray
    label: ByteArray
    brainmask: ByteArray
    size_class: str


def _stratified(rng: np.random.Generator, k: int, low: float, high: float) -> list[float]:
    """k values spread over [low, high]: one per stratum, strata in random order.

    Guarantees that sites differ (no two fall into the same stratum) while staying seed-driven.
    """
    order = rng.permutation(k)
    return [
        low + (high - low) * (float(order[i]) + float(rng.uniform(0.2, 0.8))) / k for i in range(k)
    ]


def site_profiles(sites: int, *, seed: int = 0) -> list[SiteProfile]:
    """The institution profiles of a federation of ``sites`` sites, deterministic in ``seed``.

    Scale (x0.5 .. x2 around 100), noise (2 % .. 10 %), bias-field strength (0 .. 0.35) and blur
    (0 .. 1.2 voxels) are stratified across sites, so every pair of sites differs in each of them.
    Each site favours one tumour size class (probability 0.6), in rotation. Saturated voxels
    (16 or 4 per case) occur at half of the sites, always at one of any two.

    Errors: ConfigError if ``sites`` is not an int in [1, 64] or ``seed`` not an int >= 0.
    """
    _check_int("sites", sites, 1, _MAX_SITES)
    _check_int("seed", seed, 0, None)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5173]))
    log_scales = _stratified(rng, sites, -1.0, 1.0)
    noises = _stratified(rng, sites, 0.02, 0.10)
    biases = _stratified(rng, sites, 0.0, 0.35)
    blurs = _stratified(rng, sites, 0.0, 1.2)
    offsets = _stratified(rng, sites, 0.1, 0.6)
    first_class = int(rng.integers(3))
    outlier_rank = rng.permutation(sites)
    profiles = []
    for i in range(sites):
        favoured = (first_class + i) % 3
        mix = tuple(0.6 if c == favoured else 0.2 for c in range(3))
        profiles.append(
            SiteProfile(
                name=site_name(i),
                scale=round(100.0 * 2.0 ** log_scales[i], 6),
                offset=round(offsets[i], 6),
                noise=round(noises[i], 6),
                bias=round(biases[i], 6),
                blur=round(blurs[i], 6),
                outliers=(0, 16, 0, 4)[int(outlier_rank[i]) % 4],
                size_mix=(mix[0], mix[1], mix[2]),
            )
        )
    return profiles


def _check_int(name: str, value: object, low: int, high: int | None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an int {allowed}, got {value!r}")
    return int(value)


def _check_shape(shape: object) -> tuple[int, int, int]:
    if not isinstance(shape, Sequence) or len(shape) != 3:
        raise ConfigError(f"shape must be three ints in [{_MIN_SIDE}, {_MAX_SIDE}], got {shape!r}")
    sides = tuple(_check_int(f"shape[{i}]", s, _MIN_SIDE, _MAX_SIDE) for i, s in enumerate(shape))
    return (sides[0], sides[1], sides[2])


def _gaussian_smooth(volume: FloatArray, sigma: float) -> FloatArray:
    """Gaussian blur with standard deviation ``sigma`` voxels, periodic boundary (FFT; no SciPy)."""
    axes = tuple(range(volume.ndim))
    spectrum = np.fft.rfftn(volume, axes=axes)
    for axis, n in enumerate(volume.shape):
        freq = np.fft.rfftfreq(n) if axis == volume.ndim - 1 else np.fft.fftfreq(n)
        transfer = np.exp(-2.0 * (np.pi * sigma * freq) ** 2)
        spectrum *= transfer.reshape([-1 if a == axis else 1 for a in range(volume.ndim)])
    return np.asarray(np.fft.irfftn(spectrum, s=volume.shape, axes=axes), dtype=np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: float
) -> FloatArray:
    """Gaussian-smoothed white noise with unit standard deviation."""
    field = _gaussian_smooth(rng.standard_normal(shape, dtype=np.float32), sigma)
    std = float(field.std())
    return field / np.float32(std) if std > 0 else field


def _dilate(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Binary dilation by the 6-neighbourhood (periodic; masks here never touch the border)."""
    out = mask.copy()
    for axis in range(mask.ndim):
        out |= np.roll(mask, 1, axis=axis) | np.roll(mask, -1, axis=axis)
    return out


def _ellipsoid_distance(
    grid: tuple[FloatArray, FloatArray, FloatArray],
    centre: npt.NDArray[np.float64],
    radii: npt.NDArray[np.float64],
) -> FloatArray:
    """Normalised ellipsoidal distance: < 1 inside the axis-aligned ellipsoid."""
    total = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=np.float32)
    for axis in range(3):
        total += ((grid[axis] - np.float32(centre[axis])) / np.float32(radii[axis])) ** 2
    return np.sqrt(total)


def synthesize_case(
    shape: tuple[int, int, int], profile: SiteProfile, rng: np.random.Generator
) -> SyntheticCase:
    """Draw one case of ``profile``'s institution from ``rng`` (:mod:`secure_fl.data.synthetic`).

    Guarantee: the brain mask is an ellipsoid-like region away from the volume's border; the
    tumour lies inside it; the label holds both oedema (1) and core (2) voxels; the image is
    exactly 0 outside the brain and > 0 inside it.

    Errors: ConfigError if ``shape`` is not three ints in [16, 256].
    """
    shape = _check_shape(shape)
    axes = [np.arange(s, dtype=np.float32) for s in shape]
    grid_arrays = np.meshgrid(*axes, indexing="ij", sparse=True)
    grid = (grid_arrays[0], grid_arrays[1], grid_arrays[2])
    half = np.asarray(shape, dtype=np.float64) / 2.0

    # Brain: a jittered ellipsoid with a smoothly perturbed surface.
    centre = half - 0.5 + rng.uniform(-0.04, 0.04, 3) * np.asarray(shape)
    radii = half * rng.uniform(0.72, 0.84, 3)
    surface = _smooth_noise(rng, shape, sigma=max(shape) / 10)
    brain_distance = _ellipsoid_distance(grid, centre, radii) + 0.05 * surface
    brain = brain_distance < 1.0
    for axis in range(3):  # keep a background border (skull-stripped scans have one)
        np.moveaxis(brain, axis, 0)[[0, -1]] = False

    # Tissue: grey/white-matter-like patches (FLAIR: grey slightly brighter), fine texture,
    # a darker rim of cortex-CSF partial volume and two dark ventricles.
    patches = _smooth_noise(rng, shape, sigma=max(shape) / 14)
    fine = _smooth_noise(rng, shape, sigma=0.8)
    tissue = 0.8 + 0.2 / (1.0 + np.exp(-3.0 * patches)) + 0.03 * fine
    tissue -= 0.12 * np.clip((brain_distance - 0.85) / 0.15, 0.0, 1.0)
    ventricle_radii = radii * np.array([0.16, 0.08, 0.22]) * rng.uniform(0.8, 1.2, 3)
    for side in (-1.0, 1.0):
        v_centre = centre + np.array([0.0, side * radii[1] * 0.13, 0.0])
        tissue[_ellipsoid_distance(grid, v_centre, ventricle_radii) < 1.0] = 0.35

    # Tumour: a core blob inside a larger oedema made of one to three perturbed lobes.
    size_class = _SIZE_CLASSES[int(rng.choice(3, p=np.asarray(profile.size_mix)))]
    low, high = _CORE_RADIUS[size_class]
    r_min = float(radii.min())
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    t_centre = centre + direction * radii * rng.uniform(0.0, 0.5)
    core_radii = r_min * rng.uniform(low, high) * rng.uniform(0.75, 1.25, 3)
    core_noise = _smooth_noise(rng, shape, sigma=max(1.5, float(core_radii.mean()) / 2))
    core = (_ellipsoid_distance(grid, t_centre, core_radii) + 0.15 * core_noise < 1.0) & brain
    oedema_noise = _smooth_noise(rng, shape, sigma=max(2.0, float(core_radii.mean())))
    lobes = np.full(shape, np.inf, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        shift = rng.uniform(-0.6, 0.6, 3) * core_radii
        lobe_radii = core_radii * rng.uniform(1.25, 1.7) * rng.uniform(0.8, 1.2, 3)
        lobes = np.minimum(lobes, _ellipsoid_distance(grid, t_centre + shift, lobe_radii))
    oedema = ((lobes + 0.3 * oedema_noise < 1.0) | core) & brain
    centre_voxel = tuple(round(float(c)) for c in t_centre)
    if brain[centre_voxel]:  # it always is (the centre lies well inside); never an empty core
        core[centre_voxel] = True
        oedema[centre_voxel] = True
    if not (oedema & ~core).any():  # never an empty oedema either: a one-voxel shell
        oedema |= _dilate(core) & brain

    label = np.zeros(shape, dtype=np.uint8)
    label[oedema] = 1
    label[core] = 2

    image = tissue.astype(np.float32)
    image[oedema] = 1.5 + 0.06 * fine[oedema]
    image[core] = 2.0 + 0.12 * core_noise[core]
    image[~brain] = 0.0

    # Institution effects: blur, smooth multiplicative bias, scale/offset, noise, saturated voxels.
    if profile.blur > 0:
        image = _gaussian_smooth(image, profile.blur)
    if profile.bias > 0:
        coords = [
            (g - np.float32(c)) / np.float32(s) for g, c, s in zip(grid, centre, half, strict=True)
        ]
        coefficients = rng.uniform(-1.0, 1.0, 6)
        polynomial = (
            coefficients[0] * coords[0]
            + coefficients[1] * coords[1]
            + coefficients[2] * coords[2]
            + coefficients[3] * coords[0] * coords[1]
            + coefficients[4] * coords[1] * coords[2]
            + coefficients[5] * coords[2] ** 2
        )
        image = image * np.exp(np.float32(profile.bias) * polynomial / 1.5)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(profile.noise * 0.8)
    image = np.float32(profile.scale) * (image + np.float32(profile.offset) + noise)
    image = np.maximum(image, np.float32(0.01 * profile.scale))
    brain_index = np.flatnonzero(brain)
    if profile.outliers:
        hot = rng.choice(brain_index, size=min(profile.outliers, brain_index.size), replace=False)
        image.reshape(-1)[hot] = np.float32(25.0 * profile.scale)
    image[~brain] = 0.0
    return SyntheticCase(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=label,
        brainmask=brain.astype(np.uint8),
        size_class=size_class,
    )
