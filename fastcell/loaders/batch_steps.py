"""Steps 5-8 of a view (gamma, normalisation, noise, channel drop-out) on whole batches in torch,
and the DALI CPU backend's Gaussian blur (step 3, `gaussian_blur`).

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

- blur (DALI on the CPU only): `fn.gaussian_blur` took a third of a 2-core DALI loader's time;
  DALI draws each view's sigma (0: no blur) and `gaussian_blur` applies all of a batch's
  kernels at once as two grouped 1-D convolutions. Blur commutes with the per-channel affine
  maps DALI applies after it (gain, contrast, normalisation), so running it after them, before
  gamma, gives the same view.

All randomness comes from a `torch.Generator` seeded per (seed, epoch, rank, step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        self.bank = None
        if spec.noise:
            gen = torch.Generator().manual_seed(seed)
            self.bank = torch.randn((BANK_ENTRIES, intensity.channels, 2 * size, 2 * size), generator=gen)

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
        views.clamp_(min=1e-30).log_().mul_(gamma).add_(log_scale).exp_().add_(shift)

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
            views[i].add_(self.bank[k, :, dy : dy + s, dx : dx + s].to(views.dtype) * sigma[0])

    def _drop_channels(self, views: torch.Tensor, generator: torch.Generator) -> None:
        n, c = views.shape[:2]
        keep = torch.rand((n, c), generator=generator, device=views.device) >= self.spec.channel_drop_p
        keep[~keep.any(dim=1)] = True  # never blank a whole view
        views.mul_(keep.view(n, c, 1, 1).to(views.dtype))


def gaussian_blur(views: torch.Tensor, sigma: torch.Tensor) -> None:
    """Blur each view of a [B, C, S, S] batch in place with its own sigma ([B]; 0 leaves it as is).

    The kernel of a view spans 2 * ceil(3 sigma) + 1 pixels (DALI's default window) and borders
    mirror without repeating the edge pixel (DALI's and scipy's "mirror"), so a view equals
    DALI's `fn.gaussian_blur` of it.
    """
    chosen = (sigma > 0).nonzero().flatten()
    if len(chosen) == 0:
        return
    s = sigma[chosen].to(views.device, torch.float32)
    radius = torch.ceil(3 * s)
    r_max = int(radius.max())
    taps = torch.arange(-r_max, r_max + 1, device=views.device, dtype=torch.float32)
    kernels = torch.exp(-(taps**2) / (2 * s[:, None] ** 2)) * (taps.abs() <= radius[:, None])
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(views.dtype)
    n, c, h, w = len(chosen), *views.shape[1:]
    kernels = kernels.repeat_interleave(c, 0)  # one kernel per (view, channel) plane
    planes = views[chosen].reshape(1, n * c, h, w)
    planes = F.conv2d(F.pad(planes, (r_max, r_max, 0, 0), mode="reflect"), kernels.view(n * c, 1, 1, -1), groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, r_max, r_max), mode="reflect"), kernels.view(n * c, 1, -1, 1), groups=n * c)
    views[chosen] = planes.view(n, c, h, w)


def batch_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed` (one per batch keeps resumed epochs identical)."""
    return torch.Generator(device=device).manual_seed(seed)
