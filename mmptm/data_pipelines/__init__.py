"""Data: webdataset streams, shard writers, tokenizers, transforms, language sampling, demo data."""

# Imported for their registrations: the "image_text", "image_folder", "parallel_text", "text" and
# "region_features" datasets.
from mmptm.data_pipelines import image_folder, image_text, parallel_text, region_features, text  # noqa: F401
