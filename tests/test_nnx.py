"""flax NNX: ``nnx.Optimizer`` around a chain that starts with ``sync_gradients``.

``nnx.Optimizer`` calls ``tx.init`` with boxed parameters (``nnx.Param``, paths ending in
``.value``) and ``tx.update`` with pure arrays; the sync must see one tree in both. Then
the NNX training step on 8 replicas must train like one device on the whole batch
(SGD with momentum; tolerance as in test_ddp_equivalence.py).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddp_jax
from ddp_jax import hooks

nnx = pytest.importorskip("flax.nnx")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_nnx  # noqa: E402


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(20, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def batches(steps=5, n=32):
  rng = np.random.default_rng(0)
  return (rng.normal(size=(steps, n, 20)).astype(np.float32),
          rng.integers(0, 10, (steps, n)).astype(np.int32))


def test_optimizer_update_accepts_pure_gradients_of_boxed_params():
  """The failure this replaces: 'the gradient tree differs ... ['l1']['bias'].value vs
  ['l1']['bias']'. One replica (vmap of size 1) so that it runs without a mesh."""
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(ddp_jax.sync_gradients("i"), optax.sgd(0.1)),
                            wrt=nnx.Param)
  assert optimizer.opt_state[0].signature[0][0] == "['l1']['bias']"
  x, y = batches(1)

  def step(model, optimizer):
    grads = nnx.grad(loss_fn)(model, x[0], y[0])
    optimizer.update(model, grads)
    return model

  before = np.asarray(model.l1.kernel[...])
  out = jax.vmap(step, axis_name="i", in_axes=None, out_axes=None, axis_size=1)(model, optimizer)
  assert not np.allclose(np.asarray(out.l1.kernel[...]), before)


def test_nnx_data_parallel_training_equals_one_device(mesh8):
  xs, ys = batches()
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1, momentum=0.9))
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def train_step(model, optimizer, x, y):
    loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(model, x, y)
    optimizer.update(model, grads)
    return model, optimizer, jax.lax.pmean(loss, "data")

  step = ddp_jax.data_parallel(train_step, mesh8, "data", batch_argnums=(2, 3))
  for x, y in zip(xs, ys):
    model, optimizer, _ = step(model, optimizer, x, y)

  ref = MLP(nnx.Rngs(0))
  ref_opt = nnx.Optimizer(ref, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  start = np.asarray(ref.l1.kernel[...])
  for x, y in zip(xs, ys):
    ref_opt.update(ref, nnx.grad(loss_fn)(ref, x, y))
  for got, want in [(model.l1.kernel, ref.l1.kernel), (model.l1.bias, ref.l1.bias),
                    (model.l2.kernel, ref.l2.kernel), (model.l2.bias, ref.l2.bias)]:
    np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(ref.l1.kernel[...]) - start).max() > 1e-2


def test_nnx_optimizer_with_per_replica_hook_state(mesh8):
  """A stateful hook: the optimizer is made on every replica by init_state, so its
  PowerSGD residuals carry the replica axis and data_parallel shards them."""
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=hooks.powersgd(rank=1, start_iter=0)),
                   optax.sgd(0.1, momentum=0.9))
  model = MLP(nnx.Rngs(0))
  optimizer = ddp_jax.init_state(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param), model, mesh8,
                                 "data")
  residual = optimizer.opt_state[0].hook_states[0].residual
  assert residual.shape[0] == 8

  def train_step(model, optimizer, x, y):
    loss, grads = ddp_jax.value_and_grad(loss_fn, "data")(model, x, y)
    optimizer.update(model, grads)
    return model, optimizer, jax.lax.pmean(loss, "data")

  step = ddp_jax.data_parallel(train_step, mesh8, "data", batch_argnums=(2, 3))
  # One batch, five steps: its loss must go down every step. (Five random batches, as
  # before, compared the last batch's loss with the first's: 2.45-2.75 from the batch
  # alone, so a change of PowerSGD's random start flipped it.)
  xs, ys = batches(steps=1)
  losses = []
  for _ in range(5):
    model, optimizer, loss = step(model, optimizer, xs[0], ys[0])
    losses.append(float(loss))
  new = optimizer.opt_state[0].hook_states[0].residual
  assert new.shape == residual.shape and np.abs(np.asarray(new[...])).max() > 0
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.1, losses  # 2.26 -> 2.02-2.03 (rank 1, momentum 0.9)


def test_nnx_example_trains(standard_promotion):
  result = train_nnx.train("allreduce", steps=150)
  assert result["accuracy"] > 0.95


def test_batchnorm_with_axis_name_is_sync_batchnorm(mesh8):
  """docs/from_pytorch.md: DDP's SyncBatchNorm is flax's BatchNorm(axis_name=...) inside the
  mapped step. Its outputs and running statistics over 8 replicas' slices equal one
  BatchNorm over the whole batch (f32 means of 32 rows summed in another order: a few ulp
  of values of order 1-10, so 1e-5)."""
  from jax.sharding import PartitionSpec as P
  x = (np.random.default_rng(0).normal(size=(32, 3)) * [1, 2, 3] + [0, 1, 2]).astype(np.float32)
  graphdef, state = nnx.split(nnx.BatchNorm(3, axis_name="data", rngs=nnx.Rngs(0)))

  def normalize(state, x):
    model = nnx.merge(graphdef, state)
    return model(x), nnx.state(model)

  y, stats = jax.jit(jax.shard_map(normalize, mesh=mesh8, in_specs=(P(), P("data")),
                                   out_specs=(P("data"), P())))(
      ddp_jax.replicate(state, mesh8), ddp_jax.shard(x, mesh8, "data"))
  reference = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference(jnp.asarray(x))), atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(nnx.state(reference))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(jax.tree.leaves(stats)[1]) != 0)  # the running mean moved
