"""Steps 5-8 of a view (gamma, normalisation, noise, channel drop-out) on whole batches in torch,
and, for the DALI backend on the CPU, steps 1-4 too (`BatchViews`).

Both backends run these on the [B, C, S, S] batch of each view (DALI: after its iterator, on the
loader's device; torch reference: in the DataLoader worker). Why not per sample:
- gamma: `x ** gamma` per pixel costs ~20 ns an element in DALI's CPU arithmetic (libm `pow`),
  more than the rest of a view; batched `exp(gamma * log(x))` in torch is ~4x cheaper;
- noise: DALI's CPU `fn.noise.gaussian` more than halves a 2-core loader (design notes), and
  even `torch.randn` for 2 x B x C x S x S values costs as much as a view. On the CPU the noise
  is cut from a bank of pre-drawn white Gaussian noise fields at a random offset and entry per
  sample: every pixel of a view still gets N(0, 1) x std noise, independent across its pixels;
  two views share noise only if they draw the same entry and overlapping offsets, harmless for
  augmentation. On CUDA it is plain `torch.randn`.

- steps 1-4 (DALI on the CPU only): DALI's CPU `random_resized_crop` (~10 ns an output pixel),
  conditional transpose, flips and `gaussian_blur` took most of a 2-core loader. Crop + resize,
  the flips and the blur are all linear maps along the rows and along the columns of a plane,
  so `BatchViews` builds, per view, one [S, H] matrix for the rows and one [S, W] for the columns
  (torchvision's antialiased bilinear weights of the crop window, the flip as reversed rows,
  the mirrored-border Gaussian folded in) and makes every view of the batch with two batched
  matrix products, then transposes the views that draw the transpose. Gain, contrast (and
  normalisation when gamma is off) ride along as the scale and bias of the second product.
  DALI only reads, decodes and converts the stored crop to float32, once for both views.

All randomness comes from a `torch.Generator` seeded per (seed, epoch, rank, step).
"""

from __future__ import annotations

import math

import torch

from fastcell.loaders.spec import AugmentSpec, Intensity

BANK_ENTRIES = 16


