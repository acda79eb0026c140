"""chrF, the character n-gram F-score of a generated text against its reference (Popović 2015).

Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation",
sec. 2: ``chrF_beta = (1 + beta^2) chrP chrR / (beta^2 chrP + chrR)``, where
``chrP`` and ``chrR`` are the character n-gram precision and recall averaged over
``n = 1..6``; ``beta = 2`` weighs recall twice as much as precision. Whitespace
is removed before n-grams are extracted, counts are summed over the corpus
before the averages are taken, and an order that the hypotheses or references
do not reach is left out of the averages: sacreBLEU's ``CHRF()`` defaults
(chrF2, version 2), whose corpus scores these match. Scores are in [0, 100].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

CHAR_ORDER = 6
BETA = 2.0


def char_ngrams(text: str, order: int) -> Counter[str]:
    """The character n-grams of ``text`` without its whitespace."""
    text = "".join(text.split())
    return Counter(text[i : i + order] for i in range(len(text) - order + 1))


def chrf_statistics(hypothesis: str, reference: str, char_order: int = CHAR_ORDER) -> list[int]:
    """Per order ``n = 1..char_order``: hypothesis n-grams, reference n-grams and matches (clipped counts).

    Returns:
        ``[hyp_1, ref_1, match_1, hyp_2, ...]``; as in sacreBLEU, hypothesis n-grams of an order the
        reference is too short to have are not counted.
    """
    statistics = []
    for order in range(1, char_order + 1):
        hyp, ref = char_ngrams(hypothesis, order), char_ngrams(reference, order)
        matches = sum(min(count, ref[ngram]) for ngram, count in hyp.items())
        statistics += [sum(hyp.values()) if ref else 0, sum(ref.values()), matches]
    return statistics


def chrf_score(statistics: Sequence[int], beta: float = BETA) -> float:
    """chrF in [0, 100] of summed :func:`chrf_statistics`."""
    precisions, recalls = [], []
    for hyp, ref, matches in zip(statistics[0::3], statistics[1::3], statistics[2::3], strict=True):
        if hyp > 0 and ref > 0:
            precisions.append(matches / hyp)
            recalls.append(matches / ref)
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def corpus_chrf(
    hypotheses: Sequence[str], references: Sequence[str], char_order: int = CHAR_ORDER, beta: float = BETA
) -> float:
    """Corpus-level chrF in [0, 100] of ``hypotheses`` against their ``references`` (one each).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"chrF: {len(hypotheses)} hypotheses but {len(references)} references")
    totals = [0] * (3 * char_order)
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        totals = [a + b for a, b in zip(totals, chrf_statistics(hypothesis, reference, char_order), strict=True)]
    return chrf_score(totals, beta)
