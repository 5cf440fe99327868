"""`hmem prepare` as one Apache Beam pipeline: raw documents -> a tokenized, clustered, packed dataset.

The graph, in the order the data flows (docs/DECISIONS.md, "Prepare on Apache Beam"):

  read      every input file is read three times, each time by the worker that holds it:
            documents are never kept between the passes, only what each pass yields.
  sample    pass 1 counts every record (skips by reason) and yields, per file, its documents
            with the data.tokenizer_sample smallest hashes of (file, line); Top.Smallest
            keeps the global smallest: a uniform, seeded sample, the same whatever the
            parallelism, drawn without an index of the corpus.
  fit       one worker trains (or loads) the tokenizer and fits the embedder on that sample
            and writes tokenizer.json and the embedder's files; the rest read them.
  embed     pass 2 embeds each file's documents into the embedding cache (a hit costs a
            read) and yields the data.tree_sample training documents with the smallest
            hashes of (file, line, train.seed); one worker reads their vectors back from the cache
            and fits the tree (JAX, tree.fit_tree), writing tree.npz.
  route     pass 3 tokenizes each file's documents and routes their cached vectors; each
            document goes to its leaf.
  pack      GroupByKey on the leaf; each leaf's documents, in (file, line) order, are packed
            into one train and one eval ArrayRecord shard (a leaf's group is the most any
            worker holds).
  manifest  one worker writes manifest.json from the shards' summaries, last: a failed
            pipeline leaves none, so `hmem train` refuses the directory, and a rerun clears
            what the failed one left and starts again.

Every step is idempotent (files appear by atomic renames), as Beam retries bundles. A
document that makes the embedder or tokenizer raise is skipped and counted
(embed_error, tokenize_error), never fatal. Skipped records are counted as data that flows
into the manifest (exact under retries) and as Beam counters (the runner's monitoring).

The input may lie on an object store (gs://, s3://: inputs.py reads it through
etils.epath); out_dir and data.embed_cache must be POSIX directories that every worker
sees (a local disk, NFS or a gcsfuse mount), since the shards are ArrayRecord files and
cached vectors are memory-mapped: a URL for either is refused before any input is read.

Embeddings are cached on disk (data.embed_cache, by default out_dir/embed_cache, which
outlives the run): each input file's under its absolute path, size, mtime and
data.text_field, within a directory per embedder identity (embed.EmbeddingCache). A later
preparation of the same corpus with the same embedder -- another tree, say, written to
another --out -- reads them back instead of embedding again; the cache never changes the
output. The manifest counts the lookups (one per input file, plus one per file the route
pass found unusable) as embed_cache {hits, misses, rejected}.

Output (out_dir):
  {split}-{leaf:05d}-of-{L:05d}.array_record   split 'train' or 'eval'; one shard per
        non-empty leaf and split (layout.py has the record bytes)
  manifest.json   counts, skipped records by reason, splits and shards, tree occupancy
  tokenizer.json, tree.npz, embedder.json (+ embedder_* files)
A document is held out for eval when a hash of its key falls under data.eval_fraction,
so eval documents come from the same clusters as the training ones.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import heapq
import itertools
import json
import os
import re

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from hmem.data import layout
from hmem.data.embed import EmbeddingCache, load_embedder, make_embedder
from hmem.data.inputs import ReadStats, list_files, read_documents, stamp
from hmem.data.packing import write_shard
from hmem.data.tokenizer import Tokenizer
from hmem.data.tree import Tree, fit_tree, route, tree_stats
from hmem.errors import ConfigError, DataError
from hmem.files import atomic_write

_CHUNK = 1024  # documents embedded, tokenized and routed together
# Salts of the two samples' hashes. The fit sample does not depend on train.seed, so runs
# with other seeds share the embedder (and its cached vectors); the tree's does.
_FIT_STREAM, _TREE_STREAM = 0x666974, 0x74726565
RUNNERS = {'direct': 'DirectRunner', 'dataflow': 'DataflowRunner', 'flink': 'FlinkRunner',
           'spark': 'SparkRunner'}
TREE_METRICS = ('l2', 'cosine')
# What a failed run may have left in out_dir: removed before a run starts.
_OUTPUTS = ('*.array_record', '*.tmp-*', 'tokenizer.json', 'tree.npz', 'embedder*')


def prepare(cfg, input_path_or_glob: str, out_dir: str, *, runner: str = 'direct', workers: int = 0,
            pipeline_args=(), progress: bool = True) -> dict | None:
  """Runs the preparation on `runner` and returns the manifest (None when the launcher
  cannot see out_dir, e.g. a mount that only the remote workers have).

  `workers`: DirectRunner processes (0 = the local cores; 1 runs in this process).
  `pipeline_args`: Beam pipeline options passed to the runner as they are.
  """
  del progress  # the runner reports progress (DirectRunner logs, Dataflow's console)
  d = cfg.data
  if not 0 <= d.eval_fraction < 1:
    raise DataError(f'data.eval_fraction={d.eval_fraction} must lie in [0, 1)')
  if d.tree_metric not in TREE_METRICS:
    raise ConfigError(f"data.tree_metric={d.tree_metric!r}; use 'l2' or 'cosine'")
  layout.check_posix(out_dir, '--out')
  layout.check_posix(d.embed_cache, 'data.embed_cache')
  out_dir = os.path.abspath(out_dir)
  cache_dir = os.path.abspath(d.embed_cache or os.path.join(out_dir, 'embed_cache'))
  # An output (or cache) directory inside the input one must not feed its own files back
  # in on a rerun.
  files, unsupported = ([p for p in found if not p.startswith((out_dir + os.sep, cache_dir + os.sep))]
                        for found in list_files(input_path_or_glob))
  if not files:
    raise DataError(f'input {input_path_or_glob!r} holds no readable file outside --out {out_dir}')
  fingerprint = _fingerprint(cfg, input_path_or_glob, files, unsupported)
  manifest_path = os.path.join(out_dir, layout.MANIFEST)
  if os.path.exists(manifest_path):
    manifest = _read_json(manifest_path)
    if manifest.get('fingerprint') != fingerprint:
      raise DataError(f'{out_dir} already holds a dataset prepared from other inputs or settings; '
                      'pass a new --out or delete that directory')
    return manifest
  os.makedirs(out_dir, exist_ok=True)
  for pattern in _OUTPUTS:  # a failed run's leftovers: start clean
    for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
      os.remove(path)
  job = _Job(cfg, input_path_or_glob, out_dir, cache_dir, fingerprint, len(unsupported))
  try:
    with beam.Pipeline(options=pipeline_options(runner, workers, pipeline_args)) as p:
      build(p, job, files)
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001 -- a worker's DataError comes back as the runner's error
    if found := re.search(r'DataError: (.+)', str(e)):
      raise DataError(found.group(1).strip()) from None
    raise
  return _read_json(manifest_path) if os.path.exists(manifest_path) else None


def pipeline_options(runner: str, workers: int, pipeline_args) -> PipelineOptions:
  """Beam options for `runner` ('direct' or a name of RUNNERS, or any Beam runner class)."""
  args = [f'--runner={RUNNERS.get(runner, runner)}', *pipeline_args]
  if runner == 'direct':
    workers = workers or os.cpu_count() or 1
    # One worker runs in this process; more are local processes (no binary, no network).
    mode = 'in_memory' if workers == 1 else 'multi_processing'
    args += [f'--direct_running_mode={mode}', f'--direct_num_workers={workers}']
  return PipelineOptions(args)


class _Job:
  """What every step needs to know: settings and paths, small and picklable."""

  def __init__(self, cfg, input_path, out_dir, cache_dir, fingerprint, unsupported):
    d, m = cfg.data, cfg.memory
    self.input_path, self.out_dir, self.cache_dir = input_path, out_dir, cache_dir
    self.fingerprint, self.unsupported = fingerprint, unsupported
    self.data = d.to_dict()
    self.k, self.depth, self.leaves = m.k, m.depth, m.k**m.depth
    self.vocab_size, self.seed = cfg.model.vocab_size, cfg.train.seed

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)


def build(p, job: _Job, files: list[str]) -> None:
  """The graph: read -> sample/fit -> embed/tree -> route -> group by leaf -> pack -> manifest."""
  d = job.data
  # Each pass lists the files anew: passes reading one PCollection would be fused into one
  # stage, which cannot wait for a side input that its own output feeds (the tree).
  inputs = lambda name: (p | f'{name}: files' >> beam.Create(list(enumerate(files)))  # noqa: E731
                         | f'{name}: spread' >> beam.Reshuffle())

  # Pass 1: count every record; the tokenizer and embedder's sample.
  read = inputs('read') | 'read' >> beam.ParDo(ReadSample(job)).with_outputs('stats', main='sample')
  stats = read.stats | 'sum read stats' >> beam.CombineGlobally(_sum_stats)
  fit = (read.sample | 'fit sample' >> beam.combiners.Top.Smallest(d['tokenizer_sample'])
         | 'fit tokenizer and embedder' >> beam.Map(fit_tokenizer_and_embedder, job,
                                                    beam.pvalue.AsSingleton(stats)))

  # Pass 2: embed into the cache; the tree's sample, read back from it.
  fit_side = lambda: beam.pvalue.AsSingleton(fit)  # noqa: E731 -- a new view per use
  embedded = inputs('embed') | 'embed' >> beam.ParDo(EmbedFile(job), fit_side()).with_outputs('cache', main='sample')
  lookups = embedded.cache | 'lookups' >> beam.combiners.ToList()
  tree = (embedded.sample | 'tree sample' >> beam.combiners.Top.Smallest(d['tree_sample'])
          | 'fit tree' >> beam.Map(fit_tree_on_sample, job, fit_side(), beam.pvalue.AsSingleton(lookups)))

  # Pass 3: tokenize and route; group by leaf; pack.
  routed = (inputs('route') | 'route' >> beam.ParDo(RouteFile(job), fit_side(), beam.pvalue.AsSingleton(tree))
            .with_outputs('cache', 'failed', main='docs'))
  shards = (routed.docs | 'group by leaf' >> beam.GroupByKey()
            | 'pack' >> beam.ParDo(PackLeaf(job), fit_side()))

  # Last: the manifest, once every shard is written.
  _ = (shards | 'shards' >> beam.combiners.ToList()
       | 'manifest' >> beam.Map(write_manifest, job, stats=beam.pvalue.AsSingleton(stats),
                                fit=fit_side(), tree=beam.pvalue.AsSingleton(tree),
                                lookups=beam.pvalue.AsSingleton(lookups),
                                relookups=_as_list(routed.cache, 'relookups'),
                                failed=_as_list(routed.failed, 'failed')))


def _as_list(pcoll, name: str):
  return beam.pvalue.AsSingleton(pcoll | name >> beam.combiners.ToList())


# Sampling: the k smallest hashes of (file, line, salt).


def key_hash(file_index: int, index_N: np.ndarray, salt: int = 0) -> np.ndarray:
  """A uniform 53-bit hash of each document key (file_index, index_N): splitmix64."""
  z = ((np.uint64(file_index) << np.uint64(32)) ^ index_N.astype(np.uint64)) ^ np.uint64(salt)
  z = z + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z = z ^ (z >> np.uint64(31))
  return z >> np.uint64(11)


def held_out(file_index: int, index_N: np.ndarray, fraction: float) -> np.ndarray:
  """Whether each document (file_index, index_N) is in the eval split."""
  return key_hash(file_index, index_N).astype(np.float64) * 2.0**-53 < fraction


def _salt(seed: int, stream: int) -> int:
  return (seed * 0x100000001B3 + stream) % 2**64 or 1


class ReadSample(beam.DoFn):
  """One file: every record counted; the file's documents with the smallest hashes."""

  def __init__(self, job: _Job):
    self.job = job

  def process(self, element):
    f, path = element
    d, stats = self.job.data, ReadStats()
    docs = list(read_documents(path, f, d['text_field'], stats))
    hashes = key_hash(f, np.array([doc.index for doc in docs], np.int64), _FIT_STREAM)
    yield from heapq.nsmallest(d['tokenizer_sample'], ((int(h), f, doc.index, doc.text)
                                                       for h, doc in zip(hashes.tolist(), docs)))
    for reason, count in stats.skipped.items():
      beam.metrics.Metrics.counter('skipped', reason).inc(count)
    yield beam.pvalue.TaggedOutput('stats', stats.to_json())


