"""POST /recommend through the real app (uvicorn, HTTP) and ``towerflow serve query --rank``, against real releases:
the world's champion re-assembled WITH a tiny trained ranker (alias ``ranked``) and without one (``unranked``).

Expected answers are rebuilt outside the service: the candidates from /retrieve, the sequence from the source's
events (and the live ones) through the training-side definition, the ranker loaded from the registry on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.servers import running_app
from towerflow.cli import main
from towerflow.config import RANKER_HEADS

RANKER_S = 8


@dataclass
class Ranked:
    ranked_version: int
    unranked_version: int
    ranked_id: str
    root: object = None  # where the test's releases are written
    ranker: object = None  # the ranked release's ranker, as trained
    snapshot_id: str = ""


def _set_alias(settings, alias: str, version: int) -> None:
    from towerflow.infra.tracking import tracking_client

    tracking_client(settings).set_registered_model_alias(settings.registered_model, alias, str(version))


@pytest.fixture(scope="module")
def ranked(served, world_events, tmp_path_factory) -> Ranked:
    """Two registered releases of the champion's model (re-embedded, re-indexed): one with a ranker trained for one
    epoch on the world's requests (no impressions in this world: the acted-on items are the rows), one without."""
    import torch

    from towerflow.config import IndexConfig, RankerConfig, RankerTrainConfig
    from towerflow.infra.promote import register_release
    from towerflow.infra.releases import assemble, embed_release_items, load_release, ranker_item_table
    from towerflow.tasks.build_index import build_index
    from towerflow.tasks.ranking_examples import build_ranking_examples
    from towerflow.tasks.train_ranker import train_ranker
    from towerflow.tasks.vocabulary import Vocab

    champ = load_release(served.settings)
    vocab = Vocab.from_json((champ.vocab_dir / "vocab.json").read_text())
    root = tmp_path_factory.mktemp("ranked-releases")
    versions, trained = [], None
    for with_ranker in (True, False):
        emb = embed_release_items(champ.model, vocab, "ranked-test")
        ranker = None
        if with_ranker:
            examples = build_ranking_examples(world_events, vocab, RANKER_S)
            cfg = RankerTrainConfig(model=RankerConfig(max_seq_len=RANKER_S, latest_k=2, item_dim=8, mlp_hidden=(16,)),
                                    epochs=1, batch_size=256)
            with torch.random.fork_rng(devices=[]):
                ranker = trained = train_ranker(examples, ranker_item_table(emb.vectors), cfg, log=False).model
        m = assemble(root, model=champ.model, vocab=vocab, embeddings=emb, index=build_index(emb, IndexConfig()),
                     config=champ.config, snapshot_id=champ.manifest.snapshot_id, candidate_metrics={},
                     ranker=ranker)
        versions.append((register_release(m.path, None, served.settings), m.release_id))
    (rv, rid), (uv, _) = versions
    _set_alias(served.settings, "ranked", rv)
    _set_alias(served.settings, "unranked", uv)
    return Ranked(rv, uv, rid, root, trained, champ.manifest.snapshot_id)


@pytest.fixture(scope="module")
def app_url(served, ranked, tmp_path_factory):
    """The real app over a service of alias ``ranked`` with its own live action store, under uvicorn."""
    from towerflow.serving.app import create_app
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.realtime.store import SQLiteActionStore
    from towerflow.serving.service import RetrievalService

    store = SQLiteActionStore(tmp_path_factory.mktemp("recommend-rt") / "rt.sqlite")
    svc = RetrievalService(served.settings, ServingConfig(alias="ranked", compact_interval_s=None),
                           realtime=store).start(watch=False)
    with running_app(create_app(service=svc)) as url:
        yield url, svc
    svc.close()


