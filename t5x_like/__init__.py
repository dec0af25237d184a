"""t5x_like: pretrain Transformer LMs with JAX/Flax, from a laptop CPU to TPU/GPU pods.

The core (models, trainer, partitioning, checkpoints, train loop) imports without
TensorFlow; only `input_pipeline` and `preprocessors` (the data layer) use seqio/TF.
"""
