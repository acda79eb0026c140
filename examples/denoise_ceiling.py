"""How much exact reconstruction of single noised sentences of the demo corpus is achievable at all.

Why ``mbart_tiny`` trains and is evaluated on documents (``demo:docs_train`` /
``demo:docs_val``, runs of 4 consecutive numbers): this script noises single
held-out sentences (``demo:text_val``, 35% of the words masked in Poisson(3.5)
spans, as the ``denoise`` evaluator does with that data) and shows that on
spelled-out numbers and one-word names most of them have many valid fillings.
For every noised sentence it counts ``k``, the sentences of its language in the whole
demo corpus (training and held-out shards) that fit its unmasked pieces in
order (each ``<mask>`` standing for any text), and reports:

- the ceiling of a model that picks uniformly among the fits, mean(1/k);
- the checkpoint's greedy exact match and the copy baseline's, overall and on
  the sentences with at most 1, 3 and 10 fits.

The noised sources are the ``denoise`` evaluator's with ``data: demo:text_val`` (same
seed, order and per-language cap). On the ``mbart_tiny`` run of the README: a ceiling
of 3.7%, one sentence in 1,600 with a unique filling.

    python examples/denoise_ceiling.py runs/mbart_tiny             # 200 sentences per language
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import tarfile

import torch

import mmptm
from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.evaluation.common import EvalContext
from mmptm.evaluation.denoising import capped_batches, detokenize
from mmptm.evaluation.multilingual import text_batches
from mmptm.objectives.denoising import MultilingualDenoising
from mmptm.objectives.masking import IGNORE_INDEX


def corpus_sentences(tokenizer: object) -> dict[str, set[str]]:
    """Every demo sentence per language, through the tokenizer and back (as the evaluator compares them)."""
    corpus: dict[str, set[str]] = {}
    for split in ("text_train", "text_val"):
        for path in sorted(glob.glob(resolve(f"demo:{split}") + "/*/*.tar")):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        record = json.loads(tar.extractfile(member).read())
                        corpus.setdefault(record["lang"], set()).add(tokenizer.decode(tokenizer.encode(record["text"])))
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an mbart checkpoint or run folder")
    parser.add_argument("--max-sentences", type=int, default=200, help="per language")
    parser.add_argument("--seed", type=int, default=0, help="the evaluator's noise seed")
    args = parser.parse_args()

    model, tokenizer, _ = mmptm.load_pretrained(args.checkpoint)
    model.eval()
    context = EvalContext(tokenizer=tokenizer, data=DataContext(tokenizer=tokenizer, training=False))
    corpus = corpus_sentences(tokenizer)
    noise = MultilingualDenoising()
    generator = torch.Generator().manual_seed(args.seed)
    not_text = {model.mask_id, *model.language_token_id.values()}
    max_length = min(tokenizer.context_length, model.max_positions - 1)
    rows: list[tuple[int, bool, bool]] = []  # (k, model exact, copy exact)
    batches = text_batches(context, "demo:text_val", None, 64, "denoise ceiling")
    for batch in capped_batches(batches, args.max_sentences):
        inputs = noise.corrupt(model, batch, generator)
        with torch.no_grad():
            generated = model.generate(inputs.source, batch["lang"], max_length=max_length)
        for source, target, output, lang in zip(inputs.source.tolist(), inputs.target.tolist(),
                                                generated.tokens.tolist(), batch["lang"], strict=True):
            reference = detokenize(tokenizer, [t for t in target if t != IGNORE_INDEX], not_text)
            pieces, piece = [], []
            for token in source[: source.index(tokenizer.eos_id)]:
                if token == model.mask_id:
                    pieces.append(piece)
                    piece = []
                elif token not in not_text:
                    piece.append(token)
            pieces.append(piece)
            pattern = re.compile("(?:.*)".join(re.escape(tokenizer.decode(p)) for p in pieces))
            k = sum(1 for sentence in corpus[lang] if pattern.fullmatch(sentence))
            rows.append((k, detokenize(tokenizer, output, not_text) == reference,
                         detokenize(tokenizer, source, not_text) == reference))
    n = len(rows)
    print(f"{n} noised held-out sentences; ceiling of a uniform pick among the fits, mean(1/k): "
          f"{sum(1 / max(k, 1) for k, _, _ in rows) / n:.4f}")
    print(f"all: model exact match {sum(m for _, m, _ in rows) / n:.4f}, copy {sum(c for _, _, c in rows) / n:.4f}")
    for bound in (1, 3, 10):
        subset = [(m, c) for k, m, c in rows if k <= bound]
        if subset:
            print(f"k <= {bound}: {len(subset)} sentences ({len(subset) / n:.1%}); model exact match "
                  f"{sum(m for m, _ in subset) / len(subset):.4f}, copy {sum(c for _, c in subset) / len(subset):.4f}")


if __name__ == "__main__":
    main()
