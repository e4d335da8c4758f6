"""The passes of `shard_screen`, in the order it runs them; each fans out over `run.pool` and is resumable.

- `illumination`: per plate and channel illumination functions (illumination.npz);
- `scaling`: per plate intensity scaling (`--scaling plate-percentile` before cropping,
  `plate-dmso` from the DMSO crops before writing);
- `crops`: per field read -> correct -> locate cells -> scale -> crop, into the work folder;
  then the cell and field tables;
- `split`: train/val split and the shard plan;
- `write`: the shards themselves, with each crop's checksum and the channel histograms, whose
  statistics `fastcell.format.stats` computes;
- `manifest`: the tables and index.json, last.

`context` holds what they share: the per-worker context, the run's state and the stage timer.
"""