def _sum_stats(parts) -> dict:
  total = ReadStats()
  for part in parts:
    total.add(ReadStats.from_json(part))
  return total.to_json()


def fit_tokenizer_and_embedder(sample, job: _Job, stats: dict) -> dict:
  """Trains (or loads) the tokenizer, fits the embedder; writes both to out_dir."""
  d = job.data
  if not sample:
    raise DataError(f'input {job.input_path!r} has no usable document ({stats["read"]} records, '
                    f'skipped: {stats["skipped"]}); check the files and data.text_field={d["text_field"]!r}')
  texts = [text for *_, text in sorted(sample, key=lambda s: (s[1], s[2]))]  # (file, line) order
  tokenizer = Tokenizer.load(d['tokenizer']) if d['tokenizer'] else Tokenizer.train(texts, job.vocab_size)
  if tokenizer.vocab_size > job.vocab_size:
    raise DataError(f'the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={job.vocab_size}; '
                    f'set --config.model.vocab_size={tokenizer.vocab_size} or more')
  make_embedder(_AttrDict(d), fit_texts=texts).save(job.out_dir)
  tokenizer.save(job.path('tokenizer.json'))
  return {'sample_documents': len(texts), 'vocab_size': tokenizer.vocab_size, 'eot_id': tokenizer.eot_id,
          'tokenizer_sha256': tokenizer.identity}


