"""Reading a screen: which fields exist, what they show, where their channel images and cells are.

Three kinds of SOURCE are understood, and all are normalised to a `Screen` holding a sorted list of
`Field` records (plate, well, site, batch, treatment, MoA, role, one image path per channel):

- a BBBC021-layout folder: `BBBC021_v1_image.csv(.gz)` and `BBBC021_v1_moa.csv` (the packaged copy
  when absent), image paths relative to the folder (`<PathName>/<FileName>`, or `<plate>/<FileName>`
  as the published zips unpack). Channels DAPI, Tubulin, Actin; roles from `fastcell.metadata`.
- a generic field table (CSV, one row per field): `plate`, `well`, `site` and `treatment` (or
  `compound`) columns, optional `concentration`, `batch`, `moa`, `role`, `ImageNumber`, and one file
  column per channel (named by `--channels`; by default every column holding image file names, so
  one empty cell does not hide a channel: it is an error naming the row and column). Paths are
  relative to the CSV's folder, absolute, or URLs. Any channel count.
- an OME-Zarr HCS plate (`fastcell.shard.omezarr`), read lazily per field.

Tables, plates and images may be fsspec URLs (`fastcell.remote`): a remote file is fetched whole
by whoever reads it (the worker, for pixels), once: a table's SHA-256 (its identity in the
configuration record) is taken from the bytes it was read from.

`load_locations` reads a table of cell centres (CellProfiler's `Nuclei_Location_Center_X/Y` or
`AreaShape_Center_X/Y`, ...) keyed by plate/well/site, by image file name, or by ImageNumber.
`read_field` reads one field's channels into a C x H x W uint16 array, with errors that name the file.
Bit depths are not mixed: `probe_fields` takes each channel's pixel type from a few fields'
headers, and an image of another type (an 8-bit TIFF among 16-bit ones, whose intensities would
read ~257x dimmer) is refused with a message instead of cast. A screen that is 8-bit throughout is
read as 16-bit values 0..255.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from fastcell.errors import InputError
from fastcell.remote import as_path, is_remote, join, read_bytes
from fastcell.shard.omezarr import is_plate, load_plate, plate_field_headers, read_plate_field

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
ALL_ROLES = ("treatment", "dmso", "control", "unannotated")  # as `fastcell.metadata.annotate` assigns them
DEFAULT_ROLES = ("treatment", "dmso", "control")
DNA_NAMES = ("dna", "dapi", "hoechst", "nuclei")

# Column aliases (matched case-insensitively) of the generic field table and of locations tables.
PLATE_ALIASES = ("plate", "Metadata_Plate", "Image_Metadata_Plate", "Image_Metadata_Plate_DAPI")
WELL_ALIASES = ("well", "Metadata_Well", "Image_Metadata_Well", "Image_Metadata_Well_DAPI")
SITE_ALIASES = ("site", "Metadata_Site", "Image_Metadata_Site", "field")
TREATMENT_ALIASES = ("treatment", "compound", "Metadata_Compound", "Image_Metadata_Compound")
CONCENTRATION_ALIASES = ("concentration", "Metadata_Concentration", "Image_Metadata_Concentration")
BATCH_ALIASES = ("batch", "Metadata_Batch")
FILE_ALIASES = ("image", "filename", "file", "FileName")
CENTRE_COLUMNS = (
    ("Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"),
    ("Location_Center_X", "Location_Center_Y"),
    ("Nuclei_AreaShape_Center_X", "Nuclei_AreaShape_Center_Y"),
    ("AreaShape_Center_X", "AreaShape_Center_Y"),
    ("Cells_Location_Center_X", "Cells_Location_Center_Y"),
    ("x", "y"),
)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Field:
    """One imaged field (site) of a well, with its design metadata and one image per channel."""

    key: str  # unique, file-name safe: "<plate>_<well>_s<site>"
    plate: str
    well: str
    site: int
    batch: str
    compound: str
    concentration: float
    moa: str  # "" when not annotated
    role: str  # one of ALL_ROLES
    paths: tuple[Path, ...]  # one per channel, absolute
    image: str  # the first channel's path relative to the source (the cell table's `image`)
    image_number: int | None = None  # CellProfiler ImageNumber, when the source has one
    table_number: int | None = None  # CellProfiler TableNumber (BBBC021), when present
    # OME-Zarr plates (`fastcell.shard.omezarr`): `paths` are the field's image group, once per channel;
    # these are the selected channels' indices in it and all its channel names
    channel_indices: tuple[int, ...] | None = None
    channel_labels: tuple[str, ...] | None = None


@dataclass
class Screen:
    """A source normalised: its fields (sorted by key), channel names, and the tables it was read from."""

    kind: str  # "bbbc021", "table" or "ome-zarr"
    root: Path  # the folder image paths are relative to
    tables: dict[Path, str]  # metadata files read -> the SHA-256 of their bytes (they go into the config)
    channels: tuple[str, ...]
    dna_channel: str
    fields: list[Field]

    @property
    def dna_index(self) -> int:
        return self.channels.index(self.dna_channel)

    def select(self, roles: tuple[str, ...] | list[str]) -> list[Field]:
        """The fields whose role is in `roles`, in key order."""
        unknown = sorted(set(roles) - set(ALL_ROLES))
        if unknown:
            raise InputError(f"unknown role(s) {', '.join(unknown)}; choose from {', '.join(ALL_ROLES)}")
        return [f for f in self.fields if f.role in roles]


def field_key(plate: str, well: str, site: int) -> str:
    return _UNSAFE.sub("-", f"{plate}_{well}_s{site}")


def _column(table, aliases: tuple[str, ...], path: Path, what: str, required: bool = True) -> str | None:
    """The table's column matching one of `aliases` (case-insensitive), or an error naming the file."""
    from fastcell.metadata import find_column

    column = find_column(table.columns, aliases)
    if column is None and required:
        raise InputError(f"{path}: missing the {what} column (one of: {', '.join(aliases)})")
    return column


