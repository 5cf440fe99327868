"""`hmem prepare` as one Apache Beam pipeline: raw documents -> a tokenized, clustered, packed dataset.

The unit of work is a range of an input file (ranges.py: byte ranges of JSONL, row groups of
Parquet, whole compressed or text files), so one large file keeps every worker busy; within
a range, documents stream through each pass in chunks of _CHUNK, so no worker holds a file
or a range. The graph, in the order the data flows (docs/DECISIONS.md, "Prepare on Apache Beam"):

  count     the lines of each byte range that another range of its file follows: then every
            range knows the key (file, line or row) of its first record, and a document's
            key is the same whatever the cut.
  read      every range is read three times, each time by the worker that holds it:
            documents are never kept between the passes, only what each pass yields.
  sample    pass 1 counts every record (skips by reason), per range, and yields, per range,
            its documents with the data.tokenizer_sample smallest hashes of (file, line);
            Top.Smallest keeps the global smallest: a uniform, seeded sample, the same
            whatever the parallelism or the cut, drawn without an index of the corpus.
  fit       one worker trains (or loads) the tokenizer and fits the embedder on that sample
            and writes tokenizer.json and the embedder's files; the rest read them.
  embed     pass 2 embeds each range's documents into the embedding cache (a hit costs a
            read) and yields the data.tree_sample training documents with the smallest
            hashes of (file, line, train.seed); one worker reads their vectors back from the cache
            and fits the tree (JAX, tree.fit_tree), writing tree.npz.
  route     pass 3 tokenizes each range's documents and routes their cached vectors; each
            document goes to its leaf's block of the range's temporary file (routed.py), and
            only where those blocks lie goes through the shuffle.
  pack      GroupByKey on the leaf; each leaf's blocks, read back in (file, line) order, are
            packed into one train and one eval ArrayRecord shard (a leaf's documents are the
            most any worker holds).
  manifest  one worker writes manifest.json from the shards' summaries, last, then removes
            the temporary files: a failed pipeline leaves no manifest, so `hmem train`
            refuses the directory, and a rerun clears what the failed one left and starts again.

Every step is idempotent (files appear by atomic renames), as Beam retries bundles. A
document that makes the embedder or tokenizer raise is skipped and counted
(embed_error, tokenize_error), never fatal. Skipped records are counted as data that flows
into the manifest (exact under retries) and as Beam counters (the runner's monitoring).
data.filter (filters.py) drops records by their other fields, counted as 'filtered'.

The input may lie on an object store (gs://, s3://: inputs.py reads it through
etils.epath); out_dir and data.embed_cache must be POSIX directories that every worker
sees (a local disk, NFS or a gcsfuse mount), since the shards are ArrayRecord files and
cached vectors are memory-mapped: a URL for either is refused before any input is read.

Embeddings are cached on disk (data.embed_cache, by default out_dir/embed_cache, which
outlives the run): each range's under its file's absolute path, size and mtime, the range's
bounds, data.text_field and data.filter, within a directory per embedder identity
(embed.EmbeddingCache). A later preparation of the same corpus with the same embedder --
another tree, say, written to another --out -- reads them back instead of embedding again;
the cache never changes the output. The manifest counts the lookups (one per range, plus
one per range the route pass found unusable) as embed_cache {hits, misses, rejected}.

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
import json
import os
import re
import shutil

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from hmem.data import layout, ranges
from hmem.data.embed import EmbeddingCache, load_embedder, make_embedder
from hmem.data.filters import parse_filter
from hmem.data.inputs import ReadStats, file_format, list_files, read_range, stamp
from hmem.data.packing import write_shard
from hmem.data.routed import gather_ranges, read_blocks, routed_file
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
ROUTED = 'routed-tmp'  # out_dir's directory of the route pass's temporary files
# What a failed run may have left in out_dir: removed before a run starts.
_OUTPUTS = ('*.array_record', '*.tmp-*', 'tokenizer.json', 'tree.npz', 'embedder*')


def prepare(cfg, input_path_or_glob: str, out_dir: str, *, runner: str = 'direct', workers: int = 0,
            pipeline_args=(), progress: bool = True, range_bytes: int = ranges.RANGE_BYTES) -> dict | None:
  """Runs the preparation on `runner` and returns the manifest (None when the launcher
  cannot see out_dir, e.g. a mount that only the remote workers have).

  `workers`: DirectRunner processes (0 = the local cores; 1 runs in this process).
  `pipeline_args`: Beam pipeline options passed to the runner as they are.
  `range_bytes`: the size of a JSONL byte range and of a Parquet range's row groups
  (ranges.py); the output does not depend on it, only the parallelism and the cache's keys.
  """
  del progress  # the runner reports progress (DirectRunner logs, Dataflow's console)
  d = cfg.data
  if not 0 <= d.eval_fraction < 1:
    raise DataError(f'data.eval_fraction={d.eval_fraction} must lie in [0, 1)')
  if d.tree_metric not in TREE_METRICS:
    raise ConfigError(f"data.tree_metric={d.tree_metric!r}; use 'l2' or 'cosine'")
  if range_bytes < 1:
    raise ConfigError(f'a range of {range_bytes} bytes (--range-mb) cannot hold a record; give at least 1 byte')
  keep = parse_filter(d.filter)
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
  if keep and (texts := [p for p in files if file_format(p) == 'text']):
    raise DataError(f'data.filter={d.filter!r} reads record fields, which text files have none of '
                    f'({len(texts)} in the input, e.g. {texts[0]}); leave them out of --input or drop the filter')
  fingerprint = _fingerprint(cfg, input_path_or_glob, files, unsupported)
  manifest_path = os.path.join(out_dir, layout.MANIFEST)
  if os.path.exists(manifest_path):
    manifest = _read_json(manifest_path)
    if manifest.get('fingerprint') != fingerprint:
      raise DataError(f'{out_dir} already holds a dataset prepared from other inputs or settings; '
                      'pass a new --out or delete that directory')
    return manifest
  cut = ranges.plan_ranges(files, range_bytes, keep.columns if keep else ())
  os.makedirs(out_dir, exist_ok=True)
  for pattern in _OUTPUTS:  # a failed run's leftovers: start clean
    for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
      os.remove(path)
  shutil.rmtree(os.path.join(out_dir, ROUTED), ignore_errors=True)
  job = _Job(cfg, input_path_or_glob, out_dir, cache_dir, fingerprint, len(files), len(unsupported))
  try:
    with beam.Pipeline(options=pipeline_options(runner, workers, pipeline_args)) as p:
      build(p, job, cut)
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

  def __init__(self, cfg, input_path, out_dir, cache_dir, fingerprint, files, unsupported):
    d, m = cfg.data, cfg.memory
    self.input_path, self.out_dir, self.cache_dir = input_path, out_dir, cache_dir
    self.fingerprint, self.files, self.unsupported = fingerprint, files, unsupported
    self.data = d.to_dict()
    self.keep = parse_filter(d.filter)
    self.k, self.depth, self.leaves = m.k, m.depth, m.k**m.depth
    self.vocab_size, self.seed = cfg.model.vocab_size, cfg.train.seed

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)

  def routed(self, range_id: int) -> str:
    return os.path.join(self.out_dir, ROUTED, f'{range_id:08d}.bin')


def build(p, job: _Job, cut: list) -> None:
  """The graph: count -> read -> sample/fit -> embed/tree -> route -> group by leaf -> pack -> manifest."""
  d = job.data
  # Each pass lists the ranges anew: passes reading one PCollection would be fused into one
  # stage, which cannot wait for a side input that its own output feeds (the tree).
  inputs = lambda name, elements: (p | f'{name}: ranges' >> beam.Create(elements)  # noqa: E731
                                   | f'{name}: spread' >> beam.Reshuffle())

  # The key of each range's first record.
  firsts = (inputs('count', ranges.counted(cut)) | 'count lines' >> beam.Map(lambda r: (r.id, ranges.count_lines(r)))
            | 'line counts' >> beam.combiners.ToList()
            | 'first keys' >> beam.Map(lambda counts: ranges.first_keys(cut, dict(counts))))

  # Pass 1: count every record; the tokenizer and embedder's sample.
  read = (inputs('read', cut) | 'read' >> beam.ParDo(ReadSample(job), beam.pvalue.AsSingleton(firsts))
          .with_outputs('stats', main='sample'))
  per_range = read.stats | 'range stats' >> beam.combiners.ToList()
  stats = per_range | 'sum read stats' >> beam.Map(_sum_stats)
  # {range id: (first key, kept documents)}: where a range's documents start, and how many
  # vectors it has in the cache.
  extents = per_range | 'extents' >> beam.Map(
      lambda parts, firsts: {r: (firsts[r], s['kept']) for r, s in parts}, beam.pvalue.AsSingleton(firsts))
  fit = (read.sample | 'fit sample' >> beam.combiners.Top.Smallest(d['tokenizer_sample'])
         | 'fit tokenizer and embedder' >> beam.Map(fit_tokenizer_and_embedder, job,
                                                    beam.pvalue.AsSingleton(stats)))

  # Pass 2: embed into the cache; the tree's sample, read back from it.
  fit_side = lambda: beam.pvalue.AsSingleton(fit)  # noqa: E731 -- a new view per use
  extents_side = lambda: beam.pvalue.AsSingleton(extents)  # noqa: E731
  embedded = (inputs('embed', cut) | 'embed' >> beam.ParDo(EmbedRange(job), fit_side(), extents_side())
              .with_outputs('cache', main='sample'))
  lookups = embedded.cache | 'lookups' >> beam.combiners.ToList()
  tree = (embedded.sample | 'tree sample' >> beam.combiners.Top.Smallest(d['tree_sample'])
          | 'fit tree' >> beam.Map(fit_tree_on_sample, job, fit_side(), beam.pvalue.AsSingleton(lookups)))

  # Pass 3: tokenize and route into temporary files; group their blocks by leaf; pack.
  routed = (inputs('route', cut)
            | 'route' >> beam.ParDo(RouteRange(job), fit_side(), beam.pvalue.AsSingleton(tree), extents_side())
            .with_outputs('cache', 'failed', main='blocks'))
  shards = (routed.blocks | 'group by leaf' >> beam.GroupByKey()
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


class _Smallest:
  """The k entries (hash, file, key, *payload) of smallest (hash, file, key) seen so far,
  fed a chunk at a time: once k are held, only hashes under the largest held are looked at."""

  def __init__(self, k: int):
    self.k, self._heap = k, []  # a max-heap: entries negated

  def add(self, hash_N: np.ndarray, file_index: int, key_N: np.ndarray, payloads) -> None:
    """Entries of one file: their hashes, keys and payloads (tuples)."""
    if not self.k:
      return
    rows = np.arange(len(hash_N)) if len(self._heap) < self.k else np.flatnonzero(hash_N <= -self._heap[0][0])
    payloads = list(payloads)
    for row, h, key in zip(rows.tolist(), hash_N[rows].tolist(), key_N[rows].tolist()):
      entry = (-h, -file_index, -key, payloads[row])
      if len(self._heap) < self.k:
        heapq.heappush(self._heap, entry)
      elif entry > self._heap[0]:
        heapq.heapreplace(self._heap, entry)

  def items(self) -> list[tuple]:
    return [(-h, -f, -key, *payload) for h, f, key, payload in self._heap]


def _chunks(docs, size: int = _CHUNK):
  """Lists of up to `size` documents."""
  chunk = []
  for doc in docs:
    chunk.append(doc)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


class ReadSample(beam.DoFn):
  """One range: every record counted; the range's documents with the smallest hashes."""

  def __init__(self, job: _Job):
    self.job = job

  def process(self, rng, firsts):
    d, stats = self.job.data, ReadStats()
    sample = _Smallest(d['tokenizer_sample'])
    rng = rng._replace(first=firsts[rng.id])
    for docs in _chunks(read_range(rng, d['text_field'], stats, self.job.keep)):
      key_N = np.array([doc.index for doc in docs], np.int64)
      sample.add(key_hash(rng.file, key_N, _FIT_STREAM), rng.file, key_N, ((doc.text,) for doc in docs))
    yield from sample.items()
    for reason, count in stats.skipped.items():
      beam.metrics.Metrics.counter('skipped', reason).inc(count)
    yield beam.pvalue.TaggedOutput('stats', (rng.id, stats.to_json()))


