"""LoRA adapters (T5 and Llama) and T5 soft prompts -> a Hugging Face PEFT adapter
directory.

PEFT keeps an adapter apart from its base: `adapter_config.json` (rank, alpha,
dropout, which modules) and `adapter_model.safetensors` with, per adapted
`nn.Linear`, `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]; its forward adds (alpha / r) * B(A(dropout(x))) to the base's output,
exactly our update (finetuning/lora.py). Our A [*in, r] and B [r, *out] keep the
kernel's head split, so they flatten the way the kernels do in hf/t5.py and
hf/llama.py: A.reshape(-1, r).T and B.reshape(r, -1).T. Modules are listed by their
full names, so a regex that adapts only some layers exports as exactly those.

A T5 soft prompt (finetuning/prompt_tuning.py) is PEFT's PROMPT_TUNING adapter with
one transformer submodule: `prompt_embeddings` [N, d_model], which PEFT concatenates
in front of the encoder's input embeddings (and ones in front of the attention mask):
our placeholders' positions exactly, as relative position biases see them. The
decoder family's prompt follows the start token, and its prefix attends both ways,
neither of which PEFT's Llama does, so it has no PEFT export.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from t5x_like.finetuning import lora, prompt_tuning
from t5x_like.hf import llama, safetensors_io, t5
from t5x_like.models import decoder, layers
from t5x_like.models import t5 as t5_model

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def _family(config: Any):
    """(HF family module, PEFT task type, the unscanned tree of `params`)."""
    if isinstance(config, t5_model.T5Config):
        return t5, 'SEQ_2_SEQ_LM', lambda p: t5_model.unscan_params(p, config)
    if isinstance(config, decoder.DecoderConfig):
        return llama, 'CAUSAL_LM', lambda p: layers.unscan_params(p, config.num_layers)
    raise ValueError(f'No Hugging Face family for {type(config).__name__}.')


def export_lora_adapter(params: Any, *, config: Any, adapter: lora.LoRA, directory: str,
                        base_model_name_or_path: str | None = None) -> list[str]:
    """Writes `params`' adapters as a PEFT adapter directory; returns the adapted
    HF module names. `params` are the model's (base and adapters, or adapters only).
    """
    family, task_type, unscan = _family(config)
    params = nn.unbox(params)
    if config.scan_layers:
        params = unscan(params)
    flat = safetensors_io.to_numpy_tree(params)
    adapters = {path for path in flat if path[-1] in (lora.A_NAME, lora.B_NAME)}
    tensors, modules = {}, []
    for kernel_path, hf_module in family.linear_modules(config):
        a_path, b_path = kernel_path[:-1] + (lora.A_NAME,), kernel_path[:-1] + (lora.B_NAME,)
        if a_path not in flat:
            continue
        a, b = flat[a_path], flat[b_path]
        rank = a.shape[-1]
        tensors[f'base_model.model.{hf_module}.lora_A.weight'] = a.reshape(-1, rank).T
        tensors[f'base_model.model.{hf_module}.lora_B.weight'] = b.reshape(rank, -1).T
        modules.append(hf_module)
        adapters -= {a_path, b_path}
    if adapters:
        raise ValueError(f'Adapters with no Hugging Face module: {sorted(adapters)[:4]}')
    if not modules:
        raise ValueError('The parameters hold no LoRA adapters to export.')
    safetensors_io.write_checkpoint(
        directory, _adapter_config(adapter, modules, task_type, base_model_name_or_path),
        tensors, config_file=ADAPTER_CONFIG, weights_file=ADAPTER_WEIGHTS)
    return modules


def export_prompt_tuning(params: Any, *, config: Any, adapter: prompt_tuning.PromptTuning,
                         directory: str, base_model_name_or_path: str | None = None) -> None:
    """Writes a T5 model's soft prompt as a PEFT PROMPT_TUNING adapter directory."""
    if not isinstance(config, t5_model.T5Config):
        raise ValueError("PEFT's prompt tuning goes before the whole input; only the "
                         "encoder-decoder family's soft prompt sits there")
    flat = safetensors_io.to_numpy_tree(nn.unbox(params))
    prompt = flat[('encoder', 'soft_prompt', prompt_tuning.PROMPT_NAME)]
    settings = {
        'peft_type': 'PROMPT_TUNING', 'task_type': 'SEQ_2_SEQ_LM',
        'base_model_name_or_path': base_model_name_or_path,
        'num_virtual_tokens': adapter.length, 'token_dim': config.emb_dim,
        'num_transformer_submodules': 1, 'num_attention_heads': config.num_heads,
        'num_layers': config.num_encoder_layers, 'prompt_tuning_init': 'RANDOM',
        'prompt_tuning_init_text': None, 'tokenizer_name_or_path': None,
        'tokenizer_kwargs': None, 'inference_mode': True, 'modules_to_save': None,
    }
    safetensors_io.write_checkpoint(directory, settings, {'prompt_embeddings': prompt},
                                    config_file=ADAPTER_CONFIG, weights_file=ADAPTER_WEIGHTS)


def _adapter_config(adapter: lora.LoRA, modules: list[str], task_type: str,
                    base_model_name_or_path: str | None) -> dict[str, Any]:
    return {
        'peft_type': 'LORA', 'task_type': task_type,
        'base_model_name_or_path': base_model_name_or_path,
        'r': adapter.rank, 'lora_alpha': adapter.alpha, 'lora_dropout': adapter.dropout_rate,
        'target_modules': modules, 'bias': 'none', 'fan_in_fan_out': False,
        'use_rslora': False, 'use_dora': False, 'init_lora_weights': True,
        'inference_mode': True, 'modules_to_save': None,
        'rank_pattern': {}, 'alpha_pattern': {},
    }