def _expected(svc, user: int, events: pd.DataFrame, request_us: int, k: int, candidates: int) -> list[dict]:
    """The answer rebuilt outside the service: /retrieve's candidates and the co-occurrence ones of the user's
    history in ``events``, the training-side sequence of ``events``, the ranker loaded on its own."""
    from towerflow.infra.releases import load_release
    from towerflow.serving.cooccurrence import candidates as cooccurring
    from towerflow.serving.recommend import merge_candidates, rank, ranker_sequence
    from towerflow.tasks.history import EventArrays, build_histories

    release = load_release(svc.settings, "ranked")
    found = svc.retrieve(user, k=candidates)["items"]
    b = svc.bundle
    actions = EventArrays.from_events(events)
    seq = ranker_sequence(actions, b.vocab, user, request_us, RANKER_S, b.history.max_history_days)
    hist = build_histories(actions.take(actions.user_id == user), b.vocab, request_us, b.history)
    co = cooccurring(b.cooccurrence, b.vocab, hist.hist_items[0], hist.hist_actions[0], 0,
                     svc.config.cooccurrence_candidates, hist.seen[0])
    assert co and {c["item_id"] for c in co} - {f["item_id"] for f in found}  # the second generator adds items
    cands = merge_candidates({"two_tower": found, "cooccurrence": co})
    return rank(release.ranker, cands, release.ranker_rows(cands.item_ids), 0, seq, k)


def _user(world_events: pd.DataFrame) -> int:
    """A user with more history actions than the ranker's S."""
    acted = world_events[world_events["action"] != "impression"]
    counts = acted.groupby("user_id").size()
    return int(counts[counts > 2 * RANKER_S].index[0])


def test_recommend_ranks_the_retrieved_candidates_with_the_same_release(app_url, ranked, world_events):
    from towerflow.tasks.history import to_us

    url, svc = app_url
    user = _user(world_events)
    r = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5, "candidates": 40}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["release"] == ranked.ranked_id and body["version"] == ranked.ranked_version
    items = body["items"]
    assert len(items) == 5 and [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    weights = svc.bundle.release.ranker.cfg.score_weights
    for it in items:
        assert set(it["heads"]) == set(RANKER_HEADS)
        assert it["score"] == pytest.approx(sum(weights.get(h, 0.0) * p for h, p in it["heads"].items()), abs=1e-5)
    # the candidates are /retrieve's top 40 (the same release), each with its retrieval score
    retrieved = httpx.post(f"{url}/retrieve", json={"user_id": user, "k": 40}, timeout=60).json()
    assert retrieved["release"] == ranked.ranked_id
    scores = {i["item_id"]: i["score"] for i in retrieved["items"]}
    for it in items:
        assert set(it["sources"]) <= {"two_tower", "cooccurrence"}
        if it["item_id"] in scores:
            assert it["sources"]["two_tower"] == pytest.approx(scores[it["item_id"]], abs=1e-6)
        else:
            assert set(it["sources"]) == {"cooccurrence"}
    horizon = to_us(svc._recent.as_of)
    expected = _expected(svc, user, world_events, horizon, 5, 40)
    assert [i["item_id"] for i in items] == [e["item_id"] for e in expected]
    np.testing.assert_allclose([i["score"] for i in items], [e["score"] for e in expected], rtol=1e-5)
    assert [i["sources"] for i in items] == [e["sources"] for e in expected]
    # the ranking is not the retrieval order (the ranker decides): the top 5 differ from /retrieve's top 5, or
    # their order does
    assert [i["item_id"] for i in items] != [i["item_id"] for i in retrieved["items"][:5]]


def test_recommend_sees_live_actions(app_url, ranked, world_events):
    from towerflow.contract import conform
    from towerflow.tasks.history import to_us

    url, svc = app_url
    user = _user(world_events)
    before = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 10, "candidates": 40}, timeout=60).json()
    clicked = [i["item_id"] for i in before["items"][:3]]
    t = pd.Timestamp(svc._recent.as_of) + pd.Timedelta(minutes=5)
    live = [{"event_id": f"rec-live-{n}", "user_id": user, "item_id": item, "action": "click",
             "ts": (t + pd.Timedelta(seconds=n)).isoformat(), "surface": "homefeed"} for n, item in enumerate(clicked)]
    r = httpx.post(f"{url}/events", json={"events": live}, timeout=60)
    assert r.status_code == 200, r.text
    after = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 10, "candidates": 40}, timeout=60).json()
    assert after["path"] == "live" and not set(clicked) & {i["item_id"] for i in after["items"]}  # seen now
    df = pd.DataFrame(live).assign(ts=lambda d: pd.to_datetime(d["ts"]), context_item_id=None, query=None)
    events = pd.concat([world_events, conform(df, "events")], ignore_index=True)
    expected = _expected(svc, user, events, to_us(t) + 3_000_000, 10, 40)
    assert [i["item_id"] for i in after["items"]] == [e["item_id"] for e in expected]
    np.testing.assert_allclose([i["score"] for i in after["items"]], [e["score"] for e in expected], rtol=1e-5)


