"""The query tokenizer and encoder (models/query.py): exact tokens and hashes, buckets, the bag, the towers' use."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from towerflow.config import ModelConfig
from towerflow.models.batch import Batch, FeatureSizes, ItemFeatures
from towerflow.models.query import (
    MAX_TOKENS,
    QueryEncoder,
    bucket_ids,
    encode_texts,
    normalize,
    token_hashes,
    tokens,
    words,
)
from towerflow.models.two_tower import ModelFileError, TwoTower, load_model, save_model

# crc32 of the utf-8 bytes of "w:hi", "g:#hi", "g:hi#" (zlib.crc32), + 1 so that 0 stays the padding
HI = [1729765165, 3521610864, 574259074]


def test_normalize_and_words():
    assert normalize("Café NOIR") == "cafe noir"  # accents dropped, case folded
    assert normalize("Straße") == "strasse"  # casefold, not lower
    assert words("Kalo-venmi  no. 3!") == ["kalo", "venmi", "no", "3"]
    assert words("  ") == []


def test_tokens_words_first_then_boundary_trigrams():
    assert tokens("Hi") == ["w:hi", "g:#hi", "g:hi#"]
    assert tokens("Café a") == ["w:cafe", "w:a", "g:#ca", "g:caf", "g:afe", "g:fe#", "g:#a#"]
    long = tokens("abcdefgh " * 40)
    assert len(long) == MAX_TOKENS and long[:40] == ["w:abcdefgh"] * 40  # the cap keeps the words


def test_hashes_are_stable_crc32_plus_one():
    assert token_hashes("Hi") == HI
    assert token_hashes("HI!") == HI  # the same normalised text
    assert zlib.crc32(b"w:hi") + 1 == HI[0]


def test_bucket_ids_by_hand():
    # (h - 1) % 1000 + 1: 1729765164 % 1000 = 164 -> 165; 3521610863 % 1000 = 863 -> 864; 574259073 -> 74
    assert bucket_ids(torch.tensor(HI + [0]), 1000).tolist() == [165, 864, 74, 0]


def test_encode_texts_pads_and_marks_no_text():
    out = encode_texts(["Hi", None, "", "hi a"])
    assert out.shape == (4, 5)  # "hi a": 2 words + 2 + 1 trigrams
    assert out[0].tolist() == HI + [0, 0]
    assert not out[1].any() and not out[2].any()
    assert out[3, 0] == HI[0]  # "w:hi" first
    assert encode_texts([None, None]).shape == (2, 1)


def test_unseen_words_land_in_buckets_shared_with_similar_words():
    enc = QueryEncoder(buckets=64, d=4)
    seen, typo = (torch.from_numpy(encode_texts([t])) for t in ("venmira", "venmura"))
    assert (bucket_ids(typo, 64) > 0).all()  # every token of an unseen word has a row
    shared = set(tokens("venmira")) & set(tokens("venmura"))
    assert shared == {"g:#ve", "g:ven", "g:enm", "g:ra#"}  # 4 of 7 trigrams in common
    assert enc(seen).shape == (1, 4)


def test_encoder_means_its_rows_and_gives_zero_without_tokens():
    enc = QueryEncoder(buckets=10, d=2)
    with torch.no_grad():
        enc.bag.weight.copy_(torch.arange(22, dtype=torch.float32).view(11, 2))
    # hashes 1 and 12 -> buckets 1 and 2 (12 - 1 = 11 -> 11 % 10 + 1); rows [2, 3] and [4, 5] -> mean [3, 4]
    out = enc(torch.tensor([[1, 12, 0], [0, 0, 0]]))
    assert out.tolist() == [[3.0, 4.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match=r"\(b, T\)"):
        enc(torch.tensor([1, 2]))


def _tiny(use_query: bool = True):
    sizes = FeatureSizes(n_items=4, n_categories=2, n_genres=0, dense_dim=0, demographic_cardinalities=())
    feats = ItemFeatures(category=torch.tensor([0, 1, 1, 2, 2]), genres=torch.zeros(5, 1, dtype=torch.long),
                         text=torch.from_numpy(encode_texts(["", "red shoe", "blue shoe", "red hat", "green hat"])))
    cfg = ModelConfig(dim=8, d_model=8, n_heads=1, hidden=8, max_seq_len=4, use_query=use_query, query_buckets=97)
    torch.manual_seed(0)
    return TwoTower(sizes, feats, cfg), sizes


def _batch(query: np.ndarray | None) -> Batch:
    z = torch.zeros(2, 2, dtype=torch.long)
    return Batch(hist_items=z, hist_actions=z, hist_gaps=z, context_items=torch.zeros(2, dtype=torch.long),
                 surface=torch.tensor([2, 2]), user_feats=torch.zeros(2, 0, dtype=torch.long),
                 target_items=torch.tensor([1, 3]), query=None if query is None else torch.from_numpy(query))


def test_query_changes_the_user_vector_and_history_does_not_see_it():
    model, _ = _tiny()
    model.eval()
    q = encode_texts(["red", "hat"])
    u_none, u_query = model.user_vectors(_batch(None)), model.user_vectors(_batch(q))
    assert torch.allclose(u_none, model.user_vectors(_batch(np.zeros((2, 3), dtype=np.int64))))  # 0s = no query
    assert not torch.allclose(u_none, u_query)
    assert not torch.allclose(u_query[0], u_query[1])
    # the item tower reads the items' text: the same item without text gets another vector
    v = model.item_vectors(torch.tensor([1]))
    model.item_tower.text[1] = 0
    assert not torch.allclose(v, model.item_vectors(torch.tensor([1])))


def test_a_query_model_saves_its_tokenizer_and_refuses_another(tmp_path):
    import json

    model, _ = _tiny()
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["tokenizer"] == {"version": 1, "buckets": 97}
    back = load_model(tmp_path / "m")
    assert torch.equal(back.item_tower.text, model.item_tower.text)
    meta["tokenizer"]["version"] = 0
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="tokenizer"):
        load_model(tmp_path / "m")


def test_a_model_saved_before_the_query_encoder_loads_without_it(tmp_path):
    import json

    model, _ = _tiny(use_query=False)
    save_model(model, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    for key in ("use_query", "query_buckets", "query_dropout", "query_residual"):
        del meta["model_config"][key]  # as written before these fields existed
    (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
    back = load_model(tmp_path / "old")
    assert back.cfg.use_query is False and back.item_tower.text_encoder is None
    model.eval()
    assert torch.equal(back.user_vectors(_batch(None)), model.user_vectors(_batch(None)))