class BatchSteps:
    """Apply steps 5-8 of `spec` in place to view batches that hold steps 1-4's output.

    With `spec.gamma_in_batch`, the input is the jittered intensity `v` (jitter units) and this
    applies the gamma and the output affine map; otherwise the input is already normalised.
    """

    def __init__(self, spec: AugmentSpec, intensity: Intensity, size: int, seed: int):
        self.spec = spec
        self.size = size
        channel = lambda a: torch.from_numpy(a).view(1, -1, 1, 1)  # noqa: E731
        self.scale, self.shift = channel(intensity.scale), channel(intensity.shift)
        self.noise_sigma = channel(intensity.noise_unit * spec.noise_std)
        self.bank = None  # noise fields, already times each channel's noise std
        if spec.noise:
            gen = torch.Generator().manual_seed(seed)
            self.bank = torch.randn((BANK_ENTRIES, intensity.channels, 2 * size, 2 * size), generator=gen)
            self.bank *= self.noise_sigma[0]

    @property
    def active(self) -> bool:
        return self.spec.gamma_in_batch or self.spec.noise or self.spec.channel_drop_p > 0

    def __call__(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.spec.gamma_in_batch:
            self._gamma_and_normalise(views, generator)
        if self.spec.noise:
            self._add_noise(views, generator)
        if self.spec.channel_drop_p > 0:
            self._drop_channels(views, generator)
        return views

    def _gamma_and_normalise(self, views: torch.Tensor, generator: torch.Generator) -> None:
        """`max(v, 0) ** gamma * scale + shift` as `exp(gamma log v + log scale) + shift`, in place.

        Samples without gamma use gamma = 1: four passes over the whole batch are cheaper than
        gathering and scattering the chosen ones.
        """
        n, c, device = views.shape[0], views.shape[1], views.device
        lo, hi = self.spec.gamma
        gamma = lo + (hi - lo) * torch.rand((n, c, 1, 1), generator=generator, device=device)
        chosen = torch.rand((n, 1, 1, 1), generator=generator, device=device) < self.spec.jitter_p
        gamma = torch.where(chosen, gamma, 1.0).to(views.dtype)
        log_scale, shift = self.scale.log().to(device, views.dtype), self.shift.to(device, views.dtype)
        log_v = views.clamp_(min=1e-30).log_()
        torch.addcmul(log_scale, log_v, gamma, out=views).exp_().add_(shift)

    def _add_noise(self, views: torch.Tensor, generator: torch.Generator) -> None:
        n, device = views.shape[0], views.device
        noisy = (torch.rand(n, generator=generator, device=device) < self.spec.noise_p).nonzero().flatten()
        sigma = self.noise_sigma.to(device=device, dtype=views.dtype)
        if views.is_cuda:
            noise = torch.randn((len(noisy), *views.shape[1:]), generator=generator, device=device, dtype=views.dtype)
            views[noisy] += noise * sigma
            return
        picks = torch.randint(0, BANK_ENTRIES, (len(noisy),), generator=generator).tolist()
        offsets = torch.randint(0, self.size + 1, (len(noisy), 2), generator=generator).tolist()
        s = self.size
        for i, k, (dy, dx) in zip(noisy.tolist(), picks, offsets, strict=True):
            views[i].add_(self.bank[k, :, dy : dy + s, dx : dx + s])

    def _drop_channels(self, views: torch.Tensor, generator: torch.Generator) -> None:
        n, c = views.shape[:2]
        keep = torch.rand((n, c), generator=generator, device=views.device) >= self.spec.channel_drop_p
        keep[~keep.any(dim=1)] = True  # never blank a whole view
        views.mul_(keep.view(n, c, 1, 1).to(views.dtype))


def uniform(value_range, shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws in [low, high) of `value_range` (both loaders draw their augmentation factors with it)."""
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
                  sigma: torch.Tensor | None) -> torch.Tensor:
    """[n, out_size, in_size] float32: per line of `in_size` pixels, the window [start, start + length)
    resized to `out_size` with torchvision's antialiased bilinear weights (`interpolate(...,
    antialias=True)`: a triangle filter as wide as the scale when shrinking), reversed where `flip`,
    then Gaussian-blurred with `sigma` (None or 0: no blur; window 2 ceil(3 sigma) + 1, borders
    mirrored without repeating the edge pixel, as DALI and scipy's "mirror").

    Built sparse (a few taps per output pixel) and scattered into the dense matrix."""
    n = len(start)
    scale = length.double() / out_size
    support = scale.clamp(min=1.0)
    taps = math.ceil(2 * float(support.max())) + 1
    center = scale[:, None] * (torch.arange(out_size, dtype=torch.float64) + 0.5)
    first = torch.floor(center - support[:, None] + 0.5).clamp(min=0)
    pixel = first[:, :, None] + torch.arange(taps, dtype=torch.float64)  # in the window [n, out, taps]
    weight = (1 - (pixel + 0.5 - center[:, :, None]).abs() / support[:, None, None]).clamp(min=0)
    weight = weight * (pixel < length[:, None, None])
    weight = (weight / weight.sum(-1, keepdim=True)).float()
    column = (start[:, None, None] + pixel.long()).clamp(max=in_size - 1)
    flip = flip.view(n, 1, 1)
    weight, column = torch.where(flip, weight.flip(1), weight), torch.where(flip, column.flip(1), column)
    if sigma is not None and bool((sigma > 0).any()):
        radius = torch.ceil(3 * sigma)
        offsets = torch.arange(-int(radius.max()), int(radius.max()) + 1)
        kernel = torch.exp(-(offsets**2) / (2 * sigma[:, None] ** 2).clamp(min=1e-12)) * (offsets.abs() <= radius[:, None])
        kernel = (kernel / kernel.sum(1, keepdim=True)).float()  # sigma 0: [0, ..., 1, ..., 0]
        period = 2 * (out_size - 1)
        source = (torch.arange(out_size)[:, None] + offsets).remainder(max(period, 1))
        source = torch.where(source >= out_size, period - source, source)  # mirrored [out, kernel]
        taps_of = lambda t: t.index_select(1, source.flatten()).view(n, out_size, -1, taps)  # noqa: E731
        weight = (kernel[:, None, :, None] * taps_of(weight)).flatten(2)
        column = taps_of(column).flatten(2)
    return torch.zeros((n, out_size, in_size)).scatter_add_(2, column, weight)


class BatchViews:
    """Steps 1-4 of `spec` (and 6 unless gamma follows) for a whole batch on the CPU, in torch.

    Input: the batch's stored crops as float32 [B, C, H, W]; each call draws one view of every
    crop from `generator`: [B, C, S, S] in jitter units (or normalised, see `BatchSteps`), the
    input of `BatchSteps`. See the module docstring for how.
    """

    def __init__(self, spec: AugmentSpec, intensity: Intensity, size: int):
        self.spec, self.size = spec, size
        row = lambda a: torch.from_numpy(a).view(1, -1)  # noqa: E731
        self.inv_ref, self.pivot = 1.0 / row(intensity.ref), row(intensity.jitter_mean)
        self.scale, self.shift = row(intensity.scale), row(intensity.shift)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spec, size = self.spec, self.size
        n, channels, height, width = images.shape
        gain, bias = self._affine(n, generator)
        if not (spec.random_crop or spec.dihedral or spec.blur or size != height or size != width):
            return torch.addcmul(bias.view(n, channels, 1, 1), images, gain.view(n, channels, 1, 1))
        if spec.random_crop:
            top, left, h, w = crop_boxes(n, height, width, spec.crop_scale, spec.crop_ratio, generator)
        else:
            top, left = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
            h, w = torch.full((n,), height), torch.full((n,), width)
        transpose = flip_x = flip_y = torch.zeros(n, dtype=torch.bool)
        if spec.dihedral:  # as `torch_view`: transpose, then flip x, then flip y
            transpose, flip_x, flip_y = torch.rand((3, n), generator=generator) < 0.5
        sigma = None
        if spec.blur:
            sigma = uniform(spec.blur_sigma, n, generator, torch.float64) * (torch.rand(n, generator=generator) < spec.blur_p)
        # a view to transpose is (rows X cols^T)^T: its flip along x reverses the rows of `rows`
        rows = line_matrices(top, h, size, height, torch.where(transpose, flip_x, flip_y), sigma)
        cols = line_matrices(left, w, size, width, torch.where(transpose, flip_y, flip_x), sigma)
        resized_x = torch.bmm(images.reshape(n, channels * height, width), cols.mT)  # [n, C*H, S]
        rows = (rows[:, None] * gain[:, :, None, None]).view(n * channels, size, height)  # gain rides along
        views = torch.baddbmm(bias.view(n * channels, 1, 1), rows, resized_x.view(n * channels, height, size))
        views = views.view(n, channels, size, size)
        transposed = transpose.nonzero().flatten()
        if len(transposed):
            views[transposed] = views[transposed].mT
        return views

    def _affine(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view and channel, `x * gain + bias` = step 4 on stored intensities x (and 6 unless gamma follows)."""
        spec = self.spec
        gain, bias = self.inv_ref.expand(n, -1), torch.zeros_like(self.pivot).expand(n, -1)
        if spec.jitter:
            on = (torch.rand((n, 1), generator=generator) < spec.jitter_p)
            shape = (n, self.inv_ref.shape[1])
            factor = torch.where(on, uniform(spec.gain, shape, generator, torch.float64).float(), 1.0)
            contrast = torch.where(on, uniform(spec.contrast, shape, generator, torch.float64).float(), 1.0)
            gain, bias = gain * factor * contrast, self.pivot * (1 - contrast)
        if not spec.gamma_in_batch:
            gain, bias = gain * self.scale, bias * self.scale + self.shift
        return gain.contiguous(), bias.contiguous()

def batch_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed` (one per batch keeps resumed epochs identical)."""
    return torch.Generator(device=device).manual_seed(seed)
