"""Llama (LlamaForCausalLM) checkpoints <-> our DecoderOnlyModel parameters.

Weight layout: Hugging Face `nn.Linear` stores [out, in]; our kernels are
[in, out] with heads split out, e.g. q_proj [Hq*D, E] <-> query [E, Hq, D] and
o_proj [E, Hq*D] <-> out [Hq, D, E]. Both use the two-halves rotary layout, so
no permutation of q/k rows is needed. Scanned configs stack the per-layer
tensors on a leading 'layers' axis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import numpy as np

from t5x_like.hf import safetensors_io
from t5x_like.models import decoder, layers

# (HF name under model.layers.{i}., our path under layers_{i}, kind)
_LAYER_TENSORS = (
    ('self_attn.q_proj.weight', ('attention', 'query', 'kernel'), 'heads_out'),
    ('self_attn.k_proj.weight', ('attention', 'key', 'kernel'), 'kv_out'),
    ('self_attn.v_proj.weight', ('attention', 'value', 'kernel'), 'kv_out'),
    ('self_attn.o_proj.weight', ('attention', 'out', 'kernel'), 'heads_in'),
    ('mlp.gate_proj.weight', ('mlp', 'wi_0', 'kernel'), 'linear'),
    ('mlp.up_proj.weight', ('mlp', 'wi_1', 'kernel'), 'linear'),
    ('mlp.down_proj.weight', ('mlp', 'wo', 'kernel'), 'linear'),
    ('input_layernorm.weight', ('pre_attention_norm', 'scale'), 'vector'),
    ('post_attention_layernorm.weight', ('pre_mlp_norm', 'scale'), 'vector'),
)


def linear_modules(cfg: decoder.DecoderConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """(our kernel path in the unscanned tree, HF module name) of every projection
    inside the layers: where LoRA adapters go (hf/peft.py)."""
    for i in range(cfg.num_layers):
        for hf_name, path, _ in _LAYER_TENSORS:
            if path[-1] == 'kernel':
                yield (f'layers_{i}',) + path, f'model.layers.{i}.{hf_name[:-len(".weight")]}'


def _token_ids(hf: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids: generation_config.json's where it has them (what `generate`
    stops on), else config.json's; a list of eos ids becomes a tuple."""
    ids = {}
    for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
        value = generation.get(key, hf.get(key))
        ids[key] = tuple(value) if isinstance(value, list) else value
    return ids


def config_from_hf(hf: dict[str, Any], *, generation: dict[str, Any] | None = None,
                   **overrides) -> decoder.DecoderConfig:
    """Our config from a LlamaConfig dict (and its generation_config.json, if any);
    `overrides` set dtype, scan_layers, etc."""
    if hf.get('attention_bias') or hf.get('mlp_bias'):
        raise ValueError('Llama checkpoints with attention/MLP biases are not supported.')
    if hf.get('hidden_act', 'silu') != 'silu':
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not SwiGLU's silu.")
    heads = hf['num_attention_heads']
    rope = dict(hf.get('rope_parameters') or {})
    rope.update(hf.get('rope_scaling') or {})  # older configs keep these at top level
    theta = rope.get('rope_theta', hf.get('rope_theta', 10_000.0))
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    scaling = {}
    if rope_type == 'llama3':
        scaling = dict(
            rope_scaling_factor=float(rope['factor']),
            rope_low_freq_factor=float(rope['low_freq_factor']),
            rope_high_freq_factor=float(rope['high_freq_factor']),
            rope_original_max_position=int(rope['original_max_position_embeddings']))
    elif rope_type != 'default':
        raise ValueError(f'rope type {rope_type!r} is not supported (default and llama3 are).')
    fields = dict(
        vocab_size=hf['vocab_size'],
        emb_dim=hf['hidden_size'],
        num_heads=heads,
        num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
        mlp_dim=hf['intermediate_size'],
        num_layers=hf['num_hidden_layers'],
        rope_theta=float(theta),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        norm_epsilon=float(hf.get('rms_norm_eps', 1e-6)),
        max_position_embeddings=hf.get('max_position_embeddings'),
        **_token_ids(hf, generation or {}),
        **scaling,
    )
    fields.update(overrides)
    return decoder.DecoderConfig(**fields)


