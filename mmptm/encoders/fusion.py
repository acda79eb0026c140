"""What the BERT-style vision-language fusion models share: visual inputs, token ids, heads and outputs.

VisualBERT (Li et al. 2019, "VisualBERT: A Simple and Performant Baseline for
Vision and Language") and ViLBERT (Lu et al. 2019, "ViLBERT: Pretraining
Task-Agnostic Visiolinguistic Representations for Vision-and-Language Tasks")
differ in how they fuse the two modalities; around that they are the same:
visual tokens from an image tower (trainable or frozen) or from precomputed
region features, BERT text embeddings, a masked-LM head tied to the word
embeddings, an image-text matching head and masked-region-modelling heads.
:class:`FusionModel` holds those parts and the forward pass; a subclass
implements :meth:`FusionModel.fuse`. The objectives (``itm``, ``vl_mlm``,
``mrm``) and the ``itm_retrieval`` evaluator work with any subclass.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from mmptm.encoders.bert import BERT_LAYER_NORM_EPS, BertEmbeddings, MaskedLMHead, RegionHead
from mmptm.encoders.layers import padding_by_place
from mmptm.encoders.visual_inputs import BOXES_KEY, REGION_MASK_KEY, REGIONS_KEY, VisualInputs
from mmptm.registry import ENCODERS, EncoderSpec, build
from mmptm.training.distributed import unwrap_model

# Column of the two-way matching logits that means "the text describes the image" (BERT's
# next-sentence convention, kept by Hugging Face's VisualBertForPreTraining ``sentence_image_labels``).
MATCH, MISMATCH = 0, 1


class MissingVisualInputError(KeyError):
    """A batch lacks the visual input the model reads; the message names the keys and the config fields."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class FusionOutput(NamedTuple):
    """What a fusion model returns for a batch of (text, image) pairs.

    Attributes:
        text: ``[P, L, text_width]`` final text states.
        visual: ``[P, N, visual_width]`` final states of the N visual input tokens.
        itm_logits: ``[P, 2]`` image-text matching logits (column :data:`MATCH`: the pair matches).
        mlm_logits: ``[P, L, vocab_size]`` masked-LM logits, or None when not asked for.
        inputs: the visual inputs of the B images, before pairing and masking (MRM's targets).
        text_layers: the text states after the embeddings and after every layer that updates the
            text stream, when asked for (empty otherwise).
    """

    text: torch.Tensor
    visual: torch.Tensor
    itm_logits: torch.Tensor
    mlm_logits: torch.Tensor | None
    inputs: VisualInputs
    text_layers: tuple[torch.Tensor, ...] = ()


