"""Title bag of words: the vocabulary, and the model's lexical text position."""

from __future__ import annotations

import numpy as np
import pytest

from mvpp.predictor.config import ModelConfig
from mvpp.predictor.lexicon import Lexicon, terms_of, words_of


def test_words_are_distinct_lowercase_and_unicode() -> None:
    assert words_of("Cat cat #Cats, chó mèo!") == ["cat", "cats", "chó", "mèo"]
    assert words_of(None) == [] and words_of("") == []


def test_vocabulary_keeps_words_seen_often_enough() -> None:
    texts = ["red cat", "red dog", "red cat runs", "blue bird"]
    lex = Lexicon.fit(texts, min_count=2, ngrams=1)
    assert lex.words == ["red", "cat"]  # by document frequency, then alphabetically
    # the rarer word weighs more
    assert lex.idf[1] > lex.idf[0]
    ids, weights = lex.encode(["a red cat", "nothing known", None])
    assert ids.shape == weights.shape == (3, lex.max_words)
    assert sorted(ids[0][ids[0] > 0].tolist()) == [1, 2]
    np.testing.assert_allclose(np.linalg.norm(weights[0]), 1.0, rtol=1e-6)
    assert not ids[1].any() and not weights[1].any()  # unseen words are dropped
    assert not ids[2].any()
    assert Lexicon.from_dict(lex.to_dict()).encode(["red cat"])[0].tolist() == lex.encode(["red cat"])[0].tolist()


def test_terms_include_adjacent_word_pairs() -> None:
    assert terms_of("Part 2 of part 2", ngrams=2) == ["part", "2", "of", "part 2", "2 of", "of part"]
    assert terms_of("a b c", ngrams=1) == ["a", "b", "c"]
    assert terms_of("a b c", ngrams=3)[-1] == "a b c"
    lex = Lexicon.fit(["red cat", "red cat runs", "cat red"], min_count=2)
    assert lex.words == ["cat", "red", "red cat"]
    ids, _ = lex.encode(["the red cat"])
    assert sorted(ids[0][ids[0] > 0].tolist()) == [1, 2, 3]
    ids, _ = lex.encode(["cat, red"])  # the pair only in that order
    assert sorted(ids[0][ids[0] > 0].tolist()) == [1, 2]
    # vocabularies saved before pairs existed read back as single words
    old = lex.to_dict()
    del old["ngrams"]
    assert Lexicon.from_dict(old).ngrams == 1


def test_long_titles_keep_their_rarest_words() -> None:
    texts = ["common"] * 10 + ["rare a", "rare b"] + ["other"] * 5
    lex = Lexicon.fit(texts, min_count=2, max_words=1)
    ids, _ = lex.encode(["common other rare"])
    assert lex.words[ids[0, 0] - 1] == "rare"


def test_fit_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Lexicon.fit(["a"], min_count=0)
    with pytest.raises(ValueError):
        Lexicon(["a"], [1.0, 2.0])


def test_configs_that_switched_on_the_removed_lexicon_token_are_named() -> None:
    """The learnt bag-of-words position is gone (it overfitted, benchmarks/README.md):
    configs that had it off still load, those that had it on say so."""

    old = ModelConfig().to_dict()
    old.update(use_lexicon=False, word_dropout=0.5)
    assert ModelConfig.from_dict(old) == ModelConfig()
    old["use_lexicon"] = True
    with pytest.raises(ValueError, match="use_lexicon=True"):
        ModelConfig.from_dict(old)
