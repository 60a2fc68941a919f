"""Data: sources, presets, normalisation, splits and shards, statistics."""
