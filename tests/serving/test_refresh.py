"""The refresh-user-states flow: which users get a state, and that each state is encode_history of their history."""

from __future__ import annotations

from datetime import UTC

import numpy as np
import pandas as pd
import pytest
import torch

from tests.serving.conftest import HORIZON
from towerflow.serving.state_store import SQLiteUserStateStore
from towerflow.tasks.history import EventArrays, HistorySpec, build_histories, to_us
from towerflow.tasks.vocabulary import Vocab


def test_states_for_every_active_user_tagged_with_the_champion(served, world_events, champion_release):
    r = served.refresh
    assert r.release_id == served.champion.release_id and r.version == 2
    assert r.as_of == HORIZON  # the end of the world's last day
    vocab = Vocab.from_json((champion_release.vocab_dir / "vocab.json").read_text())
    acted = world_events[(world_events["action"] != "impression") & world_events["item_id"].isin(vocab.item_ids)]
    assert r.n_users == acted["user_id"].nunique() > 100
    store = SQLiteUserStateStore(served.settings.user_states_path)
    assert store.releases() == {served.champion.release_id: r.n_users}
    users = sorted(acted["user_id"].unique().tolist())
    states = store.get(users, served.champion.release_id)
    assert sorted(states) == users
    assert store.get(users, served.other.release_id) == {}  # nothing was refreshed with the other release

    last = acted.groupby("user_id")["ts"].max()
    for u in users[:5]:
        s = states[u]
        assert s.as_of == HORIZON and pd.Timestamp(s.last_event_ts) == last[u]
        assert s.h.shape == (champion_release.model.history_dim,)


def test_state_is_the_towers_encoding_of_the_users_history(served, world_events, champion_release):
    vocab = Vocab.from_json((champion_release.vocab_dir / "vocab.json").read_text())
    store = SQLiteUserStateStore(served.settings.user_states_path)
    users = [int(u) for u in world_events["user_id"].unique()[:6]]
    states = store.get(users, served.champion.release_id)
    spec = HistorySpec.from_release_config(champion_release.release_id, champion_release.config)
    assert spec.max_seq_len == 8  # tests/worlds.py small_config
    hist = build_histories(EventArrays.from_events(world_events), vocab, to_us(HORIZON), spec)
    rows = np.searchsorted(hist.user_id, users)
    with torch.no_grad():  # one user at a time, straight through the model: no batching shared with the flow
        for u, row in zip(users, rows, strict=True):
            h = champion_release.model.encode_history(*(torch.from_numpy(a[row:row + 1]) for a in (
                hist.hist_items, hist.hist_actions, hist.hist_gaps)))[0].numpy()
            np.testing.assert_allclose(states[u].h, h, rtol=0, atol=1e-5)
            assert states[u].seen_items.tolist() == hist.seen[row].tolist()


def test_the_release_to_refresh_with_can_be_an_alias_a_version_or_an_id(served):
    from towerflow.flows.refresh_user_states import _load

    assert _load(served.settings, "champion").release_id == served.champion.release_id
    assert _load(served.settings, "1").release_id == served.other.release_id
    loaded = _load(served.settings, served.other.release_id)
    assert (loaded.release_id, loaded.version) == (served.other.release_id, 1)


def test_a_refresh_recomputes_only_users_who_acted_since_the_last_one(served, tmp_path):
    from datetime import date, datetime

    from towerflow.data.source import ParquetSink, ParquetSource
    from towerflow.flows.refresh_user_states import refresh_user_states
    from towerflow.serving.states import refresh_events

    # the flow: right after the full refresh at the horizon, nothing happened since, so nothing is recomputed
    store = SQLiteUserStateStore(served.settings.user_states_path)
    before = store.releases()
    with pytest.MonkeyPatch.context() as mp:
        served.env(mp)
        again = refresh_user_states()
    assert (again.n_users, again.incremental_since) == (0, HORIZON) and store.releases() == before

    # which events: user 1 acts on days 1 and 3, user 2 on day 1 only, user 3 on day 3 only (one click at noon)
    sink = ParquetSink(str(tmp_path))
    for day, users in ((1, [1, 2]), (3, [1, 3])):
        noon = datetime(2026, 1, day, 12, tzinfo=UTC)
        sink.write_events_day(date(2026, 1, day), pd.DataFrame({
            "event_id": [f"e{day}-{u}" for u in users], "user_id": users, "item_id": [10 * u for u in users],
            "action": ["click"] * len(users), "ts": [noon] * len(users), "surface": ["homefeed"] * len(users),
            "context_item_id": [None] * len(users), "query": [None] * len(users)}))
    src, as_of = ParquetSource(str(tmp_path)), datetime(2026, 1, 4, tzinfo=UTC)
    full, incremental = refresh_events(src, as_of, 30, None)
    assert not incremental and sorted(full.user_id.tolist()) == [1, 1, 2, 3]
    since = datetime(2026, 1, 2, tzinfo=UTC)  # users 1 and 3 acted since: their whole histories, user 2 nothing
    events, incremental = refresh_events(src, as_of, 30, since)
    assert incremental and events.user_id.tolist() == [1, 1, 3] and events.item_id.tolist() == [10, 10, 30]
    assert refresh_events(src, as_of, 30, as_of)[0].user_id.tolist() == []
    # a last refresh outside the window (older than lookback, or after as_of): every user again
    assert not refresh_events(src, as_of, 1, since)[1] and not refresh_events(src, since, 30, as_of)[1]
