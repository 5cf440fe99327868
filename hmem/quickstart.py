"""`hmem quickstart`: the whole method end to end on an offline Wikipedia corpus.

corpus -> `hmem prepare` (tokenizer, embeddings, tree, packed shards) -> dense anchor ->
anchor + memory co-trained from it (`train.init_from`) -> held-out losses compared.
Every stage skips work a previous invocation finished, so a rerun resumes.
"""

from __future__ import annotations

import copy
import os

from hmem.data.corpora import wiki_offline, write_jsonl
from hmem.data.prepare import prepare
from hmem.train.trainer import train


def quickstart(cfg, workdir: str, progress: bool = True) -> dict:
  corpus = os.path.join(workdir, 'corpus.jsonl')
  if not os.path.exists(corpus):
    write_jsonl(wiki_offline(include_uncategorized=True), corpus)
  data = os.path.join(workdir, 'data')
  manifest = prepare(cfg, corpus, data, progress=progress)
  print(f"prepared {manifest['documents_kept']:,} documents into {manifest['sequences']:,} sequences "
        f"of {cfg.data.seq_len} tokens ({manifest['skipped'] or 'none'} skipped)")

  anchor_cfg = copy.deepcopy(cfg)
  anchor_cfg.data.path = data
  anchor_cfg.memory.levels = (0,) * cfg.memory.depth
  print('stage 1/2: pretraining the dense anchor')
  anchor = train(anchor_cfg, os.path.join(workdir, 'anchor'), progress=progress)

  memory_cfg = copy.deepcopy(cfg)
  memory_cfg.data.path = data
  memory_cfg.train.init_from = os.path.join(workdir, 'anchor')
  print('stage 2/2: co-training anchor and memory from the pretrained anchor')
  memory = train(memory_cfg, os.path.join(workdir, 'memory'), progress=progress)

  summary = {
      'anchor_eval_loss': anchor['eval_loss'],
      'memory_eval_loss_fetched': memory['eval_loss'],
      'memory_eval_loss_generic': memory.get('eval_loss_generic'),
      'memory_eval_loss_no_memory': memory.get('eval_loss_anchor'),
      'documents': manifest['documents_kept'], 'sequences': manifest['sequences'],
  }
  print('held-out loss (nats/token) after', memory_cfg.train.steps, 'more steps:')
  for name, value in summary.items():
    if 'loss' in name and value is not None:
      print(f'  {name:<28} {value:.4f}')
  return summary
