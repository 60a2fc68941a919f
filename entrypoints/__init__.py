"""MLflow Project entry points, run from the project root as `python -m entrypoints.<name>` (see MLproject).

`python -m` puts the project root, not this folder, on sys.path, so `entrypoints/evaluate.py` does not shadow the
`evaluate` package. This file makes `entrypoints` a regular package: an installed top-level module of the same
name (the `entrypoints` distribution on PyPI) cannot take its place.
"""
