"""The SimCLR view recipe of `AugmentSpec` on whole batches in torch: one implementation for the CPU
and the GPU.

`ViewRecipe` makes the views of every crop of a batch [B, C, H, W] (stored intensities, float32, on
the loader's device) in named steps; to add an augmentation, add a field to `AugmentSpec`, its
random choice to `ViewDraws` / `ViewRecipe.draw` (a column of `DRAW_COLUMNS`) and a step to
`ViewRecipe.apply`:

- `draw`: every random choice of both views (crop window, symmetry, blur sigma, gain, contrast, gamma,
  noise coin and field, kept channels) from ONE uniform table [views x B, columns] drawn on the CPU
  from the batch's generator and scaled to the spec's ranges in one op, so the GPU never waits for the
  host and a CPU and a GPU run with the same seeds make the same views. Every column is drawn whatever
  the spec switches off, so switching a step off leaves the other draws of a seed unchanged.
  `ViewDraws` can also be built by hand to fix every choice (tests).
- `upload`: the draws as per-line resampling parameters and per-(view, channel) coefficients, packed
  into one CPU buffer and copied to the device at once (pinned, asynchronous on CUDA). Channel
  drop-out (step 8) is folded into the coefficients here: a dropped channel gets gain, bias, noise
  and shift 0 (and `log 0 = -inf` before the gamma's exp), so it costs no pass of its own.
- `geometry` (crop, symmetry, blur, gain and contrast; normalisation too unless gamma follows): crop +
  resize, the flips and the blur are linear maps along the rows and along the columns of a plane, so
  each view's are folded into one [S, H] matrix for the rows and one [S, W] for the columns
  (torchvision's antialiased bilinear weights of the crop window, the flip as reversed output
  positions, the mirrored-border Gaussian folded in; all lines of both views and both axes built by
  one batched `line_matrices` on a GPU, in cache-sized chunks of `CPU_LINES` on the CPU), and every
  view of the batch is a batched matrix product per view (the crops are shared) and one for both
  views; the transpose of the 90-degree rotations is an indexed `mT` of the views that draw it
  (indices found on the CPU). Gain and contrast (and the normalisation when gamma is off) ride
  along as the scale and bias of the second product.
- `gamma` (then the normalisation): `exp(gamma log v + log scale) + shift`, batched (gamma 1 where not drawn).
- `noise`: fields cut from a bank of pre-drawn white Gaussian noise (times each channel's noise std)
  at a random entry and offset per view, added with a coefficient 0 where the coin said no (every
  pixel of a noisy view gets independent N(0, std^2) noise; two views share noise only if they draw
  the same entry and overlapping offsets, harmless for augmentation). One gather, one multiply-add.
- `channel_drop`: whole channels set to 0, never all of a view (folded into `upload`'s coefficients).

Host cost (issue 12): at 60,000 two-view samples/s a GPU batch of 512 has 8.5 ms, and each torch op
on a GPU tensor is a kernel launch of several us of host time whatever its size, so the recipe issues
a fixed number of ops per batch (no per-sample Python, no op count that grows with the batch), makes
both views in one call, and reads nothing back from the device (no `.item()`, `nonzero` or Python
branch on device values): `bench/recipe_overhead.py` counts and times it.

Why batched and not per sample: DALI's per-sample operators cost several times the whole read +
decode path (launch and parameter costs amortised only over large images, which single-cell crops
are not); a batch of 512 small crops is one small tensor. The per-sample reference used
to test this recipe is `torch_ref.torch_view` (torchvision functional ops, one crop at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import NamedTuple

import torch

from fastcell.loaders.spec import AugmentSpec, Intensity

BANK_ENTRIES = 16  # pre-drawn noise fields
CPU_LINES = 128  # lines per `line_matrices` call on the CPU: its temporaries stay in cache (2x faster than 512)
CROP_TRIES = 10  # torchvision's random tries of a crop box before its fallback


def draw_columns(channels: int) -> dict[str, slice]:
    """The columns of `ViewRecipe.draw`'s uniform table per view and crop, in order (C = channels)."""
    widths = {"jitter": 1, "gain": channels, "contrast": channels, "area": CROP_TRIES, "log_aspect": CROP_TRIES,
              "position": 2, "dihedral": 3, "blur": 1, "sigma": 1, "gamma_coin": 1, "gamma": channels, "noise": 1,
              "noise_pick": 1, "noise_offset": 2, "drop": channels}
    columns, start = {}, 0
    for name, width in widths.items():
        columns[name] = slice(start, start + width)
        start += width
    return columns