def _sum_stats(parts) -> dict:
  total = ReadStats()
  for _, part in parts:
    total.add(ReadStats.from_json(part))
  return total.to_json()


def fit_tokenizer_and_embedder(sample, job: _Job, stats: dict) -> dict:
  """Trains (or loads) the tokenizer, fits the embedder; writes both to out_dir."""
  d = job.data
  if not sample:
    raise DataError(f'input {job.input_path!r} has no usable document ({stats["read"]} records, '
                    f'skipped: {stats["skipped"]}); check the files, data.text_field={d["text_field"]!r} '
                    f'and data.filter={d["filter"]!r}')
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

  def source(self, rng) -> dict:
    """What decides a range's documents, in order: the embedding cache's key for them."""
    st, d = stamp(rng.path), self.job.data
    return {'file': rng.path, 'size': st.size, 'mtime_ns': st.mtime_ns, 'text_field': d['text_field'],
            'filter': d['filter'], 'chunk': _CHUNK, 'unit': rng.unit, 'start': rng.start, 'stop': rng.stop}

  def vectors(self, rng, kept: int):
    """(cache status, cache key, chunks): the range's documents in chunks, each with its
    [n, D] vectors, read from the cache or embedded and stored into it as they go.

    A document the embedder cannot take gets a NaN row (it is skipped downstream)."""
    source = self.source(rng)
    key = EmbeddingCache.key(**source)
    status = self.cache.load(key, kept)
    docs = _chunks(read_range(rng, self.job.data['text_field'], ReadStats(), self.job.keep))
    if status == 'hit':
      return status, key, self._cached(docs, key, kept)
    return status, key, self._embedded(docs, key, source, kept)

  def _cached(self, docs, key: str, kept: int):
    for chunk, vectors_NxD in zip(docs, self.cache.read(key, kept, _CHUNK), strict=True):
      yield chunk, vectors_NxD

  def _embedded(self, docs, key: str, source: dict, kept: int):
    nan_D = np.full(self.embedder.dim, np.nan, np.float32)
    with self.cache.writer(key, source, kept) as append:
      for chunk in docs:
        rows = _each(self.embed, [doc.text for doc in chunk])
        vectors_NxD = np.stack([nan_D if row is None else row for row in rows]).astype(np.float32)
        append(vectors_NxD)
        yield chunk, vectors_NxD

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


