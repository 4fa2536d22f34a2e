"""`recsys-train` as a user runs it: progress, the report, the version; clean failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tensorflow as tf

from service.model_format import METADATA_FILE, version_dirs


def recsys_train(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "recsys-train"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_trains_and_exports_a_version(tmp_path: Path) -> None:
    done = recsys_train("--data", "synthetic", "--synthetic-users", "150",
                        "--synthetic-items", "60", "--epochs", "2", "--model-store",
                        str(tmp_path), "--name", "tiny", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert "epoch 1/2" in done.stdout
    assert "popularity" in done.stdout and "oracle" in done.stdout
    assert [n for n, _ in version_dirs(tmp_path / "tiny")] == [1]


def test_bad_data_path_fails_cleanly(tmp_path: Path) -> None:
    done = recsys_train("--data", str(tmp_path / "missing"), "--model-store", str(tmp_path))
    assert done.returncode == 2
    assert "missing" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "default").exists()


def test_malformed_file_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n1,2,3\n1,3,notatime\n")
    done = recsys_train("--data", str(data), "--model-store", str(tmp_path / "store"))
    assert done.returncode == 2
    assert "interactions.csv" in done.stderr and "line 3" in done.stderr
    assert not (tmp_path / "store" / "default").exists() or not version_dirs(
        tmp_path / "store" / "default")


def test_rejects_nonsense_options(tmp_path: Path) -> None:
    done = recsys_train("--epochs", "0", "--model-store", str(tmp_path))
    assert done.returncode == 2
    assert "--epochs" in done.stderr
    done = recsys_train("--query-time-buckets", "-1", "--model-store", str(tmp_path))
    assert done.returncode == 2
    assert "--query-time-buckets" in done.stderr


def test_the_query_time_can_be_switched_off(tmp_path: Path) -> None:
    done = recsys_train("--data", "synthetic", "--synthetic-users", "150",
                        "--synthetic-items", "60", "--epochs", "1", "--model-store",
                        str(tmp_path), "--query-time-buckets", "0")
    assert done.returncode == 0, done.stderr
    [(_, version)] = version_dirs(tmp_path / "default")
    assert json.loads((version / METADATA_FILE).read_text())["model"]["time_boundaries"] is None
    assert "query_time" not in tf.saved_model.load(str(version)).signatures


def test_the_seed_model_is_one_model(tmp_path: Path) -> None:
    for members in ("2", "0"):
        done = recsys_train("--arch", "seed", "--members", members, "--model-store",
                            str(tmp_path))
        assert done.returncode == 2
        assert "--members" in done.stderr
        assert not any(tmp_path.iterdir())
