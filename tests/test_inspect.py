"""The HLO inspect helper: one collective call per bucket, what XLA made of it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax.inspect import collectives, count_collectives
from tests.helpers import per_device_grads


def grads_tree():
  return {f"w{i}": jnp.zeros((64, 100 + i)) for i in range(12)} | {
      "h": jnp.zeros((30,), jnp.bfloat16)}


def sync_fn(tx, mesh):
  def step(g):
    g = jax.tree.map(lambda x: x[0], g)
    return tx.update(g, tx.init(g))[0]
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P()))


@pytest.mark.parametrize("pack", ["ravel", "variadic", "auto"])
def test_lowered_one_call_per_bucket(mesh8, pack):
  kw = dict(first_bucket_cap_mb=0.05, bucket_cap_mb=0.1)
  plan = ddp_jax.plan_buckets(grads_tree(), **kw)
  assert plan.num_buckets == 5
  tx = ddp_jax.sync_gradients("data", pack=pack, **kw)
  g = ddp_jax.shard(per_device_grads(grads_tree(), 8), mesh8, "data")
  report = collectives(sync_fn(tx, mesh8), g)
  # The bf16 bucket (30 elements) is summed by an all-to-all and an all-gather of its
  # 16-bit words (hooks._collectives.sum_16bit: XLA's CPU all-reduce would widen it to f32).
  half = [b for b in plan.buckets if b.dtype.itemsize == 2]
  assert len(half) == 1 and half[0].size == 30
  low = report.lowered["all-reduce"]
  assert low.calls == plan.num_buckets - 1
  if pack == "ravel":  # one contiguous buffer per bucket: one HLO all-reduce each
    assert low.ops == low.operands == plan.num_buckets - 1
  elif pack == "variadic":  # JAX lowers a multi-operand psum to one op per operand
    assert low.ops == 12
  assert low.bytes == sum(b.nbytes for b in plan.buckets) - half[0].nbytes
  comp = report.compiled["all-reduce"]
  assert 1 <= comp.ops <= low.ops  # XLA's combiner merges
  assert comp.operands == low.operands
  assert comp.bytes == low.bytes  # nothing promoted
  padded = 2 * 32  # 30 bf16 elements padded to a multiple of 8 replicas
  for kind in ("all-to-all", "all-gather"):
    for stage in (report.lowered, report.compiled):
      assert stage[kind].bytes_by_dtype == {"u16": padded}, report.summary()
  assert "all-reduce" in report.summary()


def test_plain_pmean_counts(mesh8):
  g = ddp_jax.shard(per_device_grads(grads_tree(), 8), mesh8, "data")
  f = jax.jit(jax.shard_map(lambda g: jax.lax.pmean(jax.tree.map(lambda x: x[0], g), "data"),
                            mesh=mesh8, in_specs=P("data"), out_specs=P()))
  r = collectives(f, g)
  assert r.lowered["all-reduce"].ops == 13 and r.lowered["all-reduce"].calls == 13


def test_count_from_text():
  text = """
  %a = (f32[4]{0}, bf16[2,3]{1,0}) all-reduce(%x, %y), channel_id=1, metadata={op_name="jit(f)/ddp_bucket3/psum"}
  %b = f32[8,3]{1,0} all-gather(%z), channel_id=2
  %c = f32[16]{0} all-reduce-start(%w), channel_id=3
  %d = f32[16]{0} all-reduce-done(%c)
  %e = s8[10]{0} reduce-scatter(%v), channel_id=4
  """
  r = count_collectives(text)
  assert (r["all-reduce"].ops, r["all-reduce"].operands, r["all-reduce"].bytes) == (2, 3, 92)
  assert r["all-reduce"].calls == 2
  assert r["all-gather"].bytes == 96 and r["reduce-scatter"].bytes == 10


def test_async_all_reduce_counts_its_operands_not_its_tuple():
  """XLA:GPU's all-reduce-start has the type (operands, results[, contexts]): bytes and
  operands come from what it sums (seen as 2x bytes on an H100's compiled step)."""
  text = """
ENTRY %main (p: f32[2048,2048], q: f32[2048]) -> f32[2048,2048] {
  %p = f32[2048,2048]{1,0} parameter(0)
  %q = f32[2048]{0} parameter(1)
  %fusion.3 = f32[2048,2048]{1,0} fusion(%p), kind=kLoop, calls=%f
  %s1 = (f32[2048,2048]{1,0}, f32[2048,2048]{1,0}) all-reduce-start(%fusion.3), channel_id=1
  %d1 = f32[2048,2048]{1,0} all-reduce-done(%s1)
  %s2 = ((f32[2048,2048]{1,0}, f32[2048]{0}), (f32[2048,2048]{1,0}, f32[2048]{0}), u32[], u32[]) all-reduce-start(%d1, %q), channel_id=2
  %s3 = f32[2048]{0} all-reduce-start(f32[2048]{0} %q), channel_id=3
  %s4 = ((f32[2048,2048]{1,0}, f32[2048]{0}), (f32[2048,2048]{1,0}, f32[2048]{0})) all-reduce-start(f32[2048,2048]{1,0} %p, f32[2048]{0} %q), channel_id=4
}
"""
  c = count_collectives(text)["all-reduce"]
  weight, bias = 2048 * 2048 * 4, 2048 * 4
  # %s4: operands printed with multi-dimensional shapes (commas inside [] and {})
  assert (c.ops, c.operands, c.bytes) == (4, 6, 3 * weight + 3 * bias)
  assert c.bytes_by_dtype == {"f32": 3 * weight + 3 * bias}


def test_works_on_pmap():
  f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
  r = collectives(f, np.ones((8, 3), np.float32))
  assert r.lowered["all-reduce"].ops == 1


def test_a_lowered_step_is_counted_as_its_function():
  """``collectives(step.lower(*args))`` (what the README's step offers) counts the same as
  ``collectives(step, *args)``; arguments beside a lowered program are refused."""
  mesh = jax.make_mesh((8,), ("data",))
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))
  params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros(4)}

  def train_step(p, s, x):
    g = ddp_jax.grad(lambda p, x: jnp.sum((x @ p["w"] + p["b"]) ** 2), "data")(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=2)
  s = ddp_jax.init_state(tx, params, mesh, "data")
  x = np.ones((16, 16), np.float32)
  by_fn = collectives(step, params, s, x)
  by_lowered = collectives(step.lower(params, s, x))
  assert by_lowered.compiled == by_fn.compiled
  assert by_lowered.compiled["all-reduce"].ops == 1
  with pytest.raises(TypeError, match="takes no arguments"):
    collectives(step.lower(params, s, x), params)


def test_16bit_sum_off_cpu_is_the_plain_all_reduce(mesh8, monkeypatch):
  """Off CPU (GPU, TPU) a 16-bit bucket keeps ``psum`` over the pack's operands: no
  all-to-all and no extra raveled copy of the bucket (``pack="variadic"``)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # only the decision reads it
  tx = ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.fp16_compress(), pack="variadic")
  g = ddp_jax.shard(per_device_grads(grads_tree(), 8), mesh8, "data")
  low = collectives(sync_fn(tx, mesh8), g).lowered
  assert set(low) == {"all-reduce"}
  assert low["all-reduce"].operands == 13 and set(low["all-reduce"].bytes_by_dtype) == {"f16"}