class _AttrDict(dict):
  """cfg.data as a plain dict (picklable) that make_embedder reads by attribute."""

  __getattr__ = dict.__getitem__


class _Loaded(beam.DoFn):
  """A DoFn that loads the fit (tokenizer, embedder, cache, tree) once per worker: the
  files exist once their side input has arrived, so the first element loads them."""

  def __init__(self, job: _Job):
    self.job = job
    self._fit = None

  def load(self, fit: dict, tree: dict | None = None) -> None:
    if self._fit != (fit, tree):
      self.embedder = load_embedder(self.job.out_dir)
      self.tokenizer = Tokenizer.load(self.job.path('tokenizer.json'))
      self.cache = EmbeddingCache(self.job.cache_dir, self.embedder)
      self.tree = Tree.load(self.job.path('tree.npz')) if tree else None
      self._fit = (fit, tree)

  def source(self, path: str) -> dict:
    """What decides a file's documents, in order: the embedding cache's key for them."""
    st = stamp(path)
    return {'file': path, 'size': st.size, 'mtime_ns': st.mtime_ns, 'text_field': self.job.data['text_field'],
            'chunk': _CHUNK}

  def vectors(self, path: str, docs: list):
    """(the file's [N, dim] vectors, cache status, cache key): cached, or embedded and stored.

    A document the embedder cannot take gets a NaN row (it is skipped downstream)."""
    source = self.source(path)
    key = EmbeddingCache.key(**source)
    cached_NxD, status = self.cache.load(key)
    if cached_NxD is not None and cached_NxD.shape[0] == len(docs):
      return cached_NxD, status, key
    if cached_NxD is not None:  # checksummed vectors of another version of the file
      status = 'rejected'
    nan_D = np.full(self.embedder.dim, np.nan, np.float32)
    rows = [nan_D if row is None else row for lo in range(0, len(docs), _CHUNK)
            for row in _each(self.embed, [doc.text for doc in docs[lo:lo + _CHUNK]])]
    vectors_NxD = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.embedder.dim), np.float32)
    self.cache.store(key, vectors_NxD, source)
    return vectors_NxD, status, key

  def embed(self, texts):
    return self.embedder.embed(texts, progress=False)


