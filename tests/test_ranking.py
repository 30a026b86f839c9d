"""ranking.py: BM25 over the index's terms, in numpy, against the formula written out term by term."""

import math

import numpy as np
import pytest

from custom_llm_server.knowledge.ranking import CENTRAL_TIMES, HEADING_WEIGHT, K1, RARE_TERM, SHORT_PASSAGE, B, Postings

CHUNKS = [
    (10, "kettl descal citric acid month", "manual descal"),
    (11, "deliveri free order forti euro deliveri", "shop deliveri"),
    (12, "open nine weekday ten weekend", "shop open hour"),
    (13, "return accept thirti day receipt", ""),
]


def by_hand(terms: list[str], chunks=CHUNKS) -> list[float]:
    """Lucene's BM25 with a weighted heading, one chunk and one term at a time."""
    lengths = [len(text.split()) + len(heading.split()) for _, text, heading in chunks]
    average = sum(lengths) / len(chunks)
    scores = []
    for (_, text, heading), length in zip(chunks, lengths):
        score = 0.0
        for term in set(terms):
            df = sum(term in (t.split() + h.split()) for _, t, h in chunks)
            tf = text.split().count(term) + HEADING_WEIGHT * heading.split().count(term)
            if tf:
                idf = math.log(1 + (len(chunks) - df + 0.5) / (df + 0.5))
                score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / average))
        scores.append(score)
    return scores


@pytest.mark.parametrize("terms", [["deliveri"], ["shop", "open"], ["descal", "month", "nowher"], ["return", "return"]])
def test_scores_are_bm25_with_a_weighted_heading(terms):
    assert Postings(CHUNKS).scores(terms) == pytest.approx(by_hand(terms), rel=1e-5)


def test_which_chunks_hold_a_term_and_how_many():
    postings = Postings(CHUNKS)
    assert sorted(postings.rowids[postings.holding("shop")]) == [11, 12]
    assert postings.count("shop") == 2 and postings.count("nowher") == 0
    assert "descal" in postings and "nowher" not in postings
    assert postings.holding("nowher").size == 0


def test_a_word_in_every_chunk_still_ranks_a_one_file_knowledge_base():
    """FTS5 clamped such an idf to almost nothing, so a two-chunk FAQ could not rank at all."""
    faq = [(1, "open monday friday", "faq open"), (2, "deliveri free open", "faq deliveri")]
    scores = Postings(faq).scores(["open", "faq"])
    assert (scores > 0).all() and scores[0] > scores[1]  # "open" is in the first one's heading too


def test_an_empty_index_scores_nothing():
    postings = Postings([])
    assert postings.size == 0 and postings.scores(["anything"]).shape == (0,)
    assert isinstance(postings.scores([]), np.ndarray)


def test_a_chunk_is_about_a_word_it_repeats_puts_in_its_heading_or_when_short_or_rare():
    filler = " ".join(f"word{n}" for n in range(SHORT_PASSAGE))  # long enough not to be short
    chunks = [
        (1, f"sorri {filler} sorri", ""),  # said twice in passing
        (2, f"sorri {filler} {' sorri' * (CENTRAL_TIMES - 1)}", ""),
        (3, filler, "sorri"),
        (4, "sorri we are close", ""),
    ]
    postings = Postings(chunks)
    assert sorted(postings.rowids[postings.holding("sorri")]) == [1, 2, 3, 4]
    assert sorted(postings.rowids[postings.holding("sorri", "central")]) == [2, 3, 4]
    assert sorted(postings.rowids[postings.holding("sorri", "heading")]) == [3]
    # A word the knowledge base says in no more than RARE_TERM passages (a small FAQ) is what they are about.
    few = Postings(chunks[:RARE_TERM])
    assert sorted(few.rowids[few.holding("sorri", "central")]) == [1, 2, 3]


def test_lift_compares_how_often_the_knowledge_base_says_a_term_with_everyday_language():
    postings = Postings(CHUNKS)  # 28 terms said, "deliveri" 3 times (twice in text, once in a heading)
    assert postings.lift("deliveri", 5.0) == pytest.approx(math.log10(3 / 28) - (5.0 - 9))
    assert postings.lift("deliveri", 0.0) == math.inf  # a word everyday language never uses
    assert postings.lift("nowher", 5.0) == -math.inf