def _read_table(path: Path) -> tuple[bytes, str]:
    """A table file's bytes, read once (local or remote), and their SHA-256: the digest recorded for
    the input then describes the very bytes parsed, even when the file changes meanwhile."""
    if not is_remote(path) and not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        data = read_bytes(path) if is_remote(path) else path.read_bytes()
    except OSError as err:  # a local file (read_bytes names remote problems itself)
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    return data, hashlib.sha256(data).hexdigest()


def _read_csv(path: Path):
    """(table, SHA-256 of the bytes parsed); the file is read once for both."""
    from fastcell.metadata import read_csv

    data, digest = _read_table(path)
    names = PLATE_ALIASES + WELL_ALIASES + TREATMENT_ALIASES + BATCH_ALIASES + ("moa",)
    return read_csv(path, data=data, text=names), digest


def _pick_dna(channels: tuple[str, ...], dna_channel: str | None, where: Path) -> str:
    if dna_channel is not None:
        if dna_channel not in channels:
            raise InputError(
                f"{where}: DNA channel {dna_channel!r} is not one of the channels {list(channels)}"
            )
        return dna_channel
    for name in channels:
        if any(token in name.lower() for token in DNA_NAMES):
            return name
    raise InputError(
        f"{where}: cannot tell which of the channels {list(channels)} shows DNA; name it with --dna-channel"
    )


def load_screen(
    source: str | os.PathLike,
    channels: list[str] | tuple[str, ...] | None = None,
    dna_channel: str | None = None,
) -> Screen:
    """Read SOURCE (a BBBC021-layout folder, a generic field table CSV or an OME-Zarr plate) into a `Screen`."""
    source = as_path(source)
    if is_remote(source) and source.suffix in (".csv", ".gz"):  # a field table: read it, or name the problem
        return _load_field_table(source, channels, dna_channel)
    if source.is_dir() and is_plate(source):
        return load_plate(source, channels, dna_channel)
    if source.is_dir() and is_remote(source):
        raise InputError(f"{source}: by URL, give a field table CSV or an OME-Zarr plate (BBBC021 folders are local)")
    if source.is_dir():
        return _load_bbbc021(source, channels, dna_channel)
    if source.is_file():
        return _load_field_table(source, channels, dna_channel)
    raise InputError(f"{source}: no such folder or field table")


