"""Run by ddp-jax-run in tests: sync known gradients over all processes' devices and
train a few steps; prints one JSON line per result, prefixed RESULT."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import ddp_jax

info = ddp_jax.initialize()
assert ddp_jax.initialize() == info  # idempotent
mode = sys.argv[1]
n = jax.device_count()
mesh = jax.make_mesh((n,), ("data",))


def grads_for(device_index, step):
  rng = np.random.default_rng(1000 * step + device_index)
  return {"w": rng.standard_normal((16, 12)).astype(np.float32),
          "b": rng.standard_normal((12,)).astype(np.float32)}


def local_stacked(step):
  """This process's rows of the (devices, ...) gradient arrays."""
  order = [list(mesh.devices.flat).index(d) for d in mesh.local_devices]
  per = [grads_for(i, step) for i in order]
  return jax.tree.map(lambda *xs: np.stack(xs), *per)


hooks = {"allreduce": ddp_jax.hooks.allreduce(),
         "powersgd": ddp_jax.hooks.powersgd(rank=2, start_iter=1),
         "int8_ef": ddp_jax.hooks.error_feedback(ddp_jax.hooks.int8_allreduce())}

if mode == "sync":
  for name, hook in hooks.items():
    tx = ddp_jax.sync_gradients("data", hook=hook)
    params = grads_for(0, 0)
    state = ddp_jax.init_state(tx, params, mesh, "data")
    specs = ddp_jax.state_specs(state, "data")
    fn = jax.jit(jax.shard_map(lambda s, g, tx=tx: tx.update(jax.tree.map(lambda x: x[0], g), s),
                               mesh=mesh, in_specs=(specs, P("data")), out_specs=(P(), specs)))
    for step in range(3):
      u, state = fn(state, ddp_jax.global_batch(local_stacked(step), mesh))
    out = {k: np.asarray(v.addressable_data(0)).tolist() for k, v in u.items()}
    print("RESULT " + json.dumps({"hook": name, "rank": info["process_id"], "u": out}))
elif mode == "train":
  params = {"w": jnp.zeros((16, 12)), "b": jnp.zeros((12,))}
  # Different starting points per process: broadcast_from_process0 makes them equal.
  params = jax.tree.map(lambda x: x + 0.1 + info["process_id"], params)
  params = ddp_jax.broadcast_from_process0(params)
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))

  def loss(p, x):
    return jnp.mean((x @ p["w"] + p["b"]) ** 2)

  def step(p, s, x):
    u, s = tx.update(ddp_jax.grad(loss, "data")(p, x), s, p)
    return optax.apply_updates(p, u), s

  state = ddp_jax.init_state(tx, params, mesh, "data")
  fn = ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2)
  p, ref = params, jax.tree.map(np.asarray, params)
  for t in range(5):
    idx = ddp_jax.shard_indices(64, epoch=t)
    rng = np.random.default_rng(t)
    full = rng.standard_normal((64, 16)).astype(np.float32)
    p, state = fn(p, state, ddp_jax.global_batch(full[idx], mesh))
    # One device, the whole batch (the mean gradient does not depend on the row order).
    ref = jax.tree.map(lambda a, g: a - 0.1 * g, ref, jax.grad(loss)(ref, full))
  ddp_jax.verify_replicas(p, check_values=True)
  w = np.asarray(p["w"].addressable_data(0))
  diff = max(float(np.abs(np.asarray(p[k].addressable_data(0)) - ref[k]).max()) for k in ref)
  print("RESULT " + json.dumps({"rank": info["process_id"], "w_sum": float(w.sum()),
                                "w00": float(w[0, 0]), "diff_vs_one_device": diff}))
