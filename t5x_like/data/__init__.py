"""The data layer: text -> seqio task -> per-host numpy batches, resumable at any step.

The only part of t5x_like that imports TensorFlow and seqio, and only in the
modules that need them, so this package imports nothing by itself:

  TF-free (safe on a machine without the data stack, e.g. the GPU image):
    converters     each feature converter's batch features and lengths (AOT, training)
    host_batches   this process's rows of every global batch, from fixed data shards,
                   and their saved positions
    synthetic      random batches with the real feature layout (benchmarks, tests)
    text_metrics   exact match and ROUGE-L on decoded text (seqio metric_fns), by name
  TensorFlow / seqio:
    pipeline       SeqioDataSource: a task or mixture as per-shard iterators whose
                   position is saved in the checkpoint (constant-time resume)
    seqio_converters  the seqio converter of a converters entry, with a soft prompt's
                   placeholders for a prompt-tuned model
    preprocessors  the pretraining objectives: span corruption, causal LM, prefix LM
    sources        text / JSONL / TFRecord / TFDS sources with counted bad-record skips
    vocabularies   the bundled SentencePiece model, any other, or bytes
    user_tasks     register a task for your own data in one call (Python or gin)
    text_to_text   register a supervised (fine-tuning) task with its metrics
    task_eval      a task's metric_fns on model predictions, through seqio's evaluator

The bundled pydocs tasks are registered by the repository's `data/tasks.py`
(`import data.tasks` in a gin file); the bundled vocabulary ships in `vocab/`.
"""
