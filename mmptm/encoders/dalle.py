"""DALL-E's token decoder: a decoder-only transformer over a caption's tokens followed by an image's tokens.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.2 and
appendix B. A caption is tokenised and padded to a fixed ``text_length``; an
image is compressed to a ``grid_size × grid_size`` grid of codebook tokens by a
frozen discrete image tokenizer (``dvae`` / ``vqvae``, :mod:`mmptm.encoders.dvae`).
The transformer models the concatenation ``[text tokens, image tokens]``
autoregressively:

- padding: every text position has its own learned padding token (appendix
  B.2: "we use a special padding token for each of the 256 text positions"),
  so the pad id the model sees depends on the position; a caption dropped for
  classifier-free guidance is all padding;
- positions: learned text position embeddings, and for the image a row and a
  column embedding of each token's grid cell (appendix B.1);
- attention: causal self-attention with ``scaled_dot_product_attention`` in
  pre-norm blocks (the paper's row/column/convolutional sparse masks are a
  memory optimisation for 1024 image tokens; dense causal attention is the
  same model without it);
- heads: one over the text vocabulary plus the padding tokens, one over the
  image codebook (the paper's single logit space restricted to the modality
  of each position).

Sampling one token at a time reuses the keys and values of the positions
already decoded (:class:`KVCache`); :mod:`mmptm.generation.sampling` drives it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mmptm.config import ConfigError
from mmptm.encoders.layers import Attention, Mlp, checkpoint_in_forward_modes, padding_by_place
from mmptm.registry import register_model


class LayerCache(NamedTuple):
    """One layer's keys and values, ``[B, heads, max_length, head_dim]`` each, filled up to the decoded length."""

    keys: torch.Tensor
    values: torch.Tensor


class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    Args:
        layers: number of transformer blocks.
        batch: sequences decoded together.
        heads / head_dim: the attention's shape.
        max_length: positions the cache can hold.
        device / dtype: of the tensors.
    """

    def __init__(
        self, layers: int, batch: int, heads: int, head_dim: int, max_length: int, device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch, heads, max_length, head_dim)
        self.layers = [
            LayerCache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
            for _ in range(layers)
        ]
        self.max_length = max_length


class CausalSelfAttention(Attention):
    """:class:`~mmptm.encoders.layers.Attention`'s parameters, causal, optionally reading and filling a cache."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, cache: LayerCache | None = None, start: int = 0
    ) -> torch.Tensor:
        """Attend from ``x`` (positions ``start .. start + L - 1``) to every position up to each query's own.

        Args:
            x: ``[B, L, D]``.
            cache: keys and values of positions ``0 .. start - 1``; this call writes those of ``x`` after them.
                Without a cache ``start`` must be 0 (``x`` is the whole sequence).
            start: the position of ``x``'s first element.

        Returns:
            ``[B, L, D]``.
        """
        batch, length, width = x.shape
        q, k, v = (
            F.linear(x, self.in_proj_weight, self.in_proj_bias)
            .view(batch, length, 3, self.heads, width // self.heads)
            .permute(2, 0, 3, 1, 4)  # -> 3 x [B, heads, L, head_dim]
        )
        mask, is_causal = None, True
        if cache is not None:
            end = start + length
            if end > cache.keys.shape[2]:
                raise ValueError(f"the cache holds {cache.keys.shape[2]} positions; asked to fill up to {end}")
            cache.keys[:, :, start:end] = k
            cache.values[:, :, start:end] = v
            k, v = cache.keys[:, :, :end], cache.values[:, :, :end]
            if start > 0:  # queries are the last L of `end` keys: SDPA's is_causal aligns them to the first
                is_causal = False
                if length > 1:
                    positions = torch.arange(end, device=x.device)
                    mask = positions[None, :] <= positions[start:, None]
        elif start:
            raise ValueError("without a cache the input must start at position 0")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm block with causal attention: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))


class DalleOutput(NamedTuple):
    """What :meth:`TokenDecoder.forward` returns.

    Attributes:
        text_logits: ``[B, text_length - 1, vocab_size + text_length]``, predicting text positions 1.. .
        image_logits: ``[B, grid_size ** 2, codebook_size]``, predicting every image token.
        text_ids: ``[B, text_length]``, the caption as the model reads it (padding replaced by the
            per-position padding ids): ``text_ids[:, 1:]`` are the targets of ``text_logits``.
    """

    text_logits: torch.Tensor
    image_logits: torch.Tensor
    text_ids: torch.Tensor


