"""Import and export of OpenCLIP / OpenAI and Hugging Face CLIP checkpoints (``mmptm convert``)."""

from mmptm.interop.common import ConversionError
from mmptm.interop.hf import export_hf_clip, import_hf_clip
from mmptm.interop.open_clip import import_open_clip

__all__ = ["ConversionError", "export_hf_clip", "import_hf_clip", "import_open_clip"]
