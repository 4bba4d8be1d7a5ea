"""The query tokenizer and encoder: THE text definition shared by training, the item tower and serving.

A text (a search query, or an item's title and category) becomes tokens:

- normalised: Unicode NFKD with combining marks dropped ("Café" -> "cafe"), then case-folded;
- split into words (runs of letters, digits and ``_``);
- one token per word (``w:<word>``), then the character 3-grams of each word with boundary marks
  (``#cafe#`` -> ``g:#ca``, ``g:caf``, ``g:afe``, ``g:fe#``), so a misspelt or unseen word still shares most of
  its tokens with the words it resembles; at most ``MAX_TOKENS`` tokens (words first).

Each token is hashed with CRC-32 (stable across processes and versions, unlike Python's salted ``hash()``) and
stored as ``crc32 + 1`` (int64, 0 = padding). The model maps a hash to one of ``query_buckets`` rows of an
embedding bag (``bucket_ids``), so examples and catalogs are tokenized once, whatever the table size. A change
to any rule here changes what a stored hash means: bump ``TOKENIZER_VERSION`` (releases record it and refuse to
load under another).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from towerflow.contract import MAX_QUERY_CHARS  # noqa: F401  (the limit that goes with this tokenizer)
from towerflow.models.layers import mean_bag

TOKENIZER_VERSION = 1
MAX_TOKENS = 64  # tokens kept per text: a 256-character query has more 3-grams than it needs
NGRAM = 3
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """NFKD without combining marks, case-folded: 'Café Noir' -> 'cafe noir'."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def words(text: str) -> list[str]:
    """The normalised words of ``text``: 'Kalo-venmi no. 3' -> ['kalo', 'venmi', 'no', '3']."""
    return _WORD.findall(normalize(text))


def tokens(text: str) -> list[str]:
    """Word tokens then boundary-marked character 3-grams, at most MAX_TOKENS: 'Hi' -> ['w:hi', 'g:#hi', 'g:hi#']."""
    ws = words(text)
    out = [f"w:{w}" for w in ws]
    for w in ws:
        marked = f"#{w}#"
        out += [f"g:{marked[i : i + NGRAM]}" for i in range(len(marked) - NGRAM + 1)]
    return out[:MAX_TOKENS]


def texts_differ(texts: Sequence[str | None]) -> bool:
    """Whether ``texts`` (an item text per catalog row; row 0 is padding and ignored) tell any two items apart.

    A plain ``user,item,timestamp`` import gives every item the same text (its category ``unknown``): a query or a
    pseudo-query could match nothing in it, so the model skips the query path (tasks/train.py ``fit_model_config``)
    and augmentation makes no pseudo-queries (tasks/augment_context.py).
    """
    return len({" ".join(words(t or "")) for t in texts[1:]}) > 1


def token_hashes(text: str) -> list[int]:
    """Stable hashes of ``tokens(text)``: crc32(utf-8) + 1, so 0 stays free for padding."""
    return [zlib.crc32(t.encode("utf-8")) + 1 for t in tokens(text)]


def encode_texts(texts: Sequence[str | None] | np.ndarray) -> np.ndarray:
    """Texts (None / '' = no text) -> (n, T) int64 token hashes, left-aligned, 0-padded; T = longest row (>= 1).

    Each distinct text is tokenized once (a log repeats the same queries many times).
    """
    arr = np.asarray(texts, dtype=object)
    n = len(arr)
    present = np.array([isinstance(t, str) and t != "" for t in arr], dtype=bool) if n else np.zeros(0, bool)
    codes = np.full(n, -1, dtype=np.int64)
    uniques: list[str] = []
    if present.any():
        c, u = _factorize(arr[present])
        codes[present], uniques = c, u
    rows = [token_hashes(t) for t in uniques]
    width = max([1] + [len(r) for r in rows])
    table = np.zeros((len(rows) + 1, width), dtype=np.int64)  # last row: no text
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table[codes]  # codes -1 -> the last (empty) row


def _factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    return inverse.astype(np.int64), [str(u) for u in uniq]


def pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    """(n, T) -> (n, width) with zero columns added on the right (width >= T)."""
    if a.shape[1] >= width:
        return a
    return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def bucket_ids(hashes: torch.Tensor, buckets: int) -> torch.Tensor:
    """Token hashes (...) long, 0 = padding -> rows of a table of ``buckets + 1`` rows (row 0 = padding)."""
    # a power of two (the default) takes the remainder as a mask: int64 division costs 4x more per token
    power_of_two = buckets & (buckets - 1) == 0
    rows = ((hashes - 1) & (buckets - 1)) + 1 if power_of_two else (hashes - 1) % buckets + 1
    return torch.where(hashes > 0, rows, 0)


class QueryEncoder(nn.Module):
    """Mean of the hashed tokens' embeddings: hashes (b, T) long -> (b, d); a row without tokens gives 0."""

    def __init__(self, buckets: int, d: int):
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets + 1, d, mode="mean", padding_idx=0)

    def forward(self, hashes: torch.Tensor) -> torch.Tensor:
        if hashes.dim() != 2:
            raise ValueError(f"query token hashes must be (b, T), got shape {tuple(hashes.shape)}")
        return mean_bag(self.bag.weight, bucket_ids(hashes, self.buckets))  # self.bag's mean, faster on CPU
