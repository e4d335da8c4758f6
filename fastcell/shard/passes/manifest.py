"""The last pass: `cells.parquet` (with each crop's CRC-32), `fields.parquet` (every field's cell counts,
zero included: an empty field is data, not an error) and then `index.json`, whose presence marks the
folder complete."""

from __future__ import annotations

from pathlib import Path

from fastcell.format.folder import (
    CELL_COLUMNS,
    CELLS_TABLE_NAME,
    CHECKSUM_COLUMN,
    FIELDS_TABLE_NAME,
    ShardManifest,
    write_manifest,
)
from fastcell.io import atomic_path


def _write_table(table, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def write_outputs(build: Path, manifest: ShardManifest, cells, per_field) -> None:
    """Write the cell and field tables, then the manifest (last: it marks the folder complete)."""
    _write_table(cells[[*CELL_COLUMNS, CHECKSUM_COLUMN]], build / CELLS_TABLE_NAME)
    _write_table(per_field, build / FIELDS_TABLE_NAME)
    write_manifest(build, manifest)
