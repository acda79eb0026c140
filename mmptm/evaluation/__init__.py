"""Zero-shot evaluation of dual encoders: classification, image-text retrieval, cross-lingual retrieval.

The functions take a model with OpenCLIP's interface, its tokenizer and a
stream of batches; :mod:`mmptm.evaluation.inputs` builds the streams and
prompts from paths. ``mmptm zeroshot classify|retrieve`` and the trainer's
periodic evaluation call the same functions, so their numbers agree.
"""

from mmptm.evaluation.common import EvalContext, EvaluationError, precision_autocast
from mmptm.evaluation.denoising import denoise
from mmptm.evaluation.generation import clip_generation_accuracy, gen_clip
from mmptm.evaluation.image_tokens import dvae_reconstruction
from mmptm.evaluation.inputs import (
    classification_stream,
    load_classnames,
    load_prompt_file,
    load_templates,
    parallel_stream,
    retrieval_stream,
)
from mmptm.evaluation.itm import dual_encoder_candidates, fusion_stream, itm_image_text_retrieval, itm_retrieval
from mmptm.evaluation.multilingual import mlm_accuracy, xlret, xltransfer
from mmptm.evaluation.retrieval import crosslingual_retrieval, zeroshot_retrieval
from mmptm.evaluation.zeroshot import prompt_languages, zeroshot_classification

__all__ = [
    "EvalContext",
    "EvaluationError",
    "classification_stream",
    "clip_generation_accuracy",
    "crosslingual_retrieval",
    "denoise",
    "dual_encoder_candidates",
    "dvae_reconstruction",
    "fusion_stream",
    "gen_clip",
    "itm_image_text_retrieval",
    "itm_retrieval",
    "load_classnames",
    "load_prompt_file",
    "load_templates",
    "mlm_accuracy",
    "parallel_stream",
    "precision_autocast",
    "prompt_languages",
    "retrieval_stream",
    "zeroshot_classification",
    "xlret",
    "xltransfer",
    "zeroshot_retrieval",
]