class EmbedRange(_Loaded):
  """One range's vectors into the cache; its training documents with the smallest tree hashes."""

  def process(self, rng, fit, extents):
    self.load(fit)
    first, kept = extents[rng.id]
    rng = rng._replace(first=first)
    status, key, chunks = self.vectors(rng, kept)
    sample, row = _Smallest(self.job.data['tree_sample']), 0
    for docs, vectors_NxD in chunks:
      key_N = np.array([doc.index for doc in docs], np.int64)
      usable_N = ~held_out(rng.file, key_N, self.job.data['eval_fraction']) & ~np.isnan(vectors_NxD[:, 0])
      rows = np.flatnonzero(usable_N)
      sample.add(key_hash(rng.file, key_N[rows], _salt(self.job.seed, _TREE_STREAM)), rng.file, key_N[rows],
                 ((rng.id, row + r) for r in rows.tolist()))
      row += len(docs)
    yield beam.pvalue.TaggedOutput('cache', (rng.id, key, kept, status))
    yield from sample.items()


def fit_tree_on_sample(sample, job: _Job, fit: dict, lookups: list) -> dict:
  """Fits the tree on the sampled documents' cached vectors (in (file, line) order)."""
  del fit  # only orders this step after the fit
  d = job.data
  if not sample:
    raise DataError(f'no training document to fit the tree on: every document is held out; '
                    f'lower data.eval_fraction={d["eval_fraction"]}')
  entries = {r: (key, rows) for r, key, rows, _ in lookups}
  cache = EmbeddingCache(job.cache_dir, load_embedder(job.out_dir))
  by_range = collections.defaultdict(list)
  for *_, r, row in sample:
    by_range[r].append(row)
  emb_NxD = np.concatenate([np.asarray(cache.rows(*entries[r])[sorted(rows)]) for r, rows in sorted(by_range.items())])
  tree = fit_tree(emb_NxD, job.k, job.depth, seed=job.seed, samples=d['kmeans_samples'], steps=d['kmeans_steps'],
                  balance=d['balance'], spherical=d['tree_metric'] == 'cosine', progress=False)
  tree.save(job.path('tree.npz'))
  return {'tree_documents': len(sample)}