def generation_config(cfg: decoder.DecoderConfig) -> dict[str, Any]:
    """generation_config.json: the token ids `generate` starts, pads and stops with."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    ids = {'bos_token_id': cfg.bos_token_id, 'eos_token_id': eos,
           'pad_token_id': cfg.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def config_to_hf(cfg: decoder.DecoderConfig) -> dict[str, Any]:
    if cfg.max_position_embeddings is None:
        raise ValueError(
            'max_position_embeddings is unknown for this model (it was not imported from '
            'Hugging Face): set DecoderConfig.max_position_embeddings, e.g. to the '
            'sequence length it was trained at, before exporting.')
    rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
    if cfg.rope_scaling_factor != 1.0:
        rope = {'rope_type': 'llama3', 'rope_theta': cfg.rope_theta,
                'factor': cfg.rope_scaling_factor, 'low_freq_factor': cfg.rope_low_freq_factor,
                'high_freq_factor': cfg.rope_high_freq_factor,
                'original_max_position_embeddings': cfg.rope_original_max_position}
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': cfg.vocab_size, 'hidden_size': cfg.emb_dim,
        'intermediate_size': cfg.mlp_dim, 'num_hidden_layers': cfg.num_layers,
        'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
        'head_dim': cfg.head_dim, 'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_epsilon,
        'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': False, 'mlp_bias': False,
        # Written both ways: transformers 5 reads rope_parameters, 4.x rope_theta/rope_scaling.
        'rope_parameters': rope, 'rope_theta': cfg.rope_theta,
        **({'rope_scaling': rope} if rope['rope_type'] != 'default' else {}),
        'max_position_embeddings': cfg.max_position_embeddings,
        'torch_dtype': 'float32',
        # None written as null: transformers would otherwise fill in its defaults (1, 2).
        'bos_token_id': cfg.bos_token_id, 'pad_token_id': cfg.pad_token_id,
        'eos_token_id': generation_config(cfg).get('eos_token_id'),
    }


def _to_ours(w: np.ndarray, kind: str, cfg: decoder.DecoderConfig) -> np.ndarray:
    e, d = cfg.emb_dim, cfg.head_dim
    if kind == 'heads_out':
        return w.T.reshape(e, cfg.num_heads, d)
    if kind == 'kv_out':
        return w.T.reshape(e, cfg.num_kv_heads, d)
    if kind == 'heads_in':
        return w.T.reshape(cfg.num_heads, d, e)
    if kind == 'linear':
        return w.T
    return w


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
    if kind in ('heads_out', 'kv_out'):
        return w.reshape(w.shape[0], -1).T
    if kind == 'heads_in':
        return w.reshape(-1, w.shape[-1]).T
    if kind == 'linear':
        return w.T
    return w


def _our_tensors(reader: safetensors_io.SafetensorsReader, cfg: decoder.DecoderConfig
                 ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    yield ('token_embedder', 'embedding'), reader.get('model.embed_tokens.weight')
    yield ('decoder_norm', 'scale'), reader.get('model.norm.weight')
    if not cfg.tie_embeddings:
        yield ('logits_dense', 'kernel'), reader.get('lm_head.weight').T
    for hf_name, path, kind in _LAYER_TENSORS:
        per_layer = (_to_ours(reader.get(f'model.layers.{i}.{hf_name}'), kind, cfg)
                     for i in range(cfg.num_layers))
        yield from safetensors_io.layer_stack_tensors((), path, per_layer,
                                                      scan_layers=cfg.scan_layers)


def import_checkpoint(directory: str, *, shardings: Any = None, **config_overrides
                      ) -> tuple[decoder.DecoderConfig, dict[str, Any]]:
    """(config, params) from a LlamaForCausalLM safetensors directory.

    `config_overrides` (e.g. dtype='bfloat16', scan_layers=True) change the
    returned config; `shardings` (a tree like the params, of jax Shardings, e.g.
    from trainer.state_layout(...).shardings.params) places each tensor directly
    into its shards. Parameters are float32 whatever the checkpoint dtype.
    """
    reader = safetensors_io.SafetensorsReader(directory)
    cfg = config_from_hf(safetensors_io.read_config(directory),
                         generation=safetensors_io.read_generation_config(directory),
                         **config_overrides)
    params = safetensors_io.assemble(_our_tensors(reader, cfg), shardings=shardings)
    return cfg, params


def export_checkpoint(params: Any, cfg: decoder.DecoderConfig, directory: str, *,
                      dtype=np.float32) -> None:
    """Writes config.json, generation_config.json and model.safetensors that
    LlamaForCausalLM.from_pretrained loads (token ids and context length from `cfg`,
    i.e. those of the imported source)."""
    params = nn.unbox(params)
    if cfg.scan_layers:
        params = layers.unscan_params(params, cfg.num_layers)
    flat = safetensors_io.to_numpy_tree(params)
    tensors = {
        'model.embed_tokens.weight': flat.pop(('token_embedder', 'embedding')),
        'model.norm.weight': flat.pop(('decoder_norm', 'scale')),
    }
    if not cfg.tie_embeddings:
        tensors['lm_head.weight'] = flat.pop(('logits_dense', 'kernel')).T
    for i in range(cfg.num_layers):
        for hf_name, path, kind in _LAYER_TENSORS:
            tensors[f'model.layers.{i}.{hf_name}'] = _to_hf(flat.pop((f'layers_{i}',) + path), kind)
    if flat:
        raise ValueError(f'Parameters with no Llama counterpart: {sorted(flat)}')
    hf_config = config_to_hf(cfg)
    hf_config['torch_dtype'] = np.dtype(dtype).name
    safetensors_io.write_checkpoint(
        directory, hf_config, {k: v.astype(dtype) for k, v in tensors.items()})
    safetensors_io.write_generation_config(directory, generation_config(cfg))
