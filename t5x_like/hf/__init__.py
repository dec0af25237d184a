"""Hugging Face interop: import/export T5 and Llama checkpoints (safetensors only).

`llama.import_checkpoint(path)` / `t5.import_checkpoint(path)` read a directory
written by transformers' `save_pretrained` (config.json + *.safetensors) into our
config and parameter tree, optionally straight into target shardings;
`export_checkpoint(...)` writes a directory transformers loads back. Pickled
(`pytorch_model.bin`) checkpoints are refused, never unpickled. Needs only numpy
and `safetensors` (the `hf` extra); torch/transformers are for tests.
"""
