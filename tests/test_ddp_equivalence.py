"""DDP's promise, tested on the training step users write: N replicas on per-device
batches train exactly like one device on the concatenated batch.

The optimizer is SGD with momentum: its update is proportional to the gradient, so a
gradient N times too large (what ``jax.grad`` of a replicated parameter gives under
``shard_map`` when it is averaged again) cannot hide, as it did behind adam's scale
invariance.

Tolerance: the replicas' gradients differ from the one-device gradient only in
summation order (per-device means, then their mean), a few f32 ulps (~1e-7
relative). Six SGD steps (lr 0.1, momentum 0.9: each gradient weighs at most
1 + 0.9 + ... < 5 in the parameters) keep the parameters within ~1e-7 of each other;
1e-6 leaves a 10x margin, and an N x gradient misses it by five orders of magnitude.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax import hooks
from ddp_jax.inspect import collectives

STEPS, PER_DEVICE, N = 6, 4, 8


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(64)(x))
    x = nn.tanh(nn.Dense(32)(x))
    return nn.Dense(10)(x)


def loss_fn(params, x, y):
  logits = MLP().apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def opt():
  return optax.sgd(0.1, momentum=0.9)


def data(n=N):
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(STEPS, n * PER_DEVICE, 20)).astype(np.float32)
  ys = rng.integers(0, 10, size=(STEPS, n * PER_DEVICE)).astype(np.int32)
  return xs, ys, MLP().init(jax.random.key(0), xs[0, :1])


def one_device(params, xs, ys):
  """The reference: plain jax.grad on the whole batch, one device."""
  tx = opt()
  state = tx.init(params)
  for x, y in zip(xs, ys):
    updates, state = tx.update(jax.grad(loss_fn)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params


def assert_same_training(got, want, params0):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                           want, params0)))
  assert moved > 1e-2, "training moved the parameters (the comparison is not vacuous)"


def sync(**kw):
  # Small caps: several buckets.
  return ddp_jax.sync_gradients("data", first_bucket_cap_mb=0.001, bucket_cap_mb=0.004, **kw)


@pytest.mark.parametrize("pack", ["auto", "ravel", "variadic"])
def test_shard_map_step_equals_one_device(mesh8, pack):
  """The explicit route: shard_map with state_specs, ddp_jax.value_and_grad."""
  xs, ys, params0 = data()
  tx = optax.chain(sync(pack=pack), opt())
  assert ddp_jax.plan_buckets(params0, first_bucket_cap_mb=0.001,
                              bucket_cap_mb=0.004).num_buckets > 2
  state = ddp_jax.init_state(tx, params0, mesh8, "data")
  specs = ddp_jax.state_specs(state, "data")

  def step(p, s, x, y):
    loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, jax.lax.pmean(loss, "data")

  fn = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=(P(), specs, P("data"), P("data")),
                             out_specs=(P(), specs, P())))
  params = ddp_jax.replicate(params0, mesh8)
  for x, y in zip(xs, ys):
    params, state, loss = fn(params, state, *ddp_jax.shard((x, y), mesh8, "data"))
  np.testing.assert_allclose(loss, loss_fn(one_device(params0, xs[:-1], ys[:-1]), xs[-1], ys[-1]),
                             rtol=1e-5)
  assert_same_training(params, one_device(params0, xs, ys), params0)


@pytest.mark.parametrize("hook", [None, hooks.powersgd(rank=64, start_iter=0,
                                                       min_compression_rate=0.01)],
                         ids=["allreduce", "full-rank-powersgd"])
def test_data_parallel_step_equals_one_device(mesh8, hook):
  """The step builder: specs derived, host arrays placed. Full-rank PowerSGD (rank 64 >=
  every matrix's smaller side) is exact up to rounding, so it trains like the all-reduce."""
  xs, ys, params0 = data()
  tx = optax.chain(sync(hook=hook), opt())

  def train_step(p, s, x, y):
    loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, jax.lax.pmean(loss, "data")

  step = ddp_jax.data_parallel(train_step, mesh8, "data", batch_argnums=(2, 3))
  params, state = params0, ddp_jax.init_state(tx, params0, mesh8, "data")
  for x, y in zip(xs, ys):
    params, state, _ = step(params, state, x, y)
  in_specs, out_specs = step.specs(params, state, xs[0], ys[0])
  assert in_specs[2] == P("data") and out_specs[2] == P()
  assert jax.tree.leaves(out_specs[0], is_leaf=lambda s: isinstance(s, P)) == [P()] * 6
  if hook is not None:  # PowerSGD's residuals and Qs are per replica
    assert ddp_jax.state_specs(state, "data")[0].hook_states[0].residual == P("data")
  # Full-rank PowerSGD orthogonalizes and multiplies back: ~1e-6 relative per step.
  tol = 1e-6 if hook is None else 2e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), params,
               one_device(params0, xs, ys))