class RouteRange(_Loaded):
  """One range's documents tokenized and routed into its temporary file: (leaf, where the
  leaf's documents lie in it) per leaf."""

  def process(self, rng, fit, tree, extents):
    self.load(fit, tree)
    first, kept = extents[rng.id]
    rng = rng._replace(first=first)
    # The embed pass stored these vectors; they are looked up again (and counted) only
    # when the range's file changed or its entry went bad since.
    status, _, chunks = self.vectors(rng, kept)
    if status != 'hit':
      yield beam.pvalue.TaggedOutput('cache', status)
    failed = collections.Counter()
    os.makedirs(os.path.dirname(self.job.routed(rng.id)), exist_ok=True)
    with routed_file(self.job.routed(rng.id), layout.token_dtype(fit['vocab_size'])) as out:
      for docs, vectors_NxD in chunks:
        embedded = np.flatnonzero(~np.isnan(vectors_NxD[:, 0])).tolist()
        ids = _each(self.tokenizer.encode, [docs[i].text for i in embedded])
        kept = [(i, t) for i, t in zip(embedded, ids) if t is not None]
        failed['embed_error'] += len(docs) - len(embedded)
        failed['tokenize_error'] += len(embedded) - len(kept)
        if kept:
          rows = np.array([i for i, _ in kept])
          out.add(self.route(vectors_NxD[rows]), np.array([docs[i].index for i in rows], np.int64),
                  [t for _, t in kept])
    for reason, count in failed.items():
      if count:
        beam.metrics.Metrics.counter('skipped', reason).inc(count)
    yield beam.pvalue.TaggedOutput('failed', dict(failed))
    for leaf, blocks in out.blocks.items():
      yield leaf, (rng.id, rng.file, blocks)

  def route(self, x_NxD: np.ndarray) -> np.ndarray:
    """Leaves of up to _CHUNK vectors, routed as one padded batch of _CHUNK: one compiled
    shape, not one per power of two under it (a row's leaf does not depend on the batch)."""
    return route(self.tree, np.pad(x_NxD, ((0, _CHUNK - len(x_NxD)), (0, 0))))[:len(x_NxD)]


