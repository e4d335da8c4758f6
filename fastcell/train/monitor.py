"""An optional kNN monitor: representation quality on held-out cells while training runs.

Every `knn_every` steps the encoder embeds a fixed sample of the validation split (the first
`MAX_CELLS` annotated cells in shard order; shards are interleaved across the screen) and
scores cell-level 1-nearest-neighbour MoA accuracy by cosine similarity, taking neighbours
only from other compounds (as NSC does at treatment level), so the score rewards
mechanism, not compound identity. Control cells (DMSO) and cells without a MoA are left out.
It is a trend line, not the benchmark: `fastcell eval` computes NSC / NSCB on treatment profiles.
"""

from __future__ import annotations

import numpy as np
import torch

from fastcell.errors import InputError

MAX_CELLS = 2000
CONTROL_MOAS = {"", "DMSO"}


def knn_accuracy(features: torch.Tensor, moa: np.ndarray, compound: np.ndarray) -> float:
    """Share of cells whose most cosine-similar cell of another compound has the same MoA."""
    z = torch.nn.functional.normalize(features.float(), dim=1)
    sim = z @ z.T
    same_compound = torch.as_tensor(compound[:, None] == compound[None, :])
    sim = sim.masked_fill(same_compound, float("-inf"))
    nearest = sim.argmax(dim=1).numpy()
    has_other = ~same_compound.all(dim=1).numpy()
    return float((moa[nearest] == moa)[has_other].mean()) if has_other.any() else float("nan")


class KnnMonitor:
    """Holds the held-out images (float16, CPU) and their labels; `evaluate(encoder)` scores."""

    def __init__(self, images: torch.Tensor, moa: np.ndarray, compound: np.ndarray, device: torch.device,
                 batch_size: int = 256):
        self.images, self.moa, self.compound = images, moa, compound
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def evaluate(self, encoder: torch.nn.Module, autocast_dtype: torch.dtype | None) -> float:
        encoder.eval()
        features = []
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start : start + self.batch_size].to(self.device, torch.float32)
            with torch.autocast(self.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                features.append(encoder(x).float().cpu())
        return knn_accuracy(torch.cat(features), self.moa, self.compound)


def knn_monitor(config, env) -> KnnMonitor:
    """The monitor over the val split of config.shards (InputError when it has no annotated val cells)."""
    import pandas as pd

    from fastcell.format.folder import read_manifest
    from fastcell.loaders import create_eval_loader

    manifest = read_manifest(config.shards)
    if "val" not in manifest.splits:
        raise InputError(f"{config.shards}: the kNN monitor needs a val split; shard with one or set knn_every 0")
    cells = pd.read_parquet(manifest.cells_table, columns=["id", "split", "compound", "moa"])
    cells = cells[(cells["split"] == "val") & ~cells["moa"].fillna("").isin(CONTROL_MOAS)].set_index("id")
    if cells["moa"].nunique() < 2:
        raise InputError(f"{manifest.cells_table}: fewer than 2 MoAs among the val cells; the kNN monitor needs labels")
    loader = create_eval_loader(config.shards, 256, backend=config.loader, device="cpu", split="val",
                                crop=config.view_size, num_workers=config.num_workers)  # the views' side
    images, ids = [], []
    for batch, batch_ids in loader:
        keep = np.isin(batch_ids.cpu().numpy(), cells.index.to_numpy())
        images.append(batch[torch.from_numpy(keep)].to(torch.float16))
        ids.append(batch_ids.cpu().numpy()[keep])
        if sum(len(i) for i in ids) >= MAX_CELLS:
            break
    ids_all = np.concatenate(ids)[:MAX_CELLS]
    labels = cells.loc[ids_all]
    return KnnMonitor(torch.cat(images)[:MAX_CELLS], labels["moa"].to_numpy(), labels["compound"].to_numpy(),
                      env.device)
