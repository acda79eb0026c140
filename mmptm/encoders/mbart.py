"""mBART: a pre-norm transformer encoder-decoder for multilingual denoising, with greedy and beam decoding.

Liu et al. 2020, "Multilingual Denoising Pre-training for Neural Machine
Translation", sec. 2.1-2.2: BART's sequence-to-sequence transformer (Lewis et
al. 2020, sec. 2.1) with pre-norm blocks and "an additional layer-normalization
layer on top of both the encoder and decoder"; a layer norm on the embeddings
(as the released mBART); learned positions on each side; one token embedding
for the encoder input, the decoder input and the LM head (tied); optionally the
token embeddings scaled by ``sqrt(width)`` as fairseq's ``embed_scale``
(``scale_embedding``, set by the released mbart-large-cc25 / mbart-large-50,
which :mod:`mmptm.interop.mbart` imports). A language-id
token per configured language marks the end of the source and starts the
target (Fig. 1: ``X </s> <lang>`` -> ``<lang> X``).

Language-id ids: with ``language_token_ids`` unset, language ``languages[i]``
gets the new id ``vocab_size + i`` (the tokenizer's vocabulary has no such
pieces, so the embedding grows by one row per language); a tokenizer trained
with language pieces (e.g. ``[en_XX]``) names their ids in ``language_token_ids``.

Decoding (:meth:`MBart.generate`) forces the target language's id as the first
decoder token and stops at ``</s>`` (a document of ``n`` sentences, which
``</s>`` separates as in training, at its ``n``-th): greedy or beam search with
a KV cache (the self-attention keys/values grow by one position per step; the
cross-attention keys/values of the source are computed once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.layers import (
    NO_DROPOUT,
    Activation,
    Attention,
    Dropouts,
    Mlp,
    Transformer,
    check_probability,
    checkpoint_in_forward_modes,
    dropout,
)
from mmptm.registry import register_model


class KVCache:
    """The keys and values of the decoder positions computed so far, for one self-attention layer."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' ``[B, heads, L_new, head_dim]`` keys and values; return all of them."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (beam search: the hypotheses each new beam extends)."""
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)


class DecoderSelfAttention(Attention):
    """Causal self-attention; with a :class:`KVCache`, the new positions also attend to the cached ones."""

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:  # type: ignore[override]
        """``[B, L_new, D] -> [B, L_new, D]``; ``x`` holds the positions after the cached ones."""
        if cache is None:
            return super().forward(x, is_causal=True)
        q, k, v = self.split_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias), 3)
        k, v = cache.append(k, v)
        new, total = q.shape[2], k.shape[2]
        # The new queries are the last `new` positions: each sees the cache and the new ones up to itself.
        allowed = torch.ones(new, total, dtype=torch.bool, device=x.device).tril(total - new)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout_p)
        return self.out_proj(self.merge_heads(out))


class CrossAttention(Attention):
    """Decoder-to-encoder attention: queries from the decoder, keys and values from the encoder states.

    The packed ``in_proj_weight`` is split as ``nn.MultiheadAttention`` splits it for distinct
    query and key/value inputs: the first ``D`` rows project queries, the rest keys and values.
    """

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[B, heads, S, head_dim]`` keys and values of the encoder states ``memory [B, S, D]``."""
        width = memory.shape[-1]
        keys, values = self.split_heads(F.linear(memory, self.in_proj_weight[width:], self.in_proj_bias[width:]), 2)
        return keys, values

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, memory_keep: torch.Tensor
    ) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``memory_keep [B, S]`` is False at the source's padding."""
        width = x.shape[-1]
        (q,) = self.split_heads(F.linear(x, self.in_proj_weight[:width], self.in_proj_bias[:width]), 1)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=memory_keep[:, None, None, :], dropout_p=self.dropout_p
        )
        return self.out_proj(self.merge_heads(out))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the source, MLP (each residual).

    Args:
        width / heads / mlp_ratio / act / dropouts: as :class:`~mmptm.encoders.layers.ResidualAttentionBlock`.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        dropouts: Dropouts = NO_DROPOUT,
    ) -> None:
        super().__init__()
        check_probability("dropout", dropouts.dropout)
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = DecoderSelfAttention(width, heads, dropouts.attention_dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads, dropouts.attention_dropout)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act, dropouts.activation_dropout)
        self.dropout = dropouts.dropout

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        memory_keep: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]`` given this layer's cross-attention keys/values of the source."""
        p, training = self.dropout, self.training
        x = x + dropout(self.self_attn(self.ln_1(x), cache), p, training)
        x = x + dropout(self.cross_attn(self.ln_2(x), keys, values, memory_keep), p, training)
        return x + dropout(self.mlp(self.ln_3(x)), p, training)