def test_the_cooccurrence_generator_is_fitted_on_the_releases_own_snapshot(app_url, served):
    from towerflow.config import ExamplesConfig
    from towerflow.tasks.build_examples import build_examples
    from towerflow.tasks.evaluate import CooccurrenceBaseline
    from towerflow.tasks.extract import Snapshot

    _, svc = app_url
    release = svc.bundle.release
    snap = Snapshot.load(served.settings.snapshots_dir / release.manifest.snapshot_id)
    ex = build_examples(snap.events(), snap.users(), snap.items(), snap.window[1],
                        ExamplesConfig.model_validate(release.config["examples"]))
    # this world's retrain refit its model (time split, train.refit auto): the validation day's rows count too
    assert ex.meta["split"] == "time" and release.config["train"]["refit"] == "auto" and len(ex.refit_extra) > 0
    fitted = CooccurrenceBaseline.fit(ex.train.concat(ex.refit_extra), svc.bundle.vocab.n_items)
    train_only = CooccurrenceBaseline.fit(ex.train, svc.bundle.vocab.n_items)
    assert len(fitted.vals) != len(train_only.vals) or not np.array_equal(fitted.vals, train_only.vals)
    got = svc.bundle.cooccurrence
    assert len(got.vals) > 0
    for name in ("indptr", "cols", "vals", "popularity"):
        np.testing.assert_array_equal(getattr(got, name), getattr(fitted, name))


def test_release_status_says_what_recommend_has(app_url):
    url, _ = app_url
    body = httpx.get(f"{url}/release", timeout=60).json()
    assert body["ranker"] is True and body["cooccurrence_generator"] is True


def test_a_release_whose_snapshot_is_gone_has_no_cooccurrence_generator(app_url, tmp_path, caplog):
    from towerflow.config import Settings
    from towerflow.serving.cooccurrence import fit_for_release

    _, svc = app_url
    b = svc.bundle
    elsewhere = Settings(data_root=tmp_path)  # no snapshots here
    with caplog.at_level("WARNING", logger="towerflow.serving"):
        assert fit_for_release(b.release, b.vocab, elsewhere) is None
    assert f"release {b.release_id}: no co-occurrence generator" in caplog.text
    assert fit_for_release(b.release, b.vocab, svc.settings) is not None


