"""Quality and latency against the rerank depth, through the serving code path.

    .venv/bin/python bench/rerank_depth.py --data ../shared/data/ml-100k \\
        --version model_store/default/1 [--depths 10,25,50,100,200,400,0]
    .venv/bin/python bench/rerank_depth.py --data synthetic --synthetic-users 50000 \\
        --synthetic-items 100000 --version bench/.store/synth100k/1

Remakes the trainer's leave-last-out split of the same data (deterministic), then ranks every
test user's catalog with ServingModel at each depth (0 = the whole catalog: exact head ranking)
and reports full-catalog HR@10 / NDCG@10 and the time per batch of 32 users.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from service.data.load import load_dataset
from service.data.synthetic import generate_synthetic
from service.serving.loader import load_version
from service.serving.servable import RecommendCall, ServingModel, compute_item_matrix
from service.training.metrics import full_ranking_hits
from service.training.split import leave_last_out

BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--version", required=True, type=Path)
    parser.add_argument("--depths", default="10,25,50,100,200,400,0")
    parser.add_argument("--synthetic-users", type=int, default=20_000)
    parser.add_argument("--synthetic-items", type=int, default=2_000)
    parser.add_argument("--max-users", type=int, default=5_000, help="test users ranked")
    args = parser.parse_args()
    dataset = (generate_synthetic(args.synthetic_users, args.synthetic_items)
               if args.data == "synthetic" else load_dataset(args.data))
    split = leave_last_out(dataset.interactions, 0.2 if dataset.has_labels else 0.0)
    version = load_version("bench", int(args.version.name), args.version)
    matrix = compute_item_matrix(version, 8192)
    print(f"{min(len(split.test_items), args.max_users)} test users, {len(matrix)} items")
    print(f"{'depth':>6} {'full HR@10':>11} {'full NDCG@10':>13} {'ms / 32 users':>14}")
    for depth in (int(d) for d in args.depths.split(",")):
        model = ServingModel(version, matrix, "computed", depth or len(matrix))
        tops, seconds = [], 0.0
        targets = split.test_items.head(args.max_users).reset_index(drop=True)
        for start in range(0, len(targets), BATCH):
            queries = [model.query(u, None) for u in targets["user_id"][start:start + BATCH]]
            calls = [RecommendCall(q, 10, model.allowed(q, [], True, {})) for q in queries]
            began = time.perf_counter()
            tops += [[item for item, _ in r] for r in model.recommend_many(calls)]
            seconds += time.perf_counter() - began
        hr, ndcg = full_ranking_hits(tops, targets["item_id"].to_numpy(), 10)
        per_batch = 1000 * seconds / max(1, int(np.ceil(len(targets) / BATCH)))
        print(f"{depth or 'all':>6} {hr:>11.4f} {ndcg:>13.4f} {per_batch:>14.2f}")


if __name__ == "__main__":
    main()
