"""Merging: methods, the in-memory merge, layer groups, soups and the trial scorer."""