def _load_bbbc021(root: Path, channels, dna_channel) -> Screen:
    from fastcell import metadata

    image_table = next(
        (
            root / n
            for n in (metadata.IMAGE_TABLE_NAME, metadata.IMAGE_TABLE_NAME + ".gz")
            if (root / n).is_file()
        ),
        None,
    )
    if image_table is None:
        if (root / metadata.SYNTH_SETTINGS_NAME).is_file():  # `fastcell synth` writes its tables last
            raise InputError(f"{root}: an unfinished `fastcell synth` screen (its tables are written last); "
                             "rerun the same fastcell synth command to finish it")
        raise InputError(
            f"{root}: not a BBBC021-layout folder (no {metadata.IMAGE_TABLE_NAME}[.gz]); "
            "for other screens pass a field table CSV"
        )
    moa_table = root / metadata.MOA_TABLE_NAME
    tables = {t: _read_table(t) for t in [image_table, *([moa_table] if moa_table.is_file() else [])]}
    design = metadata.annotate(
        metadata.load_image_table(image_table, tables[image_table][0]),
        metadata.load_moa_table(moa_table, tables[moa_table][0])
        if moa_table in tables
        else metadata.load_moa_table(),
    )
    channels = tuple(channels) if channels else metadata.BBBC021_CHANNELS
    unknown = [c for c in channels if c not in metadata.BBBC021_CHANNELS]
    if unknown:
        raise InputError(
            f"{image_table}: unknown channel(s) {unknown}; BBBC021 has {list(metadata.BBBC021_CHANNELS)}"
        )
    dna = _pick_dna(channels, dna_channel, image_table)

    use_plate_folders = _bbbc021_plate_folders(root, design)
    fields = []
    for row in design.to_dict("records"):
        rel = [
            PurePosixPath(row["plate"] if use_plate_folders else str(row[metadata.PATH_COLUMNS[ch]]))
            / str(row[metadata.FILE_COLUMNS[ch]])
            for ch in channels
        ]
        moa = row["moa"]
        fields.append(
            Field(
                key=field_key(row["plate"], row["well"], int(row["site"])),
                plate=row["plate"],
                well=row["well"],
                site=int(row["site"]),
                batch=row["batch"],
                compound=row["compound"],
                concentration=float(row["concentration"]),
                moa="" if moa is None or (isinstance(moa, float) and math.isnan(moa)) else str(moa),
                role=row["role"],
                paths=tuple(root / r for r in rel),
                image=str(rel[0]),
                image_number=int(row["ImageNumber"]),
                table_number=int(row["TableNumber"]),
            )
        )
    digests = {t: digest for t, (_, digest) in tables.items()}
    return Screen("bbbc021", root, digests, channels, dna, _sorted_unique(fields, image_table))


LAYOUT_PROBE_ROWS = 50  # rows `_bbbc021_plate_folders` looks at


def _bbbc021_plate_folders(root: Path, design) -> bool:
    """Whether the images are in <plate>/<file> (as the published zips unpack) rather than where the table says
    (<WeekN>/<plate>/<file>): as the first row whose DAPI image is found either way has it, so that a missing
    image is reported as missing, at its own path, rather than deciding the layout of every other row."""
    from fastcell.metadata import FILE_COLUMNS, PATH_COLUMNS

    rows = design.head(LAYOUT_PROBE_ROWS)  # a remote source: a bounded number of lookups before the error
    for path_name, plate, file_name in zip(
        rows[PATH_COLUMNS["DAPI"]], rows["plate"], rows[FILE_COLUMNS["DAPI"]], strict=True
    ):
        if (root / str(path_name) / str(file_name)).is_file():
            return False
        if (root / str(plate) / str(file_name)).is_file():
            return True
    return False


