"""Bag-of-words features of titles, with a vocabulary fitted on the training split.

Sentence encoders map titles to general-purpose meaning; popularity often hangs on
exact words instead (a series name, a creator's catchphrase, a hashtag) that such
encoders blur. The predictor therefore also sees each title as a TF-IDF-weighted bag
of terms over the training vocabulary: the word prior (`word_prior`) and, optionally,
one extra text position (`model.LexicalToken`). Terms are words and, by default, pairs
of adjacent words ("part 2" says more than "part" and "2"). Terms unseen in training,
or seen too rarely, are dropped.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Training items a term must appear in to enter the vocabulary.
DEFAULT_MIN_COUNT = 2
#: Largest vocabulary kept (the most frequent terms).
DEFAULT_MAX_SIZE = 50_000
#: Distinct terms kept per title (the rarest, i.e. most informative, first).
DEFAULT_MAX_WORDS = 64
#: Longest run of adjacent words that forms a term (1: single words only).
DEFAULT_NGRAMS = 2

_WORD = re.compile(r"\w+", re.UNICODE)


def words_of(text: str | None) -> list[str]:
    """Distinct lower-cased words of a text, in order of first appearance."""
    return list(dict.fromkeys(_WORD.findall((text or "").lower())))


def terms_of(text: str | None, ngrams: int = DEFAULT_NGRAMS) -> list[str]:
    """Distinct terms of a text: its words, then runs of up to `ngrams` adjacent words
    joined by spaces (words never contain spaces, so terms cannot collide)."""
    words = _WORD.findall((text or "").lower())
    terms = list(dict.fromkeys(words))
    for n in range(2, ngrams + 1):
        terms += dict.fromkeys(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return terms


@dataclass
class Lexicon:
    """Vocabulary of terms (id i + 1 is words[i]; 0 is padding) with inverse document
    frequencies; `ngrams` is the longest term in words."""

    words: list[str]
    idf: list[float]
    max_words: int = DEFAULT_MAX_WORDS
    ngrams: int = DEFAULT_NGRAMS
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.words) != len(self.idf):
            raise ValueError("Lexicon words and idf differ in length")
        if self.max_words <= 0:
            raise ValueError("Lexicon.max_words must be positive")
        if self.ngrams < 1:
            raise ValueError("Lexicon.ngrams must be at least 1")
        self._index = {w: i + 1 for i, w in enumerate(self.words)}

    @property
    def size(self) -> int:
        return len(self.words)

    @classmethod
    def fit(
        cls,
        texts: Sequence[str | None],
        min_count: int = DEFAULT_MIN_COUNT,
        max_size: int = DEFAULT_MAX_SIZE,
        max_words: int = DEFAULT_MAX_WORDS,
        ngrams: int = DEFAULT_NGRAMS,
    ) -> Lexicon:
        """Vocabulary of the terms found in at least `min_count` of `texts` (the training split)."""
        if min_count < 1 or max_size < 1:
            raise ValueError("min_count and max_size must be at least 1")
        df = Counter(w for t in texts for w in terms_of(t, ngrams))
        kept = sorted((w for w, c in df.items() if c >= min_count), key=lambda w: (-df[w], w))
        kept = kept[:max_size]
        n = max(1, len(texts))
        idf = [math.log((1 + n) / (1 + df[w])) + 1.0 for w in kept]
        return cls(kept, idf, max_words, ngrams)

    def encode(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Word ids (N, W) int64 (0 = padding) and L2-normalised TF-IDF weights (N, W) float32."""
        ids = np.zeros((len(texts), self.max_words), np.int64)
        weights = np.zeros((len(texts), self.max_words), np.float32)
        for row, text in enumerate(texts):
            found = [self._index[w] for w in terms_of(text, self.ngrams) if w in self._index]
            # keep the rarest words when a title has more than max_words
            found.sort(key=lambda i: -self.idf[i - 1])
            found = found[: self.max_words]
            if not found:
                continue
            w = np.array([self.idf[i - 1] for i in found], np.float32)
            ids[row, : len(found)] = found
            weights[row, : len(found)] = w / np.linalg.norm(w)
        return ids, weights

    def to_dict(self) -> dict:
        return {"words": self.words, "idf": self.idf, "max_words": self.max_words, "ngrams": self.ngrams}

    @classmethod
    def from_dict(cls, d: dict) -> Lexicon:
        # vocabularies saved before terms had several words hold single words
        return cls(
            list(d["words"]), [float(x) for x in d["idf"]], int(d["max_words"]), int(d.get("ngrams", 1))
        )
