"""The SimCLR view recipe of `AugmentSpec` on whole batches in torch: one implementation for the CPU
and the GPU.

`ViewRecipe` makes one view of every crop of a batch [B, C, H, W] (stored intensities, float32, on
the loader's device) in named steps; to add an augmentation, add a field to `AugmentSpec`, its
random choice to `ViewDraws` / `ViewRecipe.draw` and a step to `ViewRecipe.apply`:

- `draw`: every random choice of the view (crop window, symmetry, blur sigma, gain, contrast, gamma,
  noise coin, kept channels) as small tensors drawn on the CPU from the batch's generators, so the
  GPU never waits for the host and a CPU and a GPU run with the same seeds make the same views
  (noise aside). `ViewDraws` can also be built by hand to fix every choice (tests).
- `geometry` (crop, symmetry, blur, gain and contrast; normalisation too unless gamma follows): crop + resize, the flips and the blur are
  linear maps along the rows and along the columns of a plane, so each view's are folded into one
  [S, H] matrix for the rows and one [S, W] for the columns (torchvision's antialiased bilinear
  weights of the crop window, the flip as reversed rows, the mirrored-border Gaussian folded in)
  and every view of the batch is two batched matrix products; the transpose of the 90-degree
  rotations is a batched `mT` of the views that draw it. Gain and contrast (and the normalisation
  when gamma is off) ride along as the scale and bias of the second product.
- `gamma` (then the normalisation): `exp(gamma log v + log scale) + shift`, batched (gamma 1 where not drawn).
- `noise`: on CUDA `torch.randn`; on the CPU, where drawing 2 x B x C x S x S normals costs as
  much as a view, fields cut from a bank of pre-drawn white Gaussian noise at a random offset and
  entry per sample (every pixel still gets independent N(0, std^2) noise; two views share noise
  only if they draw the same entry and overlapping offsets, harmless for augmentation).
- `channel_drop`: whole channels set to 0, never all of a view.

Why batched and not per sample: DALI's per-sample operators cost several times the whole read +
decode path (launch and parameter costs amortised only over large images, which single-cell crops
are not); a batch of 512 small crops is one small tensor. The per-sample reference used
to test this recipe is `torch_ref.torch_view` (torchvision functional ops, one crop at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastcell.loaders.spec import AugmentSpec, Intensity

BANK_ENTRIES = 16  # pre-drawn CPU noise fields


@dataclass
class ViewDraws:
    """Every random choice of one view of n crops (CPU tensors; 1 / False / 0 where a step is off)."""

    top: torch.Tensor  # int64 [n]: crop window (steps 1)
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    transpose: torch.Tensor  # bool [n]: the symmetry (2): transpose, then flip x, then flip y
    flip_x: torch.Tensor
    flip_y: torch.Tensor
    blur_sigma: torch.Tensor  # float64 [n]: 0 = no blur (3)
    gain: torch.Tensor  # float32 [n, C] (4)
    contrast: torch.Tensor  # float32 [n, C] (4)
    gamma: torch.Tensor  # float32 [n, C] (5)
    noisy: torch.Tensor  # bool [n] (7)
    keep: torch.Tensor  # bool [n, C] (8)
    noise_pick: torch.Tensor  # int64 [m]: bank entry per noisy sample (CPU noise)
    noise_offset: torch.Tensor  # int64 [m, 2]: offset into the bank field (CPU noise)
    noise_seed: int  # seed of the CUDA noise

    @classmethod
    def none(cls, n: int, channels: int, height: int, width: int) -> ViewDraws:
        """Draws that change nothing: the whole crop, no symmetry, blur, jitter, noise or drop-out."""
        zeros, no = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        ones = torch.ones((n, channels))
        return cls(zeros, zeros, torch.full((n,), height), torch.full((n,), width), no, no, no,
                   torch.zeros(n, dtype=torch.float64), ones, ones, ones, no, torch.ones((n, channels), dtype=torch.bool),
                   torch.zeros(0, dtype=torch.long), torch.zeros((0, 2), dtype=torch.long), 0)


def uniform(value_range, shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws in [low, high) of `value_range` (both backends draw their augmentation factors with it)."""
    lo, hi = value_range
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def fallback_crop(height: int, width: int, ratio) -> tuple[int, int]:
    """(h, w) of torchvision's fallback when 10 random tries miss: the whole image at the closest allowed ratio."""
    if width / height < ratio[0]:
        return round(width / ratio[0]), width
    if width / height > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator):
    """(top, left, h, w), int64 [n] each: n random resized crop windows by torchvision's rule
    (10 tries of area and log-uniform aspect ratio, else the centre crop at the closest ratio)."""
    target = height * width * uniform(scale, (n, 10), generator, torch.float64)
    aspect = torch.exp(uniform((math.log(ratio[0]), math.log(ratio[1])), (n, 10), generator, torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)
    h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(1)
    fallback_h, fallback_w = fallback_crop(height, width, ratio)
    h, w = torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)
    u = torch.rand((2, n), generator=generator, dtype=torch.float64)
    top = torch.where(found, (u[0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (u[1] * (width - w + 1)).long(), (width - w) // 2)
    return top, left, h, w


def line_matrices(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, flip: torch.Tensor,
                  sigma: torch.Tensor | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, out_size, in_size] float32 on `device`: per line of `in_size` pixels, the window [start, start +
    length) resized to `out_size` with torchvision's antialiased bilinear weights (`interpolate(...,
    antialias=True)`: a triangle filter as wide as the scale when shrinking), reversed where `flip`,
    then Gaussian-blurred with `sigma` (None or 0: no blur; window 2 ceil(3 sigma) + 1, borders
    mirrored without repeating the edge pixel, as DALI and scipy's "mirror").

    The inputs are CPU tensors; the filter widths are read from them there (no device sync), the
    matrix is built sparse on `device` (a few taps per output pixel) and scattered dense."""
    n = len(start)
    taps = math.ceil(2 * max(1.0, float(length.max()) / out_size)) + 1
    radius = math.ceil(3 * float(sigma.max())) if sigma is not None and n else 0
    start, length, flip = start.to(device), length.to(device), flip.to(device)
    scale = length.double() / out_size
    support = scale.clamp(min=1.0)
    center = scale[:, None] * (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5)
    first = torch.floor(center - support[:, None] + 0.5).clamp(min=0)
    pixel = first[:, :, None] + torch.arange(taps, dtype=torch.float64, device=device)  # in the window [n, out, taps]
    weight = (1 - (pixel + 0.5 - center[:, :, None]).abs() / support[:, None, None]).clamp(min=0)
    weight = weight * (pixel < length[:, None, None])
    weight = (weight / weight.sum(-1, keepdim=True)).float()
    column = (start[:, None, None] + pixel.long()).clamp(max=in_size - 1)
    flip = flip.view(n, 1, 1)
    weight, column = torch.where(flip, weight.flip(1), weight), torch.where(flip, column.flip(1), column)
    if radius > 0:
        sigma = sigma.to(device)
        offsets = torch.arange(-radius, radius + 1, device=device)
        within = offsets.abs() <= torch.ceil(3 * sigma)[:, None]
        kernel = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2).clamp(min=1e-12)) * within
        kernel = (kernel / kernel.sum(1, keepdim=True)).float()  # sigma 0: [0, ..., 1, ..., 0]
        period = 2 * (out_size - 1)
        source = (torch.arange(out_size, device=device)[:, None] + offsets).remainder(max(period, 1))
        source = torch.where(source >= out_size, period - source, source)  # mirrored [out, kernel]
        taps_of = lambda t: t.index_select(1, source.flatten()).view(n, out_size, -1, taps)  # noqa: E731
        weight = (kernel[:, None, :, None] * taps_of(weight)).flatten(2)
        column = taps_of(column).flatten(2)
    return torch.zeros((n, out_size, in_size), device=device).scatter_add_(2, column, weight)


class ViewRecipe:
    """One view of every crop of a batch, as `spec` says (see the module docstring for the steps).

    `recipe(images, geometry_generator, finish_generator)`: images are stored intensities [B, C, H, W]
    float32 on any device; returns float32 views [B, C, S, S] on that device. Steps 1-4 draw from the
    first generator, 5-8 from the second (CPU generators, one pair per view and batch).
    """

    def __init__(self, spec: AugmentSpec, intensity: Intensity, size: int, noise_seed: int = 0):
        self.spec, self.size = spec, size
        self.channels = intensity.channels
        row = lambda a: torch.from_numpy(a).view(1, -1)  # noqa: E731
        self.inv_ref, self.pivot = 1.0 / row(intensity.ref), row(intensity.jitter_mean)
        self.scale, self.shift = row(intensity.scale), row(intensity.shift)
        self.noise_sigma = row(intensity.noise_unit * spec.noise_std)
        self.bank = None  # CPU noise fields, already times each channel's noise std
        if spec.noise:
            gen = torch.Generator().manual_seed(noise_seed)
            self.bank = torch.randn((BANK_ENTRIES, self.channels, 2 * size, 2 * size), generator=gen)
            self.bank *= self.noise_sigma.view(-1, 1, 1)
        self._device_constants: dict = {}

    def __call__(self, images: torch.Tensor, geometry_generator: torch.Generator,
                 finish_generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        return self.apply(images, self.draw(n, height, width, geometry_generator, finish_generator))

    def draw(self, n: int, height: int, width: int, geometry_generator: torch.Generator,
             finish_generator: torch.Generator) -> ViewDraws:
        """Every random choice of one view of n crops of height x width, as the spec's probabilities say."""
        spec, c, g = self.spec, self.channels, geometry_generator
        draws = ViewDraws.none(n, c, height, width)
        if spec.jitter:
            on = torch.rand((n, 1), generator=g) < spec.jitter_p
            draws.gain = torch.where(on, uniform(spec.gain, (n, c), g, torch.float64).float(), 1.0)
            draws.contrast = torch.where(on, uniform(spec.contrast, (n, c), g, torch.float64).float(), 1.0)
        if spec.random_crop:
            draws.top, draws.left, draws.height, draws.width = crop_boxes(n, height, width, spec.crop_scale,
                                                                         spec.crop_ratio, g)
        if spec.dihedral:
            draws.transpose, draws.flip_x, draws.flip_y = torch.rand((3, n), generator=g) < 0.5
        if spec.blur:
            draws.blur_sigma = uniform(spec.blur_sigma, n, g, torch.float64) * (torch.rand(n, generator=g) < spec.blur_p)
        g = finish_generator
        if spec.gamma_in_batch:
            gamma = uniform(spec.gamma, (n, c), g)
            draws.gamma = torch.where(torch.rand((n, 1), generator=g) < spec.jitter_p, gamma, 1.0)
        if spec.noise:
            draws.noisy = torch.rand(n, generator=g) < spec.noise_p
            m = int(draws.noisy.sum())
            draws.noise_pick = torch.randint(0, BANK_ENTRIES, (m,), generator=g)
            draws.noise_offset = torch.randint(0, self.size + 1, (m, 2), generator=g)
        if spec.channel_drop_p > 0:
            draws.keep = torch.rand((n, c), generator=g) >= spec.channel_drop_p
            draws.keep[~draws.keep.any(dim=1)] = True  # never blank a whole view
        if spec.noise:  # drawn last, so that adding it left every other draw of a seeded run unchanged
            draws.noise_seed = int(torch.randint(0, 2**62, (), generator=g))
        return draws

    def apply(self, images: torch.Tensor, draws: ViewDraws) -> torch.Tensor:
        """The view of every crop under fixed `draws`: the steps in order."""
        views = self.geometry(images, draws)
        if self.spec.gamma_in_batch:
            self.gamma(views, draws)
        if self.spec.noise:
            self.noise(views, draws)
        if self.spec.channel_drop_p > 0:
            self.channel_drop(views, draws)
        return views

    def _on(self, device: torch.device, name: str) -> torch.Tensor:
        """A per-channel constant [1, C] of this recipe, cached on `device`."""
        key = (device, name)
        if key not in self._device_constants:
            self._device_constants[key] = getattr(self, name).to(device)
        return self._device_constants[key]

    def affine(self, draws: ViewDraws, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view and channel, `x * gain + bias` = the gain and contrast jitter on stored intensities x
        (and the normalisation unless gamma follows): `v = (x / ref * gain - m) * contrast + m`, then `v * scale + shift`. [n, C] each."""
        gain = self.inv_ref * draws.gain * draws.contrast
        bias = self.pivot * (1 - draws.contrast)
        if not self.spec.gamma_in_batch:
            gain, bias = gain * self.scale, bias * self.scale + self.shift
        return gain.to(device, non_blocking=True), bias.to(device, non_blocking=True)

    def geometry(self, images: torch.Tensor, draws: ViewDraws) -> torch.Tensor:
        """Crop + resize, symmetry and blur as two batched matrix products per batch, gain and contrast
        (and the normalisation unless gamma follows) as their scale and bias; a new tensor."""
        spec, size, device = self.spec, self.size, images.device
        n, channels, height, width = images.shape
        gain, bias = self.affine(draws, device)
        if not (spec.random_crop or spec.dihedral or spec.blur or size != height or size != width):
            return torch.addcmul(bias.view(n, channels, 1, 1), images, gain.view(n, channels, 1, 1))
        sigma = draws.blur_sigma if spec.blur else None
        # a view to transpose is (rows X cols^T)^T: its flip along x reverses the rows of `rows`
        rows = line_matrices(draws.top, draws.height, size, height,
                             torch.where(draws.transpose, draws.flip_x, draws.flip_y), sigma, device)
        cols = line_matrices(draws.left, draws.width, size, width,
                             torch.where(draws.transpose, draws.flip_y, draws.flip_x), sigma, device)
        resized_x = torch.bmm(images.reshape(n, channels * height, width), cols.mT)  # [n, C*H, S]
        rows = (rows[:, None] * gain[:, :, None, None]).view(n * channels, size, height)  # gain rides along
        views = torch.baddbmm(bias.reshape(n * channels, 1, 1), rows, resized_x.view(n * channels, height, size))
        views = views.view(n, channels, size, size)
        transposed = draws.transpose.nonzero().flatten()  # a CPU tensor: no device sync
        if len(transposed):
            transposed = transposed.to(device, non_blocking=True)
            views[transposed] = views[transposed].mT
        return views

    def gamma(self, views: torch.Tensor, draws: ViewDraws) -> None:
        """Gamma then normalisation in place: `max(v, 0) ** gamma * scale + shift` as `exp(gamma log v + log scale) + shift`
        (gamma 1 where not drawn: a few passes over the batch beat gathering the chosen samples)."""
        n, c, device = views.shape[0], views.shape[1], views.device
        gamma = draws.gamma.to(device, views.dtype, non_blocking=True).view(n, c, 1, 1)
        log_scale = self._on(device, "scale").log().view(1, c, 1, 1)
        shift = self._on(device, "shift").view(1, c, 1, 1)
        log_v = views.clamp_(min=1e-30).log_()
        torch.addcmul(log_scale, log_v, gamma, out=views).exp_().add_(shift)

    def noise(self, views: torch.Tensor, draws: ViewDraws) -> None:
        """In place: Gaussian noise of each channel's noise std on the views that drew it."""
        noisy = draws.noisy.nonzero().flatten()
        if not len(noisy):
            return
        if views.is_cuda:
            generator = torch.Generator(device=views.device).manual_seed(draws.noise_seed)
            sigma = self._on(views.device, "noise_sigma").view(1, -1, 1, 1)
            field = torch.randn((len(noisy), *views.shape[1:]), generator=generator, device=views.device)
            views[noisy.to(views.device)] += field * sigma
            return
        s = self.size
        for i, k, (dy, dx) in zip(noisy.tolist(), draws.noise_pick.tolist(), draws.noise_offset.tolist(), strict=True):
            views[i].add_(self.bank[k, :, dy : dy + s, dx : dx + s])

    def channel_drop(self, views: torch.Tensor, draws: ViewDraws) -> None:
        """In place: the channels not kept set to 0."""
        n, c = views.shape[:2]
        views.mul_(draws.keep.to(views.device, views.dtype, non_blocking=True).view(n, c, 1, 1))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (one per view and batch keeps resumed epochs identical)."""
    return torch.Generator().manual_seed(seed)
