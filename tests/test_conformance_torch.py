"""Bucket assignment against PyTorch's own (torch==2.13.0 CPU as the oracle)."""

import random

import jax
import jax.numpy as jnp
import pytest

from ddp_jax import compute_bucket_assignment_by_size, plan_buckets

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.conformance

PAIRS = [(jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16),
         (jnp.float16, torch.float16), (jnp.float64, torch.float64)]


def random_case(rng):
  n = rng.randint(1, 40)
  shapes = [tuple(rng.randint(0, 64) for _ in range(rng.randint(0, 3))) for _ in range(n)]
  kinds = [rng.choice(PAIRS[: rng.randint(1, 4)]) for _ in range(n)]
  limits = [rng.choice([1, 64, 500, 4096, 20000, 1 << 20]) for _ in range(rng.randint(1, 3))]
  ours = [jax.ShapeDtypeStruct(s, k[0]) for s, k in zip(shapes, kinds)]
  theirs = [torch.empty(s, dtype=k[1]) for s, k in zip(shapes, kinds)]
  return ours, theirs, limits


@pytest.mark.parametrize("seed", range(200))
def test_same_as_torch(seed):
  rng = random.Random(seed)
  ours, theirs, limits = random_case(rng)
  expected = dist._compute_bucket_assignment_by_size(theirs, limits)
  assert compute_bucket_assignment_by_size(ours, limits) == (expected[0], expected[1])


@pytest.mark.parametrize("seed", range(100))
def test_same_as_torch_ready_order(seed):
  rng = random.Random(1000 + seed)
  ours, theirs, limits = random_case(rng)
  ready = list(range(len(ours)))
  rng.shuffle(ready)
  got = compute_bucket_assignment_by_size([ours[i] for i in ready], limits, tensor_indices=ready)
  want = dist._compute_bucket_assignment_by_size(
      [theirs[i] for i in ready], limits, tensor_indices=ready)
  # Buckets that closed on their limit come out in closing order in both; the
  # unfinished ones follow, in an order PyTorch leaves to an unordered_map.
  pairs_got = list(zip(*got))
  pairs_want = list(zip(map(list, want[0]), want[1]))
  assert sorted(pairs_got) == sorted(pairs_want)
  closed = sum(1 for b, lim in pairs_want
               if sum(theirs[i].numel() * theirs[i].element_size() for i in b) >= lim)
  assert pairs_got[:closed] == pairs_want[:closed]


@pytest.mark.parametrize("seed", range(20))
def test_plan_forward_matches_ddp_initial_assignment(seed):
  """DDP's constructor: assignment over params with [1 MiB, cap] limits."""
  rng = random.Random(5000 + seed)
  n = rng.randint(1, 30)
  shapes = [tuple(rng.randint(1, 300) for _ in range(rng.randint(1, 3))) for _ in range(n)]
  tree = [jnp.zeros(s) for s in shapes]
  cap = rng.choice([0.05, 0.2, 1.0])
  plan = plan_buckets(tree, order="forward", bucket_cap_mb=cap, first_bucket_cap_mb=0.01)
  want, _ = dist._compute_bucket_assignment_by_size(
      [torch.empty(s) for s in shapes], [int(0.01 * 2**20), int(cap * 2**20)])
  assert [list(b.leaf_indices) for b in plan.buckets] == want
