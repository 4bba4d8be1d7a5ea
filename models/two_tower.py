"""The two-tower model: a user tower and an item tower that share item representations.

``TwoTower.forward(batch) -> (u, v_target)``; the loss lives in models/loss.py. ``save_model`` / ``load_model``
write and read a directory holding ``model.json`` (config, feature sizes) and ``weights.pt`` (a plain state
dict with the item feature table and, when set, the log q table), loadable with ``weights_only=True`` and
without any training code. A model with the query encoder records the tokenizer it was trained with
(``tokenizer``: version and hash buckets, models/query.py); loading refuses one this code would tokenize differently.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from towerflow.config import ModelConfig
from towerflow.errors import TowerflowError
from towerflow.models.batch import Batch, FeatureSizes, ItemFeatures
from towerflow.models.item_tower import ItemTower
from towerflow.models.layers import unique_inverse
from towerflow.models.query import TOKENIZER_VERSION
from towerflow.models.user_tower import UserTower

FORMAT = "towerflow.two_tower"
FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
_SHARED = "user_tower.item_tower."  # state-dict prefix of the item tower as seen through the user tower


class ModelFileError(TowerflowError, ValueError):
    """A saved model directory is not one this code can load (wrong format, version or contents)."""


class TwoTower(nn.Module):
    """User tower + item tower. ``user_tower.item_tower is item_tower`` (the same module, stored once on disk)."""

    def __init__(self, sizes: FeatureSizes, features: ItemFeatures, cfg: ModelConfig):
        super().__init__()
        self.sizes, self.cfg = sizes, cfg
        self.item_tower = ItemTower(sizes, features, cfg)
        self.user_tower = UserTower(sizes, cfg, self.item_tower)
        self.register_buffer("log_q", None)  # (n_items + 1,) log sampling probability, saved with the model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """batch of b examples -> (u (b, dim), v_target (b, dim)), both unit vectors."""
        return self._encode(batch, with_target=True)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """batch -> u (b, dim); ``batch.target_items`` is not used."""
        return self._encode(batch, with_target=False)[0]

    def _encode(self, batch: Batch, with_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The item tower runs once over the unique items of histories, contexts (and targets), then gathers:
        # a batch of 512 x 32 history slots holds only a few thousand distinct items.
        b, seq_len = batch.hist_items.shape
        groups = {"hist": batch.hist_items.reshape(-1)}
        if self.cfg.use_context:
            groups["context"] = batch.context_items
        if with_target:
            groups["target"] = batch.target_items
        uniq, inverse = unique_inverse(torch.cat(list(groups.values())), self.item_tower.n_rows)
        # index_select, not [inverse]: its backward is one index_add, advanced indexing's an accumulating index_put
        parts = self.item_tower(uniq).index_select(0, inverse).split([g.numel() for g in groups.values()])
        vecs = dict(zip(groups, parts, strict=True))
        hist_vecs = vecs["hist"].reshape(b, seq_len, -1)  # (b, L, dim)
        h = self.user_tower.encode_history(batch.hist_items, batch.hist_actions, batch.hist_gaps, hist_vecs)
        u = self.user_tower.combine(
            h, batch.context_items, batch.surface, batch.user_feats, vecs.get("context"), batch.query
        )
        return u, vecs.get("target")

    def item_vectors(self, item_idx: torch.Tensor) -> torch.Tensor:
        """item_idx (n,) rows of the feature table -> (n, dim)."""
        return self.item_tower(item_idx)

    def encode_history(
        self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_gaps: torch.Tensor
    ) -> torch.Tensor:
        """The offline half of the user tower: (b, L) x3 -> h (b, history_dim). See UserTower.encode_history."""
        return self.user_tower.encode_history(hist_items, hist_actions, hist_gaps)

    def combine(
        self,
        h: torch.Tensor,
        context_items: torch.Tensor,
        surface: torch.Tensor,
        user_feats: torch.Tensor,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The online half: h (b, history_dim), context_items (b,), surface (b,), user_feats (b, F),
        query (b, T) token hashes or None -> (b, dim)."""
        return self.user_tower.combine(h, context_items, surface, user_feats, query=query)

    @property
    def history_dim(self) -> int:
        return self.user_tower.history_dim

    def set_features(self, features: ItemFeatures) -> None:
        """Swap in the feature table of a (grown) catalog; new rows are embedded from features alone."""
        self.item_tower.set_features(features)

    def set_log_q(self, log_q: torch.Tensor) -> None:
        """Store the log q table (n_items + 1,) so it is saved and released with the model."""
        if log_q.shape != (self.sizes.n_items + 1,):
            raise ModelFileError(
                f"log_q must have shape ({self.sizes.n_items + 1},), got {tuple(log_q.shape)}"
            )
        self.log_q = log_q.detach().float().to(self.item_tower.category.device)

    @torch.no_grad()
    def all_item_vectors(self, chunk_size: int = 8192) -> torch.Tensor:
        """Vectors of every row of the feature table, in eval mode, chunked -> (n_rows, dim).

        Row i is item index i; row 0 is the padding/unknown row (callers indexing a catalog drop it).
        """
        was_training = self.training
        self.eval()
        try:
            device = self.item_tower.category.device
            idx = torch.arange(self.item_tower.n_rows, device=device)
            return torch.cat([self.item_tower(c) for c in idx.split(chunk_size)])
        finally:
            self.train(was_training)


