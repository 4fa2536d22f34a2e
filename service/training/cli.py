"""`recsys-train`: trains a model and writes it as a new version of the model store."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from service.data.dataset import Dataset
from service.data.errors import DataError
from service.training.model import ARCH_INTERACTION, ARCH_SEED, ARCHS, ModelConfig
from service.training.trainer import TrainConfig

DEFAULT_SYNTHETIC_USERS = 20_000
DEFAULT_SYNTHETIC_ITEMS = 2000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-train", description=__doc__)
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' or a directory in one of the supported layouts")
    parser.add_argument("--model-store", default="model_store", type=Path)
    parser.add_argument("--name", default="default", help="model name under the store")
    parser.add_argument("--arch", default=ARCH_INTERACTION, choices=ARCHS,
                        help="'seed' is the write-up's exact model, kept as a baseline")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                        help="maximum epochs (early stopping on validation)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--synthetic-users", type=int, default=DEFAULT_SYNTHETIC_USERS)
    parser.add_argument("--synthetic-items", type=int, default=DEFAULT_SYNTHETIC_ITEMS)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--embedding-dim", type=int, default=ModelConfig.embedding_dim)
    parser.add_argument("--history-length", type=int, default=50)
    parser.add_argument("--members", type=int, default=None,
                        help="independently trained models fused into the one exported "
                             "(default: 2 for implicit feedback, 1 with explicit negatives "
                             "and for --arch seed)")
    parser.add_argument("--query-time-buckets", type=int,
                        default=ModelConfig.query_time_buckets,
                        help="buckets of the query time the model learns a vector for "
                             "(0: none; never for --arch seed or data without timestamps)")
    parser.add_argument("--stream", action="store_true",
                        help="stream the training examples from Parquet shards on disk instead "
                             "of holding them in memory (always on when TF_CONFIG is set)")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def load(args: argparse.Namespace) -> Dataset:
    if args.data == "synthetic":
        from service.data.synthetic import generate_synthetic
        return generate_synthetic(args.synthetic_users, args.synthetic_items, seed=args.seed)
    from service.data.load import load_dataset
    return load_dataset(args.data)


def positive(value: int, flag: str) -> None:
    if value < 1:
        raise DataError(f"{flag} must be at least 1, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        for flag in ("epochs", "synthetic_users", "synthetic_items", "batch_size",
                     "embedding_dim", "history_length"):
            positive(getattr(args, flag), "--" + flag.replace("_", "-"))
        if args.query_time_buckets < 0:
            raise DataError(f"--query-time-buckets must be at least 0, got "
                            f"{args.query_time_buckets}")
        if args.members is not None:
            positive(args.members, "--members")
            if args.arch == ARCH_SEED and args.members > 1:
                raise DataError("--arch seed is the write-up's single model: --members must be 1")
        print(f"loading {args.data} ...", flush=True)
        dataset = load(args)
        print(f"{dataset.name}: {dataset.interactions['user_id'].nunique()} users, "
              f"{len(dataset.items)} items, {len(dataset.interactions)} interactions", flush=True)
        # Imported late: TensorFlow takes seconds to import, the errors above should not wait.
        from service.training.pipeline import RunOptions, run
        options = RunOptions(
            model=ModelConfig(arch=args.arch, embedding_dim=args.embedding_dim,
                              members=args.members, query_time_buckets=args.query_time_buckets),
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                              learning_rate=args.learning_rate, seed=args.seed),
            history_length=args.history_length, stream_examples=args.stream)
        from service.training.distribution import strategy_from_environment
        try:
            distribution = strategy_from_environment()  # before any TensorFlow operation
        except ValueError as exc:  # a TF_CONFIG that is not JSON or names no valid cluster
            print(f"recsys-train: invalid TF_CONFIG: {exc}", file=sys.stderr)
            return 2
        set_seeds(args.seed)
        result = run(dataset, args.model_store, args.name, options,
                     progress=lambda line: print(line, flush=True), strategy=distribution)
    except DataError as exc:
        print(f"recsys-train: data error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recsys-train: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {result.version_dir}" if result.version_dir else
          "trained as a worker; the chief exports the model")
    return 0


def set_seeds(seed: int) -> None:
    import keras
    keras.utils.set_random_seed(seed)


if __name__ == "__main__":
    sys.exit(main())
