"""The model's layers: the history encoder as serving relies on it (padding, window width,
order), and the shortcuts that must compute what the Keras layers they use compute."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from service.data.dataset import FeatureSpec
from service.model_format import time_buckets
from service.training.features import fit_time_boundaries
from service.training.model import HISTORY_ATTENTION, ModelConfig, Recommender, build_recommender
from service.training.pipeline import time_buckets_for

LENGTH = 12
N_ITEMS = 30


def tower_output(model: Recommender, history: list[list[int]]) -> np.ndarray:
    batch = np.asarray(history, dtype=np.int32)
    inputs = {"user_id": np.ones(len(batch), np.int32), "history": batch}
    return np.asarray(model.user_tower(inputs))


@pytest.fixture(scope="module")
def model() -> Recommender:
    import keras

    keras.utils.set_random_seed(0)
    config = ModelConfig(history_encoder=HISTORY_ATTENTION)
    return build_recommender(config, FeatureSpec(), FeatureSpec(), {}, 5, N_ITEMS, LENGTH)


def left_padded(items: list[int], width: int) -> list[int]:
    return [0] * (width - len(items)) + items


def test_padding_width_does_not_matter(model: Recommender) -> None:
    """Positions count back from the newest item: a narrower left-padded window of the same
    items gives the same embedding."""
    items = [3, 7, 2, 9]
    wide = tower_output(model, [left_padded(items, LENGTH)])
    narrow = tower_output(model, [left_padded(items, 6)])
    np.testing.assert_allclose(wide, narrow, atol=1e-5)


def test_order_matters(model: Recommender) -> None:
    forward = tower_output(model, [left_padded([3, 7, 2, 9], LENGTH)])
    backward = tower_output(model, [left_padded([9, 2, 7, 3], LENGTH)])
    assert np.abs(forward - backward).max() > 1e-4


def test_rows_are_independent(model: Recommender) -> None:
    """A row's embedding does not depend on the other rows of the batch (no pad leaks)."""
    rows = [left_padded([3, 7], LENGTH), left_padded(list(range(1, LENGTH + 1)), LENGTH),
            [0] * LENGTH]
    together = tower_output(model, rows)
    alone = np.concatenate([tower_output(model, [row]) for row in rows])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_trim_padding_keeps_every_filled_column() -> None:
    from service.training.example_input import trim_padding

    history = np.array([[0, 0, 0, 4, 5], [0, 0, 2, 0, 7]], dtype=np.int32)
    np.testing.assert_array_equal(trim_padding(history), history[:, 2:])
    assert trim_padding(np.zeros((3, 5), np.int32)).shape == (3, 1)


def test_the_data_chooses_the_history_encoder() -> None:
    from service.training.model import HISTORY_POOL, history_encoder_for

    assert history_encoder_for(has_labels=False) == HISTORY_ATTENTION
    assert history_encoder_for(has_labels=True) == HISTORY_POOL


@pytest.mark.parametrize("heads", [1, 2])
def test_one_query_attention_equals_keras_multi_head_attention(heads: int) -> None:
    # The last block's shortcut (projections on the query's side) against the Keras layer
    # whose weights it uses, with empty, partly and fully masked rows. Dropout above 0, as
    # trained: Keras takes another path (uniform weights over a fully masked row) without it.
    import tensorflow as tf

    from service.training.model import AttentionBlock

    rng = np.random.default_rng(heads)
    block = AttentionBlock(8, heads, dropout=0.2)
    queries = tf.constant(rng.normal(size=(5, 1, 8)), tf.float32)
    keys = tf.constant(rng.normal(size=(5, 6, 8)), tf.float32)
    mask = tf.constant(rng.random((5, 1, 6)) < 0.6)
    mask = tf.concat([mask[:3], tf.zeros([1, 1, 6], tf.bool), tf.ones([1, 1, 6], tf.bool)], 0)
    block(queries, keys, mask)
    for layer in (block.attention.query_dense, block.attention.key_dense,
                  block.attention.value_dense, block.attention.output_dense):
        layer.bias.assign(rng.normal(size=layer.bias.shape))  # biases start at zero
    shortcut = block(queries, keys, mask).numpy()
    normed, normed_keys = block.attention_norm(queries), block.attention_norm(keys)
    x = queries + block.attention(normed, normed_keys, attention_mask=mask)
    reference = (x + block.ffn[2](block.ffn[0](block.ffn_norm(x)))).numpy()
    np.testing.assert_allclose(shortcut, reference, rtol=1e-5, atol=1e-5)


