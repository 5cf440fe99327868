"""Whether a checkpoint may resume under the current config, and what changed.

The checkpoint's `meta` holds the config it was written under. Keys that decide parameter
shapes, the function the model computes or the data a step reads cannot change: the
checkpoint would not restore, or would resume another run. Every other key (cadence,
profiling, hyperparameters such as the learning rate, the mesh) may change on resume;
the changes are reported, and recorded in WORKDIR/config_changes.jsonl.
"""

from __future__ import annotations

import json

from hmem.errors import ConfigError

# The model's shapes and function; the memory's shapes and scale; what a step reads.
FIXED = (
    'model.vocab_size', 'model.d_model', 'model.layers', 'model.heads', 'model.kv_heads', 'model.head_dim',
    'model.ffn', 'model.norm', 'model.norm_eps', 'model.qk_norm', 'model.rope_base', 'model.tie_embeddings',
    'model.param_dtype',
    'memory.k', 'memory.depth', 'memory.levels', 'memory.type', 'memory.layers', 'memory.lora_targets',
    'memory.lora_alpha',
    'data.source', 'data.path', 'data.seq_len', 'data.synthetic_mean_doc_len', 'data.synthetic_leaves',
    'train.batch_size', 'train.seed',
)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}, lists as tuples (JSON has no tuples)."""
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{name}.'))
    else:
      out[f'{prefix}{name}'] = tuple(value) if isinstance(value, list) else value
  return out


def _schedule_steps(flat: dict):
  return flat.get('train.schedule_steps') or flat.get('train.steps')


def config_changes(saved: dict, cfg, step: int, saved_data: str | None = None,
                   data: str | None = None) -> dict[str, tuple]:
  """{key: (checkpoint's value, new value)} of the keys that differ; raises one ConfigError
  listing every change to a FIXED key. `saved_data` and `data` identify the datasets (the
  prepared dataset's fingerprint): a moved dataset (new data.path, same fingerprint) may
  resume."""
  old, new = flatten(saved), flatten(json.loads(cfg.to_json_best_effort()))
  changes = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
  moved = 'data.path' in changes and saved_data is not None and saved_data == data
  fixed = [k for k in FIXED if k in changes and k in old and not (k == 'data.path' and moved)]
  if fixed:
    listed = ', '.join(f'{k} {changes[k][0]!r} -> {changes[k][1]!r}' for k in fixed)
    raise ConfigError(
        f'cannot resume checkpoint step {step} with this config: {listed} would change the model or its data. '
        'Resume with the values the run was started with, or train the new config in a new workdir '
        '(train.init_from=THIS_WORKDIR starts it from these anchor parameters)')
  return changes


def describe(changes: dict[str, tuple], saved: dict, cfg, step: int) -> str:
  """One line for the log: what changed, and whether the lr schedule length did."""
  listed = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items())
  text = f'resuming step {step} with a changed config: {listed}'
  before, after = _schedule_steps(flatten(saved)), cfg.train.schedule_steps or cfg.train.steps
  if before != after:
    text += (f'; the lr schedules now end at step {after} instead of {before} (set '
             f'train.schedule_steps={before} to keep them)')
  return text
