"""OME-Zarr HCS plates as a source: the NGFF plate layout (plate / row / column / field) read through zarr.

`load_plate` reads only metadata: the plate's well list, each well's image (field) list, and the
channel names of the first image's `omero` metadata (`omero.channels[].label`); NGFF 0.4 (Zarr v2,
`.zattrs`) and 0.5 (Zarr v3, attributes under `ome`) are both understood. Pixels are read lazily,
one field at a time, by `read_plate_field` (in the workers): the full-resolution level of the
field's multiscale image, the selected channels only, at t = 0. A plate carries no treatment
annotations, so its fields are role `unannotated` (shard them with `--roles all`).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np

from fastcell.errors import InputError
from fastcell.remote import is_remote

METADATA_FILES = {2: ".zattrs", 3: "zarr.json"}  # Zarr format -> the file of a group's attributes


def is_plate(path: Path) -> bool:
    """Whether `path` is a Zarr group (v2 or v3) rather than an ordinary folder."""
    return any((path / name).is_file() for name in METADATA_FILES.values())


@cache
def _keeping_store_class():
    """A Zarr store wrapper that keeps the bytes of the group metadata read through it (`.kept`: `.zattrs` of
    Zarr v2, `zarr.json` of v3), so that they are hashed without a second read; it names itself as the store it
    wraps (in zarr's messages). Made once, on first use (zarr is imported only for OME-Zarr sources)."""
    from zarr.storage import WrapperStore

    class KeptMetadata(WrapperStore):
        def __init__(self, store):
            super().__init__(store)
            self.kept: dict[str, bytes] = {}

        async def get(self, key, prototype, byte_range=None):
            buffer = await super().get(key, prototype, byte_range)
            if buffer is not None and byte_range is None and key in METADATA_FILES.values():
                self.kept[key] = buffer.to_bytes()
            return buffer

        def __str__(self) -> str:
            return str(self._store)

        __repr__ = __str__

    return KeptMetadata


def _kept_metadata_store(path: Path):
    """A read-only Zarr store of `path` (local or remote) that keeps the group metadata it reads."""
    from zarr.storage import FsspecStore, LocalStore

    if is_remote(path):
        store = FsspecStore.from_url(str(path), storage_options=dict(path.storage_options), read_only=True)
    else:
        store = LocalStore(str(path), read_only=True)
    return _keeping_store_class()(store)


def _open(path: Path, what: str, store=None):
    """The Zarr group at `path` (through `store` when given: the plate's, which keeps its metadata bytes; wells,
    images and the workers' field reads open plain stores) and its NGFF attributes (0.5's `ome` namespace
    unwrapped)."""
    import zarr

    try:
        if store is not None:
            group = zarr.open_group(store, mode="r")
        else:
            options = {"storage_options": dict(path.storage_options)} if is_remote(path) else {}
            group = zarr.open_group(str(path), mode="r", **options)
    except (FileNotFoundError, KeyError, ValueError, OSError) as err:
        raise InputError(
            f"{path}: cannot open the {what} as a Zarr group ({type(err).__name__}: {err})"
        ) from None
    attrs = dict(group.attrs)
    return group, attrs.get("ome", attrs)


def _channel_labels(path: Path, attrs: dict, plate: Path) -> tuple[str, ...]:
    channels = attrs.get("omero", {}).get("channels")
    labels = tuple(str(c.get("label", "")).strip() for c in channels or [])
    if not labels or not all(labels):
        raise InputError(
            f"{plate}: OME-Zarr plate without channel names: image {path.relative_to(plate)} has no "
            "omero.channels[].label metadata (fastcell needs each channel's name to pick the DNA channel "
            "and record the channels); add it to the images' metadata"
        )
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:  # channels are picked by name: a repeated name would read its first channel twice
        raise InputError(
            f"{path}: channel name(s) {', '.join(twice)} given to more than one channel ({list(labels)}); "
            "name each channel once in omero.channels[].label"
        )
    return labels


def load_plate(root: Path, channels, dna_channel):
    """An OME-Zarr HCS plate as a `Screen` (metadata only; see the module doc)."""
    from fastcell.shard.sources import Field, Screen, _pick_dna, _sorted_unique, field_key

    group, attrs = _open(root, "plate", _kept_metadata_store(root))
    plate = attrs.get("plate")
    if not isinstance(plate, dict) or not plate.get("wells"):
        raise InputError(f"{root}: a Zarr group but not an OME-Zarr HCS plate (no plate.wells metadata)")
    name = str(plate.get("name") or root.name.removesuffix(".zarr"))
    images = []  # (well name, site, image path relative to the plate)
    for well in plate["wells"]:
        well_path = well.get("path") if isinstance(well, dict) else None
        if not isinstance(well_path, str) or len(well_path.split("/")) != 2 or not all(well_path.split("/")):
            raise InputError(
                f"{root}: plate.wells lists {well!r}; expected {{'path': '<row>/<column>', ...}}"
            )
        row, column = well_path.split("/")
        _, well_attrs = _open(root / well_path, "well")
        label = f"{row}{int(column):02d}" if column.isdigit() else f"{row}{column}"
        for site, image in enumerate(well_attrs.get("well", {}).get("images", []), start=1):
            if not isinstance(image, dict) or not isinstance(image.get("path"), str) or not image["path"]:
                raise InputError(
                    f"{root / well_path}: well.images lists {image!r}; expected {{'path': '<field>', ...}}"
                )
            images.append((label, site, f"{well_path}/{image['path']}"))
    if not images:
        raise InputError(f"{root}: the plate's wells list no images (well.images metadata)")
    first = root / images[0][2]
    labels = _channel_labels(first, _open(first, "image")[1], root)
    channels = tuple(channels) if channels else labels
    missing = [c for c in channels if c not in labels]
    if missing:
        raise InputError(f"{root}: no channel(s) {', '.join(missing)} in the plate; it has {list(labels)}")
    dna = _pick_dna(channels, dna_channel, root)
    indices = tuple(labels.index(c) for c in channels)
    fields = [
        Field(
            key=field_key(name, well, site),
            plate=name,
            well=well,
            site=site,
            batch=name,
            compound="",
            concentration=0.0,
            moa="",
            role="unannotated",
            paths=(root / image,) * len(channels),
            image=image,
            channel_indices=indices,
            channel_labels=labels,
        )  # fmt: skip
        for well, site, image in images
    ]
    name = METADATA_FILES[group.metadata.zarr_format]  # the plate metadata as zarr read it
    tables = {root / name: hashlib.sha256(group.store.kept[name]).hexdigest()}
    return Screen("ome-zarr", root, tables, channels, dna, _sorted_unique(fields, root))


def _level0(field):
    """(full-resolution array, axis names) of the field's multiscale image; checks its channel names."""
    path = field.paths[0]
    group, attrs = _open(path, "image")
    plate_root = path.parents[2]
    labels = _channel_labels(path, attrs, plate_root)
    if labels != field.channel_labels:
        raise InputError(
            f"{path}: channels {list(labels)}, but the plate's first image has {list(field.channel_labels)}"
        )
    try:
        multiscale = attrs["multiscales"][0]
        array = group[multiscale["datasets"][0]["path"]]
    except (KeyError, IndexError, TypeError) as err:
        raise InputError(f"{path}: no readable multiscales image ({type(err).__name__}: {err})") from None
    axes = [
        a["name"] if isinstance(a, dict) else str(a) for a in multiscale.get("axes", "tczyx"[-array.ndim :])
    ]
    if len(axes) != array.ndim or not {"c", "y", "x"} <= set(axes):
        raise InputError(
            f"{path}: expected c, y and x axes, found {axes} for an array of shape {array.shape}"
        )
    if array.shape[axes.index("c")] != len(labels):  # else which channel is which is a guess
        raise InputError(
            f"{path}: {array.shape[axes.index('c')]} channels in the array (shape {array.shape}), but "
            f"{len(labels)} channel names {list(labels)} in omero.channels"
        )
    return array, axes


def plate_field_headers(field) -> list[tuple[tuple[int, ...], np.dtype]]:
    """Per selected channel, (shape, pixel type) of the field, from its array's metadata."""
    array, axes = _level0(field)
    shape = (array.shape[axes.index("y")], array.shape[axes.index("x")])
    return [(shape, np.dtype(array.dtype))] * len(field.channel_indices)


def read_plate_field(field) -> np.ndarray:
    """The field's selected channels as C x Y x X (t = 0; a z-stack, or any other axis of more than one
    plane, is refused rather than read at its first plane), in their pixel type."""
    array, axes = _level0(field)
    if "z" in axes and array.shape[axes.index("z")] > 1:
        raise InputError(
            f"{field.paths[0]}: a z-stack of {array.shape[axes.index('z')]} planes; fastcell reads 2-D fields"
        )
    other = [
        f"{a} ({n})" for a, n in zip(axes, array.shape, strict=True) if a not in ("t", "c", "z", "y", "x") and n > 1
    ]
    if other:
        raise InputError(
            f"{field.paths[0]}: axis {', '.join(other)} of more than one plane; fastcell reads 2-D fields"
        )
    index = tuple(
        list(field.channel_indices) if a == "c" else slice(None) if a in "yx" else 0 for a in axes
    )  # fmt: skip
    try:
        pixels = np.asarray(array.oindex[index])
    except Exception as err:  # codecs and stores raise many types; all mean "unreadable"
        raise InputError(f"{field.paths[0]}: unreadable pixels ({type(err).__name__}: {err})") from err
    kept = [a for a in axes if a in ("c", "y", "x")]  # the axes left, in the array's order (x may come before y)
    return pixels.transpose([kept.index(a) for a in "cyx"])
