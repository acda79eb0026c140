"""Data: webdataset streams, shard writers, tokenizers, transforms, language sampling, demo data."""

# Imported for their registrations: the "image_text", "image_folder" and "parallel_text" datasets.
from mmptm.data_pipelines import image_folder, image_text, parallel_text  # noqa: F401
