"""Title bag of words: the vocabulary, and the model's lexical text position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvpp.predictor.config import ModelConfig
from mvpp.predictor.dataset import FeatureTable, TargetNorm, make_batch
from mvpp.predictor.lexicon import Lexicon, terms_of, words_of
from mvpp.predictor.model import LexicalToken, PopularityModel
from mvpp.retriever.snapshot import BankSnapshot


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


def test_lexical_token_ignores_padding_and_reports_availability() -> None:
    torch.manual_seed(0)
    tok = LexicalToken(vocab_size=5, d_model=8)
    ids = torch.tensor([[1, 3, 0, 0], [0, 0, 0, 0]])
    w = torch.tensor([[0.6, 0.8, 5.0, float("nan")], [0.0, 0.0, 0.0, 0.0]])
    out, has = tok(ids, w)
    assert has.tolist() == [True, False]
    ref, _ = tok(ids[:1, :2], w[:1, :2])
    torch.testing.assert_close(out[:1], ref)  # padded slots (any weight) change nothing
    assert torch.isfinite(out).all()


def _snapshot(n: int = 12, n_tok: int = 4, d_tok: int = 6) -> BankSnapshot:
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "bird", "fish"]
    titles = [" ".join(rng.choice(words, size=2)) for _ in range(n)]
    titles[3] = "zebra"  # no known word
    retrieval = rng.normal(size=(n, 8)).astype(np.float32)
    return BankSnapshot(
        item_ids=[f"i{i}" for i in range(n)],
        retrieval=retrieval / np.linalg.norm(retrieval, axis=1, keepdims=True),
        has_retrieval=np.ones(n, bool),
        targets=rng.normal(size=(n, 1)).astype(np.float32),
        label_names=["y"],
        published_ts=np.full(n, np.nan),
        frames=np.zeros((n, 0, 1), np.float16),
        frame_len=np.zeros(n, np.int32),
        tokens=rng.normal(size=(n, n_tok, d_tok)).astype(np.float16),
        token_len=rng.integers(1, n_tok + 1, size=n).astype(np.int32),
        titles=titles,
    )


def test_projected_neighbours_match_projecting_every_batch() -> None:
    snap = _snapshot()
    lex = Lexicon.fit(snap.titles, min_count=2)
    table = FeatureTable(snap, TargetNorm.fit(snap.targets), lexicon=lex)
    cfg = ModelConfig(
        d_frame=1, d_token=6, d_model=16, d_z=8, expert_hidden=16, decoder_hidden=16,
        use_frames=False, lexicon_size=lex.size, use_lexicon=True,
    )
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    query = torch.arange(0, 5)
    nb_idx = np.array([[5, 3, -1], [6, 7, 8], [9, 10, 11], [3, 4, 5], [1, 2, -1]])
    nb_sim = np.full(nb_idx.shape, 0.5, np.float32)
    raw = model(make_batch(table, table.items(query), nb_idx, nb_sim))
    table.project(model)
    batch = make_batch(table, table.items(query), nb_idx, nb_sim)
    assert batch.projected_neighbours and batch.nb_tokens.shape[2] == snap.tokens.shape[1] + 1
    projected = model(batch)
    torch.testing.assert_close(projected.mu_y, raw.mu_y, atol=1e-5, rtol=1e-5)
    # the words matter: without them the prediction changes
    table.clear_projection()
    no_words = make_batch(table, table.items(query), nb_idx, nb_sim)
    no_words.words = no_words.word_weights = None
    assert not torch.allclose(model(no_words).mu_y, raw.mu_y)


def test_lexicon_switch_and_old_configs() -> None:
    cfg = ModelConfig(lexicon_size=10, use_lexicon=False)
    assert ModelConfig(lexicon_size=10, use_lexicon=True).has_lexicon
    assert not cfg.has_lexicon and PopularityModel(cfg).lexical is None
    assert ModelConfig(lexicon_size=10, use_text=False, use_frames=True).has_lexicon is False
    # runs saved before the lexicon existed have no lexicon_size: no lexical position
    old = ModelConfig().to_dict()
    del old["lexicon_size"], old["use_lexicon"], old["word_dropout"]
    assert not ModelConfig.from_dict(old).has_lexicon
