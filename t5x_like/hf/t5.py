"""T5 / T5.1.1 (T5ForConditionalGeneration) checkpoints <-> our EncoderDecoderModel.

Both use unscaled attention logits (T5 folds 1/sqrt(d_kv) into the query
init), one relative-position table per stack (HF keeps it in block 0), and
RMSNorm with eps 1e-6. The output layer is where the two generations differ:

- original T5: lm_head tied to the shared embedding and the decoder output
  scaled by d_model**-0.5 -> our `logits_via_embedding=True`;
- T5.1.1: a separate lm_head, no scaling -> our untied `logits_dense`.
HF decides the scaling from config.json: `scale_decoder_outputs` if present
(transformers 5), else `tie_word_embeddings` (default true). Any other mix
(a scaled separate head, an unscaled tied one) imports exactly as an untied
`logits_dense` with the scale folded into the kernel.

Scanned configs (`scan_layers=True`) import each stack's per-layer tensors stacked on
a leading 'layers' axis and export through `t5.unscan_params`, as hf/llama.py does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import numpy as np

from t5x_like.hf import safetensors_io
from t5x_like.models import t5

_ATTENTION = (('q', 'query', 'heads_out'), ('k', 'key', 'heads_out'),
              ('v', 'value', 'heads_out'), ('o', 'out', 'heads_in'))


def _mlp_names(cfg: t5.T5Config) -> tuple[tuple[str, str], ...]:
    if cfg.mlp_activation == 'relu':
        return (('wi', 'wi'), ('wo', 'wo'))
    return (('wi_0', 'wi_0'), ('wi_1', 'wi_1'), ('wo', 'wo'))


_SUBLAYERS = {  # stack -> (HF attention, our attention, our norm) in block order
    'encoder': (('SelfAttention', 'attention', 'pre_attention_layer_norm'),),
    'decoder': (('SelfAttention', 'self_attention', 'pre_self_attention_layer_norm'),
                ('EncDecAttention', 'encoder_decoder_attention',
                 'pre_cross_attention_layer_norm')),
}


def _stacks(cfg: t5.T5Config) -> tuple[tuple[str, int], ...]:
    return (('encoder', cfg.num_encoder_layers), ('decoder', cfg.num_decoder_layers))


def _layer_tensors(cfg: t5.T5Config, stack: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(HF name with `{i}` for the block index, our path inside the layer, kind) for
    every tensor of one layer of `stack`."""
    out = []
    sublayers = _SUBLAYERS[stack]
    hf_block = f'{stack}.block.{{i}}.layer'
    for j, (hf_attn, our_attn, norm) in enumerate(sublayers):
        for hf_p, our_p, kind in _ATTENTION:
            out.append((f'{hf_block}.{j}.{hf_attn}.{hf_p}.weight', (our_attn, our_p, 'kernel'),
                        kind))
        out.append((f'{hf_block}.{j}.layer_norm.weight', (norm, 'scale'), 'vector'))
    j = len(sublayers)
    for hf_p, our_p in _mlp_names(cfg):
        out.append((f'{hf_block}.{j}.DenseReluDense.{hf_p}.weight', ('mlp', our_p, 'kernel'),
                    'linear'))
    out.append((f'{hf_block}.{j}.layer_norm.weight', ('pre_mlp_layer_norm', 'scale'), 'vector'))
    return out


def _stack_tensors(stack: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(HF name, our path, kind) of a stack's tensors outside its layers."""
    return [(f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
             (stack, 'relpos_bias', 'rel_embedding'), 'vector'),
            (f'{stack}.final_layer_norm.weight', (stack, f'{stack}_norm', 'scale'), 'vector')]


def linear_modules(cfg: t5.T5Config) -> Iterator[tuple[tuple[str, ...], str]]:
    """(our kernel path in the unscanned tree, HF module name) of every projection
    inside the layers: where LoRA adapters go (hf/peft.py)."""
    for stack, num_layers in _stacks(cfg):
        for i in range(num_layers):
            for hf_name, path, _ in _layer_tensors(cfg, stack):
                if path[-1] == 'kernel':
                    yield (stack, f'layers_{i}') + path, hf_name.format(i=i)[:-len('.weight')]


def _scales_decoder_output(hf: dict[str, Any]) -> bool:
    if 'scale_decoder_outputs' in hf:
        return bool(hf['scale_decoder_outputs'])
    return hf.get('tie_word_embeddings', True) is not False


def config_from_hf(hf: dict[str, Any], *, logits_via_embedding: bool, **overrides) -> t5.T5Config:
    ff = hf.get('feed_forward_proj', 'relu')
    activation = {'relu': 'relu', 'gated-gelu': 'gated-gelu'}.get(ff)
    if activation is None:
        raise ValueError(f'feed_forward_proj {ff!r} is not supported (relu, gated-gelu are).')
    if abs(hf.get('layer_norm_epsilon', 1e-6) - 1e-6) > 1e-12:
        raise ValueError('Only layer_norm_epsilon=1e-6 (every published T5) is supported.')
    fields = dict(
        vocab_size=hf['vocab_size'], emb_dim=hf['d_model'], num_heads=hf['num_heads'],
        head_dim=hf['d_kv'], mlp_dim=hf['d_ff'], num_encoder_layers=hf['num_layers'],
        num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
        relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
        relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
        logits_via_embedding=logits_via_embedding, mlp_activation=activation)
    fields.update(overrides)
    return t5.T5Config(**fields)


def config_to_hf(cfg: t5.T5Config) -> dict[str, Any]:
    return {
        'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
        'vocab_size': cfg.vocab_size, 'd_model': cfg.emb_dim, 'd_kv': cfg.head_dim,
        'd_ff': cfg.mlp_dim, 'num_heads': cfg.num_heads, 'num_layers': cfg.num_encoder_layers,
        'num_decoder_layers': cfg.num_decoder_layers,
        'relative_attention_num_buckets': cfg.relative_attention_num_buckets,
        'relative_attention_max_distance': cfg.relative_attention_max_distance,
        'feed_forward_proj': cfg.mlp_activation, 'layer_norm_epsilon': 1e-6,
        'dropout_rate': cfg.dropout_rate, 'is_encoder_decoder': True,
        'tie_word_embeddings': cfg.logits_via_embedding,
        'scale_decoder_outputs': cfg.logits_via_embedding,
        'decoder_start_token_id': 0, 'pad_token_id': 0, 'eos_token_id': 1,
        'torch_dtype': 'float32',
    }


def _to_ours(w, kind, cfg):
    if kind == 'heads_out':
        return w.T.reshape(cfg.emb_dim, cfg.num_heads, cfg.head_dim)
    if kind == 'heads_in':
        return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.emb_dim)
    return w.T if kind == 'linear' else w


