"""Data: webdataset streams, shard writers, tokenizers, transforms, language sampling, demo data."""

from mmptm.data_pipelines import image_text  # noqa: F401  (registers the "image_text" dataset)