def save_model(model: TwoTower, directory: str | Path) -> Path:
    """Write ``model.json`` and ``weights.pt`` under ``directory`` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.cfg.model_dump(mode="json"),
        "sizes": asdict(model.sizes),
    }
    if model.cfg.use_query:
        meta["tokenizer"] = {"version": TOKENIZER_VERSION, "buckets": model.cfg.query_buckets}
    # The user tower's reference to the shared item tower is dropped here and restored by load_model.
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(_SHARED)}
    # Write then rename so a crash never leaves a half-written file under the final name.
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / WEIGHTS_FILE)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, directory / CONFIG_FILE)
    return directory


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> TwoTower:
    """Read a directory written by ``save_model`` -> TwoTower in eval mode. Leaves the global RNG untouched."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{directory / CONFIG_FILE}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    # a model saved before the query encoder existed had none: its config lacks the field, and True is the default
    cfg = ModelConfig.model_validate({"use_query": False, **meta["model_config"]})
    if cfg.use_query:
        expected = {"version": TOKENIZER_VERSION, "buckets": cfg.query_buckets}
        if meta.get("tokenizer") != expected:
            raise ModelFileError(
                f"{directory / CONFIG_FILE}: trained with query tokenizer {meta.get('tokenizer')}, this code "
                f"tokenizes as {expected}: its query and item-text hashes would mean other tokens"
            )
    s = meta["sizes"]
    sizes = FeatureSizes(**{**s, "demographic_cardinalities": tuple(s["demographic_cardinalities"])})
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    try:
        features = ItemFeatures(
            category=state["item_tower.category"],
            genres=state["item_tower.genres"],
            dense=state.get("item_tower.dense"),
            text=state.get("item_tower.text"),
        )
    except KeyError as exc:
        raise ModelFileError(f"{directory / WEIGHTS_FILE}: missing {exc.args[0]}") from exc
    with torch.random.fork_rng(
        devices=[]
    ):  # construction draws random init weights that are then overwritten
        model = TwoTower(sizes, features, cfg)
    state.update(
        {_SHARED + k[len("item_tower.") :]: v for k, v in state.items() if k.startswith("item_tower.")}
    )
    if "log_q" in state:
        model.set_log_q(state["log_q"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{directory / WEIGHTS_FILE}: weights do not fit the saved config: {exc}"
        ) from exc
    return model.to(map_location).eval()