@dataclass
class ViewDraws:
    """Every random choice of n views (CPU tensors; 1 / False / 0 where a step is off). Views of one call
    are view-major: views 0..B-1 are the first view of crops 0..B-1, B..2B-1 the second, and so on."""

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
    noise_pick: torch.Tensor  # int64 [n]: bank entry of the noise field
    noise_offset: torch.Tensor  # int64 [n, 2]: offset (y, x) of the field in the bank entry
    keep: torch.Tensor  # bool [n, C] (8)

    @classmethod
    def none(cls, n: int, channels: int, height: int, width: int) -> ViewDraws:
        """Draws that change nothing: the whole crop, no symmetry, blur, jitter, noise or drop-out."""
        zeros, no = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        ones = torch.ones((n, channels))
        return cls(zeros, zeros, torch.full((n,), height), torch.full((n,), width), no, no, no,
                   torch.zeros(n, dtype=torch.float64), ones, ones, ones, no, zeros, torch.zeros((n, 2), dtype=torch.long),
                   torch.ones((n, channels), dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.top)

    def part(self, index: int, n: int) -> ViewDraws:
        """The draws of views index * n .. (index + 1) * n - 1 (e.g. the second view of a batch of n)."""
        return ViewDraws(**{f.name: getattr(self, f.name)[index * n:(index + 1) * n] for f in fields(self)})


def uniform(value_range, shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws in [low, high) of `value_range` (the torch reference draws its augmentation factors with it)."""
    lo, hi = value_range
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def fallback_crop(height: int, width: int, ratio) -> tuple[int, int]:
    """(h, w) of torchvision's fallback when 10 random tries miss: the whole image at the closest allowed ratio."""
    if width / height < ratio[0]:
        return round(width / ratio[0]), width
    if width / height > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def crop_boxes(area: torch.Tensor, log_aspect: torch.Tensor, position: torch.Tensor, height: int, width: int, ratio):
    """(top, left, h, w), int64 [n] each: n random resized crop windows by torchvision's rule from their draws
    (float64): `area` [n, 10] fractions and `log_aspect` [n, 10] log aspect ratios of 10 tries (the first that
    fits wins, else the centre crop at the closest ratio), `position` [n, 2] uniforms in [0, 1) placing it."""
    target = (height * width) * area
    aspect = torch.exp(log_aspect)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)
    h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(1)
    fallback_h, fallback_w = fallback_crop(height, width, ratio)
    h, w = torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)
    top = torch.where(found, (position[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (position[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    return top, left, h, w


@lru_cache(maxsize=32)
def _line_constants(device: torch.device, out_size: int, taps: int, radius: int):
    """Constant index tensors of `line_matrices` per (device, sizes): output positions, their reversal,
    tap offsets, blur offsets' distances and minus their squares, the mirrored source row of each output
    row and blur tap."""
    out = torch.arange(out_size, dtype=torch.float64)
    offsets = torch.arange(-radius, radius + 1)
    period = 2 * (out_size - 1)
    source = (torch.arange(out_size)[:, None] + offsets).remainder(max(period, 1))
    source = torch.where(source >= out_size, period - source, source).flatten()  # mirrored [out * kernel]
    found = (out + 0.5, out_size - 1 - 2 * out, torch.arange(taps, dtype=torch.float64), offsets.abs().double(),
             -offsets.double() ** 2, source)
    return tuple(t.to(device) for t in found)


def line_matrices(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, flip: torch.Tensor,
                  sigma: torch.Tensor | None = None, max_sigma: float | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """[n, out_size, in_size] float32 on the inputs' device: per line of `in_size` pixels, the window [start,
    start + length) resized to `out_size` with torchvision's antialiased bilinear weights (`interpolate(...,
    antialias=True)`: a triangle filter as wide as the scale when shrinking), reversed where `flip`,
    then Gaussian-blurred with `sigma` (None or 0: no blur; window 2 ceil(3 sigma) + 1, borders
    mirrored without repeating the edge pixel, as DALI and scipy's "mirror").

    The inputs are [n] tensors on one device (numbers: lengths up to in_size, sigmas up to `max_sigma`).
    The matrix is built sparse (a few taps per output pixel) and scattered dense; the tap and blur
    windows are sized from `in_size` and `max_sigma`, not from the values, so nothing is read back
    from the device and the shapes of a batch size never change. `out`: a zeroed tensor to add into."""
    n, device = len(start), start.device
    taps = math.ceil(2 * max(1.0, in_size / out_size)) + 1
    radius = math.ceil(3 * max_sigma) if sigma is not None else 0
    half, reverse, tap, distance, minus_square, source = _line_constants(device, out_size, taps, radius)
    start, length, flip = start.double(), length.double(), flip.double()
    scale = length / out_size
    support = scale.clamp(min=1.0)[:, None]
    center = scale[:, None] * torch.addcmul(half, flip[:, None], reverse)  # flipped: output o sits at out - 1 - o
    first = torch.floor(center - (support - 0.5)).clamp_(min=0)
    pixel = first[:, :, None] + tap  # in the window [n, out, taps]
    weight = (1 - (pixel - (center - 0.5)[:, :, None]).abs_() / support[:, :, None]).clamp_(min=0)
    weight *= pixel < length[:, None, None]
    weight = (weight / weight.sum(-1, keepdim=True)).float()
    column = (pixel + start[:, None, None]).clamp_(max=in_size - 1).long()
    if radius > 0:
        sigma = sigma.double()[:, None]
        within = distance <= torch.ceil(3 * sigma)
        kernel = torch.exp(minus_square / (2 * sigma**2).clamp_(min=1e-12)) * within
        kernel = (kernel / kernel.sum(1, keepdim=True)).float()  # sigma 0: [0, ..., 1, ..., 0]
        taps_of = lambda t: t.index_select(1, source).view(n, out_size, -1, taps)  # noqa: E731
        weight = (kernel[:, None, :, None] * taps_of(weight)).flatten(2)
        column = taps_of(column).flatten(2)
    out = torch.zeros((n, out_size, in_size), device=device) if out is None else out
    return out.scatter_add_(2, column, weight)


class OnDevice(NamedTuple):
    """`ViewDraws` of n views as `ViewRecipe.upload` puts them on the device: line parameters [2n] (the
    rows' lines, then the columns'), the indices of the views to transpose and of those to add noise to
    (with their noise fields), and per-(view, channel) coefficients [n, C]."""

    start: torch.Tensor
    length: torch.Tensor
    flip: torch.Tensor
    sigma: torch.Tensor
    transposed: torch.Tensor  # int64: the views to transpose
    noisy: torch.Tensor  # int64: the views to add noise to, and their bank entries and offsets
    pick: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    gain: torch.Tensor  # of the geometry's second product (keep folded in unless gamma follows)
    bias: torch.Tensor
    gamma: torch.Tensor
    log_scale: torch.Tensor  # log(scale * keep) of the gamma step
    shift: torch.Tensor  # shift * keep of the gamma step
    keep: torch.Tensor  # 1 / 0: kept / dropped channels


LINE_ROWS, COEFFICIENTS = 8, 6  # the packed upload: [8, n] lines | [6, n, C] coefficients | indices


class ViewRecipe:
    """The views of every crop of a batch, as `spec` says (see the module docstring for the steps).

    `recipe.apply(images, recipe.draw(B, H, W, generator, views=2))`: images are stored intensities [B, C,
    H, W] float32 on any device; returns float32 views [2B, C, S, S] on that device (view-major: the first
    view of every crop, then the second). `draws.part(v, B)` makes view v alone.
    """

    def __init__(self, spec: AugmentSpec, intensity: Intensity, size: int, noise_seed: int = 0):
        self.spec, self.size = spec, size
        self.channels = c = intensity.channels
        row = lambda a: torch.from_numpy(a).view(1, -1)  # noqa: E731
        self.inv_ref, self.pivot = 1.0 / row(intensity.ref), row(intensity.jitter_mean)
        self.scale, self.shift = row(intensity.scale), row(intensity.shift)
        self.columns = draw_columns(c)
        low = torch.zeros(self.columns["drop"].stop, dtype=torch.float64)
        span = torch.ones_like(low)
        ranges = {"gain": spec.gain, "contrast": spec.contrast, "area": spec.crop_scale, "sigma": spec.blur_sigma,
                  "log_aspect": tuple(math.log(r) for r in spec.crop_ratio), "gamma": spec.gamma,
                  "noise_pick": (0, BANK_ENTRIES), "noise_offset": (0, size + 1)}
        for name, (lo, hi) in ranges.items():
            low[self.columns[name]], span[self.columns[name]] = lo, hi - lo
        self.low, self.span = low, span  # each column of the uniform table scaled to its range (coins stay in [0, 1))
        self.bank = None  # noise fields, already times each channel's noise std
        if spec.noise:
            gen = torch.Generator().manual_seed(noise_seed)
            self.bank = torch.randn((BANK_ENTRIES, c, 2 * size, 2 * size), generator=gen)
            self.bank *= torch.from_numpy(intensity.noise_unit * spec.noise_std).view(-1, 1, 1)
        self._device_constants: dict = {}

    def draw(self, n: int, height: int, width: int, generator: torch.Generator, views: int = 1) -> ViewDraws:
        """Every random choice of `views` views of n crops of height x width (view-major), as the spec's
        probabilities say: one uniform table, scaled to the ranges in one op, read off by column."""
        spec, c, col = self.spec, self.channels, self.columns
        t = views * n
        u = torch.addcmul(self.low, torch.rand((t, len(self.low)), generator=generator, dtype=torch.float64), self.span)
        draws = ViewDraws.none(t, c, height, width)
        if spec.jitter:
            on = u[:, col["jitter"]] < spec.jitter_p
            draws.gain = torch.where(on, u[:, col["gain"]], 1.0).float()
            draws.contrast = torch.where(on, u[:, col["contrast"]], 1.0).float()
        if spec.random_crop:
            draws.top, draws.left, draws.height, draws.width = crop_boxes(
                u[:, col["area"]], u[:, col["log_aspect"]], u[:, col["position"]], height, width, spec.crop_ratio)
        if spec.dihedral:
            draws.transpose, draws.flip_x, draws.flip_y = (u[:, col["dihedral"]] < 0.5).T
        if spec.blur:
            draws.blur_sigma = u[:, col["sigma"].start] * (u[:, col["blur"].start] < spec.blur_p)
        if spec.gamma_in_batch:
            draws.gamma = torch.where(u[:, col["gamma_coin"]] < spec.jitter_p, u[:, col["gamma"]], 1.0).float()
        if spec.noise:
            draws.noisy = u[:, col["noise"].start] < spec.noise_p
            draws.noise_pick = u[:, col["noise_pick"].start].long()
            draws.noise_offset = u[:, col["noise_offset"]].long()
        if spec.channel_drop_p > 0:
            keep = u[:, col["drop"]] >= spec.channel_drop_p
            draws.keep = keep | ~keep.any(1, keepdim=True)  # never blank a whole view
        return draws

    def apply(self, images: torch.Tensor, draws: ViewDraws) -> torch.Tensor:
        """The views of the crops under fixed `draws` (a whole number of views per crop): the steps in order."""
        if not images.shape[0] or len(draws) % images.shape[0]:
            raise ValueError(f"{len(draws)} views' draws for {images.shape[0]} crops: a whole number of views per crop")
        on = self.upload(draws, images.device)
        views = self.geometry(images, on)
        if self.spec.gamma_in_batch:
            self.gamma(views, on)
        if self.spec.noise:
            self.noise(views, on)
        return views

    def upload(self, draws: ViewDraws, device: torch.device) -> OnDevice:
        """The draws as line parameters and coefficients on `device`: computed on the CPU, packed into one
        float64 buffer, copied over at once (pinned and asynchronous on CUDA), unpacked by views and 2 casts.

        Coefficients per view and channel: the gain and contrast jitter on stored intensities x as
        `x * gain + bias`, `v = (x / ref * gain - m) * contrast + m`, then (unless gamma follows) `v * scale +
        shift`; channel drop-out as a factor `keep` on everything after the geometry's products."""
        n, c = len(draws), self.channels
        keep = draws.keep.float()
        gain = self.inv_ref * draws.gain * draws.contrast
        bias = self.pivot * (1 - draws.contrast)
        if self.spec.gamma_in_batch:
            log_scale, shift = torch.log(self.scale * keep), self.shift * keep
        else:
            gain, bias = gain * (self.scale * keep), (bias * self.scale + self.shift) * keep
            log_scale = shift = keep  # unused without gamma; packed for a fixed layout
        # a view to transpose is (rows X cols^T)^T: its flip along x reverses the rows of `rows`
        row_flip, col_flip = torch.where(draws.transpose, draws.flip_x, draws.flip_y), \
            torch.where(draws.transpose, draws.flip_y, draws.flip_x)
        lines = torch.stack([draws.top, draws.left, draws.height, draws.width, row_flip, col_flip,
                             draws.blur_sigma, draws.blur_sigma])
        coefficients = torch.stack([gain, bias, draws.gamma, log_scale, shift, keep])
        # the views to transpose or make noisy, found here on the CPU (a device never reads them back)
        transposed, noisy = draws.transpose.nonzero()[:, 0], draws.noisy.nonzero()[:, 0]
        indices = [transposed, noisy, draws.noise_pick[noisy], *draws.noise_offset[noisy].T]
        packed = torch.cat([lines.flatten(), coefficients.flatten(), *indices])  # float64
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        else:
            packed = packed.to(device)
        lines = packed[: LINE_ROWS * n].view(LINE_ROWS // 2, 2 * n)
        coefficients = packed[LINE_ROWS * n: (LINE_ROWS + COEFFICIENTS * c) * n].view(COEFFICIENTS, n, c).float()
        indices = packed[(LINE_ROWS + COEFFICIENTS * c) * n:].long().split([len(i) for i in indices])
        return OnDevice(*lines, *indices, *coefficients)

    def _bank_windows(self, device: torch.device) -> torch.Tensor:
        """Every S x S window of the noise bank on `device`, [entries, C, S + 1, S + 1, S, S] (a view, cached)."""
        if device not in self._device_constants:
            self._device_constants[device] = self.bank.to(device).unfold(2, self.size, 1).unfold(3, self.size, 1)
        return self._device_constants[device]

    def geometry(self, images: torch.Tensor, on: OnDevice) -> torch.Tensor:
        """Crop + resize, symmetry and blur as batched matrix products, gain and contrast (and the normalisation
        unless gamma follows) as their scale and bias; a new tensor [views x B, C, S, S]."""
        spec, size = self.spec, self.size
        n, channels, height, width = images.shape
        t = len(on.gain)
        views = t // n
        if not (spec.random_crop or spec.dihedral or spec.blur or size != height or size != width):
            shape = (views, n, channels, 1, 1)
            return torch.addcmul(on.bias.view(shape), images, on.gain.view(shape)).view(t, channels, size, size)
        lines = torch.zeros((2 * t, size, max(height, width)), device=images.device)
        chunk = CPU_LINES if images.device.type == "cpu" else 2 * t
        for i in range(0, 2 * t, chunk):
            part = slice(i, i + chunk)
            line_matrices(on.start[part], on.length[part], size, max(height, width), on.flip[part],
                          on.sigma[part] if spec.blur else None, spec.blur_sigma[1], out=lines[part])
        rows, cols = lines[:t, :, :height], lines[t:, :, :width]
        resized = images.new_empty((views, n, channels * height, size))
        flat = images.reshape(n, channels * height, width)
        for v in range(views):  # the crops are shared: one product per view, no copy of them
            torch.bmm(flat, cols[v * n:(v + 1) * n].mT, out=resized[v])
        rows = (rows[:, None] * on.gain[:, :, None, None]).view(t * channels, size, height)  # gain rides along
        out = torch.baddbmm(on.bias.view(t * channels, 1, 1), rows, resized.view(t * channels, height, size))
        out = out.view(t, channels, size, size)
        if spec.dihedral:
            out[on.transposed] = out[on.transposed].mT
        return out

    def gamma(self, views: torch.Tensor, on: OnDevice) -> None:
        """Gamma then normalisation in place: `max(v, 0) ** gamma * scale + shift` as `exp(gamma log v + log scale) + shift`
        (gamma 1 where not drawn: a few passes over the batch beat gathering the chosen samples)."""
        shape = (len(views), self.channels, 1, 1)
        log_v = views.clamp_(min=1e-30).log_()
        torch.addcmul(on.log_scale.view(shape), log_v, on.gamma.view(shape), out=views).exp_().add_(on.shift.view(shape))

    def noise(self, views: torch.Tensor, on: OnDevice) -> None:
        """In place: to each view whose coin said so its field of the noise bank (0 on dropped channels)."""
        field = self._bank_windows(views.device)[on.pick, :, on.dy, on.dx]
        if self.spec.channel_drop_p > 0:
            field *= on.keep[on.noisy][:, :, None, None]
        views.index_add_(0, on.noisy, field)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (one per batch keeps resumed epochs identical)."""
    return torch.Generator().manual_seed(seed)