def _each(fn, texts: list[str]) -> list:
  """fn(texts) as a list; when the batch raises, each text alone, None for those that raise."""
  try:
    return list(fn(texts))
  except Exception:  # noqa: BLE001 -- a bad document must not stop the corpus
    out = []
    for text in texts:
      try:
        out.append(fn([text])[0])
      except Exception:  # noqa: BLE001
        out.append(None)
    return out


class EmbedFile(_Loaded):
  """One file's vectors into the cache; its training documents with the smallest tree hashes."""

  def process(self, element, fit):
    f, path = element
    self.load(fit)
    docs = list(read_documents(path, f, self.job.data['text_field'], ReadStats()))
    vectors_NxD, status, key = self.vectors(path, docs)
    yield beam.pvalue.TaggedOutput('cache', (f, key, len(docs), status))
    index_N = np.array([doc.index for doc in docs], np.int64)
    usable_N = ~held_out(f, index_N, self.job.data['eval_fraction']) & ~np.isnan(vectors_NxD[:, 0])
    rows = np.flatnonzero(usable_N)
    hashes = key_hash(f, index_N[rows], _salt(self.job.seed, _TREE_STREAM))
    yield from heapq.nsmallest(self.job.data['tree_sample'],
                               zip(hashes.tolist(), itertools.repeat(f), rows.tolist()))


