"""The ranker's retrieval score, train/serve: a training row's user vector (tasks/request_vectors.py, through
build_ranking_examples) is the vector serving searched the index with for the same user, context and time, so
``u . v`` of a training row is the score /retrieve gives that item (the feature by hand:
tests/ranking/test_ranker_retrieval_score.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.serving.conftest import service_for
from towerflow.contract import conform
from towerflow.data.source import ParquetSource
from towerflow.models.ranker import retrieval_features
from towerflow.serving.service import Query
from towerflow.tasks.history import to_us
from towerflow.tasks.ranking_examples import build_ranking_examples
from towerflow.tasks.ranking_stage import champion_retriever


def _request(user: int, ts: pd.Timestamp, items: list[int], context: int | None, rid: str) -> pd.DataFrame:
    """One served request as the source logs it: an impression of each shown item, one request_id."""
    df = pd.DataFrame({"event_id": [f"{rid}-{i}" for i in range(len(items))], "user_id": user, "item_id": items,
                       "action": "impression", "ts": ts, "surface": "related" if context else "homefeed",
                       "context_item_id": context, "query": None, "request_id": rid})
    return conform(df, "events")


@pytest.mark.parametrize("mode", ["hybrid", "online"])
def test_a_training_rows_user_vector_is_the_one_serving_searched_with(served, world_events, mode):
    svc = service_for(served, mode=mode)
    try:
        b = svc.bundle
        vocab, release = b.vocab, b.release
        clock = pd.Timestamp(svc._recent.as_of)  # serving's request time: after every source event
        acted = world_events[world_events["action"] != "impression"]
        user = int(acted.groupby("user_id").size().idxmax())
        unknown = int(world_events["user_id"].max()) + 1000  # no history: the "context" path
        viewed = int(vocab.item_ids[3])
        asks = [Query(user, viewed, "related", 20), Query(user, None, "homefeed", 20),
                Query(unknown, viewed, "related", 20)]
        u: dict[int, np.ndarray] = {}
        found = svc.retrieve_batch(asks, user_vectors_out=u)
        assert [f["path"] for f in found] == ["state" if mode == "hybrid" else "online"] * 2 + ["context"]
        # the same requests in a log: the training side builds their rows at the same time
        logged = [_request(q.user_id, clock, [f["items"][0]["item_id"], f["items"][5]["item_id"]], q.item_id,
                           f"probe-{i}") for i, (q, f) in enumerate(zip(asks, found, strict=True))]
        events = pd.concat([world_events, *logged], ignore_index=True)
        users = ParquetSource(served.settings.source).read_users()
        ex = build_ranking_examples(events, vocab, 4, b.history.max_history_days, start_us=to_us(clock),
                                    retriever=champion_retriever(release, vocab, users))
        assert ex.n_requests == 3 and ex.user_vector.shape == (6, b.item_table.shape[1])
        for i, f in enumerate(found):
            rows = np.flatnonzero(ex.request == i)
            np.testing.assert_allclose(ex.user_vector[rows], np.stack([u[i]] * 2), atol=1e-5)
            # the ranker's feature of each row is the score /retrieve gave the item
            table = torch.from_numpy(np.vstack([np.zeros((1, release.item_vectors.shape[1]), np.float32),
                                                np.asarray(release.item_vectors)]))
            feats = retrieval_features(table, torch.from_numpy(release.ranker_rows(vocab.item_ids[ex.item[rows] - 1])),
                                       torch.from_numpy(ex.user_vector[rows])).numpy()
            score = {it["item_id"]: it["score"] for it in f["items"]}
            np.testing.assert_allclose(feats[:, 0], [score[i] for i in vocab.item_ids[ex.item[rows] - 1]], atol=1e-5)
            assert feats[:, 1].tolist() == [1.0, 1.0]
        # the unknown user was searched with the viewed item's own vector
        np.testing.assert_allclose(u[2], release.item_vectors[release.ranker_rows([viewed])[0] - 1], atol=1e-6)
    finally:
        svc.close()
