"""A tf.data iterator's state as bytes, and back: the one module that reaches into
TensorFlow's internals for it.

Why internals: tf.data's public way to save an iterator is tf.train.Checkpoint, which
writes checkpoint files of its own (an index and data shards per save). We need the
state as bytes, one blob per data shard, inside our Orbax checkpoint beside the model
(data/pipeline.py's positions). So, as T5X does for its input iterator, we call the
ops those checkpoints are built on: SerializeIterator and DeserializeIterator on the
iterator's resource handle (`_iterator_resource`, a private attribute), with the
variant tensor they exchange written by tf.io.serialize_tensor, then zlib (level 1:
the state is mostly the shuffle buffer and the packing window, and saving it is on
the checkpoint's path).

The bytes are a stored format: positions in existing checkpoints must restore, so
`save` writes exactly what pipeline.py wrote before this module was split out of it
(checked byte for byte then). Verified with TensorFlow 2.21.0;
tests/test_library_adapters.py fails, naming the symbol, if an upgrade removes one.
"""

from __future__ import annotations

import zlib
from typing import Any

import tensorflow as tf

from t5x_like import errors

VERIFIED = "2.21.0"
_SERIALIZE = "tensorflow.raw_ops.SerializeIterator"
_DESERIALIZE = "tensorflow.raw_ops.DeserializeIterator"
_IGNORE_EXTERNAL_STATE = "tensorflow.data.experimental.ExternalStatePolicy.IGNORE"
_RESOURCE = "tensorflow.python.data.ops.iterator_ops.OwnedIterator._iterator_resource"

# What `restore` raises for bytes that are not a state `save` wrote, or that TF rejects
# (a state of another pipeline): the caller can fall back to replaying.
UNREADABLE = (tf.errors.OpError, ValueError, zlib.error)


def save(iterator: Any) -> bytes:
    """The state of `iterator` (`iter()` of a tf.data.Dataset); call between batches."""
    # Our py_functions (skip counting, JSONL parsing) keep no state the stream depends
    # on, so their "external state" is safe to leave out of a saved state.
    state = _internal(_SERIALIZE)(
        resource_handle=_resource(iterator),
        external_state_policy=_internal(_IGNORE_EXTERNAL_STATE).value)
    return zlib.compress(tf.io.serialize_tensor(state).numpy(), 1)


def restore(iterator: Any, state: bytes) -> None:
    """Moves a fresh `iterator` of the same pipeline to a `state` from `save`;
    raises one of UNREADABLE if it cannot."""
    serialized = tf.io.parse_tensor(zlib.decompress(state), tf.variant)
    _internal(_DESERIALIZE)(resource_handle=_resource(iterator), serialized=serialized)


def check_internals() -> None:
    """Raises LibraryChangedError naming the first internal the installed TF lacks."""
    for symbol in (_SERIALIZE, _DESERIALIZE, _IGNORE_EXTERNAL_STATE):
        _internal(symbol)
    _resource(iter(tf.data.Dataset.range(1)))


def _internal(symbol: str) -> Any:
    return errors.library_internal(symbol, verified=VERIFIED, adapter=__name__)


def _resource(iterator: Any) -> Any:
    try:
        return iterator._iterator_resource  # noqa: SLF001 - TF's own handle, see above
    except AttributeError:
        raise errors.LibraryChangedError(symbol=_RESOURCE, verified=VERIFIED,
                                         adapter=__name__) from None