@pytest.mark.parametrize("grad_fn", ["jax.grad", "ddp_jax.grad"])
def test_pmap_step_equals_one_device(grad_fn):
  """Under pmap values carry no replication type: jax.grad is per replica already, and
  ddp_jax.grad is the same function there."""
  xs, ys, params0 = data()
  tx = optax.chain(sync(), opt())
  grad = jax.grad(loss_fn) if grad_fn == "jax.grad" else ddp_jax.grad(loss_fn, "data")

  def step(p, s, x, y):
    updates, s = tx.update(grad(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  fn = jax.pmap(step, axis_name="data")
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * N), t)  # noqa: E731
  params, state = stack(params0), jax.pmap(tx.init)(stack(params0))
  for x, y in zip(xs, ys):
    params, state = fn(params, state, x.reshape(N, PER_DEVICE, -1), y.reshape(N, PER_DEVICE))
  assert_same_training(jax.tree.map(lambda a: a[0], params), one_device(params0, xs, ys),
                       params0)


def test_the_old_recipe_raises(mesh8):
  """jax.grad of P() params under shard_map is already summed: refused, with the fix."""
  _, _, params0 = data()
  tx = optax.chain(ddp_jax.sync_gradients("data"), opt())

  def train_step(p, s, x, y):
    updates, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  step = ddp_jax.data_parallel(train_step, mesh8, "data", batch_argnums=(2, 3))
  xs, ys, _ = data()
  state = ddp_jax.init_state(tx, params0, mesh8, "data")
  with pytest.raises(ValueError, match=r"6 gradient leaves are not per replica over 'data': "
                                       r"\['params'\]\['Dense_0'\]\['bias'\].*already summed.*"
                                       r"ddp_jax.value_and_grad\(loss_fn, 'data'\)"):
    step(params0, state, xs[0], ys[0])


def _compiled_step(mesh, hook):
  xs, ys, params0 = data()
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=hook), opt())

  def train_step(p, s, x, y):
    updates, s = tx.update(ddp_jax.grad(loss_fn, "data")(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=(2, 3))
  state = ddp_jax.init_state(tx, params0, mesh, "data")
  return collectives(step, params0, state, xs[0], ys[0]), params0


def test_compiled_step_communicates_in_f16_only(mesh8):
  """grad + fp16 sync + optimizer, compiled: every collective is the hook's f16 one
  (with jax.grad of P() params autodiff would add f32 all-reduces of every gradient).
  On CPU the f16 sum is an all-to-all and an all-gather of f16 (``sum_16bit``)."""
  report, _ = _compiled_step(mesh8, hooks.fp16_compress())
  for stage in (report.compiled, report.lowered):
    assert set(stage) == {"all-to-all", "all-gather"}, report.summary()
    for kind in stage.values():
      assert set(kind.bytes_by_dtype) == {"u16"}, report.summary()  # f16 words


def test_compiled_step_powersgd_sends_under_a_quarter(mesh8):
  """PowerSGD rank 1: the compiled step's all-reduces carry < 1/4 of the f32 gradients."""
  report, params0 = _compiled_step(mesh8, hooks.powersgd(rank=1, start_iter=0))
  grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(params0))
  sent = report.compiled["all-reduce"].bytes
  assert 0 < sent < grad_bytes / 4, (sent, grad_bytes)
  assert report.compiled["all-reduce"].in_conditional == 0
