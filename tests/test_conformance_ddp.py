"""The training step against PyTorch DDP itself (torch==2.13.0 CPU, 4 gloo ranks).

Same MLP, same initial weights, same per-rank batches, SGD with momentum (scale-sensitive):
ddp_jax on 4 replicas of a CPU mesh must end where DDP ends. The oracle is somebody
else's code: a bug shared by ddp_jax and a reference written here cannot hide.
"""

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddp_jax
from ddp_jax import hooks

pytest.importorskip("torch")
pytestmark = pytest.mark.conformance
SCRIPT = Path(__file__).resolve().parent / "mp_scripts" / "torch_ddp.py"
WORLD, PER_RANK = 4, 8


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(32)(x))
    return nn.Dense(10)(h)


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(MLP().apply(params, x), y).mean()


def setup(steps, seed=0):
  rng = np.random.default_rng(seed)
  d = {"w1": rng.normal(0, 0.3, (32, 20)), "b1": rng.normal(0, 0.1, 32),
       "w2": rng.normal(0, 0.3, (10, 32)), "b2": rng.normal(0, 0.1, 10),
       "xs": rng.normal(size=(steps, WORLD * PER_RANK, 20)),
       "ys": rng.integers(0, 10, (steps, WORLD * PER_RANK))}
  d = {k: v.astype(np.int64 if k == "ys" else np.float32) for k, v in d.items()}
  return d


def to_flax(d):
  return {"params": {"Dense_0": {"kernel": d["w1"].T, "bias": d["b1"]},
                     "Dense_1": {"kernel": d["w2"].T, "bias": d["b2"]}}}


# The two trainings the tests compare with: (seed, steps, hook, lr, momentum).
JOBS = {"sgd_momentum": (0, 20, "allreduce", 0.1, 0.9), "fp16_step": (1, 1, "fp16", 1.0, 0.0)}


@pytest.fixture(scope="module")
def torch_ddp(tmp_path_factory):
  """Runs every job of JOBS in one set of 4 DDP ranks (one torch start-up)."""
  tmp = tmp_path_factory.mktemp("torch_ddp")
  cmd = [sys.executable, str(SCRIPT), "--world", str(WORLD)]
  for name, (seed, steps, hook, lr, momentum) in JOBS.items():
    np.savez(tmp / f"{name}_in.npz", **setup(steps, seed))
    cmd += ["--job", str(tmp / f"{name}_in.npz"), str(tmp / f"{name}_out.npz"), hook,
            str(lr), str(momentum)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {name: to_flax(dict(np.load(tmp / f"{name}_out.npz"))) for name in JOBS}


def ddp_jax_training(d, hook, lr, momentum):
  mesh = jax.make_mesh((WORLD,), ("data",), devices=jax.devices()[:WORLD])
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=hook), optax.sgd(lr, momentum=momentum))

  def train_step(p, s, x, y):
    _, grads = ddp_jax.value_and_grad(loss_fn, "data")(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=(2, 3))
  params = to_flax(d)
  state = ddp_jax.init_state(tx, params, mesh, "data")
  for x, y in zip(d["xs"], d["ys"]):
    params, state = step(params, state, x, y.astype(np.int32))
  return jax.tree.map(np.asarray, params)


def test_sgd_momentum_training_equals_torch_ddp(torch_ddp):
  """20 steps, default all-reduce. Both sides compute the same f32 math in different
  summation orders (~1e-7 relative per step); 1e-6 is a 10x margin, while the N x
  gradient of jax.grad on P() params would be off by ~1e-1."""
  seed, steps, _, lr, momentum = JOBS["sgd_momentum"]
  d = setup(steps, seed)
  theirs = torch_ddp["sgd_momentum"]
  ours = ddp_jax_training(d, None, lr=lr, momentum=momentum)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, theirs)
  start = to_flax(d)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ours),
                                                         jax.tree.leaves(start)))
  assert moved > 0.05


def _f16_ulp(x):
  half = jnp.asarray(x, jnp.float16)
  return np.abs(np.asarray(jnp.nextafter(half, jnp.asarray(np.inf, jnp.float16)), np.float32)
                - np.asarray(half, np.float32))


def test_fp16_hook_step_equals_torch_ddp_to_f16_rounding(torch_ddp):
  """One step of SGD (lr 1, no momentum): the update is minus the synced gradient, which
  DDP's fp16_compress_hook computes as the f16 sum of f16(g_r) / N. Both sides round the
  same terms in another order: each term's cast can land one f16 ulp apart (the f32
  gradients differ in their last bits), and each of the N - 1 additions rounds once on
  each side, so the results differ by at most (2N - 1) f16 ulps of sum_r |g_r| / N (not
  of the result, which can be a cancellation of larger terms)."""
  seed, steps, _, lr, momentum = JOBS["fp16_step"]
  d = setup(steps, seed)
  start = to_flax(d)
  theirs = torch_ddp["fp16_step"]
  ours = ddp_jax_training(d, hooks.fp16_compress(), lr=lr, momentum=momentum)
  x, y = d["xs"][0], d["ys"][0].astype(np.int32)
  per_rank = [jax.grad(loss_fn)(start, x[r * PER_RANK:(r + 1) * PER_RANK],
                                y[r * PER_RANK:(r + 1) * PER_RANK]) for r in range(WORLD)]
  magnitude = jax.tree.map(lambda *g: sum(np.abs(np.asarray(t)) for t in g) / WORLD, *per_rank)
  ulps = []
  for a, b, s, m in zip(*map(jax.tree.leaves, (ours, theirs, start, magnitude))):
    # + the f32 rounding of s - update on both sides (a few ulps of |s|).
    bound = (2 * WORLD - 1) * _f16_ulp(m) + 4 * np.spacing(np.abs(s))
    diff = np.abs((s - a) - (s - b))
    assert np.all(diff <= bound), (diff.max(), (diff - bound).max())
    ulps.append(float((diff / _f16_ulp(m)).max()))
  assert max(ulps) > 0, "f16 rounding happened (the comparison is not vacuous)"