def _load_field_table(path: Path, channels, dna_channel) -> Screen:
    import pandas as pd

    table, digest = _read_csv(path)
    if len(table) == 0:
        raise InputError(f"{path}: the field table has no rows")
    plate_col = _column(table, PLATE_ALIASES, path, "plate")
    well_col = _column(table, WELL_ALIASES, path, "well")
    site_col = _column(table, SITE_ALIASES, path, "site")
    treatment_col = _column(table, TREATMENT_ALIASES, path, "treatment")
    conc_col = _column(table, CONCENTRATION_ALIASES, path, "concentration", required=False)
    batch_col = _column(table, BATCH_ALIASES, path, "batch", required=False)
    moa_col = _column(table, ("moa",), path, "moa", required=False)
    role_col = _column(table, ("role",), path, "role", required=False)
    number_col = _column(table, ("ImageNumber",), path, "ImageNumber", required=False)

    if channels:
        missing = [c for c in channels if c not in table.columns]
        if missing:
            raise InputError(f"{path}: missing channel column(s) {', '.join(missing)} (named by --channels)")
        channels = tuple(channels)
    else:
        metadata_columns = {plate_col, well_col, site_col, treatment_col, conc_col, batch_col, moa_col, role_col}
        channels = tuple(
            c
            for c in table.columns
            if c not in metadata_columns
            and table[c].map(lambda v: isinstance(v, str) and v.strip().lower().endswith(IMAGE_SUFFIXES)).any()
        )
        if not channels:
            raise InputError(
                f"{path}: no channel columns (columns of image file names); name them with --channels"
            )
    dna = _pick_dna(channels, dna_channel, path)

    def text(row, col, what, rownum) -> str:
        value = row[col]
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            raise InputError(f"{path}: row {rownum} has an empty {what} (column {col!r})")
        return str(value).strip()

    root = path.parent
    fields = []
    for i, row in enumerate(table.to_dict("records")):
        rownum = i + 2  # the header is line 1
        plate, well = text(row, plate_col, "plate", rownum), text(row, well_col, "well", rownum)
        site = _integer(text(row, site_col, "site", rownum))  # 2.0, as a column with gaps reads, is site 2
        if site is None:
            raise InputError(f"{path}: row {rownum} has a non-integer site {row[site_col]!r}")
        compound = text(row, treatment_col, "treatment", rownum)
        concentration = 0.0
        if conc_col is not None and pd.notna(row[conc_col]):
            try:
                concentration = float(row[conc_col])
            except ValueError:
                raise InputError(
                    f"{path}: row {rownum} has a non-numeric concentration {row[conc_col]!r}"
                ) from None
        moa = "" if moa_col is None or pd.isna(row[moa_col]) else str(row[moa_col]).strip()
        if role_col is not None and pd.notna(row[role_col]):
            role = str(row[role_col]).strip()
            if role not in ALL_ROLES:
                raise InputError(
                    f"{path}: row {rownum} has role {role!r}; expected one of {', '.join(ALL_ROLES)}"
                )
        else:
            role = "dmso" if compound.upper() == "DMSO" else "treatment"
        rel = [text(row, c, f"file for channel {c}", rownum) for c in channels]
        number = None
        if number_col is not None and pd.notna(row[number_col]):
            number = _integer(row[number_col])  # not int(): 1.5 would become 1, another image's number
            if number is None:
                raise InputError(f"{path}: row {rownum} has a non-integer ImageNumber {row[number_col]!r}")
        fields.append(
            Field(
                key=field_key(plate, well, site),
                plate=plate,
                well=well,
                site=site,
                batch=text(row, batch_col, "batch", rownum) if batch_col else plate,
                compound=compound,
                concentration=concentration,
                moa=moa,
                role=role,
                paths=tuple(join(root, r) for r in rel),
                image=rel[0],
                image_number=number,
            )
        )
    return Screen("table", root, {path: digest}, channels, dna, _sorted_unique(fields, path))


