"""Tests for the balanced hierarchical k-means tree and greedy routing (hmem.data.tree)."""

import functools

import jax
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from hmem.data import tree as tree_lib
from hmem.data.tree import Tree, fit_tree, route, tree_stats
from hmem.errors import DataError

# Small EM settings shared by most tests, so they share compiled functions.
FIT = dict(samples=512, steps=8, progress=False)


def brute_force_route(tree, x_NxD):
  """Reference descent: all k child distances at each level, argmin, lowest index on ties."""
  leaves = []
  for x_D in x_NxD:
    node = 0
    for c_MxD in tree.centroids:
      children_KxD = c_MxD[node * tree.k:(node + 1) * tree.k]
      node = node * tree.k + int(np.argmin(((children_KxD - x_D)**2).sum(1)))
    leaves.append(node)
  return np.array(leaves, np.int64)


def normalise(x_NxD):
  return (x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)).astype(np.float32)


def blobs(rng, centers_CxD, sizes, noise):
  """Gaussian blobs around the (normalised) centers; returns L2-normalised points and labels."""
  labels = np.repeat(np.arange(len(sizes)), sizes)
  x = normalise(centers_CxD)[labels] + noise * rng.normal(size=(len(labels), centers_CxD.shape[1]))
  return normalise(x), labels


@pytest.mark.parametrize('k, depth', [(2, 5), (3, 3), (4, 2), (16, 2), (5, 1)])
def test_route_matches_brute_force(k, depth):
  rng = np.random.default_rng(k * 10 + depth)
  d = 8
  tree = Tree(k, depth, tuple(rng.normal(size=(k**l, d)) for l in range(1, depth + 1)))
  x = normalise(rng.normal(size=(301, d)))
  leaves = route(tree, x, batch=64)  # several batches, the last one padded
  assert leaves.dtype == np.int64 and leaves.shape == (301,)
  np.testing.assert_array_equal(leaves, brute_force_route(tree, x))


def test_route_breaks_ties_to_lowest_index():
  a, b = np.eye(3)[:2]
  # Level 1: children 0 and 1 identical; level 2: every node's children identical.
  level1 = np.stack([a, a, b])
  tree = Tree(3, 2, (level1, np.repeat(level1, 3, axis=0)))
  x = normalise(np.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [1.0, 0.0, 0.5]]))
  np.testing.assert_array_equal(route(tree, x), [0, 6, 0])
  np.testing.assert_array_equal(route(tree, x), brute_force_route(tree, x))


def test_route_accepts_device_arrays_and_rejects_wrong_dimension():
  rng = np.random.default_rng(0)
  tree = Tree(2, 2, (rng.normal(size=(2, 4)), rng.normal(size=(4, 4))))
  x = normalise(rng.normal(size=(10, 4)))
  np.testing.assert_array_equal(route(tree, jax.numpy.asarray(x)), route(tree, x))
  assert route(tree, x[:0]).shape == (0,)
  with pytest.raises(ValueError, match='dimension 4'):
    route(tree, x[:, :3])