def test_factored_head_equals_the_mlp_over_the_concatenation() -> None:
    """The head's first layer, factored per user and per candidate, against the Dense layers
    it uses called on [u, c, u⊙c] as written."""
    import tensorflow as tf

    from service.training.model import InteractionHead

    rng = np.random.default_rng(0)
    head = InteractionHead(ModelConfig(head_hidden=(16, 8)))
    users = tf.constant(rng.normal(size=(3, 6)), tf.float32)
    items = tf.constant(rng.normal(size=(3, 5, 6)), tf.float32)
    head(users, items)
    for layer in (*head.mlp, head.out):
        layer.bias.assign(rng.normal(size=layer.bias.shape))  # biases start at zero
    u = tf.broadcast_to(users[:, None], items.shape)
    x = tf.concat([u, items, u * items], axis=-1)
    for layer in head.mlp:
        x = layer(x)
    reference = head.dot_weight * tf.reduce_sum(u * items, -1) + tf.squeeze(head.out(x), -1)
    np.testing.assert_allclose(head(users, items).numpy(), reference.numpy(), rtol=1e-5,
                               atol=1e-5)


def test_the_query_time_starts_at_zero_and_adds_to_the_user_tower() -> None:
    config = ModelConfig(embedding_dim=8, id_dim=8, user_id_dim=8, hidden_dim=16,
                         head_hidden=(8,), history_encoder=HISTORY_ATTENTION)
    built = build_recommender(config, FeatureSpec(), FeatureSpec(), {}, 3, 10, 4, 5)
    inputs = {"user_id": np.array([1, 2, 2], np.int32),
              "history": np.array([[0, 1, 2, 3]] * 3, np.int32),
              "time_bucket": np.array([0, 4, 2], np.int32)}
    tower = np.asarray(built.user_tower(inputs))
    np.testing.assert_array_equal(np.asarray(built.users(inputs)), tower)
    assert built.query_time is not None
    table = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    built.query_time.table.embeddings.assign(table)
    np.testing.assert_allclose(np.asarray(built.users(inputs)), tower + table[[0, 4, 2]],
                               atol=1e-6)


def test_the_seed_model_and_timeless_data_take_no_query_time() -> None:
    seed = build_recommender(ModelConfig(arch="seed"), FeatureSpec(), FeatureSpec(), {}, 3, 10,
                             4, 5)
    assert seed.query_time is None
    assert time_buckets_for(ModelConfig(), has_time=True) == ModelConfig().query_time_buckets
    assert time_buckets_for(ModelConfig(), has_time=False) == 0
    assert time_buckets_for(ModelConfig(arch="seed"), has_time=True) == 0


def test_time_boundaries_are_training_quantiles() -> None:
    times = pd.Series(np.arange(100, dtype=np.int64))
    boundaries = fit_time_boundaries(times, 4)
    assert boundaries == (24.75, 49.5, 74.25)
    np.testing.assert_array_equal(time_buckets([0, 24.75, 50, 74.25, 1e12], boundaries),
                                  [0, 1, 2, 3, 3])
    assert fit_time_boundaries(pd.Series([7, 7, 7]), 16) is None  # one time: nothing to learn
    assert fit_time_boundaries(times, 0) is None
    # Repeated times collapse equal quantiles into one boundary.
    assert fit_time_boundaries(pd.Series([1] * 90 + [2] * 10), 4) == (1.0,)