def _to_hf(w, kind):
    if kind == 'heads_out':
        return w.reshape(w.shape[0], -1).T
    if kind == 'heads_in':
        return w.reshape(-1, w.shape[-1]).T
    return w.T if kind == 'linear' else w


def _our_tensors(reader, cfg, lm_head_kernel) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    yield ('token_embedder', 'embedding'), reader.get('shared.weight')
    if lm_head_kernel is not None:
        yield ('decoder', 'logits_dense', 'kernel'), lm_head_kernel
    for stack, num_layers in _stacks(cfg):
        for hf_name, path, kind in _layer_tensors(cfg, stack):
            per_layer = (_to_ours(reader.get(hf_name.format(i=i)), kind, cfg)
                         for i in range(num_layers))
            yield from safetensors_io.layer_stack_tensors((stack,), path, per_layer,
                                                          scan_layers=cfg.scan_layers)
        for hf_name, path, kind in _stack_tensors(stack):
            yield path, _to_ours(reader.get(hf_name), kind, cfg)


def import_checkpoint(directory: str, *, shardings: Any = None, **config_overrides
                      ) -> tuple[t5.T5Config, dict[str, Any]]:
    """(config, params) from a T5ForConditionalGeneration safetensors directory.

    See llama.import_checkpoint for `shardings` and `config_overrides`;
    `scan_layers=True` stacks each stack's layers on a leading 'layers' axis.
    """
    hf = safetensors_io.read_config(directory)
    reader = safetensors_io.SafetensorsReader(directory)
    scaled = _scales_decoder_output(hf)
    shared = reader.get('shared.weight')
    head = reader.get('lm_head.weight') if 'lm_head.weight' in reader else None
    tied = head is None or np.array_equal(head, shared)
    lm_head_kernel = None
    if not (tied and scaled):
        head = shared if head is None else head
        lm_head_kernel = head.T.astype(np.float32)
        if scaled:
            lm_head_kernel = lm_head_kernel * np.float32(hf['d_model'] ** -0.5)
    cfg = config_from_hf(hf, logits_via_embedding=tied and scaled, **config_overrides)
    params = safetensors_io.assemble(_our_tensors(reader, cfg, lm_head_kernel), shardings=shardings)
    return cfg, params


def export_checkpoint(params: Any, cfg: t5.T5Config, directory: str, *, dtype=np.float32) -> None:
    """Writes config.json + model.safetensors that T5ForConditionalGeneration loads."""
    params = nn.unbox(params)
    if cfg.scan_layers:
        params = t5.unscan_params(params, cfg)
    flat = safetensors_io.to_numpy_tree(params)
    shared = flat.pop(('token_embedder', 'embedding'))
    tensors = {'shared.weight': shared}
    if cfg.logits_via_embedding:
        tensors['lm_head.weight'] = shared
    else:
        tensors['lm_head.weight'] = flat.pop(('decoder', 'logits_dense', 'kernel')).T
    for stack, num_layers in _stacks(cfg):
        for i in range(num_layers):
            for hf_name, path, kind in _layer_tensors(cfg, stack):
                tensors[hf_name.format(i=i)] = _to_hf(flat.pop((stack, f'layers_{i}') + path),
                                                      kind)
        for hf_name, path, kind in _stack_tensors(stack):
            tensors[hf_name] = _to_hf(flat.pop(path), kind)
    if flat:
        raise ValueError(f'Parameters with no T5 counterpart: {sorted(flat)}')
    hf_config = config_to_hf(cfg)
    hf_config['torch_dtype'] = np.dtype(dtype).name
    # transformers' loader ties these to shared.weight; storing them keeps
    # older loaders (which expect them) working too.
    tensors['encoder.embed_tokens.weight'] = shared
    tensors['decoder.embed_tokens.weight'] = shared
    safetensors_io.write_checkpoint(
        directory, hf_config, {k: np.asarray(v).astype(dtype) for k, v in tensors.items()})
