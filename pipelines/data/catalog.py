"""A landed product catalog: where it lands, how it is read, its content hash and what changed against the served one.

A catalog file is the shop's WHOLE catalog at one moment (products absent from it have left), one row per product:
`product_uid` (integer) and `product_title` (text), the names of the snapshot's own catalog table; other columns are
allowed and ignored, since the served index embeds and matches titles only. CSV (UTF-8, with a header) or parquet.
Files land in `<landing>/catalog/` (Paths.landing, SHOPGUIDE_LANDING): the catalog DAG reads nothing outside it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.data.dataset import LandingPathError, landed_file

CATALOG_SUBDIR = "catalog"
ID_COLUMN, TITLE_COLUMN = "product_uid", "product_title"
SUFFIXES = (".csv", ".parquet")


class CatalogPathError(LandingPathError):
    """A catalog_path outside the catalog landing folder, or a file that is neither CSV nor parquet."""


def catalog_landing(landing: Path) -> Path:
    return landing / CATALOG_SUBDIR


def landed_catalog(path: str | Path, landing: Path) -> Path:
    """The real path of a landed catalog file: inside `<landing>/catalog/` (dataset.landed_file's rules), .csv or
    .parquet. Raises CatalogPathError."""
    real = landed_file(path, catalog_landing(landing), "catalog_path", CatalogPathError)
    if real.suffix.lower() not in SUFFIXES:
        raise CatalogPathError(f"catalog_path {real.name!r} is neither {' nor '.join(SUFFIXES)}")
    return real


def land_catalog(source: Path, landing: Path, now: datetime) -> Path:
    """Copy a catalog file into <landing>/catalog/ under a name of its own (`<UTC time>-<file name>`: a landed file
    is never overwritten, so a run reads exactly the file it was given) and return where it landed. The copy appears
    whole or not at all (written aside, then renamed)."""
    if source.suffix.lower() not in SUFFIXES:
        raise CatalogPathError(f"{source.name!r} is neither {' nor '.join(SUFFIXES)}")
    folder = catalog_landing(landing)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{now.astimezone(UTC):%Y%m%dT%H%M%S%fZ}-{source.name}"
    partial = folder / f".{target.name}.partial"
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


def read_catalog(path: Path) -> pd.DataFrame:
    """The file's product_uid (nullable Int64: an id that is not an integer reads as null, which validation reports)
    and product_title (string: an empty cell stays "", never NaN, so validation names it an empty title). A missing
    column is left missing, for validation to report."""
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    out = pd.DataFrame(index=df.index)
    if ID_COLUMN in df.columns:
        ids = pd.to_numeric(df[ID_COLUMN].astype(str).str.strip(), errors="coerce")  # "" and "abc" -> NaN
        whole = ids.isna() | (ids == ids.round())  # 12.5 is no product id: null, reported as such
        out[ID_COLUMN] = ids.where(whole).astype("Int64")
    if TITLE_COLUMN in df.columns:
        out[TITLE_COLUMN] = df[TITLE_COLUMN].astype("string")
    return out.reset_index(drop=True)


def catalog_hash(product_ids: np.ndarray, titles: np.ndarray) -> str:
    """sha256 (16 hex digits) of the catalog's (id, title) rows in id order: the same catalog, in any row order and
    from any file, always gets the same index version."""
    order = np.argsort(np.asarray(product_ids, dtype=np.int64), kind="stable")
    digest = hashlib.sha256()
    for i in order:
        digest.update(f"{int(product_ids[i])}\t{titles[i]}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CatalogDiff:
    """What a new catalog changes against the served one, by product id (a changed title is a changed product)."""

    added: list[int]
    removed: list[int]
    changed: list[int]
    kept: int

    @property
    def to_embed(self) -> list[int]:
        """Products whose title the served encoder has not embedded yet."""
        return sorted(self.added + self.changed)

    def summary(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed), "changed": len(self.changed), "kept": self.kept}


def diff_catalog(
    served_ids: np.ndarray, served_titles: np.ndarray, new_ids: np.ndarray, new_titles: np.ndarray
) -> CatalogDiff:
    """Added, removed and re-titled products of the new catalog against the served index (both unique by id)."""
    served = {int(p): str(t) for p, t in zip(served_ids, served_titles, strict=True)}
    new = {int(p): str(t) for p, t in zip(new_ids, new_titles, strict=True)}
    added = sorted(p for p in new if p not in served)
    removed = sorted(p for p in served if p not in new)
    changed = sorted(p for p, t in new.items() if p in served and served[p] != t)
    return CatalogDiff(added, removed, changed, len(new) - len(added) - len(changed))
