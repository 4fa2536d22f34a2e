"""What a version's stored users cost a server process: time to read users.parquet, resident
memory once read, and one lookup, for a generated table of N users.

    .venv/bin/python bench/users_memory.py [--users 1000000] [--history 50]

Histories hold 0..--history ids (uniform, so half that on average) drawn from 100,000 item ids;
four side features as the synthetic data has them. The table is written to a temporary
directory (seed 0, so every run reads the same table); memory is RSS after reading less RSS
before, both after gc and glibc's malloc_trim, so freed memory does not count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/users_memory.py` puts bench/ on the path
    sys.path.insert(0, str(ROOT))

# Imports TensorFlow too, so that only the table counts in what is measured.
from service.serving.manager import release_memory  # noqa: E402
from service.serving.users import read_users  # noqa: E402

FEATURES = ["gender", "country", "age", "price_sensitivity"]
CATALOG = 100_000
LOOKUPS = 2000


def write_users(path: Path, n: int, max_history: int) -> int:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, max_history + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.array([f"i{j}" for j in range(1, CATALOG + 1)], dtype=object)
    history = pa.LargeListArray.from_arrays(
        pa.array(offsets, pa.int64()), pa.array(items[rng.integers(0, CATALOG, offsets[-1])],
                                                pa.string()))
    pq.write_table(pa.table({
        "user_id": [f"u{j}" for j in range(1, n + 1)], "history": history,
        "gender": rng.choice(["M", "F"], n), "country": rng.choice(["BR", "US", "DE"], n),
        "age": rng.uniform(18, 80, n), "price_sensitivity": rng.uniform(0, 1, n)}), path)
    return int(offsets[-1])


def resident() -> int:
    release_memory()  # as the server does after loading: freed memory does not count
    return int(psutil.Process().memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "users.parquet"
        mentions = write_users(path, args.users, args.history)
        before = resident()
        started = time.perf_counter()
        users = read_users(path, FEATURES)
        seconds = time.perf_counter() - started
        grown = resident() - before
        asked = [f"u{j}" for j in np.random.default_rng(1).integers(1, args.users + 1, LOOKUPS)]
        users.get(asked[0])  # the first call pays one-time setup
        started = time.perf_counter()
        found = sum(users.get(a) is not None for a in asked)
        lookup_us = (time.perf_counter() - started) / LOOKUPS * 1e6
    assert found == LOOKUPS, f"{LOOKUPS - found} stored users not found"
    print(f"{args.users:,} users, {mentions:,} history ids: read in {seconds:.1f} s, "
          f"+{grown / 2**20:,.0f} MiB resident, {lookup_us:.1f} us per lookup")


if __name__ == "__main__":
    main()
