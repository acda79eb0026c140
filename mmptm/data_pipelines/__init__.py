"""Data: webdataset streams, shard writers, tokenizers, transforms, language sampling, demo data."""
