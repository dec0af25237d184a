"""Reading and writing safetensors directories, and placing tensors on a mesh.

Tensors are read lazily one at a time (memory-mapped), so importing a large
checkpoint holds at most one full tensor (or one stacked layer group) on the
host; with target shardings each device receives only its own slice. A directory in
a bucket (gs://...; storage.py) is read the same way, each tensor by one ranged read
of its bytes (the format is an 8-byte header length, a JSON header of dtypes, shapes
and byte offsets, then the raw little-endian data), so nothing is copied to disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from t5x_like import storage
from t5x_like.models import layers

CONFIG_FILE = 'config.json'
GENERATION_CONFIG_FILE = 'generation_config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


class SafetensorsReader:
    """name -> numpy array over one model.safetensors or an indexed set of shards."""

    def __init__(self, directory: str):
        from safetensors import safe_open  # the `hf` extra

        self.directory = directory
        index_path = storage.join(directory, INDEX_FILE)
        if storage.exists(index_path):
            weight_map = json.loads(storage.read_text(index_path))['weight_map']
            files = sorted(set(weight_map.values()))
        elif storage.exists(storage.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            found = storage.list_dir(directory)
            if any(n.endswith(('.bin', '.pt', '.pth', '.ckpt')) for n in found):
                raise ValueError(
                    f'{directory} holds only pickled PyTorch weights, which are never loaded here '
                    '(unpickling can run arbitrary code). Re-save it with safetensors, e.g. '
                    'model.save_pretrained(dir, safe_serialization=True).')
            raise FileNotFoundError(
                f'No {SINGLE_FILE} or {INDEX_FILE} in {directory} (found {found}).')
        self._handles = {}
        self._file_of = {}
        open_file = _RangedSafetensors if storage.is_url(directory) else \
            (lambda path: safe_open(path, framework='np'))
        for name in files:
            handle = open_file(storage.join(directory, name))
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray:
        if name not in self._file_of:
            raise KeyError(f'{name} is not in the checkpoint at {self.directory}.')
        return self._handles[self._file_of[name]].get_tensor(name)


class _RangedSafetensors:
    """One .safetensors object in a bucket: the header read once, each tensor's bytes
    by a ranged read (safe_open needs a local file to map)."""

    _DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
               'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
               'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}

    def __init__(self, url: str):
        self._url = url
        with storage.open_file(url, 'rb') as f:
            header_length = int.from_bytes(f.read(8), 'little')
            header = json.loads(f.read(header_length))
        header.pop('__metadata__', None)
        self._entries = header
        self._data_start = 8 + header_length

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, end = entry['data_offsets']
        with storage.open_file(self._url, 'rb') as f:
            f.seek(self._data_start + begin)
            data = f.read(end - begin)
        dtype = np.dtype(self._DTYPES[entry['dtype']]).newbyteorder('<')
        return np.frombuffer(data, dtype=dtype).reshape(entry['shape']).astype(
            dtype.newbyteorder('='))


def read_config(directory: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(directory, CONFIG_FILE)))


def read_generation_config(directory: str) -> dict[str, Any]:
    """generation_config.json (the token ids `generate` uses), or {} if absent."""
    path = storage.join(directory, GENERATION_CONFIG_FILE)
    if not storage.exists(path):
        return {}
    return json.loads(storage.read_text(path))


def write_generation_config(directory: str, config: Mapping[str, Any]) -> None:
    storage.write_text(storage.join(directory, GENERATION_CONFIG_FILE),
                       json.dumps(dict(config), indent=2, sort_keys=True))


def write_checkpoint(directory: str, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray], *, config_file: str = CONFIG_FILE,
                     weights_file: str = SINGLE_FILE) -> None:
    """config.json + model.safetensors (metadata format 'pt', as transformers expects),
    in a local folder or a bucket (storage.py); a PEFT adapter names them otherwise."""
    from safetensors.numpy import save

    storage.write_text(storage.join(directory, config_file),
                       json.dumps(dict(config), indent=2, sort_keys=True))
    with storage.open_file(storage.join(directory, weights_file), 'wb') as f:
        f.write(save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                     metadata={'format': 'pt'}))


def place(array: np.ndarray, sharding: jax.sharding.Sharding | None, dtype) -> jax.Array:
    """One host array onto devices; with a sharding each device gets only its slice.

    Works multi-host too: each process fills only its addressable shards.
    """
    array = np.asarray(array).astype(dtype, copy=False)
    if sharding is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def assemble(flat_arrays: Iterator[tuple[tuple[str, ...], np.ndarray]], *,
             shardings: Any = None, dtype=np.float32) -> dict[str, Any]:
    """Places (path, array) pairs as they come and nests them into a param tree.

    `shardings`: None, or a tree shaped like the params whose leaves are
    jax.sharding.Sharding (e.g. the trainer's `layout.shardings.params`).
    """
    flat_shardings = {}
    if shardings is not None:
        flat_shardings = traverse_util.flatten_dict(shardings)
    out = {}
    for path, array in flat_arrays:
        if shardings is not None and path not in flat_shardings:
            raise KeyError(f'No target sharding for parameter {"/".join(path)}.')
        out[path] = place(array, flat_shardings.get(path), dtype)
    if shardings is not None:
        missing = set(flat_shardings) - set(out)
        if missing:
            raise KeyError(f'Checkpoint lacks parameters {sorted("/".join(p) for p in missing)}.')
    return traverse_util.unflatten_dict(out)


def layer_stack_tensors(stack: tuple[str, ...], path: tuple[str, ...],
                        per_layer: Iterable[np.ndarray], *, scan_layers: bool
                        ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """One tensor of every layer of a stack, as `assemble` takes them.

    Unscanned: `stack + ('layers_i',) + path` per layer. Scanned: one array at
    `stack + ('layers',) + path`, stacked by `models.layers.scan_params` (the layout
    `apply_stack(scan_layers=True)` creates), so at most one stacked tensor is on the
    host at a time.
    """
    by_layer = {f'layers_{i}': array for i, array in enumerate(per_layer)}
    if not scan_layers:
        for name, array in by_layer.items():
            yield stack + (name,) + path, array
        return
    yield stack + ('layers',) + path, layers.scan_params(by_layer, len(by_layer))['layers']


def to_numpy_tree(params: Any) -> dict[tuple[str, ...], np.ndarray]:
    """Flattened {path: float32 numpy} of a (possibly sharded, boxed) param tree."""
    import flax.linen as nn

    params = nn.unbox(params)
    return {k: np.asarray(jax.device_get(v), np.float32)
            for k, v in traverse_util.flatten_dict(params).items()}
