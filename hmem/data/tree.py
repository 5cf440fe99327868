"""Balanced hierarchical k-means tree over document embeddings, and greedy routing.

The tree is complete: level l = 1..depth has k**l nodes, stored as one [k**l, D] centroid
array. Node j of level l has parent j // k at level l-1, so the children of a node are
contiguous and a leaf id (a level-`depth` node) encodes its whole path: the level-l
ancestor of leaf i is i // k**(depth - l). Nodes may be empty; the tree keeps its shape so
memory-bank rows can be indexed by node id.

Fitting follows the paper, root to leaf. At each node: k-means++ seeds k centroids on one
batch of `samples` of the node's documents, then each of `steps` EM steps takes the next
`samples` documents, assigns them to the nearest centroid, applies the balancing rule and
re-estimates the centroids. The batches walk a seeded random permutation of the node's
documents, so they are fresh (drawn without replacement) as long as the node holds
(steps + 1) * samples documents; a smaller node cycles through its documents, each used
equally often (within one). Every node of a level is fit by the same jitted function,
vmapped over a chunk of nodes whose node axis is split over the local devices
(`shard_map`: each device fits its own nodes, with no communication). Children are fit on
the documents that `route` (the greedy descent used for the whole corpus) sends to their
parent, so the fit and the final routing agree.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from hmem.errors import ConfigError, DataError
from hmem.files import as_path, atomic_write

# Working-set budget of one jitted level-fit call; sets how many nodes are vmapped at once.
_CHUNK_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class Tree:
  """A complete k-ary tree of centroids: `centroids[l-1]` is level l's [k**l, D] array."""

  k: int
  depth: int
  centroids: tuple[np.ndarray, ...]

  def __post_init__(self):
    if self.k < 2 or self.depth < 1:
      raise ValueError(f'a tree needs k >= 2 and depth >= 1, got k={self.k}, depth={self.depth}')
    if len(self.centroids) != self.depth:
      raise ValueError(f'depth={self.depth} but {len(self.centroids)} centroid levels')
    centroids = tuple(np.asarray(c, np.float32) for c in self.centroids)
    dim = centroids[0].shape[1] if centroids[0].ndim == 2 else 'D'
    for level, c in enumerate(centroids, 1):
      if c.shape != (self.k**level, dim):
        raise ValueError(f'level {level} centroids have shape {c.shape}, '
                         f'expected ({self.k**level}, {dim})')
      if not np.isfinite(c).all():
        raise ValueError(f'level {level} centroids are not all finite')
    object.__setattr__(self, 'centroids', centroids)

  @property
  def dim(self) -> int:
    return self.centroids[0].shape[1]

  def save(self, path: str | os.PathLike) -> None:
    """Writes k, depth and level_1..level_depth to an .npz, atomically (no half-written file)."""
    with atomic_write(path, 'wb') as f:
      np.savez(f, k=np.int64(self.k), depth=np.int64(self.depth),
               **{f'level_{l}': c for l, c in enumerate(self.centroids, 1)})

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tree:
    """Reads a tree written by `save`; errors name a missing, corrupt or inconsistent file."""
    try:
      with np.load(io.BytesIO(as_path(path).read_bytes()), allow_pickle=False) as z:
        k, depth = int(z['k']), int(z['depth'])
        return cls(k, depth, tuple(z[f'level_{l}'] for l in range(1, depth + 1)))
    except FileNotFoundError:
      raise DataError(f'tree file {path} does not exist; build it with `hmem prepare`') from None
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile,
            pickle.UnpicklingError) as e:
      raise DataError(f'tree file {path} is corrupt or not a tree ({type(e).__name__}: {e}); '
                       'rebuild it with `hmem prepare`') from None


