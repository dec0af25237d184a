"""Reading and writing safetensors directories, and placing tensors on a mesh.

Tensors are read lazily one at a time (memory-mapped), so importing a large
checkpoint holds at most one full tensor (or one stacked layer group) on the
host; with target shardings each device receives only its own slice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

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
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)['weight_map']
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            if any(n.endswith(('.bin', '.pt', '.pth', '.ckpt')) for n in found):
                raise ValueError(
                    f'{directory} holds only pickled PyTorch weights, which are never loaded here '
                    '(unpickling can run arbitrary code). Re-save it with safetensors, e.g. '
                    'model.save_pretrained(dir, safe_serialization=True).')
            raise FileNotFoundError(
                f'No {SINGLE_FILE} or {INDEX_FILE} in {directory} (found {found}).')
        self._handles = {}
        self._file_of = {}
        for name in files:
            handle = safe_open(os.path.join(directory, name), framework='np')
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


def read_config(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        return json.load(f)


def read_generation_config(directory: str) -> dict[str, Any]:
    """generation_config.json (the token ids `generate` uses), or {} if absent."""
    path = os.path.join(directory, GENERATION_CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_generation_config(directory: str, config: Mapping[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, GENERATION_CONFIG_FILE), 'w') as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)


def write_checkpoint(directory: str, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> None:
    """config.json + model.safetensors (metadata format 'pt', as transformers expects)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(directory, SINGLE_FILE), metadata={'format': 'pt'})


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
