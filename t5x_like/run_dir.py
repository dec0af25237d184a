"""What lives where under MODEL_DIR: the one map every entry point uses.

    MODEL_DIR/
      checkpoints/            Orbax steps (state, data positions, fingerprints)
      checkpoints.corrupt/    checkpoints set aside as proven corrupt
      operative_config.gin    the gin config the run used
      parameters.txt          every parameter with its shape and sharding
      logs/train.log          every log record of process 0 (train.process_N.log: N)
      train/                  TensorBoard events of training
      eval/<task>/            TensorBoard events of evaluation
      eval/checkpoint_N.json  launch.eval's record of step N

MODEL_DIR may be a local folder or a URL (gs://...): see storage.py.
"""

from __future__ import annotations

from t5x_like import storage


def checkpoints(model_dir: str) -> str:
    return storage.join(model_dir, "checkpoints")


def operative_config(model_dir: str) -> str:
    return storage.join(model_dir, "operative_config.gin")


def parameter_table(model_dir: str) -> str:
    return storage.join(model_dir, "parameters.txt")


def log_file(model_dir: str, process_index: int) -> str:
    """Where launch.train writes this process's log (and an error's traceback)."""
    name = "train.log" if process_index == 0 else f"train.process_{process_index}.log"
    return storage.join(model_dir, "logs", name)


def train_events(model_dir: str) -> str:
    return storage.join(model_dir, "train")


def eval_dir(model_dir: str) -> str:
    """In-loop eval's TensorBoard folders (eval/<task>) and launch.eval's records."""
    return storage.join(model_dir, "eval")
