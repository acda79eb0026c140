"""Data: webdataset streams, shard writers, tokenizers, transforms, language sampling, demo data."""

# Imported for their registrations: the "image_text", "image_folder", "parallel_text", "number_pairs",
# "text", "region_features" and "image_tokens" datasets.
from mmptm.data_pipelines import (  # noqa: F401
    image_folder,
    image_text,
    image_tokens,
    number_pairs,
    parallel_text,
    region_features,
    text,
)
