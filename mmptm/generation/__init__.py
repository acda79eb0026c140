"""Text-to-image generation with a token decoder: sampling, CLIP reranking, PNG output, the ``generate`` command."""

# mmptm.evaluation first: its gen_clip evaluator imports this package's modules, which import mmptm.evaluation.common.
import mmptm.evaluation  # noqa: F401
from mmptm.generation.pipeline import (
    GenerationError,
    clip_image_features,
    clip_prompt_scores,
    generate_images,
    load_clip,
    load_token_decoder,
    save_grid,
    save_images,
    tokenize_prompts,
)
from mmptm.generation.sampling import SamplingOptions, sample_image_tokens, top_k_filter, top_p_filter

__all__ = [
    "GenerationError",
    "SamplingOptions",
    "clip_image_features",
    "clip_prompt_scores",
    "generate_images",
    "load_clip",
    "load_token_decoder",
    "sample_image_tokens",
    "save_grid",
    "save_images",
    "tokenize_prompts",
    "top_k_filter",
    "top_p_filter",
]
