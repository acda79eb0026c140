"""Temperature-based language sampling for multilingual corpora.

Sampling sentences of language ``i`` with probability ``q_i ∝ p_i^alpha``,
where ``p_i`` is the language's share of the corpus, up-samples low-resource
languages (Lample & Conneau 2019, "Cross-lingual Language Model Pretraining",
sec 3.1, alpha=0.5; Conneau et al. 2020, "Unsupervised Cross-lingual
Representation Learning at Scale" (XLM-R), alpha=0.3). ``alpha=1`` keeps the
natural distribution, ``alpha -> 0`` tends to uniform over languages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def language_sampling_probs(counts: Mapping[str, int], alpha: float) -> dict[str, float]:
    """Sampling probability of each language: ``q_i = p_i^alpha / sum_j p_j^alpha``.

    Args:
        counts: number of sentences (or tokens) per language; a language with
            count 0 gets probability 0.
        alpha: the exponent, ``>= 0`` (1: proportional, 0: uniform over the
            languages with data).

    Returns:
        ``{language: q}`` in the order of ``counts``, summing to 1.

    Raises:
        ValueError: on a negative alpha or count, or when every count is 0.
    """
    if alpha < 0 or math.isnan(alpha):
        raise ValueError(f"language sampling alpha must be >= 0, got {alpha}")
    for lang, n in counts.items():
        if n < 0:
            raise ValueError(f"language '{lang}' has a negative count {n}")
    present = {lang: n for lang, n in counts.items() if n > 0}
    if not present:
        raise ValueError(f"no language has data: {dict(counts)}")
    # p_i^alpha ∝ n_i^alpha; working with alpha * log(n_i) minus its maximum
    # keeps tiny shares from underflowing for large alpha.
    logits = {lang: alpha * math.log(n) for lang, n in present.items()}
    top = max(logits.values())
    weights = {lang: math.exp(v - top) for lang, v in logits.items()}
    total = sum(weights.values())
    return {lang: weights[lang] / total if lang in weights else 0.0 for lang in counts}


def allocate(total: int, probs: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` draws between languages in proportion to ``probs``.

    Largest-remainder rounding, so the parts sum to ``total`` exactly; ties
    go to the language listed first.

    Args:
        total: number of draws to share out.
        probs: ``{language: probability}`` summing to 1.

    Returns:
        ``{language: number of draws}``.
    """
    exact = {lang: total * p for lang, p in probs.items()}
    parts = {lang: math.floor(x) for lang, x in exact.items()}
    order = sorted(exact, key=lambda lang: parts[lang] - exact[lang])  # stable: largest remainder first
    for lang in order[: total - sum(parts.values())]:
        parts[lang] += 1
    return parts


def sample_by_language(
    texts: Mapping[str, Sequence[str]], alpha: float, total: int | None = None, seed: int = 0
) -> list[str]:
    """Draw sentences so that language ``i`` makes up a share ``q_i ∝ p_i^alpha`` of them.

    A language gets ``round(q_i * total)`` sentences: every one of its
    sentences ``k`` times plus a seeded sample without replacement for the
    rest, so a language is repeated only when it is up-sampled and never
    loses sentences it has room for.

    Args:
        texts: sentences per language.
        alpha: sampling exponent (see :func:`language_sampling_probs`).
        total: number of sentences to return (default: the corpus size).
        seed: seed of the draws; the same inputs and seed give the same list.

    Returns:
        The sampled sentences grouped by language, in the order of ``texts``.
    """
    probs = language_sampling_probs({lang: len(items) for lang, items in texts.items()}, alpha)
    total = sum(len(items) for items in texts.values()) if total is None else total
    rng = np.random.default_rng(seed)
    sampled: list[str] = []
    for lang, n_draws in allocate(total, probs).items():
        items = texts[lang]
        if n_draws == 0:
            continue
        repeats, rest = divmod(n_draws, len(items))
        sampled.extend(list(items) * repeats)
        sampled.extend(items[i] for i in sorted(rng.choice(len(items), size=rest, replace=False)))
    return sampled
