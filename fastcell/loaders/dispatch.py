"""Count the torch ops a call dispatches, by where their tensors live: the host cost of a batched recipe.

Each op on a GPU tensor is a kernel launch of several us of Python, dispatch and launch whatever its
size, so the ops a recipe dispatches per batch, not its arithmetic, bound the host time it takes from
a training loop that shares the GIL (issue 12). On a machine without a GPU the recipe runs with its
images on the 'meta' device (shapes only, no compute, no value can be read back): its ops on meta
tensors are the kernels a GPU would launch. Used by `bench/recipe_overhead.py`, `bench/gpu_check.py`
and the loader tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")  # read a device value on the host


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched meanwhile: `device` (a tensor argument or output off the CPU, not a
    view: a kernel launch on a GPU), `views` (views of device tensors: dispatch only) and `host` (CPU
    tensors only); `syncs` lists the ops that read a device value back to the host (`.item()`, `nonzero`,
    device-to-CPU copies), each of which would stall the host until the GPU catches up."""

    def __init__(self):
        super().__init__()
        self.device: Counter = Counter()
        self.views: Counter = Counter()
        self.host: Counter = Counter()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not any(t.device.type != "cpu" for t in inputs + outputs):
            self.host[name] += 1
        else:
            (self.views if func.is_view else self.device)[name] += 1
        read_back = outputs and all(t.device.type == "cpu" for t in outputs)
        if any(t.device.type != "cpu" for t in inputs) and (name.startswith(SYNC_OPS) or read_back):
            self.syncs.append(name)
        return out

    def summary(self) -> dict:
        """Totals: device kernels, device views, host ops, and the ops that read back."""
        return {"device_kernels": sum(self.device.values()), "device_views": sum(self.views.values()),
                "host_ops": sum(self.host.values()), "syncs": list(self.syncs)}


def count_ops(run: Callable[[], object]) -> OpCounter:
    """The ops `run()` dispatches (see `OpCounter`)."""
    with OpCounter() as counter:
        run()
    return counter