def fit_tree_on_sample(sample, job: _Job, fit: dict, lookups: list) -> dict:
  """Fits the tree on the sampled documents' cached vectors (in (file, line) order)."""
  del fit  # only orders this step after the fit
  d = job.data
  if not sample:
    raise DataError(f'no training document to fit the tree on: every document is held out; '
                    f'lower data.eval_fraction={d["eval_fraction"]}')
  entries = {f: (key, rows) for f, key, rows, _ in lookups}
  cache = EmbeddingCache(job.cache_dir, load_embedder(job.out_dir))
  by_file = collections.defaultdict(list)
  for _, f, row in sample:
    by_file[f].append(row)
  emb_NxD = np.concatenate([np.asarray(cache.rows(*entries[f])[sorted(rows)]) for f, rows in sorted(by_file.items())])
  tree = fit_tree(emb_NxD, job.k, job.depth, seed=job.seed, samples=d['kmeans_samples'], steps=d['kmeans_steps'],
                  balance=d['balance'], spherical=d['tree_metric'] == 'cosine', progress=False)
  tree.save(job.path('tree.npz'))
  return {'tree_documents': len(sample)}


class RouteFile(_Loaded):
  """One file's documents tokenized and routed: (leaf, documents of that leaf) per leaf."""

  def process(self, element, fit, tree):
    f, path = element
    self.load(fit, tree)
    docs = list(read_documents(path, f, self.job.data['text_field'], ReadStats()))
    # The embed pass stored these vectors; they are looked up again (and counted) only
    # when the file changed or its entry went bad since.
    vectors_NxD, status, _ = self.vectors(path, docs)
    if status != 'hit':
      yield beam.pvalue.TaggedOutput('cache', status)
    failed = collections.Counter(embed_error=int(np.isnan(vectors_NxD[:, 0]).sum()))
    keep = [i for i in range(len(docs)) if not np.isnan(vectors_NxD[i, 0])]
    tokens, kept = [], []
    for lo in range(0, len(keep), _CHUNK):
      chunk = keep[lo:lo + _CHUNK]
      for i, ids in zip(chunk, _each(self.tokenizer.encode, [docs[i].text for i in chunk])):
        if ids is None:
          failed['tokenize_error'] += 1
        else:
          tokens.append(ids)
          kept.append(i)
    for reason, count in failed.items():
      if count:
        beam.metrics.Metrics.counter('skipped', reason).inc(count)
    yield beam.pvalue.TaggedOutput('failed', dict(failed))
    if not kept:
      return
    leaf_N = np.concatenate([route(self.tree, vectors_NxD[kept[lo:lo + _CHUNK]])
                             for lo in range(0, len(kept), _CHUNK)])
    index_N = np.array([docs[i].index for i in kept], np.int64)
    lengths_N = np.array([len(t) for t in tokens], np.int64)
    dtype = layout.token_dtype(fit['vocab_size'])
    tokens_T = np.concatenate(tokens).astype(dtype)
    starts_N = np.cumsum(lengths_N) - lengths_N
    held_N = held_out(f, index_N, self.job.data['eval_fraction'])
    for leaf in np.unique(leaf_N):
      mine = np.flatnonzero(leaf_N == leaf)
      yield int(leaf), (f, index_N[mine], held_N[mine], lengths_N[mine],
                        _concat_ranges(tokens_T, starts_N[mine], lengths_N[mine]))