def _integer(value) -> int | None:
    """`value` as an int when it is a whole number (2, 2.0, "2"), else None (1.5, NaN, "x"): a table's number
    column is never truncated into another field's number."""
    if isinstance(value, (int, np.integer)):  # exact: a float of a large id could round it to another
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _sorted_unique(fields: list[Field], path: Path) -> list[Field]:
    keys: dict[str, Field] = {}
    for f in fields:
        if f.key in keys:
            raise InputError(
                f"{path}: two rows describe field {f.key} (plate {f.plate}, well {f.well}, site {f.site})"
            )
        keys[f.key] = f
    return [keys[k] for k in sorted(keys)]


# --- reading pixels -------------------------------------------------------------------------------


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _readable(path: Path) -> Path | io.BytesIO:
    """What decoders and pandas read: a local file's path, or a remote file's content (fetched by the
    caller: a worker when it reads pixels)."""
    return io.BytesIO(read_bytes(path)) if is_remote(path) else path


def image_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, pixel type) of an image from its header, without decoding the pixels."""
    source = _readable(path)
    if _is_tiff(path):
        import tifffile

        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            return tuple(series.shape), np.dtype(series.dtype)
    import imageio.v3 as iio

    props = iio.improps(source, extension=path.suffix)
    return tuple(props.shape), np.dtype(props.dtype)


def probe_fields(fields: list[Field], sample: int = 5) -> tuple[tuple[np.dtype | None, ...], tuple[int, int]]:
    """Per channel, the most common pixel type among the headers of the first `sample` fields (None when
    none could be read), and the smallest height and width seen: what every field is checked against."""
    counts = [Counter() for _ in fields[0].paths] if fields else []
    smallest = (2**31, 2**31)
    for f in fields[:sample]:
        for c, header in enumerate(_headers(f)):
            if header is None:  # unreadable: the field's own read reports it
                continue
            shape, dtype = header
            counts[c][dtype.newbyteorder("=")] += 1  # byte order is the file's, not a bit depth (`_checked`)
            shape = tuple(n for n in shape if n > 1)
            if len(shape) == 2:
                smallest = (min(smallest[0], shape[0]), min(smallest[1], shape[1]))
    return tuple(c.most_common(1)[0][0] if c else None for c in counts), smallest


def _headers(f: Field) -> list[tuple[tuple[int, ...], np.dtype] | None]:
    """Per channel, (shape, pixel type) from the field's headers, or None where unreadable; an OME-Zarr
    field's image is opened once for all its channels."""
    if f.channel_indices:
        try:
            return plate_field_headers(f)
        except Exception:
            return [None] * len(f.paths)
    headers = []
    for p in f.paths:
        try:
            headers.append(image_header(p))
        except Exception:  # decoders and stores raise many types; all mean "unreadable"
            headers.append(None)
    return headers


def read_image(path: Path, dtype: np.dtype | None = None) -> np.ndarray:
    """One channel image as a 2-D uint16 array; InputError naming the file when it cannot be, or when
    its pixel type is not `dtype` (the screen's type for the channel: bit depths are never mixed)."""
    if not is_remote(path) and not path.is_file():
        raise InputError(f"{path}: image file not found")
    source = _readable(path)
    try:
        if _is_tiff(path):
            import tifffile

            image = tifffile.imread(source)
        else:
            import imageio.v3 as iio

            image = iio.imread(source, extension=path.suffix)
    except Exception as err:  # decoders raise many types; all mean "unreadable"
        raise InputError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    return _checked(np.squeeze(image), path, dtype)


def _checked(image: np.ndarray, path: Path, dtype: np.dtype | None) -> np.ndarray:
    """A channel image as uint16 after the checks `read_image` describes; errors name `path`."""
    if image.ndim != 2:
        raise InputError(f"{path}: expected a single-channel 2-D image, found shape {image.shape}")
    if not image.dtype.isnative:  # a big-endian file's uint16 is uint16: not refused as another depth
        image = image.astype(image.dtype.newbyteorder("="))
    if dtype is not None and image.dtype != dtype:
        raise InputError(
            f"{path}: {_depth(image.dtype)} pixels, but this channel's other images are {_depth(dtype)}: "
            "fastcell does not mix bit depths (an 8-bit image read among 16-bit ones would be ~257x dimmer); "
            "convert it to the others' depth, or leave its field out with --on-error skip"
        )
    if image.dtype == np.uint16:
        return image
    if image.dtype == np.uint8 or (image.dtype.kind in "iu" and image.min() >= 0 and image.max() <= 65535):
        return image.astype(np.uint16)
    raise InputError(f"{path}: expected 8- or 16-bit integer pixels, found {image.dtype}")


