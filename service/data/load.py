"""`load_dataset`: find which data layout a directory holds, load it and clean it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.data.cleaning import clean
from service.data.dataset import Dataset
from service.data.errors import DataError
from service.data.generic import load_generic
from service.data.movielens import load_ml1m, load_ml100k, load_movielens_csv

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """A data layout: recognised by any one of its marker files."""

    name: str
    markers: tuple[str, ...]
    loader: Callable[[Path], Dataset]

    def matches(self, directory: Path) -> bool:
        return any((directory / marker).is_file() for marker in self.markers)


# In order of precedence, should a directory hold files of several layouts.
LAYOUTS = (
    Layout("MovieLens 100K", ("u.data",), load_ml100k),
    Layout("MovieLens 1M", ("ratings.dat",), load_ml1m),
    Layout("MovieLens CSV", ("ratings.csv",), load_movielens_csv),
    Layout("generic", ("interactions.csv", "interactions.parquet"), load_generic),
)


def detect_layout(path: str | Path) -> tuple[Layout, Path]:
    """The layout of the data at `path` and its directory (a marker file's path is accepted too)."""
    directory = _directory(Path(path))
    for layout in LAYOUTS:
        if layout.matches(directory):
            return layout, directory
    looked_for = "; ".join(f"{' or '.join(layout.markers)} ({layout.name})" for layout in LAYOUTS)
    raise DataError(f"{directory}: no known data layout; looked for {looked_for}")


def _directory(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.is_file() and any(path.name in layout.markers for layout in LAYOUTS):
        return path.parent
    if path.exists():
        raise DataError(f"{path}: expected a data directory")
    raise DataError(f"{path}: no such directory")


def load_dataset(path: str | Path) -> Dataset:
    """Load and clean the data set at `path`, whichever supported layout it uses."""
    layout, directory = detect_layout(path)
    logger.info("loading %s as %s", directory, layout.name)
    return clean(layout.loader(directory))
