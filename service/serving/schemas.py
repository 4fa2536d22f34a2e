"""Request and response bodies of the HTTP API (see CONTRACT.md)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

MAX_ID_LENGTH = 256
MAX_FEATURES = 64
MAX_FILTERS = 32

ItemId = Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)]
FeatureValue = (Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)] | float | int | bool
                | list[Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)]] | None)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class User(Strict):
    id: ItemId | None = Field(None, description="A known id brings stored features and history; "
                              "unknown or absent: a cold-start user")
    features: dict[str, FeatureValue] | None = Field(
        None, max_length=MAX_FEATURES, description="Override or supply user features")


class Context(Strict):
    time: dt.datetime | None = Field(
        None, description="When the request is made, for a model that takes the query time: "
        "Unix seconds or ISO 8601 (UTC when no offset is given); absent: now")

    def seconds(self) -> float | None:
        """The query time as Unix seconds (None when absent: now)."""
        if self.time is None:
            return None
        moment = self.time if self.time.tzinfo else self.time.replace(tzinfo=dt.UTC)
        return moment.timestamp()


class ScoreRequest(Strict):
    user: User = Field(default_factory=User)
    item_ids: list[ItemId] = Field(description="Items to score, in the order wanted")
    context: Context = Field(default_factory=Context)


class RecommendRequest(Strict):
    user: User = Field(default_factory=User)
    context: Context = Field(default_factory=Context)
    k: StrictInt = Field(10, ge=1, description="How many items, at most")
    exclude_item_ids: list[ItemId] = Field(default_factory=list)
    exclude_seen: StrictBool = Field(True, description="Drop items the user interacted with")
    filters: dict[str, list[ItemId]] = Field(
        default_factory=dict, max_length=MAX_FILTERS,
        description="attribute -> accepted values; an item must match every attribute")


class ModelRef(BaseModel):
    name: str
    version: int


class ScoredItem(BaseModel):
    item_id: str
    score: float


class ScoreResponse(BaseModel):
    model: ModelRef
    scores: list[ScoredItem]
    unknown_item_ids: list[str]


class RecommendResponse(BaseModel):
    model: ModelRef
    items: list[ScoredItem]


class ModelDescription(BaseModel):
    name: str
    version: int
    created_at: str | None
    item_count: int
    user_count: int
    embedding_dim: int
    arch: str
    retrieval: str
    query_time_buckets: int = Field(description="Buckets of the query time the model tells "
                                    "apart (context.time); 0: it takes no query time")
    fingerprint: str
    item_representations_source: str
    data: dict[str, object]
    metrics: dict[str, object]


class ReloadResponse(BaseModel):
    model: ModelRef
    changed: bool


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