def skewed_data(rng, n=4000, d=16):
  """90% of the points in one tight blob, the rest in 7 small blobs."""
  sizes = [int(0.9 * n)] + [n // 70] * 7
  return blobs(rng, rng.normal(size=(8, d)), sizes, noise=0.05)


def test_balance_rule_holds_on_skewed_samples():
  """Asserted precisely: in the last EM step, after balancing, no cluster of the node holds
  more than balance/k of its `samples` sample assignments (and all samples are assigned).
  Without the rule the same data breaks that bound, so the rule is what enforces it."""
  x, _ = skewed_data(np.random.default_rng(0))
  k, samples = 8, 800

  def last_step_sizes(balance):
    fit = jax.jit(functools.partial(tree_lib._fit_node, k=k, samples=samples, steps=6,
                                    balance=balance, spherical=False))
    all_points = np.arange(len(x), dtype=np.int32)
    _, size_K = fit(x, all_points, 0, len(x), np.zeros(x.shape[1], np.float32), jax.random.key(0))
    return np.asarray(size_K)

  size_K = last_step_sizes(1.5)
  assert size_K.sum() == samples
  assert size_K.max() <= 1.5 * samples / k, size_K
  assert last_step_sizes(1e9).max() > 1.5 * samples / k  # the rule had work to do


def test_balanced_tree_splits_the_dominant_blob():
  # 90% of the points in one blob: each level-1 cluster holds at most 1.5/8 of the samples,
  # so the blob's samples span at least 5 clusters and routing splits it across them.
  x, labels = skewed_data(np.random.default_rng(1))
  leaves = route(fit_tree(x, 8, 1, seed=0, **FIT), x)
  assert len(np.unique(leaves[labels == 0])) >= 5
  assert np.bincount(leaves).max() < 0.4 * len(x)


def test_fit_is_deterministic_for_a_seed():
  x, _ = skewed_data(np.random.default_rng(2), n=1000)
  t1, t2 = (fit_tree(x, 4, 2, seed=7, **FIT) for _ in range(2))
  t3 = fit_tree(x, 4, 2, seed=8, **FIT)
  for c1, c2, c3 in zip(t1.centroids, t2.centroids, t3.centroids):
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(c1, c3)


def test_chunking_does_not_change_the_tree(monkeypatch):
  x, _ = skewed_data(np.random.default_rng(3), n=1000)
  whole = fit_tree(x, 4, 2, seed=0, devices=jax.devices()[:1], **FIT)
  # One node per device on 3 devices: level 2's 4 parents take two chunks of 3, the
  # second one padded.
  monkeypatch.setattr(tree_lib, '_CHUNK_BYTES', 4 * FIT['samples'] * (16 + 4 * 4))
  chunked = fit_tree(x, 4, 2, seed=0, devices=jax.devices()[:3], **FIT)
  for c1, c2 in zip(whole.centroids, chunked.centroids):
    np.testing.assert_allclose(c1, c2, atol=1e-5)


@pytest.mark.parametrize('devices', [2, 8])
def test_device_count_does_not_change_the_tree(devices):
  x, _ = skewed_data(np.random.default_rng(3), n=1000)
  one = fit_tree(x, 4, 2, seed=0, devices=jax.devices()[:1], **FIT)
  many = fit_tree(x, 4, 2, seed=0, devices=jax.devices()[:devices], **FIT)
  for c1, c2 in zip(one.centroids, many.centroids):
    np.testing.assert_allclose(c1, c2, atol=1e-5)
  np.testing.assert_array_equal(route(one, x), route(many, x))


@pytest.mark.parametrize('count', [50, 700, 5000])
def test_em_batches_are_fresh_while_the_node_has_points(count):
  # Batches 0..steps of a node starting at row 3 of a shuffled order: without repeats
  # while there are enough points, else every point used equally often (within one).
  samples, batches = 64, 11
  perm_N = np.random.default_rng(0).permutation(count + 10).astype(np.int32)
  rows = np.concatenate([np.asarray(tree_lib._batch_rows(perm_N, 3, count, t, samples))
                         for t in range(batches)])
  assert set(rows) <= set(perm_N[3:3 + count])
  uses = np.bincount(rows, minlength=count + 10)[perm_N[3:3 + count]]
  if count >= samples * batches:
    assert uses.max() == 1 and uses.sum() == samples * batches
  else:
    assert uses.min() >= 1 and uses.max() - uses.min() <= 1


def hierarchical_blobs(rng, n_per=150, d=32):
  """4 well-separated super-clusters, each made of 4 separated sub-clusters."""
  super_4xD = 3 * normalise(rng.normal(size=(4, d)))
  sub_16xD = np.repeat(super_4xD, 4, axis=0) + normalise(rng.normal(size=(16, d)))
  x, sub = blobs(rng, sub_16xD, [n_per] * 16, noise=0.03)
  return x, sub // 4, sub


@pytest.mark.parametrize('spherical', [False, True])
def test_level1_nmi_and_children_numbering_on_separated_blobs(spherical):
  x, super_labels, sub_labels = hierarchical_blobs(np.random.default_rng(0))
  tree = fit_tree(x, 4, 2, seed=0, spherical=spherical, **FIT)
  leaves = route(tree, x)
  level1 = route(Tree(4, 1, tree.centroids[:1]), x)
  # The level-1 ancestor of a leaf is leaf // k: children of node j are j*k .. j*k+k-1.
  np.testing.assert_array_equal(leaves // 4, level1)
  assert normalized_mutual_info_score(super_labels, level1) > 0.95
  assert normalized_mutual_info_score(sub_labels, leaves) > 0.9


def test_fitted_tree_routes_like_brute_force_and_ancestors_are_prefixes():
  rng = np.random.default_rng(4)
  x = normalise(rng.normal(size=(500, 8)))
  k, depth = 3, 3
  tree = fit_tree(x, k, depth, seed=1, **FIT)
  leaves = route(tree, x, batch=128)
  np.testing.assert_array_equal(leaves, brute_force_route(tree, x))
  # Routing with the first `level` levels gives the leaves' level-`level` ancestors.
  for level in range(1, depth + 1):
    prefix = Tree(k, level, tree.centroids[:level])
    np.testing.assert_array_equal(route(prefix, x), leaves // k**(depth - level))


def test_spherical_centroids_are_unit_vectors_so_the_descent_picks_the_most_similar():
  """spherical=True (data.tree_metric=cosine): every centroid, empty nodes' copies too, has
  norm 1, so the unchanged L2 descent (and inference's) is the descent by cosine."""
  rng = np.random.default_rng(6)
  x = normalise(rng.normal(size=(400, 8)))
  k, depth = 4, 3
  tree = fit_tree(x, k, depth, seed=0, spherical=True, **FIT)
  for c_MxD in tree.centroids:
    np.testing.assert_allclose(np.linalg.norm(c_MxD, axis=1), 1.0, atol=1e-5)
  leaves = []
  for x_D in x:
    node = 0
    for c_MxD in tree.centroids:
      node = node * k + int(np.argmax(c_MxD[node * k:(node + 1) * k] @ x_D))
    leaves.append(node)
  np.testing.assert_array_equal(route(tree, x), leaves)
  plain = fit_tree(x, k, depth, seed=0, **FIT)
  assert np.linalg.norm(plain.centroids[0], axis=1).max() < 0.9  # means of spread points: shorter


def test_empty_nodes_keep_the_tree_complete():
  rng = np.random.default_rng(5)
  x = normalise(rng.normal(size=(12, 8)))  # fewer points than level-2 nodes
  k, depth = 4, 3
  tree = fit_tree(x, k, depth, seed=0, **FIT)
  assert [c.shape for c in tree.centroids] == [(4, 8), (16, 8), (64, 8)]
  leaves = route(tree, x)
  np.testing.assert_array_equal(leaves, brute_force_route(tree, x))
  stats = tree_stats(tree, np.bincount(leaves, minlength=k**depth))
  assert stats[3]['nodes'] == 64 and stats[3]['non_empty'] <= 12
  # A node no document reaches has k copies of its own centroid as children.
  empty_parents = 0
  for level in range(1, depth):
    size = np.bincount(leaves // k**(depth - level), minlength=k**level)
    for node in np.flatnonzero(size == 0):
      children = tree.centroids[level][node * k:(node + 1) * k]
      parent = tree.centroids[level - 1][node]
      np.testing.assert_array_equal(children, np.broadcast_to(parent, children.shape))
      empty_parents += 1
  assert empty_parents > 0


def test_tree_stats():
  tree = Tree(2, 2, (np.zeros((2, 3)), np.zeros((4, 3))))
  stats = tree_stats(tree, np.bincount([0, 0, 1, 3, 3, 3], minlength=4))
  assert stats == {1: {'nodes': 2, 'non_empty': 2, 'largest': 3, 'smallest': 3},
                   2: {'nodes': 4, 'non_empty': 3, 'largest': 3, 'smallest': 1}}
  with pytest.raises(ValueError, match='one per leaf'):
    tree_stats(tree, np.array([1, 2, 3]))


def test_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  tree = Tree(3, 2, (rng.normal(size=(3, 5)), rng.normal(size=(9, 5))))
  path = str(tmp_path / 'tree.npz')
  tree.save(path)
  loaded = Tree.load(path)
  assert (loaded.k, loaded.depth) == (3, 2)
  for c1, c2 in zip(tree.centroids, loaded.centroids):
    np.testing.assert_array_equal(c1, c2)
    assert c2.dtype == np.float32
  x = normalise(rng.normal(size=(20, 5)))
  np.testing.assert_array_equal(route(loaded, x), route(tree, x))


def test_load_errors_name_the_file(tmp_path):
  missing = str(tmp_path / 'missing.npz')
  with pytest.raises(DataError, match='missing.npz.*does not exist'):
    Tree.load(missing)

  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not a tree at all')
  with pytest.raises(DataError, match='garbage.npz.*corrupt'):
    Tree.load(str(garbage))

  truncated = tmp_path / 'truncated.npz'
  Tree(2, 1, (np.ones((2, 4)),)).save(str(truncated))
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(DataError, match='truncated.npz'):
    Tree.load(str(truncated))

  inconsistent = tmp_path / 'inconsistent.npz'
  np.savez(inconsistent, k=2, depth=2, level_1=np.ones((2, 4)), level_2=np.ones((3, 4)))
  with pytest.raises(DataError, match='inconsistent.npz.*level 2'):
    Tree.load(str(inconsistent))


def test_fit_rejects_unsatisfiable_balance():
  x = normalise(np.random.default_rng(0).normal(size=(10, 4)))
  with pytest.raises(ValueError, match='balance'):
    fit_tree(x, 16, 1, seed=0, samples=20, balance=1.5, progress=False)
  with pytest.raises(ValueError, match='balance'):
    fit_tree(x, 4, 1, seed=0, balance=1.0, progress=False)
