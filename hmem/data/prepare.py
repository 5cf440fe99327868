"""`hmem prepare`: raw documents -> a tokenized, clustered, packed dataset.

Five stages, so the work spreads over processes and the output does not depend on how
many there are (docs/DESIGN.md, "Data flow"):

  fit     process 0 reads the first ceil(data.tokenizer_sample/files) usable documents of
          every file, trains or loads the tokenizer and fits the embedder (TF-IDF) on them.
  embed   process i of n takes files[i::n] and embeds every document into the embedding
          cache (a no-op for files already there).
  tree    process 0 draws data.tree_sample training documents uniformly at random from
          the whole corpus (seeded by train.seed; eval documents are never drawn), reads
          their vectors from the cache (memory-mapped: only the drawn rows are read) and
          fits the hierarchical k-means tree on them (tree.fit_tree).
  map     process i of n takes files[i::n]: reads and tokenizes every document, routes
          its cached vector and spills (leaf, key, held-out flag, tokens) sorted by leaf.
  reduce  process i takes a contiguous range of shards (a shard is a fixed leaf range)
          and packs each leaf's documents in (file, line) order, the train and eval
          splits into separate shards; process 0 then writes manifest.json.

With stage='all' each process runs the stages in turn. The stages can also run as
separate jobs: 'fit' and 'tree' run on process 0 only (others return at once); 'embed',
'map' and 'reduce' on any number of processes each (spills are per input file and shards
are fixed leaf ranges); the reduce's process 0 writes the manifest. There are
min(k**depth, 256) shards per split, which is also the most processes a reduce can use.
The tree sample depends only on the corpus, data.tree_sample and the seed: the documents
are numbered in (file, line) order and a seeded draw without replacement picks among the
training ones, whatever the number of processes that embedded them.

Processes coordinate only through files in out_dir: process 0 writes fit.json and then
the plan when the tree is fit, a file's embedding marker and spill appear (by atomic
renames) when it is embedded and mapped, a shard's marker when it is packed. Waiting for
a file times out with a clear message, and a process that fails leaves a note that makes
its peers stop too. A rerun with the same inputs and settings resumes: finished files and
shards are kept. Intermediate files live in out_dir/_work, removed at the end.

The input may lie on an object store (gs://, s3://: inputs.py reads it through
etils.epath); out_dir and data.embed_cache must be POSIX directories (a local disk, NFS or
a gcsfuse mount), since the shards are ArrayRecord files and the spills and cached vectors
are memory-mapped: a URL for either is refused before any input is read.

Embeddings are cached on disk (data.embed_cache, by default out_dir/embed_cache, which
outlives the run): each input file's under its absolute path, size, mtime and
data.text_field, within a directory per embedder identity (embed.EmbeddingCache). A later
preparation of the same corpus with the same embedder -- another tree, say, written to
another --out -- reads them back instead of embedding again; the cache never changes the
output. The manifest counts the embed stage's lookups (one per input file) as embed_cache
{hits, misses, rejected}, rejected being files that were there but unusable (corrupt,
wrong shape), recomputed; a file the map stage then finds unusable too (changed under the
run) is recomputed and counted again.

Output (out_dir):
  {split}-{s:05d}-of-{S:05d}.array_record   split 'train' or 'eval'; shard s holds the
        sequences of leaves [s*L/S, (s+1)*L/S) in leaf order (layout.py has the record bytes)
  manifest.json   counts, skipped records by reason, splits and shards, tree occupancy
  tokenizer.json, tree.npz, embedder.json (+ embedder_* files)
A document is held out for eval when a hash of its key falls under data.eval_fraction,
so eval documents come from the same clusters as the training ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from hmem.data import layout
from hmem.data.embed import EmbeddingCache, load_embedder, make_embedder
from hmem.data.inputs import ReadStats, list_files, read_documents, stamp
from hmem.data.packing import pack
from hmem.data.tokenizer import Tokenizer
from hmem.data.tree import Tree, fit_tree, route, tree_stats
from hmem.errors import DataError
from hmem.files import atomic_path, atomic_write

STAGES = ('all', 'fit', 'embed', 'tree', 'map', 'reduce')
_MAX_SHARDS = 256  # shards per split; also the most processes the reduce can use
_CHUNK = 1024      # documents tokenized, embedded and routed together
_TREE_STREAM = 0x74726565  # with train.seed, seeds the draw of the tree sample
_POLL_S = 0.5


def prepare(cfg, input_path_or_glob: str, out_dir: str, processes: int = 1, process_index: int = 0,
            *, stage: str = 'all', timeout_s: float = 6 * 3600, progress: bool = True) -> dict | None:
  """Runs `stage` of the preparation as process `process_index` of `processes`.

  Returns the manifest on the process that writes it (process 0 of the reduce, or any
  process once the dataset is complete), else None. `timeout_s` bounds each wait for
  another process's output.
  """
  if stage not in STAGES:
    raise DataError(f'stage {stage!r} is not one of {", ".join(STAGES)}')
  if not 0 <= process_index < processes:
    raise DataError(f'process index {process_index} is outside [0, {processes}); '
                    'pass --process-index between 0 and --processes - 1')
  if not 0 <= cfg.data.eval_fraction < 1:
    raise DataError(f'data.eval_fraction={cfg.data.eval_fraction} must lie in [0, 1)')
  layout.check_posix(out_dir, '--out')
  layout.check_posix(cfg.data.embed_cache, 'data.embed_cache')
  out_dir = os.path.abspath(out_dir)
  cache_dir = _cache_dir(cfg, out_dir)
  # An output (or cache) directory inside the input one must not feed its own files back
  # in on a rerun.
  files, unsupported = ([p for p in found
                         if not p.startswith((out_dir + os.sep, cache_dir + os.sep))]
                        for found in list_files(input_path_or_glob))
  if not files:
    raise DataError(f'input {input_path_or_glob!r} holds no readable file outside --out {out_dir}')
  run = _Run(cfg, input_path_or_glob, out_dir, cache_dir, files, unsupported, processes,
             process_index, timeout_s, progress)
  if os.path.exists(os.path.join(run.out_dir, layout.MANIFEST)):
    return run.finished_manifest()
  run.begin()
  try:
    if stage in ('all', 'fit') and process_index == 0 and not os.path.exists(run.fit_path):
      run.fit()
    if stage == 'fit':
      return None
    run.wait(lambda: os.path.exists(run.fit_path), 'the fit stage (process 0)')
    run.check_fingerprint(run.fit_path)
    if stage in ('all', 'embed'):
      run.embed()
    if stage == 'embed':
      return None
    if stage in ('all', 'tree') and process_index == 0 and not os.path.exists(run.plan_path):
      run.wait(lambda: run.files_embedded() == len(files), 'every input file to be embedded')
      run.tree()
    if stage == 'tree':
      return None
    run.wait(lambda: os.path.exists(run.plan_path), 'the tree stage (process 0)')
    run.check_fingerprint(run.plan_path)
    if stage in ('all', 'map'):
      run.map()
    if stage == 'map':
      return None
    run.wait(lambda: run.files_mapped() == len(files), 'every input file to be mapped')
    run.reduce()
    if process_index != 0:
      return None
    run.wait(lambda: run.shards_packed() == run.shards, 'every shard to be packed')
    return run.finalize()
  except BaseException as e:
    run.note_failure(e)
    raise


class _Run:
  """The state one process needs; the methods are the stages."""

  def __init__(self, cfg, input_path, out_dir, cache_dir, files, unsupported, processes, index,
               timeout_s, progress):
    self.cfg, self.input_path, self.out_dir, self.cache_dir = cfg, input_path, out_dir, cache_dir
    self.files, self.unsupported = files, unsupported
    self.processes, self.index, self.timeout_s, self.progress = processes, index, timeout_s, progress
    self.work = os.path.join(out_dir, '_work')
    self.fit_path = os.path.join(self.work, 'fit.json')
    self.plan_path = os.path.join(self.work, 'plan.json')
    self.embedded_dir = os.path.join(self.work, 'embedded')
    self.spill_dir = os.path.join(self.work, 'spill')
    self.packed_dir = os.path.join(self.work, 'packed')
    self.failure_path = os.path.join(self.work, f'failed-{index}.txt')
    self.started = time.time()
    self.fingerprint = _fingerprint(cfg, input_path, files, unsupported)
    self.leaves = cfg.memory.k**cfg.memory.depth
    self.shards = min(self.leaves, _MAX_SHARDS)

  # Coordination.

  def begin(self) -> None:
    for d in (self.embedded_dir, self.spill_dir, self.packed_dir):
      os.makedirs(d, exist_ok=True)
    if os.path.exists(self.failure_path):
      os.remove(self.failure_path)

  def finished_manifest(self) -> dict | None:
    with open(os.path.join(self.out_dir, layout.MANIFEST)) as f:
      manifest = json.load(f)
    if manifest.get('fingerprint') != self.fingerprint:
      raise DataError(f'{self.out_dir} already holds a dataset prepared from other inputs or '
                      'settings; pass a new --out or delete that directory')
    return manifest if self.index == 0 else None

  def check_fingerprint(self, path: str) -> None:
    with open(path) as f:
      written = json.load(f)
    if written['fingerprint'] != self.fingerprint:
      raise DataError(f'{self.work} belongs to a preparation of other inputs or settings; give '
                      'every process the same --config, --input and overrides, or delete '
                      f'{self.work}')

  def wait(self, ready, what: str) -> None:
    deadline = time.monotonic() + self.timeout_s
    while not ready():
      for name in os.listdir(self.work):
        path = os.path.join(self.work, name)
        # Notes older than this process are left over from an earlier attempt.
        if (name.startswith('failed-') and path != self.failure_path
            and os.path.getmtime(path) >= self.started - 60):
          with open(path) as f:
            raise DataError(f'process {self.index} stops because process {name[7:-4]} failed: '
                            f'{f.read().strip()}')
      if time.monotonic() > deadline:
        raise DataError(f'process {self.index} of {self.processes} waited {self.timeout_s:.0f}s for '
                        f'{what} in {self.out_dir}; start every process with the same --input, '
                        '--out and --processes, and check the log of the one that is missing')
      time.sleep(_POLL_S)

  def note_failure(self, e: BaseException) -> None:
    if os.path.isdir(self.work):
      with open(self.failure_path, 'w') as f:
        f.write(f'{type(e).__name__}: {e}\n')

  def files_embedded(self) -> int:
    return sum(1 for name in os.listdir(self.embedded_dir) if name.endswith('.json'))

  def files_mapped(self) -> int:
    return sum(1 for name in os.listdir(self.spill_dir) if name.isdigit())

  def shards_packed(self) -> int:
    return sum(1 for name in os.listdir(self.packed_dir) if name.endswith('.json'))

  # Stage a: fit (tokenizer and embedder).

  def fit(self) -> None:
    d = self.cfg.data
    quota = math.ceil(d.tokenizer_sample / len(self.files))
    sample, stats = [], ReadStats()
    files = tqdm(self.files, desc='fit: sample', unit='file', disable=not self.progress)
    for i, path in enumerate(files):
      docs = read_documents(path, i, d.text_field, stats)
      sample.extend(doc.text for doc in itertools.islice(docs, quota))
      docs.close()
    if not sample:  # every file was read to its end, so the corpus has no usable document
      raise DataError(f'input {self.input_path!r} has no usable document ({stats.read} records, '
                      f'skipped: {dict(stats.skipped)}); check the files and '
                      f'data.text_field={d.text_field!r}')
    fit_texts = _spread(sample, d.tokenizer_sample)
    tokenizer = (Tokenizer.load(d.tokenizer) if d.tokenizer
                 else Tokenizer.train(fit_texts, self.cfg.model.vocab_size))
    if tokenizer.vocab_size > self.cfg.model.vocab_size:
      raise DataError(f'the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size='
                      f'{self.cfg.model.vocab_size}; set --config.model.vocab_size='
                      f'{tokenizer.vocab_size} or more')
    embedder = make_embedder(d, fit_texts=fit_texts)
    tokenizer.save(os.path.join(self.out_dir, 'tokenizer.json'))
    embedder.save(self.out_dir)
    _write_json(self.fit_path, {'fingerprint': self.fingerprint, 'sample_documents': len(sample),
                                'vocab_size': tokenizer.vocab_size, 'eot_id': tokenizer.eot_id,
                                'tokenizer_sha256': tokenizer.identity})

  # Stage b: embed.

  def embed(self) -> None:
    embedder = load_embedder(self.out_dir)
    cache = EmbeddingCache(self.cache_dir, embedder)
    mine = range(self.index, len(self.files), self.processes)
    with tqdm(desc=f'embed {self.index}/{self.processes}', unit='doc', disable=not self.progress) as bar:
      for f in mine:
        if not os.path.exists(self._embedded(f) + '.json'):
          self._embed_file(f, embedder, cache, bar)

  def _embedded(self, f: int) -> str:
    return os.path.join(self.embedded_dir, f'{f:06d}')

  def _embed_file(self, f, embedder, cache, bar, use_cache=True) -> None:
    """Makes sure file f's vectors are cached; notes its document count and held-out flags."""
    key = cache.key(**self._file_source(f))
    cached_NxD, status = cache.load(key) if use_cache else (None, 'rejected')
    stats = ReadStats()
    docs = read_documents(self.files[f], f, self.cfg.data.text_field, stats)
    index, computed = [], []
    while chunk := list(itertools.islice(docs, _CHUNK)):
      index.extend(doc.index for doc in chunk)
      if cached_NxD is None:
        computed.append(embedder.embed([doc.text for doc in chunk], progress=self.progress))
      bar.update(len(chunk))
    if cached_NxD is not None and cached_NxD.shape[0] != len(index):
      # Checksummed vectors of another version of the file (same size and mtime): redo it.
      bar.update(-len(index))
      return self._embed_file(f, embedder, cache, bar, use_cache=False)
    if cached_NxD is None:
      cache.store(key, np.concatenate(computed) if computed else np.zeros((0, embedder.dim), np.float32),
                  self._file_source(f))
    index_N = np.asarray(index, np.int64)
    np.save(self._embedded(f) + '.npy', held_out(f, index_N, self.cfg.data.eval_fraction))
    _write_json(self._embedded(f) + '.json', {'key': key, 'documents': len(index),
                                              'embed_cache': _cache_counts([status])})

  # Stage c: tree.

  def tree(self) -> None:
    """Fits the tree on a uniform sample of the corpus's training documents."""
    d, m = self.cfg.data, self.cfg.memory
    cache = EmbeddingCache(self.cache_dir, load_embedder(self.out_dir))
    markers, train_rows = [], []
    for f in range(len(self.files)):
      with open(self._embedded(f) + '.json') as fh:
        markers.append(json.load(fh))
      train_rows.append(np.flatnonzero(~np.load(self._embedded(f) + '.npy')))
    counts_F = np.array([rows.size for rows in train_rows], np.int64)
    total = int(counts_F.sum())
    if total == 0:
      raise DataError(f'no training document to fit the tree on: all {sum(mk["documents"] for mk in markers)} '
                      f'documents are held out; lower data.eval_fraction={d.eval_fraction}')
    # Training documents numbered in (file, line) order; a seeded draw without replacement.
    rng = np.random.default_rng([self.cfg.train.seed, _TREE_STREAM])
    chosen = np.sort(rng.choice(total, size=min(d.tree_sample, total), replace=False))
    bounds = np.searchsorted(chosen, np.concatenate([[0], np.cumsum(counts_F)]))
    start_F = np.cumsum(counts_F) - counts_F
    parts = []
    for f in tqdm(range(len(self.files)), desc='tree: read sample', unit='file', disable=not self.progress):
      ordinals = chosen[bounds[f]:bounds[f + 1]] - start_F[f]
      if ordinals.size:
        parts.append(np.asarray(cache.rows(markers[f]['key'], markers[f]['documents'])[train_rows[f][ordinals]]))
    emb_NxD = np.concatenate(parts)
    tree = fit_tree(emb_NxD, m.k, m.depth, seed=self.cfg.train.seed, samples=d.kmeans_samples,
                    steps=d.kmeans_steps, balance=d.balance, progress=self.progress)
    tree.save(os.path.join(self.out_dir, 'tree.npz'))
    with open(self.fit_path) as fh:
      plan = json.load(fh)
    cache_counts = _cache_counts([])
    for mk in markers:
      for name, count in mk['embed_cache'].items():
        cache_counts[name] += count
    _write_json(self.plan_path, {**plan, 'tree_documents': int(chosen.size), 'embed_cache': cache_counts})

  # Stage d: map.

  def map(self) -> None:
    tokenizer = Tokenizer.load(os.path.join(self.out_dir, 'tokenizer.json'))
    embedder = load_embedder(self.out_dir)
    tree = Tree.load(os.path.join(self.out_dir, 'tree.npz'))
    cache = EmbeddingCache(self.cache_dir, embedder)
    dtype = layout.token_dtype(tokenizer.vocab_size)
    mine = range(self.index, len(self.files), self.processes)
    with tqdm(desc=f'map {self.index}/{self.processes}', unit='doc', disable=not self.progress) as bar:
      for f in mine:
        if not os.path.exists(self._spill(f)):
          self._map_file(f, tokenizer, embedder, cache, tree, dtype, bar)

  def _spill(self, f: int) -> str:
    return os.path.join(self.spill_dir, f'{f:06d}')

  def _file_source(self, f: int) -> dict:
    """What decides file f's documents, in order: the embedding cache's key for them."""
    path = self.files[f]  # absolute (list_files)
    st = stamp(path)
    return {'file': path, 'size': st.size, 'mtime_ns': st.mtime_ns,
            'text_field': self.cfg.data.text_field, 'chunk': _CHUNK}

  def _map_file(self, f, tokenizer, embedder, cache, tree, dtype, bar, use_cache=True) -> None:
    """Spills one file's documents sorted by (leaf, line): the reduce reads leaf ranges."""
    source = self._file_source(f)
    key = cache.key(**source)
    cached_NxD, status = cache.load(key) if use_cache else (None, 'rejected')
    stats = ReadStats()
    docs = read_documents(self.files[f], f, self.cfg.data.text_field, stats)
    index, leaf, tokens, computed = [], [], [], []
    while chunk := list(itertools.islice(docs, _CHUNK)):
      texts = [doc.text for doc in chunk]
      lo, hi = len(index), len(index) + len(chunk)
      if cached_NxD is None:
        computed.append(embedder.embed(texts, progress=self.progress))
        emb_NxD = computed[-1]
      elif cached_NxD.shape[0] >= hi:
        emb_NxD = cached_NxD[lo:hi]
      else:
        break  # fewer cached vectors than documents
      index.extend(doc.index for doc in chunk)
      tokens.extend(tokenizer.encode(texts))
      # Routed chunk by chunk, cached or not, so both give the same leaves.
      leaf.append(route(tree, emb_NxD))
      bar.update(len(chunk))
    if cached_NxD is not None and (chunk or cached_NxD.shape[0] != len(index)):
      # The file's documents do not match its cached vectors (checksummed, so the file
      # changed under the same size and mtime, or the reader did): map it again, uncached.
      docs.close()
      bar.update(-len(index))
      return self._map_file(f, tokenizer, embedder, cache, tree, dtype, bar, use_cache=False)
    if cached_NxD is None:
      cache.store(key, np.concatenate(computed) if computed else np.zeros((0, embedder.dim), np.float32),
                  source)
    index_N = np.asarray(index, np.int64)
    leaf_N = np.concatenate(leaf) if leaf else np.zeros(0, np.int64)
    order = np.lexsort((index_N, leaf_N))
    lengths_N = np.asarray([len(tokens[i]) for i in order], np.int64)
    arrays = {
        'leaf': leaf_N[order], 'index': index_N[order],
        'held_out': held_out(f, index_N[order], self.cfg.data.eval_fraction),
        'offsets': np.concatenate([[0], np.cumsum(lengths_N)]),
        'tokens': (np.concatenate([tokens[i] for i in order]) if tokens else np.zeros(0)).astype(dtype),
    }
    try:
      with atomic_path(self._spill(f)) as tmp:  # a spill exists whole or not at all
        os.makedirs(tmp)
        for name, a in arrays.items():
          np.save(os.path.join(tmp, f'{name}.npy'), a)
        _write_json(os.path.join(tmp, 'stats.json'), stats.to_json())
        # The embed stage counted this file's lookup; a recomputation here is one more.
        _write_json(os.path.join(tmp, 'embed_cache.json'),
                    _cache_counts([]) if status == 'hit' else _cache_counts([status]))
    except OSError:
      if not os.path.isdir(self._spill(f)):
        raise
      # Another process spilled this file first (the same content); ours was removed.

  # Stage e: reduce.

  def reduce(self) -> None:
    with open(self.plan_path) as f:
      plan = json.load(f)
    dtype = layout.token_dtype(plan['vocab_size'])
    lo, hi = self.index * self.shards // self.processes, (self.index + 1) * self.shards // self.processes
    for s in tqdm(range(lo, hi), desc=f'reduce {self.index}/{self.processes}', unit='shard',
                  disable=not self.progress):
      if not os.path.exists(self._packed(s)):
        self._pack_shard(s, plan['eot_id'], dtype)

  def _packed(self, s: int) -> str:
    return os.path.join(self.packed_dir, f'{s:05d}.json')

  def _shard_leaves(self, s: int) -> tuple[int, int]:
    return s * self.leaves // self.shards, (s + 1) * self.leaves // self.shards

  def _pack_shard(self, s: int, eot_id: int, dtype: np.dtype) -> None:
    lo, hi = self._shard_leaves(s)
    docs = _select([self._spill(f) for f in range(len(self.files))], lo, hi)
    order = np.lexsort((docs['index'], docs['file'], docs['leaf']))
    seq_len = self.cfg.data.seq_len
    summary = {'leaf_documents': np.bincount(docs['leaf'] - lo, minlength=hi - lo).tolist()}
    for split in layout.SPLITS:
      chosen = order[docs['held_out'][order] == (split == 'eval')]
      name = layout.shard_name(split, s, self.shards)
      sequences, tokens = _write_shard(os.path.join(self.out_dir, name), docs, chosen, seq_len,
                                       eot_id, dtype)
      summary[split] = {'file': name if sequences else None, 'documents': int(chosen.size),
                        'sequences': sequences, 'tokens': tokens}
    _write_json(self._packed(s), summary)

  def finalize(self) -> dict:
    stats = ReadStats()
    for f in range(len(self.files)):
      with open(os.path.join(self._spill(f), 'stats.json')) as fh:
        stats.add(ReadStats.from_json(json.load(fh)))
    packed = []
    for s in range(self.shards):
      with open(self._packed(s)) as fh:
        packed.append(json.load(fh))
    with open(self.plan_path) as fh:
      plan = json.load(fh)
    cache_counts = dict(plan['embed_cache'])
    for f in range(len(self.files)):
      with open(os.path.join(self._spill(f), 'embed_cache.json')) as fh:
        for name, count in json.load(fh).items():
          cache_counts[name] += count
    c, seq_len = self.cfg, self.cfg.data.seq_len
    splits = {}
    for split in layout.SPLITS:
      parts = [p[split] for p in packed]
      sequences = sum(p['sequences'] for p in parts)
      tokens = sum(p['tokens'] for p in parts)
      splits[split] = {
          'documents': sum(p['documents'] for p in parts), 'sequences': sequences, 'tokens': tokens,
          'padding_fraction': _padding(sequences, tokens, seq_len),
          'shards': [{'file': p['file'], 'sequences': p['sequences']} for p in parts if p['file']],
      }
    leaf_documents = np.concatenate([p['leaf_documents'] for p in packed])
    tree = Tree.load(os.path.join(self.out_dir, 'tree.npz'))
    occupancy = tree_stats(tree, leaf_documents)
    sequences = sum(s['sequences'] for s in splits.values())
    tokens = sum(s['tokens'] for s in splits.values())
    manifest = {
        'format': layout.FORMAT, 'version': layout.VERSION, 'fingerprint': self.fingerprint,
        'input': self.input_path, 'files': len(self.files), 'files_unsupported': len(self.unsupported),
        'documents_read': stats.read, 'documents_kept': stats.kept,
        'skipped': stats.to_json()['skipped'],
        'sample_documents': plan['sample_documents'], 'tree_documents': plan['tree_documents'],
        'sequences': sequences, 'tokens': tokens,
        'padding_fraction': _padding(sequences, tokens, seq_len),
        'seq_len': seq_len, 'vocab_size': plan['vocab_size'], 'eot_id': plan['eot_id'],
        'tokenizer_sha256': plan['tokenizer_sha256'],
        'pad_id': plan['eot_id'], 'token_dtype': layout.token_dtype(plan['vocab_size']).name,
        'k': c.memory.k, 'depth': c.memory.depth, 'leaves': self.leaves, 'embedder': c.data.embedder,
        'embed_cache': cache_counts,
        'eval_fraction': c.data.eval_fraction, 'splits': splits,
        'occupancy': {str(level): v for level, v in occupancy.items()},
    }
    _write_json(os.path.join(self.out_dir, layout.MANIFEST), manifest)
    shutil.rmtree(self.work)
    return manifest