class FusionModel(nn.Module):
    """Base of the fusion models: visual inputs, text embeddings, heads and the forward pass.

    The keyword-only options below are the config options every fusion model shares: a subclass
    whose ``__init__`` ends in ``**options`` passes them on unchanged, and its config options (the
    signature the config loader and ``mmptm list`` read) are its own parameters followed by these,
    see :meth:`__init_subclass__`. A subclass that declares one of them itself (to change its default
    or to use it) passes it on explicitly.

    Args:
        text_width: width of the text stream.
        visual_width: width of the visual stream (the text width for a single-stream model).
        max_text_length: text positions.
        dropout: dropout probability.
        vision: the image tower's config section (``vit``, ``timm``, or any encoder with
            ``forward_tokens``), built with ``embed_dim=visual_dim``; None (``null``): read precomputed
            region features from the batch (``regions``, ``boxes``, ``region_mask``; the
            ``region_features`` dataset).
        freeze_vision: keep the tower's weights fixed (no gradients, eval mode): the weights it is built
            with (random) unless ``train.init_from`` loads a fusion checkpoint.
        visual_dim: feature size of a visual token: the tower's output or the regions' D.
        region_classes: classes of the masked-region classification head (k-means codes, dVAE
            tokens or detector classes, see the ``mrm`` objective).
        vocab_size / pad_id / eot_id / bos_id / mask_id: filled in from the tokenizer.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """List the shared keyword-only options in the signature of a subclass ``__init__(..., **options)``.

        Configs are validated against a component's signature and type hints (:mod:`mmptm.config`), so
        the options a subclass forwards with ``**options`` are added to its ``__init__``'s
        ``__signature__`` and annotations instead of being repeated in every model.
        """
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        own = inspect.signature(init) if init is not None else None
        if own is None or not any(p.kind is p.VAR_KEYWORD for p in own.parameters.values()):
            return
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        declared = {p.name for p in params}
        shared = [
            p for p in inspect.signature(FusionModel.__init__).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in declared
        ]
        hints = typing.get_type_hints(FusionModel.__init__, include_extras=True)
        init.__signature__ = own.replace(parameters=[*params, *shared])
        init.__annotations__ = {**{p.name: hints[p.name] for p in shared}, **init.__annotations__}

    def __init__(
        self,
        text_width: int,
        visual_width: int,
        max_text_length: int,
        dropout: float,
        *,
        # Read-only default (copied before use); the config loader validates it as an encoder section.
        vision: EncoderSpec | None = {"name": "vit"},  # noqa: B006
        freeze_vision: bool = False,
        visual_dim: int = 768,
        region_classes: int = 256,
        vocab_size: int | None = None,
        pad_id: int = 0,
        eot_id: int | None = None,
        bos_id: int | None = None,
        mask_id: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size is None:
            raise ValueError("vocab_size is filled in from the tokenizer: build the model with create_model(..., "
                             "tokenizer=...)")
        self.vocab_size, self.pad_id, self.eot_id, self.bos_id, self.mask_id = (
            vocab_size, pad_id, eot_id, bos_id, mask_id
        )
        self.text_width, self.visual_width, self.visual_dim = text_width, visual_width, visual_dim
        self.region_classes = region_classes
        self.freeze_vision = freeze_vision
        self.grad_checkpointing = False
        self.visual = None if vision is None else self._build_tower(vision, visual_dim)
        if self.visual is not None and freeze_vision:
            self.visual.requires_grad_(False).eval()  # eval from the start, as train() keeps it
        # No padding_idx: padding is found by its place (text_keep), and CLIP BPE's pad id 0 is also "!",
        # whose embedding must train. Padding positions are masked out of attention, so its row gets no gradient.
        self.embeddings = BertEmbeddings(vocab_size, text_width, max_text_length, pad_id=None, dropout=dropout)
        self.mlm_head = MaskedLMHead(text_width, vocab_size)
        self.region_regression = RegionHead(visual_width, visual_dim, BERT_LAYER_NORM_EPS)
        self.region_classifier = RegionHead(visual_width, region_classes, BERT_LAYER_NORM_EPS)

    def init_weights(self, std: float) -> None:
        """BERT's initialisation of the fusion layers and heads (Devlin et al. 2019; Hugging Face's
        ``_init_weights``): normal(0, std) weights, zero biases, unit LayerNorms; the tower keeps its own.

        Args:
            std: the weights' standard deviation (BERT: 0.02, for width 768 and up; a narrow model
                trained from scratch learns much faster with about ``width ** -0.5``, as with 0.02 its
                attention logits and matching-head gradients start near zero).
        """
        for name, module in self.named_modules():
            if name == "visual" or name.startswith("visual."):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _build_tower(spec: dict[str, Any], visual_dim: int) -> nn.Module:
        spec = dict(spec)
        spec.setdefault("name", "timm" if "timm_model" in spec else "vit")
        try:
            tower = build(ENCODERS, spec, embed_dim=visual_dim)
        except ValueError as err:
            raise ValueError(f"model.vision: {err}") from err
        if not hasattr(tower, "forward_tokens"):
            raise ValueError(
                f"model.vision: encoder '{spec['name']}' has no forward_tokens (patch or grid features); "
                "use vit or timm, or model.vision=null with region features"
            )
        return tower

    def text_keep(self, text: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool, True at the caption's tokens: those that are not ``pad_id``, and any ``pad_id``
        before the row's first end-of-text token.

        With CLIP's BPE, ``pad_id`` 0 is also the symbol ``"!"``: inside a caption it is a word and
        stays visible, after the end-of-text token it is padding. For WordPiece captions
        (``[CLS] ... [SEP] [PAD]...``) this is Hugging Face's ``attention_mask`` (``text != pad``).
        """
        return ~padding_by_place(text, self.pad_id, self.eot_id)

    @property
    def reads_regions(self) -> bool:
        """True when the visual tokens are precomputed region features from the batch."""
        return self.visual is None

    def train(self, mode: bool = True) -> FusionModel:
        """Set train/eval mode; a frozen tower stays in eval mode (no dropout, fixed norm statistics)."""
        super().train(mode)
        if self.visual is not None and self.freeze_vision:
            self.visual.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute layer activations in backward to save memory (fusion layers and a trainable tower)."""
        self.grad_checkpointing = enable
        if self.visual is not None and not self.freeze_vision:
            self.visual.set_grad_checkpointing(enable)

    def visual_inputs(
        self,
        image: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
    ) -> VisualInputs:
        """The visual tokens of a batch: the tower's tokens of ``image``, or the given region features.

        Args:
            image: ``[B, 3, H, W]`` normalised images (a model with a tower).
            regions: ``[B, N, visual_dim]`` region features (a model without a tower).
            boxes: ``[B, N, 4]`` normalised region boxes.
            region_mask: ``[B, N]`` bool, True for real regions (None: all are).
        """
        if self.visual is not None:
            if image is None:
                raise ValueError("the model encodes pixels (model.vision is set) but got no image")
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision):
                features, token_boxes = self.visual.forward_tokens(image)
            batch = features.shape[0]
            mask = torch.ones(batch, features.shape[1], dtype=torch.bool, device=features.device)
            return VisualInputs(features, token_boxes.expand(batch, -1, -1), mask)
        if regions is None or boxes is None:
            raise ValueError("the model reads region features (model.vision is null) but got no regions/boxes")
        if regions.shape[-1] != self.visual_dim:
            raise ValueError(
                f"region features have {regions.shape[-1]} dimensions but model.visual_dim is {self.visual_dim}"
            )
        if region_mask is None:
            region_mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        return VisualInputs(regions, boxes, region_mask.bool())

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        *,
        visual_inputs: VisualInputs | None = None,
        pair_index: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        mlm: bool = False,
        text_layers: bool = False,
    ) -> FusionOutput:
        """Fuse texts with images (or region features).

        Args:
            text: ``[P, L]`` token ids (``bos`` text ``eos`` padding: BERT's ``[CLS] ... [SEP]``).
            image / regions / boxes / region_mask: the visual input of B images, see :meth:`visual_inputs`.
            visual_inputs: the images' visual tokens, already computed by :meth:`visual_inputs` (the
                visual arguments are then ignored): an objective that needs them before the forward
                pass (to choose regions to mask, or to score negatives) encodes the images once.
            pair_index: ``[P]`` the image of each text row (None: row i pairs with image i, P = B), so
                that several texts are scored against one encoding of the images (ITM negatives, retrieval).
            visual_mask: ``[P, N]`` bool, visual tokens whose features are zeroed (masked region
                modelling, Lu et al. 2019, sec. 3.2); their boxes are kept.
            mlm: also compute the masked-LM logits of every text position.
            text_layers: also return the text states after every layer (see :class:`FusionOutput`).

        Returns:
            A :class:`FusionOutput`.
        """
        inputs = self.visual_inputs(image, regions, boxes, region_mask) if visual_inputs is None else visual_inputs
        features, token_boxes, mask = inputs
        if pair_index is not None:
            features, token_boxes, mask = features[pair_index], token_boxes[pair_index], mask[pair_index]
        if visual_mask is not None:
            features = features.masked_fill(visual_mask[..., None], 0.0)
        text_states, visual_states, itm_logits, layers = self.fuse(
            text, VisualInputs(features, token_boxes, mask), text_layers
        )
        mlm_logits = self.mlm_head(text_states, self.embeddings.word_embeddings.weight) if mlm else None
        return FusionOutput(text_states, visual_states, itm_logits, mlm_logits, inputs, layers)

    def fuse(
        self, text: torch.Tensor, visual: VisualInputs, text_layers: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The architecture's fusion: ``(text states, visual states, ITM logits, text states per layer)``."""
        raise NotImplementedError


