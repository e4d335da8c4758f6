"""The shard format: the contract between `fastcell shard`, which writes shard folders, and everything
that reads them (loaders, training, embedding, `fastcell info`). A low layer: it imports nothing of
fastcell but its version, errors and io, so readers need not import the writer's package.

    codecs.py   how a crop is stored in a tar member: the `CODECS` registry (add a codec here)
    folder.py   a shard folder: shard and index names, the cell table's columns, `ShardWriter`,
                `verify_shard` / `read_samples`, `ShardManifest` (`index.json`; its `codec` is a `Codec`
                once read) and its reader/writer
    stats.py    the manifest's exact channel statistics, from pixel histograms

The layout is specified in shards/README.md.
"""
