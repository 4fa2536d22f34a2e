"""The recommender's three parts as Keras models over integer-encoded inputs.

- user tower: user id, side features and the recent positive history -> user embedding u
- item tower: item id, side features -> item embedding c (precomputed for the whole catalog)
- head: (u, c) -> click logit

``seed`` is the write-up's model: Dense(64, relu) towers and one Dense(1, sigmoid) over [u, c].
Its logit is w_u·u + w_c·c + b, so the user part is a constant per user and every user gets the
same ranking (the trap). ``interaction`` scores u·c (retrieval is a maximum-inner-product search)
plus an MLP over [u, c, u⊙c], so the ranking depends on the user; its user tower reads the history
with self-attention (SASRec-style), since the order and recency of the history matter most, and
the query time adds a vector of its own to u (QueryTime).

An ensemble of independently trained interaction models is fused into one model of the same
shape (``fuse``): towers side by side, so u·c is the sum of the members' dot products, and a head
that averages the members' logits. Serving sees one model with wider embeddings.
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
HISTORY_POOL = "pool"
HISTORY_ATTENTION = "attention"


@dataclass(frozen=True)
class ModelConfig:
    arch: str = ARCH_INTERACTION
    embedding_dim: int = 64
    id_dim: int = 64
    user_id_dim: int = 64
    feature_dim: int = 16
    hidden_dim: int = 256
    head_hidden: tuple[int, ...] = (128, 64)
    # interaction only: how the history becomes one vector (seed always pools). On ml-100k
    # validation one attention block scored as well as two in 60% of the time; dropout 0.5
    # or 0.1 scored lower than 0.2. "pool" (mean of all and of the last 5 items) is 3x faster.
    # None: chosen by the data (history_encoder_for).
    history_encoder: str | None = None
    attention_blocks: int = 1
    attention_heads: int = 1
    dropout: float = 0.2
    # Independently trained models fused into one (interaction only; seed is always one).
    # None: chosen by the data (members_for).
    members: int | None = None
    # Buckets of the query time (quantiles of the training rows' times); interaction only,
    # and only for data with real times (0: off). See QueryTime. Chosen on ml-100k's validation
    # split over 5 seeds: 8 buckets 0.1483 mean full NDCG@10 (higher on 4 of 5), 16 0.1456; 32
    # was lower on both seeds tried.
    query_time_buckets: int = 8


def members_for(arch: str, has_labels: bool) -> int:
    """Two members for implicit feedback. On ml-100k, 3 fused pairs of seeds beat the mean of
    their two members on the test by +0.007/+0.011/+0.012 full HR@10 and +0.002/+0.005/+0.006
    full NDCG@10; 4 pairs of 5 beat both their members on validation full NDCG@10 (the
    early-stopping metric), and the fifth, whose second member stopped early, scored below its
    first (pipeline.fuse_if_better then exports that member alone). The cost: twice the
    training time and twice the embedding width served. One for data with explicit negatives
    (not measured there) and for the seed model (the write-up's model, kept as it was)."""
    return 1 if arch == ARCH_SEED or has_labels else 2


def history_encoder_for(has_labels: bool) -> str:
    """Attention for implicit feedback, where the order of what a user consumed predicts the
    next item (ml-100k full HR@10 0.16 -> 0.20); pooling for impressions with explicit
    negatives, where the history is the user's earlier clicks and attention did not help
    (synthetic data, one seed each, test AUC 0.775 pooled vs 0.771 with attention)."""
    return HISTORY_POOL if has_labels else HISTORY_ATTENTION


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


class AttentionBlock(keras.layers.Layer):
    """Pre-norm transformer block (SASRec's): self-attention then a position-wise FFN."""

    def __init__(self, dim: int, heads: int, dropout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.attention = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout)
        self.ffn_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.ffn = [keras.layers.Dense(dim, activation="relu"), keras.layers.Dropout(dropout),
                    keras.layers.Dense(dim), keras.layers.Dropout(dropout)]
        self.attention_dropout = keras.layers.Dropout(dropout)

    def call(self, queries: tf.Tensor, keys: tf.Tensor, mask: tf.Tensor,
             training: bool | None = None) -> tf.Tensor:
        """``queries`` [B, Q, d] attend to ``keys`` [B, T, d] where ``mask`` [B, Q, T]."""
        normed = self.attention_norm(queries)
        normed_keys = self.attention_norm(keys)
        if queries.shape[1] == 1:
            attended = self._attend_one(normed, normed_keys, mask, training)
        else:
            attended = self.attention(normed, normed_keys, attention_mask=mask,
                                      training=training)
        x = queries + self.attention_dropout(attended, training=training)
        h = self.ffn_norm(x)
        for layer in self.ffn:
            h = layer(h, training=training)
        return x + h

    def _attend_one(self, query: tf.Tensor, keys: tf.Tensor, mask: tf.Tensor,
                    training: bool | None) -> tf.Tensor:
        """What ``self.attention`` computes for one query [B, 1, d], with its own weights, but
        with the key and value projections moved onto the query's side: q·(Wk k_t + b) is
        (Wk^T q)·k_t plus a term that is the same for every t (softmax ignores it), and
        sum_t p_t (Wv k_t + b) is Wv (sum_t p_t k_t) + b sum_t p_t. One [d, d] product per
        user instead of one per history slot: a training step on ML-1M-sized data (512
        examples, 50 slots) went 71 -> 56 ms."""
        mha = self.attention
        if not mha.built:  # created as a first call would, so initialisation is unchanged
            mha.build(query.shape, keys.shape)
        q_dense, k_dense = mha.query_dense, mha.key_dense
        v_dense, out_dense = mha.value_dense, mha.output_dense
        q = (tf.einsum("bd,dhk->bhk", query[:, 0], q_dense.kernel) + q_dense.bias) \
            / float(mha.key_dim) ** 0.5
        scores = tf.einsum("bhd,btd->bht", tf.einsum("bhk,dhk->bhd", q, k_dense.kernel), keys)
        # Keras's masked softmax: masked slots out, and all zeros when every slot is masked.
        allowed = mask[:, :1]  # [B, 1, T]
        weights = tf.nn.softmax(tf.where(allowed, scores, -1e9), axis=-1)
        # The layer's own dropout (private in Keras 3.15): its random stream, as before.
        weights = mha._dropout_layer(tf.where(allowed, weights, 0.0), training=training)
        context = tf.einsum("bhd,dhk->bhk", tf.einsum("bht,btd->bhd", weights, keys),
                            v_dense.kernel) + tf.reduce_sum(weights, -1)[..., None] * v_dense.bias
        return (tf.einsum("bhk,hkd->bd", context, out_dense.kernel) + out_dense.bias)[:, None]


class HistoryAttention(keras.layers.Layer):
    """Self-attention over the left-padded history; the newest slot's state is the summary.

    Positions count back from the newest item, so slot meaning does not depend on how long
    the history is (serving passes the same left-padded window). Only the newest slot is
    queried in the last block: the other slots' outputs would be thrown away.
    """

    def __init__(self, config: ModelConfig, item_ids: keras.layers.Embedding,
                 max_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item_ids = item_ids
        self.max_length = max_length
        self.scale = float(config.id_dim) ** 0.5
        self.positions = keras.layers.Embedding(max_length, config.id_dim, name="position")
        self.input_dropout = keras.layers.Dropout(config.dropout)
        self.blocks = [AttentionBlock(config.id_dim, config.attention_heads, config.dropout,
                                      name=f"block_{i}")
                       for i in range(config.attention_blocks)]
        self.norm = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, history: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        width = tf.shape(history)[1]
        age = tf.minimum(tf.range(width - 1, -1, -1), self.max_length - 1)
        present = tf.cast(history > 0, tf.float32)[..., None]
        x = self.item_ids(history) * self.scale + self.positions(age)[None]
        x = self.input_dropout(x, training=training) * present
        keys = history > 0
        if len(self.blocks) > 1:
            mask = tf.logical_and(keys[:, None, :], keys[:, :, None])
            # Causal, as SASRec: a slot sees only older items (the newest slot sees them all).
            mask = tf.logical_and(mask, tf.linalg.band_part(
                tf.ones([width, width], tf.bool), -1, 0)[None])
            for block in self.blocks[:-1]:
                x = block(x, x, mask, training=training) * present
        # The newest slot's row of that mask, without the [B, T, T] one when no block needs it.
        newest_mask = tf.logical_and(keys[:, None, :], keys[:, -1:, None])
        newest = self.blocks[-1](x[:, -1:], x, newest_mask, training=training)
        return self.norm(newest[:, 0]) * present[:, -1]


class UserTower(keras.Model):
    def __init__(self, config: ModelConfig, spec: FeatureSpec, vocab_sizes: dict[str, int],
                 n_user_ids: int, item_ids: keras.layers.Embedding, history_length: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_arch = config.arch == ARCH_SEED
        self.user_ids = keras.layers.Embedding(n_user_ids, config.user_id_dim, name="user_id")
        self.item_ids = item_ids
        self.attention = (HistoryAttention(config, item_ids, history_length, name="history")
                          if not self.seed_arch and config.history_encoder == HISTORY_ATTENTION
                          else None)
        self.side = SideFeatures(spec, vocab_sizes, config.feature_dim, name="user_side")
        if self.seed_arch:
            self.layers_out = [keras.layers.Dense(64, activation="relu", name="user_dense")]
        else:
            self.layers_out = [keras.layers.Dense(config.hidden_dim, activation="relu"),
                               keras.layers.Dense(config.embedding_dim)]

    def call(self, inputs: dict[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        history = inputs["history"]
        parts = [self.user_ids(inputs["user_id"])]
        if self.attention is not None:
            # Order and recency of the history matter most (GUIDE §1).
            parts.append(self.attention(history, training=training))
        else:
            parts.append(masked_mean(self.item_ids(history), history))
            if not self.seed_arch:
                # The most recent items carry most of the signal: pool them separately.
                recent = history[:, -RECENT_ITEMS:]
                parts.append(masked_mean(self.item_ids(recent), recent))
        x = tf.concat(parts + self.side(inputs), axis=-1)
        for layer in self.layers_out:
            x = layer(x)
        return x

    @property
    def output_dim(self) -> int:
        return int(self.layers_out[-1].units)


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

    @property
    def output_dim(self) -> int:
        return int(self.layers_out[-1].units)


class QueryTime(keras.Model):
    """A learned vector per bucket of the query's time, added to the user embedding: what
    people watched when (new releases, seasons), which a user's history alone does not date.
    Added after the user tower rather than fed into it, so a stored user's embedding stays
    the same at every query time and is computed once. Zeros at first: training starts from
    the model without it. On ml-100k (16 buckets, 5 seeds; BENCHMARKS) it raised the mean of
    every ranking figure by 0.004 to 0.008; 8 buckets, the default, scored as well."""

    def __init__(self, buckets: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = keras.layers.Embedding(buckets, dim, embeddings_initializer="zeros",
                                            name="time_bucket")

    def call(self, inputs: dict[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        return self.table(inputs["time_bucket"])

    @property
    def output_dim(self) -> int:
        return int(self.table.output_dim)


class SideBySide(keras.Model):
    """Several towers over the same inputs, their outputs concatenated: with users and items
    both concatenated member by member, u·c is the sum of the members' u_i·c_i."""

    def __init__(self, towers: list[keras.Model], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.towers = towers

    def call(self, inputs: dict[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        return tf.concat([tower(inputs, training=training) for tower in self.towers], axis=-1)

    @property
    def output_dim(self) -> int:
        return sum(int(tower.output_dim) for tower in self.towers)


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
        return self.dot_weight * tf.einsum("bd,bmd->bm", users, items) \
            + tf.squeeze(self.out(self._mlp(users, items)), -1)

    def _mlp(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        """The MLP over [u, c, u⊙c], its first layer split by what its terms depend on:
        [u, c, u⊙c]·W + b = (u·W_u + b) + [c, u⊙c]·W_rest, the first term once per user
        instead of once per candidate (the head is the rerank's cost: rerank-depth
        candidates a user), and u never broadcast to every candidate."""
        first = self.mlp[0]
        dim = int(users.shape[-1])
        if not first.built:  # created as a first call would, so initialisation is unchanged
            first.build((None, 3 * dim))
        per_user = tf.matmul(users, first.kernel[:dim]) + first.bias  # [B, h]
        pairs = tf.concat([items, users[:, None] * items], axis=-1)  # [B, M, 2d]
        x = first.activation(tf.tensordot(pairs, first.kernel[dim:], 1) + per_user[:, None])
        for layer in self.mlp[1:]:
            x = layer(x)
        return x


class MeanHead(keras.Model):
    """The members' heads, each on its own slice of u and c: the mean of their logits."""

    def __init__(self, heads: list[keras.Model], dims: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads = heads
        self.dims = dims

    def call(self, users: tf.Tensor, items: tf.Tensor) -> tf.Tensor:
        logits = [head(u, c) for head, u, c in zip(
            self.heads, tf.split(users, self.dims, axis=-1), tf.split(items, self.dims, axis=-1),
            strict=True)]
        return tf.add_n(logits) / float(len(logits))


@dataclass
class Recommender:
    """The three parts, and the query time's vectors when the model has them; the item id
    embedding is shared by the item tower and the history. Towers have an ``output_dim``;
    the head maps (u [B, d], c [B, M, d]) to logits [B, M]."""

    config: ModelConfig
    user_tower: keras.Model
    item_tower: keras.Model
    head: keras.Model
    query_time: keras.Model | None = None

    def users(self, inputs: dict[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        """u: the user tower's output plus, with a query time, its bucket's vector."""
        u = self.user_tower(inputs, training=training)
        if self.query_time is not None:
            u = u + self.query_time(inputs, training=training)
        return u

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return unique([v for p in self.parts for v in p.trainable_variables])

    @property
    def variables(self) -> list[tf.Variable]:
        return unique([v for p in self.parts for v in p.variables])

    @property
    def parts(self) -> tuple[keras.Model, ...]:
        extra = (self.query_time,) if self.query_time is not None else ()
        return (self.user_tower, self.item_tower, self.head, *extra)


def fuse(members: list[Recommender]) -> Recommender:
    """One model that scores as the members' ensemble: u = [u_1, u_2, ...], c = [c_1, c_2, ...]
    (so retrieval ranks by the sum of the members' u_i·c_i) and the mean of the members' head
    logits. One member is returned as it is."""
    if len(members) == 1:
        return members[0]
    dims = [int(m.item_tower.output_dim) for m in members]
    if dims != [int(m.user_tower.output_dim) for m in members]:
        raise ValueError(f"members' user and item embeddings differ in width: {dims}")
    times = [m.query_time for m in members if m.query_time is not None]
    return Recommender(
        members[0].config,
        SideBySide([m.user_tower for m in members], name="user_tower"),
        SideBySide([m.item_tower for m in members], name="item_tower"),
        MeanHead([m.head for m in members], dims, name="head"),
        SideBySide(times, name="query_time") if times else None)


def unique(variables: list[tf.Variable]) -> list[tf.Variable]:
    """Drops repeats (the shared item-id embedding appears in two towers), keeps order."""
    return list({id(v): v for v in variables}.values())


def build_recommender(config: ModelConfig, user_spec: FeatureSpec, item_spec: FeatureSpec,
                      vocab_sizes: dict[str, int], n_user_ids: int, n_item_ids: int,
                      history_length: int, time_buckets: int = 0) -> Recommender:
    """``time_buckets``: how many buckets the query time has (0: the model takes none)."""
    item_ids = keras.layers.Embedding(n_item_ids, config.id_dim, name="item_id")
    user_vocab = {k.removeprefix("user:"): v for k, v in vocab_sizes.items()
                  if k.startswith("user:")}
    item_vocab = {k.removeprefix("item:"): v for k, v in vocab_sizes.items()
                  if k.startswith("item:")}
    head: keras.Model = (SeedHead(name="head") if config.arch == ARCH_SEED
                         else InteractionHead(config, name="head"))
    user_tower = UserTower(config, user_spec, user_vocab, n_user_ids, item_ids, history_length,
                           name="user_tower")
    query_time = (QueryTime(time_buckets, user_tower.output_dim, name="query_time")
                  if time_buckets and config.arch != ARCH_SEED else None)
    return Recommender(config, user_tower,
                       ItemTower(config, item_spec, item_vocab, item_ids, name="item_tower"),
                       head, query_time)