def test_a_snapshot_in_another_vocabulary_is_counted_through_the_raw_ids(app_url):
    """As for a ranker-only release (its snapshot newer than the retriever): items the served vocabulary lacks drop
    out of the sources and the targets; the rest count as on the snapshot's own vocabulary."""
    from towerflow.serving.cooccurrence import fit_for_release
    from towerflow.tasks.vocabulary import Vocab

    _, svc = app_url
    b = svc.bundle
    own = b.cooccurrence
    kept = b.vocab.item_ids[::2]  # every other item: indices move, half the ids are unknown
    smaller = Vocab(kept, b.vocab.user_ids, b.vocab.categories, b.vocab.genres, b.vocab.demographic_fields,
                    b.vocab.demographic_values)
    got = fit_for_release(b.release, smaller, svc.settings)
    assert got is not None and len(got.popularity) == len(kept) + 1 and got.popularity[0] == 0
    # kept[j] is index 2j + 1 of the release's vocabulary and j + 1 of the smaller one: a pair of kept items counts
    # the same in both
    a_own = next(a for a in range(1, len(b.vocab.item_ids) + 1, 2) if any(c % 2 for c in own.cooccurrence(a)))
    want = {(c + 1) // 2: v for c, v in own.cooccurrence(a_own).items() if c % 2}
    assert got.cooccurrence((a_own + 1) // 2) == want


def test_a_ranker_only_release_recommends_with_its_base_retriever(served, ranked, world_events):
    """A ranker-only release (retrain-ranker) serves its base's index and its own ranker: /recommend answers with
    its id, its ranker's scores and its base's candidates."""
    from towerflow.infra.promote import register_release
    from towerflow.infra.releases import new_release_id, verify_release, write_ranker_release
    from towerflow.serving.config import ServingConfig
    from towerflow.serving.service import RetrievalService

    base = verify_release(next(p for p in ranked.root.iterdir() if p.name == ranked.ranked_id))
    m = write_ranker_release(ranked.root, release_id=new_release_id(), base=base, base_version=ranked.ranked_version,
                             ranker=ranked.ranker, config={"ranker": "test"}, snapshot_id=ranked.snapshot_id,
                             model_version="ranker-only-test")
    _set_alias(served.settings, "ranker_only", register_release(m.path, None, served.settings))
    svc = RetrievalService(served.settings, ServingConfig(alias="ranker_only", compact_interval_s=None),
                           realtime=None, use_default_store=False).start(watch=False)
    ranked_svc = RetrievalService(served.settings, ServingConfig(alias="ranked", compact_interval_s=None),
                                  use_default_store=False).start(watch=False)
    try:
        user = _user(world_events)
        out = svc.recommend(user, k=5, candidates=40)
        assert out["release"] == m.release_id and svc.bundle.release.ranker is not None
        assert svc.bundle.cooccurrence is not None
        # the same ranker weights over the same base: the ranked release's answer, under the ranker-only id
        same = ranked_svc.recommend(user, k=5, candidates=40)
        assert [i["item_id"] for i in out["items"]] == [i["item_id"] for i in same["items"]]
        np.testing.assert_allclose([i["score"] for i in out["items"]], [i["score"] for i in same["items"]],
                                   rtol=1e-6)
    finally:
        svc.close()
        ranked_svc.close()


@pytest.mark.parametrize(("body", "status", "detail"), [
    ({"user_id": 1, "k": 11, "candidates": 10}, 422, "k must be between 1 and candidates (10), got 11"),
    ({"user_id": 1, "candidates": 201}, 422, "candidates must be between 1 and 200, got 201"),
    ({"user_id": 1, "candidates": 0}, 422, "candidates: Input should be greater than or equal to 1"),
    ({"user_id": 1, "context": {"surface": "homefeed", "query": "x"}}, 422,
     "context.query is only allowed on the 'search' surface"),
    ({"user_id": 1, "context": {"item_id": 10**12}}, 422, "context.item_id 1000000000000 is not in the catalog"),
    ({"user_id": 1, "exclude_seen": False}, 422, "exclude_seen: Extra inputs are not permitted"),
    ({"user_id": "1"}, 422, "user_id: Input should be a valid integer"),
])
def test_recommend_refuses_what_retrieve_refuses_and_its_own_ranges(app_url, body, status, detail):
    url, _ = app_url
    r = httpx.post(f"{url}/recommend", json=body, timeout=60)
    assert r.status_code == status and detail in r.json()["detail"], r.text


def test_a_release_without_a_ranker_answers_409_and_the_swap_brings_index_and_ranker_together(
        app_url, served, ranked, world_events):
    url, svc = app_url
    user = _user(world_events)
    try:
        _set_alias(served.settings, "ranked", ranked.unranked_version)
        svc.poll()
        r = httpx.post(f"{url}/recommend", json={"user_id": user}, timeout=60)
        assert r.status_code == 409 and "has no ranker" in r.json()["detail"], r.text
        assert svc.bundle.cooccurrence is None  # fitted only for a release with a ranker
        assert httpx.post(f"{url}/retrieve", json={"user_id": user}, timeout=60).status_code == 200
    finally:
        _set_alias(served.settings, "ranked", ranked.ranked_version)
        svc.poll()
    r = httpx.post(f"{url}/recommend", json={"user_id": user}, timeout=60)
    assert r.status_code == 200 and r.json()["release"] == ranked.ranked_id


def test_serve_query_rank(served, ranked, world_events, capsys, monkeypatch):
    import torch

    served.env(monkeypatch)
    user = _user(world_events)
    threads = torch.get_num_threads()
    try:
        assert main(["serve", "query", str(user), "--alias", "ranked", "--rank", "--candidates", "40", "-k", "3",
                     "--json"]) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["release"] == ranked.ranked_id and len(body["items"]) == 3 and "heads" in body["items"][0]
        assert main(["serve", "query", str(user), "--alias", "ranked", "--rank", "--candidates", "40", "-k", "3"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1] == "ranked 40 retrieved candidates by the release's ranker"
        assert [int(line.split()[2]) for line in lines[2:]] == [i["item_id"] for i in body["items"]]
        assert main(["serve", "query", str(user), "--alias", "unranked", "--rank"]) == 1
        assert "has no ranker" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