def fit_tree(emb_NxD, k: int, depth: int, *, seed: int, samples: int = 6400, steps: int = 20,
             balance: float = 1.5, spherical: bool = False, devices=None, progress: bool = True) -> Tree:
  """Fits a balanced hierarchical k-means tree to embeddings (L2-normalised rows), root to leaf.

  `emb_NxD` is the fit sample (numpy, possibly memory-mapped): a copy lives on every one of
  `devices` (default: the local devices) for the whole fit, then `route` places every
  document. `balance`: in every EM step no cluster may hold more than balance/k of a
  node's samples. `spherical`: each centroid is its cluster's mean scaled to unit norm
  (spherical k-means), so the L2 descent of `route` picks the child of highest cosine.
  The result depends only on the inputs and `seed`: a node's document
  order and k-means++ draws come from (seed, level, node id), so neither the chunking nor
  the number of devices changes it beyond, at most, the device kernels' float rounding.
  """
  x_NxD = np.asarray(emb_NxD, np.float32)
  if x_NxD.ndim != 2 or x_NxD.shape[0] == 0:
    raise DataError(f'fit_tree needs a non-empty [N, D] embedding array, got shape {x_NxD.shape}')
  if not np.isfinite(x_NxD).all():
    raise DataError('fit_tree: embeddings contain NaN or inf; check the embedder')
  if k < 2 or depth < 1 or steps < 1:
    raise ConfigError(f'fit_tree needs k >= 2, depth >= 1, steps >= 1; got {k}, {depth}, {steps}')
  # The rule can only be met if k clusters of at most floor(balance*samples/k) hold all samples.
  if not balance > 1 or math.floor(balance * samples / k) * k < samples:
    raise ConfigError(f'balance={balance} with samples={samples}, k={k} cannot be met: '
                     'use balance > 1 and more samples')
  n, d = x_NxD.shape
  devices = tuple(jax.local_devices() if devices is None else devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ('nodes',))
  replicated, by_node = (jax.sharding.NamedSharding(mesh, P(*spec)) for spec in ((), ('nodes',)))
  x_dev = jax.device_put(x_NxD, replicated)
  fit = _level_fitter(mesh, k=k, samples=samples, steps=steps, balance=balance, spherical=spherical)
  # Nodes per call: a multiple of the device count within the working-set budget.
  per_device = max(1, _CHUNK_BYTES // (4 * samples * (d + 4 * k)))
  key = jax.random.key(seed)
  centroids = []
  node_N = np.zeros(n, np.int64)      # each point's node at the level being split
  parent_PxD = np.zeros((1, d), np.float32)  # the root is never empty, so never copied
  for level in range(1, depth + 1):
    parents = k**(level - 1)
    count_P = np.bincount(node_N, minlength=parents)
    start_P = np.cumsum(count_P) - count_P
    # Sorted by node, each node's points in a random order: its EM batches walk that order.
    shuffle_N = np.random.default_rng([seed, level]).permutation(n)
    perm_dev = jax.device_put(np.lexsort((shuffle_N, node_N)).astype(np.int32), replicated)
    chunk = len(devices) * min(per_device, -(-parents // len(devices)))  # one compile per level
    level_key = jax.random.fold_in(key, level)
    c_PxKxD = np.empty((parents, k, d), np.float32)
    with tqdm(total=parents, desc=f'tree level {level}/{depth}', unit='node',
              disable=not progress) as bar:
      for lo in range(0, parents, chunk):
        node_C = np.arange(lo, lo + chunk)
        real = node_C < parents  # the last chunk is padded with empty nodes, then dropped
        p_C = np.minimum(node_C, parents - 1)
        args = (start_P[p_C].astype(np.int32), np.where(real, count_P[p_C], 0).astype(np.int32),
                parent_PxD[p_C], node_C.astype(np.int32))
        c_CxKxD, _ = fit(x_dev, perm_dev, level_key, *jax.device_put(args, by_node))
        c_PxKxD[lo:lo + chunk] = np.asarray(c_CxKxD)[real]
        bar.update(int(real.sum()))
    centroids.append(c_PxKxD.reshape(parents * k, d))
    parent_PxD = centroids[-1]
    if level < depth:
      node_N = route(Tree(k, level, tuple(centroids)), x_dev)
  return Tree(k, depth, tuple(centroids))


@functools.cache
def _level_fitter(mesh, *, k, samples, steps, balance, spherical):
  """The jitted fit of a chunk of nodes, its node axis split over the mesh's devices."""
  fit = functools.partial(_fit_nodes, k=k, samples=samples, steps=steps, balance=balance, spherical=spherical)
  # No collective inside: each device runs the vmapped fit on its own nodes, so the
  # replication checks (vma) would only ask for casts on the loops' carries.
  return jax.jit(jax.shard_map(fit, mesh=mesh, in_specs=(P(), P(), P()) + (P('nodes'),) * 4,
                               out_specs=P('nodes'), check_vma=False))


def _fit_nodes(x_NxD, perm_N, level_key, start_C, count_C, parent_CxD, node_C, *, k, samples,
               steps, balance, spherical):
  """`_fit_node` vmapped over a chunk of C nodes; each node's key depends on its id only."""
  key_C = jax.vmap(jax.random.fold_in, (None, 0))(level_key, node_C)
  fit = functools.partial(_fit_node, k=k, samples=samples, steps=steps, balance=balance, spherical=spherical)
  return jax.vmap(fit, (None, None, 0, 0, 0, 0))(x_NxD, perm_N, start_C, count_C, parent_CxD, key_C)


def _fit_node(x_NxD, perm_N, start, count, parent_D, key, *, k, samples, steps, balance, spherical):
  """Balanced k-means for one node whose points are x_NxD[perm_N[start:start + count]].

  Batch t (0 seeds k-means++, 1..steps are the EM steps) is the node's points at
  positions t*samples ... (t+1)*samples - 1, modulo `count`, of that (shuffled) order.
  Returns [k, D] centroids and the [k] cluster sizes of the last step's balanced sample
  assignment. A node without points gets k copies of its parent centroid (and zero sizes),
  so the tree stays complete and its empty subtree routes like its parent.
  """
  # An empty node's samples are all one arbitrary point: skip its (discarded) balancing.
  max_size = jnp.where(count > 0, balance * samples / k, jnp.inf)

  def draw(t):
    return x_NxD[_batch_rows(perm_N, start, count, t, samples)]

  def em_step(t, carry):
    c_KxD, _ = carry
    x_SxD = draw(t + 1)
    # ||x||^2 is the same for every centroid, so it changes neither argmin nor move costs.
    d_SxK = (c_KxD**2).sum(1) - 2 * jnp.dot(x_SxD, c_KxD.T, precision='highest')
    onehot_SxK = jax.nn.one_hot(_balanced_assign(d_SxK, max_size), k)
    size_K = onehot_SxK.sum(0).astype(jnp.int32)
    # A matmul, not a scatter-add: float atomics would make GPU fits non-deterministic.
    sum_KxD = jnp.dot(onehot_SxK.T, x_SxD, precision='highest')
    mean_KxD = sum_KxD / jnp.maximum(size_K, 1)[:, None]
    if spherical:
      mean_KxD = mean_KxD / jnp.maximum(jnp.linalg.norm(mean_KxD, axis=1, keepdims=True), 1e-12)
    c_KxD = jnp.where(size_K[:, None] > 0, mean_KxD, c_KxD)
    return c_KxD, size_K

  c_KxD = _kmeans_pp(jax.random.uniform(key, (k,)), draw(0))
  c_KxD, size_K = jax.lax.fori_loop(0, steps, em_step, (c_KxD, jnp.zeros(k, jnp.int32)))
  c_KxD = _merge_duplicates(c_KxD)
  empty = count == 0
  return (jnp.where(empty, jnp.broadcast_to(parent_D, c_KxD.shape), c_KxD),
          jnp.where(empty, 0, size_K))


def _batch_rows(perm_N, start, count, t, samples):
  """Rows of batch t of the node perm_N[start:start + count]: its next `samples` points."""
  i_S = start + (t * samples + jnp.arange(samples)) % jnp.maximum(count, 1)
  return perm_N[jnp.minimum(i_S, perm_N.shape[0] - 1)]


def _merge_duplicates(c_KxD, tol=1e-5):
  """Makes centroids closer than `tol` (L2) exact copies of the first of them.

  A node with fewer distinct points than k gets centroids that are equal up to rounding.
  Points are then tied between them up to rounding, and two implementations of the descent
  (say a different device at inference) could pick different children. With exact copies the
  tie is exact and every implementation picks the lowest index. Distinct centroids of unit
  vectors that close would route differently only by rounding anyway.
  """
  d2_KxK = ((c_KxD[:, None] - c_KxD[None]) ** 2).sum(2)
  return c_KxD[jnp.argmax(d2_KxK <= tol**2, axis=1)]


def _kmeans_pp(u_K, x_SxD):
  """k-means++ seeding: a uniform first centroid, then samples drawn with probability ∝ D(x)^2.

  u_K: one uniform [0, 1) number per centroid, used by inverse-CDF sampling.
  """
  num_samples = x_SxD.shape[0]
  c0_D = x_SxD[jnp.floor(u_K[0] * num_samples).astype(jnp.int32)]
  d2_S = ((x_SxD - c0_D)**2).sum(1)

  def pick(i, carry):
    c_KxD, d2_S = carry
    cdf_S = jnp.cumsum(d2_S)
    # Chosen samples have weight 0 and are never drawn again, unless every sample is
    # chosen (fewer distinct points than k): then draw uniformly.
    i_D2 = (cdf_S <= u_K[i] * cdf_S[-1]).sum()
    i_uniform = jnp.floor(u_K[i] * num_samples).astype(i_D2.dtype)
    c_D = x_SxD[jnp.where(cdf_S[-1] > 0, i_D2, i_uniform)]
    return c_KxD.at[i].set(c_D), jnp.minimum(d2_S, ((x_SxD - c_D)**2).sum(1))

  c_KxD = jnp.zeros((u_K.shape[0], x_SxD.shape[1]), x_SxD.dtype).at[0].set(c0_D)
  return jax.lax.fori_loop(1, u_K.shape[0], pick, (c_KxD, d2_S))[0]


def _balanced_assign(d_SxK, max_size):
  """Nearest-centroid assignment under the paper's balancing rule.

  While the largest cluster holds more than `max_size` samples, it and the smallest cluster
  split their samples evenly: the largest gives away the samples that cost least to move,
  i.e. smallest d(x, smallest) - d(x, largest), so the split follows a hyperplane instead of
  scattering the cluster. Each round shrinks the excess, and `fit_tree` checks the rule is
  satisfiable, so the loop ends; the round cap (one per sample) is only a safety net.
  """
  num_samples, k = d_SxK.shape
  assign_S = jnp.argmin(d_SxK, axis=1)
  size_K = jnp.bincount(assign_S, length=k)

  def unbalanced(carry):
    _, size_K, rounds = carry
    return (size_K.max() > max_size) & (rounds < num_samples)

  def split(carry):
    assign_S, size_K, rounds = carry
    big, small = jnp.argmax(size_K), jnp.argmin(size_K)
    moved = (size_K[big] - size_K[small]) // 2
    cost_S = jnp.where(assign_S == big, d_SxK[:, small] - d_SxK[:, big], jnp.inf)
    cheapest_S = jnp.zeros(num_samples, bool).at[jnp.argsort(cost_S)].set(
        jnp.arange(num_samples) < moved)
    return (jnp.where(cheapest_S, small, assign_S),
            size_K.at[big].add(-moved).at[small].add(moved), rounds + 1)

  return jax.lax.while_loop(unbalanced, split, (assign_S, size_K, 0))[0]


@functools.partial(jax.jit, static_argnames='k')
def _descend(c_levels, x_BxD, allowed=None, avoid_B=None, *, k):
  """Leaf ids by greedy descent: at each level the nearest (L2) of the current node's k children.

  `allowed` (one [k**l] bool array per level) restricts every step to allowed children, and
  `avoid_B` [B] (-1: none) forbids one more level-1 node per row: inference's blocking. The
  caller makes sure every node it can reach has an allowed child.
  """
  node_B = jnp.zeros(x_BxD.shape[0], jnp.int32)
  for level, c_MxD in enumerate(c_levels):
    c_PxKxD = c_MxD.reshape(-1, k, c_MxD.shape[1])
    child_BxKxD = c_PxKxD[node_B]
    # ||x||^2 is constant over the children; argmin takes the lowest index on ties.
    d_BxK = (child_BxKxD**2).sum(2) - 2 * jnp.einsum('bd,bkd->bk', x_BxD, child_BxKxD,
                                                     precision='highest')
    if allowed is not None:
      id_BxK = node_B[:, None] * k + jnp.arange(k, dtype=jnp.int32)
      ok_BxK = allowed[level][id_BxK]
      if level == 0 and avoid_B is not None:
        ok_BxK &= id_BxK != avoid_B[:, None]
      d_BxK = jnp.where(ok_BxK, d_BxK, jnp.inf)
    node_B = node_B * k + jnp.argmin(d_BxK, axis=1).astype(jnp.int32)
  return node_B


def route(tree: Tree, emb_NxD, batch: int = 65536, *, allowed=None, avoid_N=None) -> np.ndarray:
  """[N] int64 leaf ids of the rows of emb_NxD (numpy or on-device), by greedy descent.

  Runs on the device in batches of `batch` rows; the working set is about batch * k * D
  floats. Batches are padded to a power of two (at most `batch`), so calls with varying N
  reuse a few compiled shapes and a single query does not pay for a full batch.
  `allowed` and `avoid_N` restrict the descent (see `_descend`); without them it is exactly
  the routing `hmem prepare` applies to the corpus.
  """
  if emb_NxD.ndim != 2 or emb_NxD.shape[1] != tree.dim:
    raise DataError(f'route: embeddings of shape {emb_NxD.shape} do not match the tree '
                     f'(dimension {tree.dim})')
  n = emb_NxD.shape[0]
  leaf_N = np.empty(n, np.int64)
  if n == 0:
    return leaf_N
  b = min(batch, 1 << (n - 1).bit_length())
  c_levels = tuple(jnp.asarray(c) for c in tree.centroids)
  if allowed is not None:
    allowed = tuple(jnp.asarray(a, bool) for a in allowed)
    avoid_N = np.full(n, -1, np.int32) if avoid_N is None else np.asarray(avoid_N, np.int32)

  def collect(lo, rows, leaf_B):
    leaf_N[lo:lo + rows] = np.asarray(leaf_B)[:rows]

  in_flight = None  # the previous batch computes while the next one is sent
  for lo in range(0, n, b):
    x_BxD = jnp.asarray(emb_NxD[lo:lo + b], jnp.float32)
    rows = x_BxD.shape[0]
    x_BxD = jnp.pad(x_BxD, ((0, b - rows), (0, 0)))
    if allowed is None:
      leaf_B = _descend(c_levels, x_BxD, k=tree.k)
    else:
      avoid_B = np.pad(avoid_N[lo:lo + b], (0, b - rows), constant_values=-1)
      leaf_B = _descend(c_levels, x_BxD, allowed, avoid_B, k=tree.k)
    if in_flight is not None:
      collect(*in_flight)
    in_flight = (lo, rows, leaf_B)
  collect(*in_flight)
  return leaf_N


def tree_stats(tree: Tree, leaf_counts) -> dict[int, dict[str, int]]:
  """Per level: nodes, non-empty nodes, and the largest/smallest non-empty node.

  `leaf_counts[i]` is the number of documents routed to leaf i (np.bincount of the leaf
  ids), so corpus-sized id arrays are never needed.
  """
  counts_L = np.asarray(leaf_counts, np.int64)
  leaves = tree.k**tree.depth
  if counts_L.shape != (leaves,) or (counts_L < 0).any():
    raise ValueError(f'leaf_counts must be {leaves} non-negative counts, one per leaf of this tree')
  stats = {}
  for level in range(1, tree.depth + 1):
    size = counts_L.reshape(tree.k**level, -1).sum(axis=1)
    used = size[size > 0]
    stats[level] = {'nodes': int(size.size), 'non_empty': int(used.size),
                    'largest': int(used.max()) if used.size else 0,
                    'smallest': int(used.min()) if used.size else 0}
  return stats
