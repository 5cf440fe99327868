"""Whether a checkpoint may resume under the current config, and what changed.

The checkpoint's `meta` holds the config it was written under. A change may not resume
when it changes the train state's structure (the checkpoint would not restore: the state
both configs build is compared, leaf by leaf), the function the model computes (every key
of the `model` and `memory` sections except the few in `SAFE`, so a key added to those
sections is fixed until declared safe) or the data a step reads (`STEP_INPUT`). Every
other key (cadence, profiling, optimizer hyperparameters such as the learning rate, the
mesh) may change on resume; the changes are reported, and recorded in
WORKDIR/config_changes.jsonl.
"""

from __future__ import annotations

import json

import jax

from hmem.config import config_from_json, default_config, flat_keys, flatten
from hmem.errors import ConfigError
from hmem.train.optimizer import anchor_optimizer
from hmem.train.state import abstract_state

# Sections whose every key shapes the model or the memory, or the function they compute...
FUNCTION_SECTIONS = ('model', 'memory')
# ... except these: how the function is computed (precision, recomputation, loop form,
# attention kernel), initialisation (spent once the run started) and how the memory is
# optimised. A change to them that alters the state's structure is still refused.
SAFE = frozenset({
    'model.dtype', 'model.remat', 'model.scan_layers', 'model.attention', 'model.init_std',
    'memory.init_std', 'memory.optimizer', 'memory.lr', 'memory.min_lr', 'memory.weight_decay',
})
# What a step reads: another dataset, sequence length, batch or seed resumes another run.
STEP_INPUT = ('data.source', 'data.path', 'data.seq_len', 'data.synthetic_mean_doc_len', 'data.synthetic_leaves',
              'train.batch_size', 'train.seed')


def fixed_keys(cfg) -> list[str]:
  """The keys of `cfg` that a resume may not change (besides those changing the state's structure)."""
  return [k for k in flat_keys(cfg) if k.split('.')[0] in FUNCTION_SECTIONS and k not in SAFE] + list(STEP_INPUT)


def _state_leaves(cfg) -> dict[str, tuple]:
  """{path: (shape, dtype)} of the train state `cfg` builds (abstract: nothing is allocated)."""
  tx, _ = anchor_optimizer(cfg.train)
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state(cfg, tx))[0]
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _structure_change(saved: dict, cfg) -> str:
  """'' when the saved config builds the train state `cfg` builds, else its first differences."""
  old, new = _state_leaves(config_from_json(saved)), _state_leaves(cfg)
  differ = [p for p in sorted(old.keys() | new.keys()) if old.get(p) != new.get(p)]
  shown = '; '.join(f'{p}: {old.get(p, "absent")} -> {new.get(p, "absent")}' for p in differ[:3])
  more = f' and {len(differ) - 3} more' if len(differ) > 3 else ''
  return f'the train state would change ({len(differ)} arrays: {shown}{more})' if differ else ''


def _flat_json(cfg) -> dict:
  return flatten(json.loads(cfg.to_json_best_effort()))


def _schedule_steps(flat: dict):
  return flat.get('train.schedule_steps') or flat.get('train.steps')


def config_changes(saved: dict, cfg, step: int, saved_data: str | None = None,
                   data: str | None = None) -> dict[str, tuple]:
  """{key: (checkpoint's value, new value)} of the keys that differ; raises one ConfigError
  listing every change to a fixed key and any change to the state's structure. `saved_data`
  and `data` identify the datasets (the prepared dataset's fingerprint): a moved dataset
  (new data.path, same fingerprint) may resume."""
  # A key added since the checkpoint was written had its default's effect then.
  old = {**_flat_json(default_config()), **flatten(saved)}
  new = _flat_json(cfg)
  changes = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
  moved = 'data.path' in changes and saved_data is not None and saved_data == data
  fixed = [k for k in fixed_keys(cfg) if k in changes and not (k == 'data.path' and moved)]
  problems = [', '.join(f'{k} {changes[k][0]!r} -> {changes[k][1]!r}' for k in fixed)] if fixed else []
  if changes and (structure := _structure_change(saved, cfg)):
    problems.append(structure)
  if problems:
    raise ConfigError(
        f'cannot resume checkpoint step {step} with this config: {"; ".join(problems)}: it would change the model '
        'or its data. Resume with the values the run was started with, or train the new config in a new workdir '
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
