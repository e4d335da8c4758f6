"""`AugmentSpec`: one SimCLR view of a multi-channel 16-bit crop, implemented by both backends.

A view is made in this order (each step can be switched off):

1. random resized crop of the stored uint16 crop to `output_size` (area fraction `crop_scale`,
   aspect ratio `crop_ratio`, bilinear);
2. one of the 8 flips / 90-degree rotations, uniformly (microscopy has no up or down);
3. with probability `blur_p`, Gaussian blur with a sigma drawn from `blur_sigma` (pixels;
   window 2 ceil(3 sigma) + 1, mirrored borders);
4. with probability `jitter_p`, per-channel gain (brightness) and contrast, each channel drawing
   its own factors: `v = (u * gain - m) * contrast + m`, where `u` is the intensity divided by
   the channel's 99th percentile (manifest `p99`) and `m` the channel's dataset mean in that unit;
5. with probability `jitter_p` (a coin of its own), per-channel gamma: `max(v, 0) ** gamma`;
   on the 0..~1 scale of `v` whatever the stored range;
6. normalisation with the manifest's per-channel `mean` / `std` (off: intensities / 65535);
7. with probability `noise_p`, additive Gaussian noise of std `noise_std` (in units of the
   channel's std, i.e. of the normalised output);
8. each channel set to 0 with probability `channel_drop_p` (never all channels of a view).

Defaults follow SimCLR (Chen et al. 2020) at its small-image strength: random resized crop,
flips, colour jitter 0.4 at p=0.8 (here per channel: gain, contrast, gamma), Gaussian blur
p=0.5 with sigma 0.1-2, plus the rotations and mild noise. The crop keeps at least 20% of the
area (SimCLR: 8%): a 96-px single-cell crop cut to 8% is a 27-px patch of cytoplasm. Blur comes
before the jitter (SimCLR: after): blur commutes exactly with gain, contrast and normalisation
(per-channel affine maps, kernel summing to 1, mirrored borders), so only gamma moves; this lets
crop, symmetry, blur, gain and contrast fold into two matrix products per batch (`augment.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastcell.errors import InputError

UINT16_MAX = 65535.0


@dataclass(frozen=True)
class AugmentSpec:
    """How to draw one augmented view (see the module docstring for the exact order)."""

    output_size: int | None = None  # side of the view in pixels; None: the shards' crop size
    crop_scale: tuple[float, float] = (0.2, 1.0)  # (1, 1) with crop_ratio (1, 1): no random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    dihedral: bool = True  # the 8 flips and 90-degree rotations
    jitter_p: float = 0.8
    gain: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    gamma: tuple[float, float] = (0.8, 1.25)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_p: float = 0.5
    noise_std: float = 0.05
    channel_drop_p: float = 0.0
    normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("jitter_p", "blur_p", "noise_p", "channel_drop_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"augmentation {name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("crop_scale", "crop_ratio", "gain", "contrast", "gamma", "blur_sigma"):
            lo, hi = (float(v) for v in getattr(self, name))  # lists from a config file become tuples
            object.__setattr__(self, name, (lo, hi))
            if not 0.0 < lo <= hi:
                raise InputError(f"augmentation {name} must be a range 0 < low <= high, got {(lo, hi)}")
        if self.crop_scale[1] > 1.0:
            raise InputError(f"augmentation crop_scale is an area fraction <= 1, got {self.crop_scale}")
        if self.noise_std < 0:
            raise InputError(f"augmentation noise_std must be >= 0, got {self.noise_std}")
        if self.output_size is not None and self.output_size < 1:
            raise InputError(f"augmentation output_size must be positive, got {self.output_size}")

    @classmethod
    def identity(cls, **changes) -> AugmentSpec:
        """A spec with every augmentation off (normalisation on): the stored crop, normalised."""
        off = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), dihedral=False, jitter_p=0.0,
                   blur_p=0.0, noise_p=0.0, channel_drop_p=0.0)
        return cls(**{**off, **changes})

    @property
    def random_crop(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.crop_ratio != (1.0, 1.0)

    @property
    def jitter(self) -> bool:
        """Whether step 4 (gain and contrast) does anything."""
        return self.jitter_p > 0 and (self.gain, self.contrast) != ((1.0, 1.0),) * 2

    @property
    def gamma_in_batch(self) -> bool:
        """Whether step 5 runs (then 6 follows it; otherwise 6 folds into step 4's affine map)."""
        return self.jitter_p > 0 and self.gamma != (1.0, 1.0)

    @property
    def blur(self) -> bool:
        return self.blur_p > 0

    @property
    def noise(self) -> bool:
        return self.noise_p > 0 and self.noise_std > 0


@dataclass(frozen=True)
class Intensity:
    """Per-channel constants from the manifest that the view arithmetic needs (float32 arrays [C]).

    `ref`: the jitter's unit (99th percentile, at least 1); `jitter_mean`: the channel mean in
    that unit (the contrast pivot); `scale`, `shift`: the output affine map `u * scale + shift`
    from jitter units to the loader output (normalised, or intensity / 65535); `noise_unit`: one
    channel std in output units (1 when normalised).
    """

    ref: np.ndarray
    jitter_mean: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    noise_unit: np.ndarray

    @classmethod
    def from_stats(cls, channel_stats: dict[str, list[float]], normalize: bool, where: str = "manifest") -> Intensity:
        try:
            mean = np.asarray(channel_stats["mean"], dtype=np.float64)
            std = np.asarray(channel_stats["std"], dtype=np.float64)
            p99 = np.asarray(channel_stats["p99"], dtype=np.float64)
        except KeyError as err:
            raise InputError(f"{where}: channel_stats lacks {err.args[0]!r} (shard format v1 lists mean, std, p99)") from err
        if np.any(std < 0) or not (len(mean) == len(std) == len(p99)):
            raise InputError(f"{where}: channel_stats mean/std/p99 must be C values each with std >= 0")
        ref = np.maximum(p99, 1.0)
        std = np.where(std > 0, std, 1.0)  # a constant channel: shift to 0, do not divide by 0
        if normalize:
            scale, shift, noise_unit = ref / std, -mean / std, np.ones_like(ref)
        else:
            scale, shift, noise_unit = ref / UINT16_MAX, np.zeros_like(ref), std / UINT16_MAX
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        return cls(ref=f32(ref), jitter_mean=f32(mean / ref), scale=f32(scale), shift=f32(shift),
                   noise_unit=f32(noise_unit))

    @property
    def channels(self) -> int:
        return len(self.ref)

    @property
    def stored_scale(self) -> np.ndarray:
        """The output map's scale for stored intensities (no jitter unit): `v * stored_scale + shift` (eval)."""
        return self.scale / self.ref


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that is a deterministic function of integer parts (seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)
