"""fastcell: fast self-supervised single-cell representations from microscopy.

Pipeline, one module (or sub-package) per stage:

    synth   -> a BBBC021-shaped screen on disk (real design, synthetic pixels)
    shard   -> fields + metadata -> illumination-corrected single-cell crops in WebDataset shards
    loaders -> two-view contrastive augmentation (DALI on GPU/CPU, PyTorch reference), eval loader
    train   -> SimCLR, mixed precision, DDP through torchrun
    embed   -> checkpoint + shards -> one embedding per cell
    evaluate-> cell embeddings or well profiles -> NSC / NSCB / drop
"""

__version__ = "0.1.0"
