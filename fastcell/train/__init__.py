"""fastcell.train: SimCLR training (`fastcell train`).

    config.py      TrainConfig: every setting; config files; what a resume may change
    encoders.py    the architectures (and their feature widths) and stems to choose from
    model.py       ResNet encoder for C-channel crops (standard / small stem) + projection head
    loss.py        NT-Xent with negatives gathered from every DDP rank
    optim.py       LARS / AdamW, parameter groups, linear scaling, warm-up + cosine
    checkpoint.py  atomic checkpoints, exact resume, load_for_inference
    trainer.py     the loop: train(config) (mixed precision, DDP via torchrun, metrics)
    monitor.py     optional kNN MoA monitor on held-out cells
    throughput.py  samples/s and MFU of the training step (benchmark, GPU check)
    synthetic.py   a synthetic loader with the training loader's contract

Attributes are imported on first use, so `import fastcell.train` stays light (no torch).
"""

from importlib import import_module

_EXPORTS = {"TrainConfig": "config", "train": "trainer"}  # the API the README names

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"fastcell.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fastcell.train' has no attribute {name!r}")