def _concat_ranges(tokens: np.ndarray, starts_N: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
  """tokens[starts[0]:starts[0]+lengths[0]], tokens[starts[1]:...], ... concatenated."""
  shift_N = starts_N - (np.cumsum(lengths_N) - lengths_N)
  return tokens[np.repeat(shift_N, lengths_N) + np.arange(lengths_N.sum())]


class PackLeaf(beam.DoFn):
  """One leaf's documents, in (file, line) order, packed into its train and eval shards."""

  def __init__(self, job: _Job):
    self.job = job

  def process(self, element, fit):
    leaf, parts = element
    parts = sorted(parts, key=lambda part: part[0])  # by file; lines are in order within one
    file_N = np.concatenate([np.full(len(part[1]), part[0]) for part in parts])
    index_N, held_N, lengths_N, tokens_T = (np.concatenate([part[i] for part in parts]) for i in range(1, 5))
    assert (np.diff(file_N * 2**32 + index_N) > 0).all(), 'a document reached its leaf twice'
    starts_N = np.cumsum(lengths_N) - lengths_N
    summary = {'leaf': leaf, 'documents': len(index_N)}
    for split in layout.SPLITS:
      mine = np.flatnonzero(held_N == (split == 'eval'))
      name = layout.shard_name(split, leaf, self.job.leaves)
      sequences, tokens = write_shard(
          self.job.path(name), _concat_ranges(tokens_T, starts_N[mine], lengths_N[mine]), lengths_N[mine], leaf,
          self.job.data['seq_len'], fit['eot_id'], layout.token_dtype(fit['vocab_size']))
      summary[split] = {'file': name if sequences else None, 'documents': int(mine.size),
                        'sequences': sequences, 'tokens': tokens}
    yield summary


def write_manifest(shards: list, job: _Job, *, stats, fit, tree, lookups, relookups, failed) -> None:
  """manifest.json from the leaves' summaries: the pipeline's last write."""
  shards = sorted(shards, key=lambda s: s['leaf'])
  read = ReadStats.from_json(stats)
  for counts in failed:
    for reason, count in counts.items():
      if count:  # documents read and kept, then dropped by a step that raised on them
        read.kept -= count
        read.skipped[reason] += count
  statuses = [status for *_, status in lookups] + list(relookups)
  seq_len = job.data['seq_len']
  splits = {}
  for split in layout.SPLITS:
    parts = [s[split] for s in shards]
    sequences, tokens = sum(p['sequences'] for p in parts), sum(p['tokens'] for p in parts)
    splits[split] = {
        'documents': sum(p['documents'] for p in parts), 'sequences': sequences, 'tokens': tokens,
        'padding_fraction': _padding(sequences, tokens, seq_len),
        'shards': [{'file': p['file'], 'sequences': p['sequences']} for p in parts if p['file']],
    }
  leaf_documents = np.zeros(job.leaves, np.int64)
  for s in shards:
    leaf_documents[s['leaf']] = s['documents']
  occupancy = tree_stats(Tree.load(job.path('tree.npz')), leaf_documents)
  sequences = sum(s['sequences'] for s in splits.values())
  tokens = sum(s['tokens'] for s in splits.values())
  manifest = {
      'format': layout.FORMAT, 'version': layout.VERSION, 'fingerprint': job.fingerprint,
      'input': job.input_path, 'files': len(lookups), 'files_unsupported': job.unsupported,
      'documents_read': read.read, 'documents_kept': read.kept, 'skipped': read.to_json()['skipped'],
      'sample_documents': fit['sample_documents'], 'tree_documents': tree['tree_documents'],
      'sequences': sequences, 'tokens': tokens, 'padding_fraction': _padding(sequences, tokens, seq_len),
      'seq_len': seq_len, 'vocab_size': fit['vocab_size'], 'eot_id': fit['eot_id'],
      'tokenizer_sha256': fit['tokenizer_sha256'], 'pad_id': fit['eot_id'],
      'token_dtype': layout.token_dtype(fit['vocab_size']).name,
      'k': job.k, 'depth': job.depth, 'leaves': job.leaves, 'embedder': job.data['embedder'],
      'embed_cache': {'hits': statuses.count('hit'), 'misses': len(statuses) - statuses.count('hit'),
                      'rejected': statuses.count('rejected')},
      'eval_fraction': job.data['eval_fraction'], 'splits': splits,
      'occupancy': {str(level): v for level, v in occupancy.items()},
  }
  with atomic_write(job.path(layout.MANIFEST)) as f:
    json.dump(manifest, f, indent=1)
    f.write('\n')


# Data keys added after datasets were prepared, with the value that does what was done
# before them: at that value a key stays out of the fingerprint, so those datasets are
# still recognised as done.
_ADDED_KEYS = {'tfidf_min_df': 0, 'tree_metric': 'l2'}


def _fingerprint(cfg, input_path, files, unsupported) -> str:
  """A hash of everything the output depends on: a rerun with the same one is done."""
  # Where the embedding cache lives does not change the output.
  data = {k: v for k, v in cfg.data.items()
          if k not in ('source', 'path', 'embed_cache') and not (k in _ADDED_KEYS and v == _ADDED_KEYS[k])}
  stamps = [(p, st.size, st.mtime) for p, st in zip(files, map(stamp, files))]
  key = json.dumps([input_path, stamps, unsupported, data, cfg.memory.k, cfg.memory.depth,
                    cfg.model.vocab_size, cfg.train.seed], sort_keys=True, default=str)
  return hashlib.sha256(key.encode()).hexdigest()[:20]


def _padding(sequences: int, tokens: int, seq_len: int) -> float:
  return 1.0 - tokens / (sequences * seq_len) if sequences else 0.0


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)
