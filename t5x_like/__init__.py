"""t5x_like: pretrain Transformer LMs with JAX/Flax, from a laptop CPU to TPU/GPU pods.

The core (models, trainer, partitioning, checkpoints, train loop) imports without
TensorFlow; only the data layer (`t5x_like.data`) uses seqio/TF.
"""