def _depth(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    return f"{dtype.itemsize * 8}-bit ({dtype})"


def read_field(field: Field, dtypes: tuple[np.dtype | None, ...] | None = None) -> np.ndarray:
    """A field's channels stacked as C x H x W uint16; all channels must have the same shape and, with
    `dtypes` (`probe_fields`), each channel its pixel type."""
    dtypes = dtypes or (None,) * len(field.paths)
    if field.channel_indices:
        pixels = read_plate_field(field)
        return np.stack([_checked(image, field.paths[0], d) for image, d in zip(pixels, dtypes, strict=True)])
    images = [read_image(p, d) for p, d in zip(field.paths, dtypes, strict=True)]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        detail = ", ".join(
            f"{p.name} {im.shape[0]}x{im.shape[1]}" for p, im in zip(field.paths, images, strict=True)
        )
        raise InputError(f"{field.paths[0].parent}: channels of field {field.key} differ in shape ({detail})")
    return np.stack(images)


# --- cell locations -------------------------------------------------------------------------------


@dataclass
class Locations:
    """Cell centres from a locations table: (N, 2) float64 (x, y) per field key."""

    path: Path
    centres: dict[str, np.ndarray]
    n_invalid: int  # rows without a finite centre, dropped and counted
    digest: str  # SHA-256 of the table's bytes (it goes into the config)


def load_locations(path: str | os.PathLike, screen: Screen) -> Locations:
    """Read a table of cell centres and match its rows to the screen's fields.

    Rows are matched by plate/well/site columns when present, else by an image file name column
    (relative path or a unique file name), else by ImageNumber (with TableNumber when both the
    table and the source have it). Rows naming images the screen does not have are an error.
    """
    import pandas as pd

    path = as_path(path)
    table, digest = _read_csv(path)
    from fastcell.metadata import find_column

    found = ((find_column(table.columns, (x,)), find_column(table.columns, (y,))) for x, y in CENTRE_COLUMNS)
    centre = next(((x, y) for x, y in found if x is not None and y is not None), None)
    if centre is None:
        expected = ", ".join(f"{x}/{y}" for x, y in CENTRE_COLUMNS)
        raise InputError(f"{path}: no cell centre columns (expected one of {expected})")

    names, keys = _location_keys(table, path, screen)
    known = np.array([k is not None for k in keys])
    if not known.all():
        unknown = sorted({str(n) for n, k in zip(names, keys, strict=True) if k is None})
        raise InputError(
            f"locations table {path} names {len(unknown)} unknown image(s), e.g. {', '.join(unknown[:3])}"
        )
    xy = table[list(centre)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(xy).all(axis=1)
    _refuse_repeated_cells(path, names, keys, xy, finite)
    centres: dict[str, list] = {}
    for key, point, ok in zip(keys, xy, finite, strict=True):
        if ok:
            centres.setdefault(key, []).append(point)
    return Locations(
        path, {k: np.asarray(v, dtype=np.float64) for k, v in centres.items()}, int((~finite).sum()), digest
    )


def _refuse_repeated_cells(path, names: list, keys: list, xy: np.ndarray, finite: np.ndarray) -> None:
    """InputError when two rows give the same image and centre: each would become a cell of its own, the same
    crop twice in the shards (a table concatenated twice, a join that repeated rows)."""
    import pandas as pd

    rows = pd.DataFrame({"key": keys, "x": xy[:, 0], "y": xy[:, 1]})[finite]
    repeated = rows.duplicated(keep=False)
    if repeated.any():
        first = rows[repeated].iloc[0]
        same = rows.index[repeated & (rows["key"] == first["key"]) & (rows["x"] == first["x"])
                          & (rows["y"] == first["y"])]
        raise InputError(
            f"locations table {path}: {int(rows.duplicated().sum())} row(s) repeat an earlier row's image and "
            f"centre, e.g. rows {', '.join(str(i + 2) for i in same[:3])} ({names[same[0]]} at x {first['x']:g}, "
            f"y {first['y']:g}); each would be cropped again as another cell: remove the repeats"
        )


def _name_in_source(path, root) -> str:
    """How a locations table may name an image: its path relative to the source's folder (posix) when it lies
    there, else the path or URL as the field table gives it (an absolute path elsewhere, a URL beside a local
    table); `relative_to` would raise for those, and gives no usable relative name for URLs."""
    if is_remote(path) or is_remote(root):
        prefix = str(root).rstrip("/") + "/"
        return str(path).removeprefix(prefix) if is_remote(path) and is_remote(root) else str(path)
    try:
        return PurePosixPath(path.relative_to(root)).as_posix()
    except ValueError:
        return str(path)


def _location_keys(table, path: Path, screen: Screen) -> tuple[list, list]:
    """Per row of a locations table: the image name it gives (for messages) and the field key (or None)."""
    plate_col = _column(table, PLATE_ALIASES, path, "plate", required=False)
    well_col = _column(table, WELL_ALIASES, path, "well", required=False)
    site_col = _column(table, SITE_ALIASES, path, "site", required=False)
    if plate_col and well_col and site_col:
        by_pws = {f.key for f in screen.fields}
        names = [
            f"{p}/{w}/s{s}"
            for p, w, s in zip(table[plate_col], table[well_col], table[site_col], strict=True)
        ]
        keys = []
        for p, w, s in zip(table[plate_col], table[well_col], table[site_col], strict=True):
            site = _integer(s)  # 1.5 is no field's site, not site 1; names stripped as in the field table
            key = None if site is None else field_key(str(p).strip(), str(w).strip(), site)
            keys.append(key if key in by_pws else None)
        return names, keys

    file_cols = [c for c in table.columns if str(c).lower() in {a.lower() for a in FILE_ALIASES}]
    file_cols += [c for c in table.columns if re.match(r"^(Image_)?FileName_", str(c), re.IGNORECASE)]
    if file_cols:
        by_rel: dict[str, str] = {}
        by_name: dict[str, str | None] = {}
        for f in screen.fields:
            for p in f.paths:
                by_rel[_name_in_source(p, screen.root)] = f.key
                by_name[p.name] = None if p.name in by_name and by_name[p.name] != f.key else f.key
        names = table[file_cols[0]].astype(str).tolist()
        keys = []
        for name in names:
            if name in by_rel:
                keys.append(by_rel[name])
            elif PurePosixPath(name).name in by_name:
                key = by_name[PurePosixPath(name).name]
                if key is None:
                    raise InputError(
                        f"{path}: image name {name!r} matches several fields; key the table by plate/well/site"
                    )
                keys.append(key)
            else:
                keys.append(None)
        return names, keys

    if "ImageNumber" in table.columns:
        use_table = "TableNumber" in table.columns and all(f.table_number is not None for f in screen.fields)
        by_number: dict[tuple, str] = {}
        for f in screen.fields:
            if f.image_number is not None:
                by_number[(f.table_number, f.image_number) if use_table else (f.image_number,)] = f.key
        if not use_table and len(by_number) < sum(f.image_number is not None for f in screen.fields):
            raise InputError(
                f"{path}: ImageNumber is not unique in the source; add TableNumber or plate/well/site columns"
            )
        cols = ["TableNumber", "ImageNumber"] if use_table else ["ImageNumber"]
        rows = [tuple(r) for r in table[cols].itertuples(index=False)]
        names = ["ImageNumber " + "/".join(str(v) for v in r) for r in rows]
        # not int(): NaN would crash, and 1.5 would be image 1's; either is an unknown image
        return names, [by_number.get(tuple(_integer(v) for v in r)) for r in rows]

    raise InputError(
        f"{path}: cannot tell which image each row belongs to: add plate/well/site, an image file name "
        "(image, FileName_<channel>) or ImageNumber columns"
    )