def _fingerprint(cfg, input_path, files, unsupported) -> str:
  """A hash of everything the output depends on: a rerun with the same one resumes."""
  # Where the embedding cache lives does not change the output.
  data = {k: v for k, v in cfg.data.items() if k not in ('source', 'path', 'embed_cache')}
  stamps = [(p, st.size, st.mtime) for p, st in zip(files, map(stamp, files))]
  key = json.dumps([input_path, stamps, unsupported, data, cfg.memory.k, cfg.memory.depth,
                    cfg.model.vocab_size, cfg.train.seed], sort_keys=True, default=str)
  return hashlib.sha256(key.encode()).hexdigest()[:20]


def _cache_dir(cfg, out_dir: str) -> str:
  """data.embed_cache as an absolute path; '' is out_dir/embed_cache."""
  return os.path.abspath(cfg.data.embed_cache or os.path.join(out_dir, 'embed_cache'))


def _cache_counts(statuses) -> dict[str, int]:
  """{'hits', 'misses', 'rejected'} for EmbeddingCache.load statuses; rejected ones are misses too."""
  statuses = list(statuses)
  return {'hits': statuses.count('hit'), 'misses': len(statuses) - statuses.count('hit'),
          'rejected': statuses.count('rejected')}


def _spread(items: list, n: int) -> list:
  """At most n items spaced evenly over the list (so a sample spans every file)."""
  if n >= len(items):
    return items
  return [items[i] for i in np.arange(n) * len(items) // n]


def held_out(file_index: int, index_N: np.ndarray, fraction: float) -> np.ndarray:
  """Whether each document (file_index, index_N) is in the eval split: splitmix64 of its key."""
  z = (np.uint64(file_index) << np.uint64(32)) ^ index_N.astype(np.uint64)
  z = z + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _select(spills: list[str], lo: int, hi: int) -> dict[str, np.ndarray]:
  """The documents of leaves [lo, hi) from every file's spill, concatenated in file order.

  Spills are memory-mapped and sorted by leaf, so only the range's bytes are read.
  """
  parts = {name: [] for name in ('leaf', 'index', 'held_out', 'file', 'lengths', 'tokens')}
  for f, path in enumerate(spills):
    sp = {name: np.load(os.path.join(path, f'{name}.npy'), mmap_mode='r')
          for name in ('leaf', 'index', 'held_out', 'offsets', 'tokens')}
    a, b = np.searchsorted(sp['leaf'], [lo, hi])
    offsets = np.asarray(sp['offsets'][a:b + 1])
    parts['leaf'].append(np.asarray(sp['leaf'][a:b]))
    parts['index'].append(np.asarray(sp['index'][a:b]))
    parts['held_out'].append(np.asarray(sp['held_out'][a:b]))
    parts['file'].append(np.full(b - a, f, np.int64))
    parts['lengths'].append(np.diff(offsets))
    parts['tokens'].append(np.asarray(sp['tokens'][offsets[0]:offsets[-1]]))
  docs = {name: np.concatenate(p) for name, p in parts.items()}
  docs['starts'] = np.cumsum(docs['lengths']) - docs['lengths']
  return docs


def _write_shard(path, docs, chosen, seq_len, eot_id, dtype) -> tuple[int, int]:
  """Packs the chosen documents leaf by leaf into one shard; (sequences, non-padding tokens)."""
  leaf = docs['leaf'][chosen]
  runs = np.split(chosen, np.flatnonzero(np.diff(leaf)) + 1) if chosen.size else []
  sequences, tokens = 0, 0
  if not runs:
    return sequences, tokens
  with atomic_path(path) as tmp:
    writer = ArrayRecordWriter(str(tmp), 'group_size:1')  # a POSIX path: no object stores
    for run in runs:
      lengths_N = docs['lengths'][run]
      tokens_MxT, segment_ids_MxT = pack(_concat_ranges(docs['tokens'], docs['starts'][run], lengths_N),
                                         lengths_N, seq_len, eot_id, pad_id=eot_id)
      for t_T, s_T in zip(tokens_MxT, segment_ids_MxT):
        writer.write(layout.encode(t_T, s_T, int(docs['leaf'][run[0]]), dtype))
      sequences += tokens_MxT.shape[0]
      tokens += int((segment_ids_MxT > 0).sum())
    writer.close()
  return sequences, tokens


def _concat_ranges(tokens: np.ndarray, starts_N: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
  """tokens[starts[0]:starts[0]+lengths[0]], tokens[starts[1]:...], ... concatenated."""
  shift_N = starts_N - (np.cumsum(lengths_N) - lengths_N)
  return tokens[np.repeat(shift_N, lengths_N) + np.arange(lengths_N.sum())]


def _padding(sequences: int, tokens: int, seq_len: int) -> float:
  return 1.0 - tokens / (sequences * seq_len) if sequences else 0.0


def _write_json(path: str, obj) -> None:
  """Atomic: a reader sees the whole file or none (other processes poll for these files)."""
  with atomic_write(path) as f:
    json.dump(obj, f, indent=1)
    f.write('\n')