class PackLeaf(beam.DoFn):
  """One leaf's documents, read back in (file, line) order, packed into its train and eval shards."""

  def __init__(self, job: _Job):
    self.job = job

  def process(self, element, fit):
    leaf, parts = element
    dtype = layout.token_dtype(fit['vocab_size'])
    parts = sorted(parts)  # by range: (file, line) order
    read = [read_blocks(self.job.routed(r), blocks, dtype) for r, _, blocks in parts]
    file_N = np.concatenate([np.full(len(index_N), f) for (_, f, _), (index_N, _, _) in zip(parts, read)])
    index_N, lengths_N, tokens_T = (np.concatenate(a) for a in zip(*read))
    assert (np.diff(file_N * 2**32 + index_N) > 0).all(), 'a document reached its leaf twice'
    held_N = np.concatenate([held_out(f, index_N, self.job.data['eval_fraction'])
                             for (_, f, _), (index_N, _, _) in zip(parts, read)])
    starts_N = np.cumsum(lengths_N) - lengths_N
    summary = {'leaf': leaf, 'documents': len(index_N)}
    for split in layout.SPLITS:
      mine = np.flatnonzero(held_N == (split == 'eval'))
      name = layout.shard_name(split, leaf, self.job.leaves)
      sequences, tokens = write_shard(
          self.job.path(name), gather_ranges(tokens_T, starts_N[mine], lengths_N[mine]), lengths_N[mine], leaf,
          self.job.data['seq_len'], fit['eot_id'], dtype)
      summary[split] = {'file': name if sequences else None, 'documents': int(mine.size),
                        'sequences': sequences, 'tokens': tokens}
    yield summary


def write_manifest(shards: list, job: _Job, *, stats, fit, tree, lookups, relookups, failed) -> None:
  """manifest.json from the leaves' summaries: the pipeline's last write; then the route
  pass's temporary files go."""
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
      'input': job.input_path, 'files': job.files, 'files_unsupported': job.unsupported, 'ranges': len(lookups),
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
  shutil.rmtree(job.path(ROUTED), ignore_errors=True)


# Data keys added after datasets were prepared, with the value that does what was done
# before them: at that value a key stays out of the fingerprint, so those datasets are
# still recognised as done.
_ADDED_KEYS = {'tfidf_min_df': 0, 'tree_metric': 'l2', 'filter': ''}


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