elif mode == "warmup":
  # PowerSGD switching at start_iter through data_parallel: the warm-up program until
  # then, the full one after, on every process at the same call; the same numbers as the
  # full program all along (DDP_JAX_WARMUP_PROGRAM=0).
  import os
  rng = np.random.default_rng(0)
  params0 = {"w": rng.standard_normal((16, 12)).astype(np.float32),
             "b": rng.standard_normal((12,)).astype(np.float32)}
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.powersgd(
      rank=2, start_iter=2, min_compression_rate=1)), optax.sgd(0.1))

  def loss(p, x):
    return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

  def step(p, s, x):
    u, s = tx.update(ddp_jax.grad(loss, "data")(p, x), s, p)
    return optax.apply_updates(p, u), s

  runs = {}
  for setting in ("1", "0"):
    os.environ["DDP_JAX_WARMUP_PROGRAM"] = setting
    fn = ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2)
    p = ddp_jax.broadcast_from_process0(params0, mesh)
    state = ddp_jax.init_state(tx, p, mesh, "data")
    programs = []
    for t in range(5):
      full = np.random.default_rng(t).standard_normal((64, 16)).astype(np.float32)
      p, state = fn(p, state, ddp_jax.global_batch(full[ddp_jax.shard_indices(64)], mesh))
      programs.append(fn.last_program)
    runs[setting] = ({k: np.asarray(v.addressable_data(0)).tolist() for k, v in p.items()},
                     programs)
  print("RESULT " + json.dumps({"rank": info["process_id"], "warm": runs["1"][0],
                                "full": runs["0"][0], "programs": runs["1"][1]}))
elif mode == "warmup_mismatch":
  # Process 1 turned warm-up programs off: the configuration check refuses before the
  # first collective (the programs' collectives would not match).
  import os
  os.environ["DDP_JAX_WARMUP_PROGRAM"] = "0" if info["process_id"] == 1 else "1"
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.powersgd(
      rank=2, start_iter=2, min_compression_rate=1)), optax.sgd(0.1))

  def step(p, s, x):
    u, s = tx.update(ddp_jax.grad(lambda p, x: jnp.mean((x @ p["w"]) ** 2), "data")(p, x), s, p)
    return optax.apply_updates(p, u), s

  fn = ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2)
  p = ddp_jax.broadcast_from_process0({"w": np.ones((16, 12), np.float32)}, mesh)
  state = ddp_jax.init_state(tx, p, mesh, "data")
  x = np.ones((64, 16), np.float32)
  try:
    fn(p, state, ddp_jax.global_batch(x[ddp_jax.shard_indices(64)], mesh))
    error = None
  except ValueError as e:
    error = str(e)
  print("RESULT " + json.dumps({"rank": info["process_id"], "error": error}))
elif mode == "hier":
  # node = process: each process's devices form one row of the ("node", "local") mesh.
  devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  local = jax.local_device_count()
  mesh2 = jax.sharding.Mesh(np.array(devs).reshape(-1, local), ("node", "local"))
  flat = list(mesh2.devices.flat)
  axes = ("node", "local")
  for name, inner in [("allreduce", ddp_jax.hooks.allreduce()),
                      ("fp16", ddp_jax.hooks.fp16_compress())]:
    tx = ddp_jax.sync_gradients(axes, hook=ddp_jax.hooks.hierarchical(inner, local_size=local))
    state = ddp_jax.init_state(tx, grads_for(0, 0), mesh2, axes)
    specs = ddp_jax.state_specs(state, axes)
    fn = jax.jit(jax.shard_map(lambda s, g, tx=tx: tx.update(jax.tree.map(lambda x: x[0], g), s),
                               mesh=mesh2, in_specs=(specs, P(axes)), out_specs=(P(), specs)))
    mine = [flat.index(d) for d in mesh2.local_devices]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[grads_for(i, 0) for i in mine])
    g = ddp_jax.global_batch(stacked, mesh2, axes)
    u, state = fn(state, g)
    out = {k: np.asarray(v.addressable_data(0)).tolist() for k, v in u.items()}
    print("RESULT " + json.dumps({"hook": name, "rank": info["process_id"], "u": out}))
elif mode == "fail":
  import time
  if info["process_id"] == 1:
    print("rank 1 failing on purpose", flush=True)
    raise RuntimeError("boom")
  time.sleep(120)