class Memory(NamedTuple):
    """The encoded source as the decoder reads it."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: [B, heads, S, head_dim] each
    keep: torch.Tensor  # [B, S]: False at padding

    def repeat_rows(self, times: int) -> Memory:
        """Each row ``times`` times in a row (beam search's ``B * beam`` hypotheses)."""
        return Memory(
            [(k.repeat_interleave(times, dim=0), v.repeat_interleave(times, dim=0)) for k, v in self.keys_values],
            self.keep.repeat_interleave(times, dim=0),
        )


class Generation(NamedTuple):
    """What :meth:`MBart.generate` returns."""

    tokens: torch.Tensor  # [B, T]: generated ids after the forced language id, </s> included, then pad
    scores: torch.Tensor  # [B]: sum of the tokens' log-probabilities / length ** length_penalty
    logits: torch.Tensor | None  # greedy: [B, T, V] logits of every step (rows after their </s>: of pad inputs)


@register_model("mbart")
class MBart(nn.Module):
    """Pre-norm transformer encoder-decoder with tied embeddings and language-id tokens (mBART, Liu et al. 2020).

    Args:
        width: model width.
        encoder_layers / decoder_layers: blocks on each side.
        heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        max_positions: learned positions on each side (the longest source and target, special tokens included).
        languages: the language codes; each gets a language-id token.
        language_token_ids: ``{code: id}`` of language pieces already in the tokenizer's vocabulary;
            None: append one id per language after it (``vocab_size + index in languages``).
        act: the MLP activation.
        scale_embedding: multiply the token embeddings by ``sqrt(width)`` before the positions are
            added (fairseq's ``embed_scale``; Hugging Face's ``scale_embedding``). The LM head uses the
            unscaled embeddings, as in both.
        dropout: in training, dropout on the normalised embeddings and on every sub-layer's output
            before its residual sum (Hugging Face's and fairseq's ``dropout``; the released mBART
            trained with 0.1). Default 0: none.
        attention_dropout: in training, dropout on the attention probabilities (``attention_dropout``).
        activation_dropout: in training, dropout on the MLP activations (``activation_dropout``).
        vocab_size / pad_id / eot_id / bos_id / mask_id: from the tokenizer (filled at run time).

    Raises:
        ValueError: no languages, ``language_token_ids`` that miss a language or fall outside the vocabulary,
            or a dropout probability outside [0, 1].
    """

    def __init__(
        self,
        width: int = 256,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_positions: int = 256,
        languages: list[str] | None = None,
        language_token_ids: dict[str, int] | None = None,
        act: Activation = "gelu",
        scale_embedding: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        vocab_size: int = 8000,
        pad_id: int = 0,
        eot_id: int = 3,
        bos_id: int = 2,
        mask_id: int | None = None,
    ) -> None:
        super().__init__()
        self.languages = list(languages or [])
        if not self.languages:
            raise ValueError("mbart: set the model's 'languages' (one language-id token each)")
        if language_token_ids is None:
            self.language_token_id = {lang: vocab_size + i for i, lang in enumerate(self.languages)}
            self.vocab_size = vocab_size + len(self.languages)
        else:
            self.language_token_id = _check_language_token_ids(language_token_ids, self.languages, vocab_size)
            self.vocab_size = vocab_size
        if decoder_layers < 1:
            raise ValueError(f"'decoder_layers' must be at least 1, got {decoder_layers}")
        self.width = width
        self.max_positions = max_positions
        self.embedding_scale = math.sqrt(width) if scale_embedding else 1.0
        dropouts = Dropouts(dropout, attention_dropout, activation_dropout)
        self.dropout = dropout
        self.pad_id, self.eos_id, self.bos_id, self.mask_id = pad_id, eot_id, bos_id, mask_id
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.encoder_positions = nn.Embedding(max_positions, width)
        self.decoder_positions = nn.Embedding(max_positions, width)
        self.encoder_embedding_norm = nn.LayerNorm(width)
        self.decoder_embedding_norm = nn.LayerNorm(width)
        self.encoder = Transformer(width, encoder_layers, heads, mlp_ratio, act, dropouts)
        self.encoder_norm = nn.LayerNorm(width)
        self.decoder = nn.ModuleList(
            DecoderBlock(width, heads, mlp_ratio, act, dropouts) for _ in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(width)
        self.grad_checkpointing = False
        for embedding in (self.token_embedding, self.encoder_positions, self.decoder_positions):
            nn.init.normal_(embedding.weight, std=0.02)
        # Ids the decoder never has to produce: generation never picks them.
        never_generated = [pad_id, bos_id, mask_id, *self.language_token_id.values()]
        self.register_buffer(
            "never_generated", torch.tensor([i for i in never_generated if i is not None]), persistent=False
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        self.grad_checkpointing = enable

    def language_tokens(self, languages: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """``LongTensor[len(languages)]``: the language-id token of each code.

        Raises:
            ValueError: a code the model has no token for.
        """
        unknown = sorted(set(languages) - set(self.language_token_id))
        if unknown:
            raise ValueError(f"languages {unknown} are not among the model's languages {self.languages}")
        return torch.tensor([self.language_token_id[lang] for lang in languages], dtype=torch.long, device=device)

    def _embed(
        self, tokens: torch.Tensor, positions: nn.Embedding, norm: nn.LayerNorm, offset: int = 0
    ) -> torch.Tensor:
        end = offset + tokens.shape[1]
        if end > self.max_positions:
            raise ValueError(f"mbart: a sequence of {end} tokens is longer than max_positions={self.max_positions}")
        embedded = self.token_embedding(tokens)
        if self.embedding_scale != 1.0:
            embedded = embedded * self.embedding_scale
        embedded = norm(embedded + positions(torch.arange(offset, end, device=tokens.device)))
        return dropout(embedded, self.dropout, self.training)

    def encode(self, source: torch.Tensor) -> Memory:
        """Encode ``source [B, S]`` (``pad_id`` masked out) into every decoder layer's cross-attention keys/values."""
        keep = source != self.pad_id
        x = self._embed(source, self.encoder_positions, self.encoder_embedding_norm)
        states = self.encoder_norm(self.encoder(x, attn_mask=keep))
        return Memory([block.cross_attn.keys_values(states) for block in self.decoder], keep)

    def decode(self, tokens: torch.Tensor, memory: Memory, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Decoder states ``[B, L, D]`` of ``tokens [B, L]``.

        Args:
            tokens: decoder inputs; with ``caches``, only the positions after the cached ones.
            memory: the encoded source (:meth:`encode`).
            caches: one :class:`KVCache` per decoder layer, extended in place (None: no cache, the
                whole prefix is given).
        """
        offset = len(caches[0]) if caches else 0
        x = self._embed(tokens, self.decoder_positions, self.decoder_embedding_norm, offset)
        for index, block in enumerate(self.decoder):
            keys, values = memory.keys_values[index]
            cache = caches[index] if caches else None
            if self.grad_checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint_in_forward_modes(block, x, keys, values, memory.keep)
            else:
                x = block(x, keys, values, memory.keep, cache)
        return self.decoder_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[..., vocab_size]`` by the LM head tied to the token embeddings."""
        return F.linear(hidden, self.token_embedding.weight)

    def forward(self, source: torch.Tensor, decoder_input: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, vocab_size]`` of ``decoder_input [B, T]`` given ``source [B, S]``."""
        return self.logits(self.decode(decoder_input, self.encode(source)))

    # ------------------------------------------------------------------ generation

    def next_token_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[..., vocab_size]`` decoding picks from; pad, bos, ``<mask>``, language ids excluded."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 logits: in float32
        return logits.index_fill(-1, self.never_generated, float("-inf")).log_softmax(dim=-1)

    @torch.no_grad()
    def generate(
        self,
        source: torch.Tensor,
        languages: Sequence[str],
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        sentences: Sequence[int] | None = None,
    ) -> Generation:
        """Decode ``source`` into ``languages``: greedy (``beam_size=1``) or beam search, both with a KV cache.

        Args:
            source: ``[B, S]`` token ids (``... </s> <lang>``), right-padded.
            languages: the target language of each row (its id is the forced first decoder token).
            max_length: at most this many generated tokens, ``</s>`` included (None: ``max_positions - 1``).
            beam_size: hypotheses kept per row.
            length_penalty: a hypothesis scores ``sum log p / length ** length_penalty`` (0: no
                normalisation; above 1 favours longer outputs).
            sentences: the sentences of each row's output (None: one each). Sentences are
                separated by ``</s>``, as in the training documents, so a row ends at its
                ``sentences[row]``-th ``</s>`` (denoising keeps a document's sentence count).

        Returns:
            A :class:`Generation` (``logits`` only for greedy decoding).
        """
        if beam_size == 1:
            return self.greedy_search(source, languages, max_length, length_penalty, sentences=sentences)
        return self.beam_search(source, languages, beam_size, max_length, length_penalty, sentences)

    def _sentences(self, sentences: Sequence[int] | None, rows: int, device: torch.device) -> torch.Tensor:
        """``LongTensor[rows]``: the ``</s>`` that ends each row's output (``sentences``; default 1)."""
        if sentences is None:
            return torch.ones(rows, dtype=torch.long, device=device)
        ends = torch.as_tensor(sentences, dtype=torch.long).to(device)
        if ends.shape != (rows,) or bool((ends < 1).any()):
            raise ValueError(f"sentences must hold one count >= 1 per source row ({rows}), got {list(sentences)}")
        return ends

    def _max_length(self, max_length: int | None) -> int:
        """``max_length``, or the most the decoder's positions allow (the forced language id takes one)."""
        if max_length is None:
            return self.max_positions - 1
        if not 1 <= max_length < self.max_positions:
            raise ValueError(
                f"max_length must be in [1, max_positions - 1 = {self.max_positions - 1}], got {max_length}"
            )
        return max_length

    @torch.no_grad()
    def greedy_search(
        self,
        source: torch.Tensor,
        languages: Sequence[str],
        max_length: int | None = None,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        sentences: Sequence[int] | None = None,
    ) -> Generation:
        """Pick the most likely token at every step until each row has produced its last ``</s>``.

        Args:
            source / languages / max_length / length_penalty / sentences: as :meth:`generate`.
            use_cache: extend per-layer KV caches by one position per step; False recomputes the
                decoder over the whole prefix at every step (the reference the cache must equal).
        """
        max_length = self._max_length(max_length)
        memory = self.encode(source)
        tokens = self.language_tokens(languages, source.device)[:, None]
        caches = [KVCache() for _ in self.decoder] if use_cache else None
        ends_left = self._sentences(sentences, len(tokens), source.device)  # </s> still to produce per row
        finished = torch.zeros(len(tokens), dtype=torch.bool, device=source.device)
        total = torch.zeros(len(tokens), device=source.device)
        lengths = torch.zeros(len(tokens), device=source.device)
        step_logits = []
        for _ in range(max_length):
            logits = self.logits(self.decode(tokens[:, -1:] if use_cache else tokens, memory, caches)[:, -1])
            step_logits.append(logits)
            log_probs = self.next_token_log_probs(logits)
            best = log_probs.argmax(dim=-1)
            total += torch.where(finished, 0.0, log_probs.gather(1, best[:, None]).squeeze(1))
            lengths += (~finished).float()
            tokens = torch.cat([tokens, torch.where(finished, self.pad_id, best)[:, None]], dim=1)
            ends_left -= ((best == self.eos_id) & ~finished).long()
            finished |= ends_left == 0
            if finished.all():
                break
        return Generation(tokens[:, 1:], total / lengths**length_penalty, torch.stack(step_logits, dim=1))

    @torch.no_grad()
    def beam_search(
        self,
        source: torch.Tensor,
        languages: Sequence[str],
        beam_size: int = 4,
        max_length: int | None = None,
        length_penalty: float = 1.0,
        sentences: Sequence[int] | None = None,
    ) -> Generation:
        """Beam search as fairseq's ``SequenceGenerator``: ``beam_size`` hypotheses per row, KV caches reordered.

        Every step ranks the ``2 * beam_size`` best extensions of a row's hypotheses by their
        summed log-probability; an extension by the hypothesis's last ``</s>`` (see ``sentences``)
        among the first ``beam_size`` is finished (scored ``sum log p / length ** length_penalty``),
        the best other extensions are the next hypotheses. A row is done when it has
        ``beam_size`` finished hypotheses; at ``max_length`` the last step's ended and open
        hypotheses of a row not done all join its finished ones (the open ones as they are,
        without ``</s>``), as fairseq and transformers rank them at the length limit. The best
        finished hypothesis wins. With ``beam_size=1`` this is greedy decoding.

        Args:
            source / languages / max_length / length_penalty / sentences: as :meth:`generate`.
            beam_size: hypotheses kept per row.
        """
        max_length = self._max_length(max_length)
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        batch, device = source.shape[0], source.device
        ends = self._sentences(sentences, batch, device).tolist()
        ends_seen = [0] * (batch * beam_size)  # the </s> each hypothesis holds
        memory = self.encode(source).repeat_rows(beam_size)
        tokens = self.language_tokens(languages, device).repeat_interleave(beam_size)[:, None]
        caches = [KVCache() for _ in self.decoder]
        # All beams of a row start identical: only the first one may be extended at the first step.
        scores = torch.full((batch, beam_size), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        for step in range(max_length):
            last = step == max_length - 1
            # Rows already done; at the last step the others' ended and open hypotheses compete together.
            done = [len(hypotheses) >= beam_size for hypotheses in finished]
            log_probs = self.next_token_log_probs(self.logits(self.decode(tokens[:, -1:], memory, caches)[:, -1]))
            vocab = log_probs.shape[-1]
            candidates = (scores[:, :, None] + log_probs.view(batch, beam_size, vocab)).view(batch, -1)
            top_scores, top_index = candidates.topk(2 * beam_size, dim=1)
            ranked = zip((top_index // vocab).tolist(), (top_index % vocab).tolist(), top_scores.tolist(), strict=True)
            rows, next_tokens, next_scores = [], [], []
            for row, (beams, row_tokens, row_scores) in enumerate(ranked):
                extended: list[tuple[int, int, float]] = []
                if not done[row]:
                    # </s> ends the hypotheses at their last sentence; elsewhere it is a separator like any token
                    end_id = [self.eos_id if ends_seen[row * beam_size + beam] + 1 == ends[row] else -1
                              for beam in range(beam_size)]
                    extended, ended = _split_extensions(beams, row_tokens, row_scores, beam_size, end_id)
                    for beam, score in ended if last else ended[: beam_size - len(finished[row])]:
                        prefix = tokens[row * beam_size + beam, 1:].tolist()
                        finished[row].append((score / (step + 1) ** length_penalty, [*prefix, self.eos_id]))
                if (len(finished[row]) >= beam_size and not last) or done[row] or not extended:
                    extended = [(0, self.pad_id, float("-inf"))]  # done: a placeholder keeps the shapes
                extended += [(*extended[-1][:2], float("-inf"))] * (beam_size - len(extended))
                for beam, token, score in extended:
                    rows.append(row * beam_size + beam)
                    next_tokens.append(token)
                    next_scores.append(score)
            index = torch.tensor(rows, device=device)
            for cache in caches:
                cache.reorder(index)
            ends_seen = [ends_seen[h] + (token == self.eos_id) for h, token in zip(rows, next_tokens, strict=True)]
            tokens = torch.cat([tokens[index], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
            scores = torch.tensor(next_scores, device=device).view(batch, beam_size)
            if not last and all(len(hypotheses) >= beam_size for hypotheses in finished):
                break
        else:  # max_length reached: the open hypotheses of the rows not done compete as they are, without </s>
            for row in range(batch):
                if done[row]:
                    continue
                for beam, score in enumerate(scores[row].tolist()):
                    if score != float("-inf"):
                        prefix = tokens[row * beam_size + beam, 1:].tolist()
                        finished[row].append((score / max_length**length_penalty, prefix))
        best = [max(done, key=lambda hypothesis: hypothesis[0]) for done in finished]
        output = torch.full((batch, max(len(ids) for _, ids in best)), self.pad_id, dtype=torch.long, device=device)
        for row, (_, ids) in enumerate(best):
            output[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return Generation(output, torch.tensor([score for score, _ in best], device=device), None)


def _split_extensions(
    beams: Sequence[int], tokens: Sequence[int], scores: Sequence[float], beam_size: int, end_id: Sequence[int]
) -> tuple[list[tuple[int, int, float]], list[tuple[int, float]]]:
    """One row's ranked extensions (best first) -> the next hypotheses and the finished ones.

    Args:
        end_id: per beam, the id that finishes it (``</s>`` at its last sentence; -1: none).

    Returns:
        ``(extended, ended)``: up to ``beam_size`` ``(beam, token, score)`` extensions by a token
        that does not finish the beam, and the ``(beam, score)`` of the finishing extensions ranked among
        the first ``beam_size`` (fairseq's rule: a ``</s>`` ranked lower would not survive the beam).
    """
    extended: list[tuple[int, int, float]] = []
    ended: list[tuple[int, float]] = []
    for rank, (beam, token, score) in enumerate(zip(beams, tokens, scores, strict=True)):
        if score == float("-inf") or len(extended) == beam_size:
            break
        if token != end_id[beam]:
            extended.append((beam, token, score))
        elif rank < beam_size:
            ended.append((beam, score))
    return extended, ended


def _check_language_token_ids(ids: Mapping[str, int], languages: Sequence[str], vocab_size: int) -> dict[str, int]:
    """``ids`` restricted to ``languages``, once checked to name each of them inside the vocabulary."""
    missing = [lang for lang in languages if lang not in ids]
    outside = {lang: ids[lang] for lang in languages if lang in ids and not 0 <= ids[lang] < vocab_size}
    if missing or outside:
        raise ValueError(
            f"mbart language_token_ids must give each of {list(languages)} an id below vocab_size={vocab_size}; "
            f"missing {missing}, outside the vocabulary {outside}"
        )
    return {lang: int(ids[lang]) for lang in languages}
