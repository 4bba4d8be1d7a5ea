"""The refresh-user-states flow: which users get a state, and that each state is encode_history of their history."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tests.serving.conftest import HORIZON
from towerflow.serving.history import EventArrays, build_histories, to_us
from towerflow.serving.state_store import SQLiteUserStateStore
from towerflow.tasks.build_examples import Vocab


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
    hist = build_histories(EventArrays.from_events(world_events), vocab, to_us(HORIZON), 8, 16)
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
