"""Fine-tuning on this CPU: full against LoRA (rank 8 and 16) and prompt tuning (20
vectors, uniform or from vocabulary embeddings), as `launch.train` runs them.

    .venv/bin/python -m benchmarks.finetune                      # both models, 60/10 steps
    .venv/bin/python -m benchmarks.finetune --models cpu --steps 300
    .venv/bin/python -m benchmarks.finetune --methods full prompt   # some rows only

Models (each fine-tuned on the bundled task pydocs_section_titles, 256 -> 32 tokens,
batch 16 packed rows, the recipes of configs/runs/finetune.gin, finetune_lora.gin and
finetune_prompt.gin):
  cpu    the CPU default (configs/t5_1_1_cpu.gin) from the default pretrained run
         runs/base (train it first: `python -m launch.train --gin_file=configs/base.gin`),
         plus the same steps from scratch: the baseline that says whether the
         pretrained start helps. Scored after the last step by `launch.eval`
         (teacher-forced loss and accuracy; greedy exact match and ROUGE-L).
  small  T5.1.1-small (76.9M parameters) from a 1-step base written here (its
         weights are random: speed and memory only, no task metric).
Per run, in a fresh process: s/step (from the wall times of the TensorBoard points,
steps 6..N), peak RSS (the OS's, of that process alone), trainable parameters, and the
bytes of the last checkpoint's state. Prints a table; writes
benchmarks/results/finetune.json. The baseline each row is compared with is full
fine-tuning of the same model on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results' / 'finetune.json'
FULL, LORA = 'configs/finetune_section_titles.gin', 'configs/finetune_lora_section_titles.gin'
PROMPT = 'configs/finetune_prompt_section_titles.gin'
# method -> (gin file, extra bindings)
METHODS = {
    'full': (FULL, []),
    'lora_r8': (LORA, ['lora.LoRA.rank=8', 'lora.LoRA.alpha=16.0']),
    'lora_r16': (LORA, ['lora.LoRA.rank=16', 'lora.LoRA.alpha=32.0']),
    'prompt': (PROMPT, []),
    # Lester et al.'s init: the base's embeddings of 20 of its 5,000 commonest pieces.
    'prompt_vocab': (PROMPT, ["prompt_tuning.PromptTuning.init='vocabulary'"]),
    'scratch': (FULL, ['train_loop.train.init_from=None']),
}
MODELS = {'cpu': ('configs/models/t5_1_1_cpu.gin',
                  ['full', 'lora_r8', 'lora_r16', 'prompt', 'prompt_vocab', 'scratch']),
          'small': ('configs/models/t5_1_1_small.gin', ['full', 'lora_r8', 'lora_r16', 'prompt'])}
FIRST_TIMED_STEP = 6


def _launch(launcher: str, gin_files: list[str], bindings: list[str], *extra: str) -> str:
    command = [sys.executable, '-m', f'launch.{launcher}'] + [
        f'--gin_file={f}' for f in gin_files] + [f'--gin.{b}' for b in bindings] + list(extra)
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    if out.returncode:
        raise SystemExit(f'error: {" ".join(command)} failed:\n{out.stderr[-3000:]}')
    return out.stdout + out.stderr


def measure(model: str, method: str, *, pretrained: str, steps: int, model_dir: str) -> dict:
    """One fine-tuning run (this process's only child, so its peak RSS is the run's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    gin_file, extra = METHODS[method]
    gin_files = [gin_file, MODELS[model][0]]
    bindings = [f"MODEL_DIR='{model_dir}'", f"PRETRAINED_DIR='{pretrained}'",
                f'TRAIN_STEPS={steps}', 'train_loop.train.log_every_steps=1',
                'train_loop.train.eval_every_steps=0',
                f'train_loop.train.checkpoint_every_steps={steps}', *extra]
    log = _launch('train', gin_files, bindings)
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    events = EventAccumulator(os.path.join(model_dir, 'train'))
    events.Reload()
    done_at = {p.step: p.wall_time for p in events.Scalars('loss')}
    start = FIRST_TIMED_STEP - 1
    result = {'model': model, 'method': method, 'steps': steps,
              's_per_step': (done_at[steps] - done_at[start]) / (steps - start),
              'peak_rss_bytes': peak_rss,
              'final_train_loss': events.Scalars('loss')[-1].value,
              'checkpoint_state_bytes': sum(
                  f.stat().st_size for f in pathlib.Path(model_dir, 'checkpoints', str(steps),
                                                         'state').rglob('*') if f.is_file())}
    trained = re.search(r"training (\d+) of the model's (\d+) parameters", log)
    total = re.search(r'Total parameters: ([\d,]+)', log)
    result['parameters'] = int(total.group(1).replace(',', ''))
    result['trainable_parameters'] = (int(trained.group(1)) if trained
                                      else result['parameters'])
    if model == 'cpu':
        _launch('eval', gin_files, bindings, '--checkpoint=latest')
        with open(os.path.join(model_dir, 'eval', f'checkpoint_{steps}.json')) as f:
            scores = json.load(f)['tasks']['pydocs_section_titles']
        result['eval'] = {k: scores[k] for k in ('loss', 'accuracy', 'perplexity',
                                                 'greedy/exact_match', 'greedy/rouge_l')}
    return result


def run_child(model: str, method: str, **kwargs) -> dict:
    out = subprocess.run([sys.executable, '-m', 'benchmarks.finetune', '--child', model,
                          method] + [f'--{k}={v}' for k, v in kwargs.items()],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f'error: {model}/{method} failed:\n{out.stdout[-2000:]}'
                         f'{out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def small_base(workdir: str) -> str:
    """A 1-step T5.1.1-small run on the task: a base of the right shape (random)."""
    model_dir = os.path.join(workdir, 'small_base')
    _launch('train', [FULL, MODELS['small'][0]],
            [f"MODEL_DIR='{model_dir}'", 'TRAIN_STEPS=1', 'train_loop.train.init_from=None',
             'train_loop.train.eval_every_steps=0'])
    return os.path.join(model_dir, 'checkpoints')


def print_table(results: list[dict]) -> None:
    print(f"{'model':6} {'method':9} {'s/step':>7} {'vs full':>7} {'peak RSS':>9} "
          f"{'trainable':>11} {'ckpt MB':>8} {'eval loss':>9} {'acc':>6} {'EM':>5} "
          f"{'ROUGE-L':>7}")
    full = {r['model']: r for r in results if r['method'] == 'full'}
    for r in results:
        ev = r.get('eval', {})
        base = full.get(r['model'])
        ratio = f"{r['s_per_step'] / base['s_per_step']:.2f}x" if base else '-'
        print(f"{r['model']:6} {r['method']:9} {r['s_per_step']:7.2f} {ratio:>7} "
              f"{r['peak_rss_bytes'] / 2**30:8.2f}G {r['trainable_parameters']:11,} "
              f"{r['checkpoint_state_bytes'] / 1e6:8.2f} "
              + (f"{ev['loss']:9.3f} {ev['accuracy']:6.3f} {ev['greedy/exact_match']:5.1f} "
                 f"{ev['greedy/rouge_l']:7.2f}" if ev else f"{'-':>9} {'-':>6} {'-':>5} {'-':>7}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--steps', type=int, default=60, help='steps of the cpu model')
    parser.add_argument('--small_steps', type=int, default=10, help='steps of T5.1.1-small')
    parser.add_argument('--methods', nargs='+', choices=list(METHODS),
                        help='only these rows (default: every row of each model)')
    parser.add_argument('--pretrained', default='runs/base/checkpoints')
    parser.add_argument('--output', default=str(RESULTS), help='where the JSON goes')
    parser.add_argument('--child', nargs=2, metavar=('MODEL', 'METHOD'))
    parser.add_argument('--model_dir')
    args = parser.parse_args()
    if args.child:
        model, method = args.child
        print(json.dumps(measure(model, method, pretrained=args.pretrained,
                                 steps=args.steps, model_dir=args.model_dir)))
        return
    if 'cpu' in args.models and not (ROOT / args.pretrained).is_dir():
        raise SystemExit(f'error: no pretrained run at {args.pretrained} — train it first: '
                         '.venv/bin/python -m launch.train --gin_file=configs/base.gin')
    results = []
    with tempfile.TemporaryDirectory(prefix='finetune_') as workdir:
        for model in args.models:
            pretrained = (str(ROOT / args.pretrained) if model == 'cpu'
                          else small_base(workdir))
            steps = args.steps if model == 'cpu' else args.small_steps
            for method in [m for m in MODELS[model][1]
                           if not args.methods or m in args.methods]:
                results.append(run_child(model, method, pretrained=pretrained, steps=steps,
                                         model_dir=os.path.join(workdir, model, method)))
                print(f"{model}/{method}: {results[-1]['s_per_step']:.2f} s/step",
                      file=sys.stderr)
    output = pathlib.Path(args.output)
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({'machine': platform.platform(), 'cores': os.cpu_count(),
                                   'results': results}, indent=1) + '\n')
    print_table(results)


if __name__ == '__main__':
    main()