def fusion_model(model: nn.Module) -> FusionModel:
    """The :class:`FusionModel` inside a (possibly DDP-wrapped) model, or a TypeError naming the objective's need."""
    inner = unwrap_model(model)
    if not isinstance(inner, FusionModel):
        raise TypeError(
            f"this objective needs a fusion model (visualbert, vilbert), not {type(inner).__name__}: "
            "check the config's model.name"
        )
    return inner


def visual_batch(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The visual entries of ``batch`` that ``model`` reads, as keyword arguments of its forward.

    Raises:
        MissingVisualInputError: the batch lacks them; the message names the missing keys and the config fields
            that choose between pixels (``model.vision``) and region features (``model.vision: null``
            with the ``region_features`` dataset).
    """
    if not fusion_model(model).reads_regions:
        if "image" not in batch:
            raise MissingVisualInputError(
                f"model.vision is set, so the model encodes images from batch key 'image', but this batch has "
                f"only {sorted(k for k in batch if not k.startswith('skipped'))}: use an image dataset "
                "(data.<stream>.name: image_text), or set model.vision: null to read region features"
            )
        return {"image": batch["image"]}
    missing = [key for key in (REGIONS_KEY, BOXES_KEY) if key not in batch]
    if missing:
        raise MissingVisualInputError(
            f"model.vision is null, so the model reads precomputed region features, but the batch lacks "
            f"{missing} (it has {sorted(k for k in batch if not k.startswith('skipped'))}): use the "
            "region_features dataset (data.<stream>.name: region_features, files set by its feature_key and "
            "boxes_key), or set model.vision to encode pixels"
        )
    out = {REGIONS_KEY: batch[REGIONS_KEY], BOXES_KEY: batch[BOXES_KEY]}
    if REGION_MASK_KEY in batch:
        out[REGION_MASK_KEY] = batch[REGION_MASK_KEY]
    return out