def frozen_image_tokenizer(spec: str | Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen image tokenizer (eval mode, no gradients) of ``model.dvae``, and its architecture.

    Args:
        spec: a ``dvae`` / ``vqvae`` checkpoint or run folder, whose weights are loaded; or such a
            model's config section (what a decoder checkpoint records), built with random weights
            that the decoder's own checkpoint then overwrites.

    Returns:
        The tokenizer and its ``model`` config section.

    Raises:
        ConfigError: no checkpoint there, one of another kind of model, or an invalid section.
    """
    from mmptm.data_pipelines.image_tokens import load_image_tokenizer
    from mmptm.models import create_model
    from mmptm.training.checkpoint import resolve_checkpoint

    if isinstance(spec, Mapping):
        try:
            tokenizer, section = create_model(dict(spec)), dict(spec)
        except ConfigError as err:
            raise ConfigError(f"model.dvae: {err}") from None
        return tokenizer.requires_grad_(False).eval(), section
    try:
        tokenizer = load_image_tokenizer(spec)
        section = yaml.safe_load((resolve_checkpoint(spec) / "config.yaml").read_text(encoding="utf-8"))["model"]
    except FileNotFoundError as err:
        raise ConfigError(f"model.dvae={spec}: {err} (a relative path is read from the current folder)") from None
    except ConfigError as err:
        raise ConfigError(f"model.dvae={spec}: {err}") from None
    return tokenizer.requires_grad_(False).eval(), section


@register_model("dalle")
class TokenDecoder(nn.Module):
    """DALL-E's decoder-only transformer over [caption tokens, image tokens] (Ramesh et al. 2021, sec. 2.2).

    Args:
        dvae: the image tokenizer's checkpoint or run folder (``dvae`` / ``vqvae``), or its model
            config section. It is loaded frozen and kept as ``self.dvae``; its weights are saved with
            the decoder's and its section replaces the path in the run's saved config (see
            :meth:`portable_config`), so a decoder checkpoint loads on its own. Training
            tokenises images on the fly, generation decodes the sampled tokens. None: a decoder of
            precomputed tokens (``image_tokens`` batches) that cannot make images; then set
            ``codebook_size`` and ``grid_size``.
        text_length: caption tokens per sequence (bos and eos included); shorter token rows are padded.
        width / layers / heads / mlp_ratio: the transformer.
        codebook_size / grid_size: the image tokens' vocabulary and grid side; taken from ``dvae``
            (they must agree with it if given too).
        languages: the caption languages the decoder is trained on, recorded so that
            ``mmptm generate --lang`` refuses others (None: not recorded).
        vocab_size / pad_id / eot_id: the text tokenizer's, filled in at run time. With an
            ``eot_id``, a ``pad_id`` is padding only after a row's first end-of-text token (CLIP's
            BPE pads with id 0, which is also the symbol ``"!"``); without one, every ``pad_id`` is.
    """

    # The data context checks precomputed token grids against grid_size and codebook_size.
    reads_image_tokens = True
    # mmptm.training.sharding refuses FSDP: sharded weights are gathered only inside forward().
    fsdp_unsupported = (
        "the frozen image tokenizer (model.dvae) and token sampling run outside forward(), where FSDP does not "
        "gather the sharded weights"
    )

    def __init__(
        self,
        dvae: str | dict[str, Any] | None = None,
        text_length: int = 64,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        codebook_size: int | None = None,
        grid_size: int | None = None,
        languages: list[str] | None = None,
        vocab_size: int = 49408,
        pad_id: int = 0,
        eot_id: int | None = None,
    ) -> None:
        super().__init__()
        if text_length < 2:
            raise ConfigError(f"model.text_length must be at least 2 (bos and eos), got {text_length}")
        self.dvae, self.dvae_config = frozen_image_tokenizer(dvae) if dvae is not None else (None, None)
        if self.dvae is not None:
            for name, value in (("codebook_size", codebook_size), ("grid_size", grid_size)):
                if value is not None and value != getattr(self.dvae, name):
                    raise ConfigError(
                        f"model.{name}={value} but the image tokenizer model.dvae={dvae} has {name} "
                        f"{getattr(self.dvae, name)}; leave model.{name} out to take it from the tokenizer"
                    )
            codebook_size, grid_size = self.dvae.codebook_size, self.dvae.grid_size
        elif codebook_size is None or grid_size is None:
            raise ConfigError(
                "model.dvae is not set: give the image tokenizer's checkpoint, or model.codebook_size and "
                "model.grid_size to train on precomputed image tokens"
            )
        self.text_length = text_length
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.eot_id = eot_id
        self.codebook_size = codebook_size
        self.grid_size = grid_size
        self.languages = list(languages) if languages is not None else None
        self.heads = heads
        self.grad_checkpointing = False

        # The text vocabulary is the tokenizer's plus one padding token per position (vocab_size + i at i).
        self.text_embedding = nn.Embedding(vocab_size + text_length, width)
        self.text_position_embedding = nn.Parameter(torch.empty(text_length, width))
        self.image_embedding = nn.Embedding(codebook_size, width)
        self.image_row_embedding = nn.Parameter(torch.empty(grid_size, width))
        self.image_column_embedding = nn.Parameter(torch.empty(grid_size, width))
        self.blocks = nn.ModuleList(DecoderBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_head = nn.Linear(width, vocab_size + text_length, bias=False)
        self.image_head = nn.Linear(width, codebook_size, bias=False)
        for weight in (
            self.text_embedding.weight, self.text_position_embedding, self.image_embedding.weight,
            self.image_row_embedding, self.image_column_embedding, self.text_head.weight, self.image_head.weight,
        ):
            nn.init.normal_(weight, std=0.02)

    # ------------------------------------------------------------------ geometry and inputs

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def visual(self) -> nn.Module | None:
        """The image tokenizer, whose ``image_size``, ``image_mean`` and ``image_std`` set the pixels of the streams."""
        return self.dvae

    def train(self, mode: bool = True) -> TokenDecoder:
        """Set the decoder's mode; the image tokenizer stays frozen in eval mode."""
        super().train(mode)
        if self.dvae is not None:
            self.dvae.eval()
        return self

    def portable_config(self, section: dict[str, Any]) -> dict[str, Any]:
        """This decoder's config ``section`` with the image tokenizer's architecture in place of its path.

        The trainer saves this section, so a checkpoint loads wherever the tokenizer's folder is gone
        (its weights are in the decoder's ``model.safetensors``).
        """
        return section if self.dvae_config is None else {**section, "dvae": self.dvae_config}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def null_text(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[batch, text_length]`` captions of padding only: the empty caption of classifier-free guidance."""
        return torch.full((batch, self.text_length), self.pad_id, dtype=torch.long, device=device)

    def check_text_shape(self, text: torch.Tensor) -> None:
        """Raise a ValueError unless ``text`` is ``[B, L <= text_length]`` tokenizer rows."""
        if text.ndim != 2 or text.shape[1] > self.text_length:
            raise ValueError(
                f"the token decoder reads captions of at most model.text_length={self.text_length} tokens, "
                f"got a batch of shape {tuple(text.shape)}; set tokenizer.context_length to {self.text_length}"
            )

    def padding(self, text: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool, True at the padding of tokenizer rows ``text`` (:func:`padding_by_place`).

        Rows without an end-of-text token (the empty caption, or a model without ``eot_id``) have
        every ``pad_id`` as padding.
        """
        return padding_by_place(text, self.pad_id, self.eot_id)

    def text_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Tokeniser rows ``[B, L <= text_length]`` -> the ids the model reads, ``[B, text_length]``.

        Rows are right-padded to ``text_length``, and the padding (:meth:`padding`) at position
        ``i`` becomes the padding token ``vocab_size + i`` (Ramesh et al. 2021, appendix B.2).

        Raises:
            ValueError: rows longer than ``text_length``, or ids outside the tokenizer's vocabulary
                (a tokenizer that is not the model's).
        """
        self.check_text_shape(text)
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= self.vocab_size):
            raise ValueError(
                f"caption token ids range over [{int(text.min())}, {int(text.max())}] but the model's text "
                f"vocabulary has {self.vocab_size} ids: the tokenizer is not the one the model was built for"
            )
        text = F.pad(text, (0, self.text_length - text.shape[1]), value=self.pad_id)
        padding_ids = self.vocab_size + torch.arange(self.text_length, device=text.device)
        return torch.where(self.padding(text), padding_ids, text)

    def check_image_tokens(self, tokens: torch.Tensor) -> None:
        """Raise a ValueError unless ``tokens`` are ``[B, <= grid_size ** 2]`` codebook indices."""
        if tokens.ndim != 2 or tokens.shape[1] > self.num_image_tokens:
            raise ValueError(
                f"image tokens must be [B, {self.num_image_tokens}] (a {self.grid_size}x{self.grid_size} grid, "
                f"row-major), got {tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(
                f"image tokens must be in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``[B, text_length]`` ids from :meth:`text_ids` -> ``[B, text_length, D]``."""
        return self.text_embedding(text_ids) + self.text_position_embedding[: text_ids.shape[1]]

    def embed_image(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Image tokens at grid positions ``start, start + 1, ...`` (row-major) -> ``[B, n, D]``."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        rows, columns = positions // self.grid_size, positions % self.grid_size
        return self.image_embedding(tokens) + self.image_row_embedding[rows] + self.image_column_embedding[columns]

    # ------------------------------------------------------------------ the transformer

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states of embedded positions ``start ..`` (with a cache of the earlier ones).

        Args:
            x: ``[B, L, D]`` embeddings.
            cache: keys and values of positions ``0 .. start - 1``, extended with those of ``x``.
            start: position of ``x``'s first element (0 without a cache).
        """
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint_in_forward_modes(block, x)
            else:
                x = block(x, layer_cache, start)
        return self.ln_final(x)

    def new_cache(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` whole sequences (caption and every image token but the last)."""
        reference = self.text_position_embedding
        width = reference.shape[1]
        return KVCache(
            len(self.blocks), batch, self.heads, width // self.heads, self.text_length + self.num_image_tokens - 1,
            device or reference.device, dtype or reference.dtype,
        )

    def forward(self, text: torch.Tensor, image_tokens: torch.Tensor) -> DalleOutput:
        """Teacher-forced logits of a caption and its image's tokens.

        Args:
            text: ``[B, L <= text_length]`` tokenizer rows (bos, pieces, eos, padding).
            image_tokens: ``[B, grid_size ** 2]`` codebook indices, row-major.

        Returns:
            :class:`DalleOutput`: the logits of text positions 1.. and of every image token, and the caption ids.
        """
        text_ids = self.text_ids(text)
        self.check_image_tokens(image_tokens)
        if image_tokens.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"training takes whole images: {self.num_image_tokens} tokens, got {image_tokens.shape[1]}"
            )
        # The last image token is only ever a target: the input stops one position before it.
        x = torch.cat([self.embed_text(text_ids), self.embed_image(image_tokens[:, :-1])], dim=1)
        states = self.hidden(x)
        boundary = self.text_length - 1  # the last caption position predicts the first image token
        return DalleOutput(self.text_head(states[:, :boundary]), self.image_head(states[:, boundary:]), text_ids)

    # ------------------------------------------------------------------ images

    def _require_dvae(self, what: str) -> nn.Module:
        if self.dvae is None:
            raise ValueError(f"{what} needs the image tokenizer: this token decoder was built without model.dvae")
        return self.dvae

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (as the streams yield them for the tokenizer) -> ``[B, grid_size ** 2]`` tokens, frozen."""
        return self._require_dvae("tokenising images").encode_tokens(images)

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, grid_size ** 2]`` tokens -> images ``[B, 3, H, W]`` in [0, 1]."""
        return self._require_dvae("making images").decode_tokens(tokens)

    def check_language(self, language: str) -> None:
        """Raise a ValueError if ``languages`` is recorded and does not hold ``language``."""
        if self.languages is not None and language not in self.languages:
            raise ValueError(f"unknown language '{language}'; this model was trained on captions in: "
                             f"{', '.join(self.languages)}")

