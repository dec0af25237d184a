"""Model layer: Flax modules, losses and the model wrappers the trainer drives."""
