"""DDP's promise: N replicas on per-device batches train exactly like one device on the
concatenated batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import ddp_jax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(64)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(10)(x)


def loss_fn(params, x, y):
  logits = MLP().apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("pack", ["auto", "ravel"])
def test_eight_replicas_equal_one_big_batch(mesh8, pack, standard_promotion):
  steps, per_device, n = 6, 4, 8
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, n * per_device, 20)).astype(np.float32)
  ys = rng.integers(0, 10, size=(steps, n * per_device)).astype(np.int32)
  params0 = MLP().init(jax.random.key(0), xs[0, :1])

  # Single device, the whole batch.
  opt = optax.adam(1e-2)
  params, state = params0, opt.init(params0)
  for t in range(steps):
    grads = jax.grad(loss_fn)(params, xs[t], ys[t])
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)

  # Eight replicas, each on its slice, synced by ddp_jax (small buckets: several).
  tx = optax.chain(ddp_jax.sync_gradients("data", pack=pack, first_bucket_cap_mb=0.001,
                                          bucket_cap_mb=0.004), optax.adam(1e-2))
  dp_params = ddp_jax.replicate(params0, mesh8)
  dp_state = ddp_jax.init_state(tx, params0, mesh8, "data")
  specs = ddp_jax.state_specs(dp_state, "data")

  def step(p, s, x, y):
    grads = jax.grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  dp_step = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=(P(), specs, P("data"), P("data")),
                                  out_specs=(P(), specs)))
  assert ddp_jax.plan_buckets(params0, first_bucket_cap_mb=0.001,
                              bucket_cap_mb=0.004).num_buckets > 2
  for t in range(steps):
    x, y = ddp_jax.shard((xs[t], ys[t]), mesh8, "data")
    dp_params, dp_state = dp_step(dp_params, dp_state, x, y)

  # Summation order differs (per-device means, then the mean of means); adam divides by
  # sqrt(v), which magnifies that float noise where a gradient is near zero: 1e-5 is a
  # thousandth of one step (lr 1e-2).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params, dp_params)
  # And training moved the parameters (the comparison is not vacuous).
  delta = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, params0))
  assert max(delta) > 1e-2
