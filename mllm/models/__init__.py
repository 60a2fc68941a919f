"""Models: pretrained sources, checkpoints, batching, the training loop, frozen-prefix reuse, tiny models."""
