"""The recommender's three parts as Keras models over integer-encoded inputs.

- user tower: user id, side features and the recent positive history -> user embedding u
- item tower: item id, side features -> item embedding c (precomputed for the whole catalog)
- head: (u, c) -> click logit

``seed`` is the write-up's model: Dense(64, relu) towers and one Dense(1, sigmoid) over [u, c].
Its logit is w_u·u + w_c·c + b, so the user part is a constant per user and every user gets the
same ranking (the trap). ``interaction`` scores u·c (retrieval is a maximum-inner-product search)
plus an MLP over [u, c, u⊙c], so the ranking depends on the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from service.data.dataset import FeatureSpec
from service.training.features import BUCKET_SUFFIX

ARCH_SEED = "seed"
ARCH_INTERACTION = "interaction"
ARCHS = (ARCH_INTERACTION, ARCH_SEED)
RECENT_ITEMS = 5


@dataclass(frozen=True)
class ModelConfig:
    arch: str = ARCH_INTERACTION
    embedding_dim: int = 64
    id_dim: int = 64
    user_id_dim: int = 64
    feature_dim: int = 16
    hidden_dim: int = 256
    head_hidden: tuple[int, ...] = (128, 64)


def masked_mean(embedded: tf.Tensor, codes: tf.Tensor) -> tf.Tensor:
    """Mean of the embeddings whose code is not 0 (0 = padding/unknown); zeros if none."""
    mask = tf.cast(codes > 0, embedded.dtype)[..., None]
    total = tf.reduce_sum(embedded * mask, axis=-2)
    return total / tf.maximum(tf.reduce_sum(mask, axis=-2), 1.0)


class SideFeatures(keras.layers.Layer):
    """One table's categorical, multi-valued and numeric features as one vector."""

    def __init__(self, spec: FeatureSpec, vocab_sizes: dict[str, int], dim: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.embeddings = {name: keras.layers.Embedding(vocab_sizes[name], dim,
                                                        name=f"emb_{i}")
                           for i, name in enumerate(spec.categorical + spec.multi)}
        self.buckets = {name: keras.layers.Embedding(vocab_sizes[name + BUCKET_SUFFIX], dim,
                                                     name=f"bucket_{i}")
                        for i, name in enumerate(spec.numeric)}

    def call(self, inputs: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        parts = [self.embeddings[name](inputs[name]) for name in self.spec.categorical]
        parts += [masked_mean(self.embeddings[name](inputs[name]), inputs[name])
                  for name in self.spec.multi]
        parts += [tf.cast(inputs[name], tf.float32)[:, None] for name in self.spec.numeric]
        parts += [self.buckets[name](inputs[name + BUCKET_SUFFIX]) for name in self.spec.numeric]
        return parts


class UserTower(keras.Model):
    def __init__(self, config: ModelConfig, spec: FeatureSpec, vocab_sizes: dict[str, int],
                 n_user_ids: int, item_ids: keras.layers.Embedding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_arch = config.arch == ARCH_SEED
        self.user_ids = keras.layers.Embedding(n_user_ids, config.user_id_dim, name="user_id")
        self.item_ids = item_ids
        self.side = SideFeatures(spec, vocab_sizes, config.feature_dim, name="user_side")
        if self.seed_arch:
            self.layers_out = [keras.layers.Dense(64, activation="relu", name="user_dense")]
        else:
            self.layers_out = [keras.layers.Dense(config.hidden_dim, activation="relu"),
                               keras.layers.Dense(config.embedding_dim)]

    def call(self, inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        history = inputs["history"]
        embedded = self.item_ids(history)
        parts = [self.user_ids(inputs["user_id"]), masked_mean(embedded, history)]
        if not self.seed_arch:
            # The most recent items carry most of the signal (GUIDE §1): pool them separately.
            recent = history[:, -RECENT_ITEMS:]
            parts.append(masked_mean(self.item_ids(recent), recent))
        x = tf.concat(parts + self.side(inputs), axis=-1)
        for layer in self.layers_out:
            x = layer(x)
        return x


class ItemTower(keras.Model):
    def __init__(self, config: ModelConfig, spec: FeatureSpec, vocab_sizes: dict[str, int],
                 item_ids: keras.layers.Embedding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item_ids = item_ids
        self.side = SideFeatures(spec, vocab_sizes, config.feature_dim, name="item_side")
        if config.arch == ARCH_SEED:
            self.layers_out = [keras.layers.Dense(64, activation="relu", name="item_dense")]
        else:
            self.layers_out = [keras.layers.Dense(config.hidden_dim, activation="relu"),
                               keras.layers.Dense(config.embedding_dim)]

    def call(self, inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        x = tf.concat([self.item_ids(inputs["item_id"]), *self.side(inputs)], axis=-1)
        for layer in self.layers_out:
            x = layer(x)
        return x


def pair_up(users: tf.Tensor, items: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Broadcast user embeddings [B, d] against item embeddings [B, M, d]."""
    return tf.broadcast_to(users[:, None, :], tf.shape(items)), items


class SeedHead(keras.Model):
    """Dense(1) over [u, c]: the write-up's head (sigmoid applied by the caller)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = keras.layers.Dense(1, name="head_dense")

    def call(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        u, c = pair_up(users, items)
        return tf.squeeze(self.out(tf.concat([u, c], axis=-1)), -1)


class InteractionHead(keras.Model):
    """logit = a·(u·c) + MLP([u, c, u⊙c]): the dot product ranks, the MLP refines."""

    def __init__(self, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlp = [keras.layers.Dense(n, activation="relu") for n in config.head_hidden]
        self.out = keras.layers.Dense(1)
        self.dot_weight = self.add_weight(shape=(), initializer="ones", name="dot_weight")

    def call(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        u, c = pair_up(users, items)
        x = tf.concat([u, c, u * c], axis=-1)
        for layer in self.mlp:
            x = layer(x)
        return self.dot_weight * tf.reduce_sum(u * c, -1) + tf.squeeze(self.out(x), -1)


@dataclass
class Recommender:
    """The three parts; the item id embedding is shared by the item tower and the history."""

    config: ModelConfig
    user_tower: UserTower
    item_tower: ItemTower
    head: keras.Model

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return unique([v for p in self.parts for v in p.trainable_variables])

    @property
    def variables(self) -> list[tf.Variable]:
        return unique([v for p in self.parts for v in p.variables])

    @property
    def parts(self) -> tuple[keras.Model, ...]:
        return (self.user_tower, self.item_tower, self.head)


def unique(variables: list[tf.Variable]) -> list[tf.Variable]:
    """Drops repeats (the shared item-id embedding appears in two towers), keeps order."""
    return list({id(v): v for v in variables}.values())


def build_recommender(config: ModelConfig, user_spec: FeatureSpec, item_spec: FeatureSpec,
                      vocab_sizes: dict[str, int], n_user_ids: int,
                      n_item_ids: int) -> Recommender:
    item_ids = keras.layers.Embedding(n_item_ids, config.id_dim, name="item_id")
    user_vocab = {k.removeprefix("user:"): v for k, v in vocab_sizes.items()
                  if k.startswith("user:")}
    item_vocab = {k.removeprefix("item:"): v for k, v in vocab_sizes.items()
                  if k.startswith("item:")}
    head: keras.Model = (SeedHead(name="head") if config.arch == ARCH_SEED
                         else InteractionHead(config, name="head"))
    return Recommender(config,
                       UserTower(config, user_spec, user_vocab, n_user_ids, item_ids,
                                 name="user_tower"),
                       ItemTower(config, item_spec, item_vocab, item_ids, name="item_tower"),
                       head)
