"""LoRA adapters and T5 soft prompts exported for Hugging Face PEFT: `peft` loads them
onto the HF base and gets our adapted model's logits; the merged export loads in plain
transformers."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

import test_hf_llama  # noqa: E402 - random HF Llama checkpoints
import test_hf_t5  # noqa: E402 - random HF T5 checkpoints
from t5x_like import tree_paths  # noqa: E402
from t5x_like.data import converters  # noqa: E402
from t5x_like.finetuning import lora, prompt_tuning, trainable  # noqa: E402
from t5x_like.hf import llama as hf_llama  # noqa: E402
from t5x_like.hf import peft as hf_peft  # noqa: E402
from t5x_like.hf import t5 as hf_t5  # noqa: E402
from t5x_like.models import decoder, t5  # noqa: E402

# All linear kernels of some layers only (a regex, not a preset), rank 4.
ADAPTERS = {
    't5': lora.LoRA(rank=4, alpha=12.0, targets=r'(encoder/layers_1|decoder/layers_\d)/.*/kernel'),
    'llama': lora.LoRA(rank=4, alpha=8.0, targets='all_linear'),
}


@pytest.fixture(scope='module')
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('hf_peft'))


def _with_random_adapters(model, base, seed):
  """Base params plus adapters that move the logits by O(0.1-1)."""
  boxed = model.init_params(jax.random.key(seed), batch_size=1,
                            **model.init_lengths({'encoder_input_tokens': 4,
                                                  'decoder_target_tokens': 4}))
  adapters, _ = trainable.split(nn.unbox(boxed), lora.TRAINABLE_PATTERN)
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), adapters)
  return trainable.merge(adapters, base)


def _family(name, tmp_root):
  """(HF path, HF model, our model with the adapter, our params, logits fn, HF logits fn)."""
  if name == 't5':
    path, hf_model = test_hf_t5.hf_checkpoint('t5_1_1_untied', tmp_root)
    cfg, base = hf_t5.import_checkpoint(path)
    model = t5.EncoderDecoderModel(config=cfg, adapter=ADAPTERS['t5'])
    enc, dec = test_hf_t5._inputs(cfg.vocab_size)
    ours = lambda m, p: np.asarray(m.logits(p, {'encoder_input_tokens': enc,
                                                 'decoder_input_tokens': dec}))
    theirs = lambda hf: test_hf_t5._hf_logits(hf, enc, dec)
  else:
    path, hf_model = test_hf_llama.hf_checkpoint('gqa3_untied', tmp_root)
    cfg, base = hf_llama.import_checkpoint(path)
    model = decoder.DecoderOnlyModel(config=cfg, adapter=ADAPTERS['llama'])
    tokens = test_hf_llama._tokens(cfg.vocab_size)
    ours = lambda m, p: np.asarray(m.logits(p, {'decoder_input_tokens': tokens}))
    theirs = lambda hf: test_hf_llama._hf_logits(hf, tokens)
  params = _with_random_adapters(model, jax.device_get(base), seed=3)
  return path, hf_model, model, params, ours, theirs


@pytest.mark.parametrize('name', ['t5', 'llama'])
def test_peft_loads_our_adapter_and_transformers_our_merged_export_with_our_logits(
    name, tmp_root):
  path, hf_model, model, params, ours, theirs = _family(name, tmp_root)
  adapted = ours(model, params)
  base = ours(dataclasses.replace(model, adapter=None),
              trainable.split(params, lora.TRAINABLE_PATTERN)[1])
  assert np.abs(adapted - base).max() > 0.2          # the adapters change the answer
  out = os.path.join(tmp_root, f'{name}_adapter')
  modules = hf_peft.export_lora_adapter(params, config=model.config, adapter=model.adapter,
                                        directory=out, base_model_name_or_path=path)
  with open(os.path.join(out, 'adapter_config.json')) as f:
    config = json.load(f)
  assert config['r'] == 4 and config['target_modules'] == modules
  if name == 't5':   # the regex's layers only: encoder block 1, all 3 decoder blocks
    assert len(modules) == 7 + 3 * 11 and not any('encoder.block.0.' in m for m in modules)
  hf_base = type(hf_model).from_pretrained(path).eval()
  with_adapter = peft.PeftModel.from_pretrained(hf_base, out).eval()
  diff = float(np.abs(theirs(with_adapter) - adapted).max())
  print(f'peft parity {name}: max|diff| = {diff:.2e} (logits up to {np.abs(adapted).max():.1f})')
  assert diff < 1e-5, diff

  # Merged into the kernels and exported whole: plain transformers, the same logits.
  merged = lora.merged(params, scale=model.adapter.scale)
  assert not any('lora' in k for k in tree_paths.flatten(merged))
  out = os.path.join(tmp_root, f'{name}_merged')
  export = hf_t5.export_checkpoint if name == 't5' else hf_llama.export_checkpoint
  export(merged, model.config, out)
  reloaded = type(hf_model).from_pretrained(out).eval()
  diff = float(np.abs(theirs(reloaded) - adapted).max())
  print(f'merged export {name}: max|diff| = {diff:.2e}')
  assert diff < 1e-5, diff


def test_peft_loads_our_t5_soft_prompt_with_our_logits(tmp_root):
  """Our prompt over placeholders = PEFT's prompt tuning prepended to the embeddings."""
  path, hf_model = test_hf_t5.hf_checkpoint('t5_1_1_untied', tmp_root)
  cfg, base = hf_t5.import_checkpoint(path)
  adapter = prompt_tuning.PromptTuning(length=5)
  model = t5.EncoderDecoderModel(config=cfg, adapter=adapter)
  boxed = model.init_params(jax.random.key(4), batch_size=1,
                            **model.init_lengths({'encoder_input_tokens': 8,
                                                  'decoder_target_tokens': 4}))
  prompt, _ = trainable.split(nn.unbox(boxed), prompt_tuning.TRAINABLE_PATTERN)
  params = trainable.merge(jax.device_get(prompt), jax.device_get(base))
  enc, dec = test_hf_t5._inputs(cfg.vocab_size)      # row 1 padded after 7 tokens
  slots = np.full((enc.shape[0], adapter.length), converters.SOFT_PROMPT_ID, np.int32)
  ours = np.asarray(model.logits(params, {'encoder_input_tokens': np.concatenate([slots, enc], 1),
                                          'decoder_input_tokens': dec}))
  out = os.path.join(tmp_root, 't5_prompt')
  hf_peft.export_prompt_tuning(params, config=cfg, adapter=adapter, directory=out,
                               base_model_name_or_path=path)
  hf_base = type(hf_model).from_pretrained(path).eval()
  with_prompt = peft.PeftModel.from_pretrained(hf_base, out).eval()
  assert np.abs(test_hf_t5._hf_logits(hf_base, enc, dec) - ours).max() > 0.1   # it matters
  diff = float(np.abs(test_hf_t5._hf_logits(with_prompt, enc, dec) - ours).max())
  print(f'peft prompt parity t5: max|diff| = {diff:.2e} (logits up to {np.abs(ours).max():.1f})')
  assert diff < 1e-5, diff
