"""Run by ddp-jax-run in tests/test_faults.py: one failure mode per argument."""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ddp_jax

mode = sys.argv[1]
info = ddp_jax.initialize()
rank = info["process_id"]
print(f"READY {os.getpid()}", flush=True)
mesh = jax.make_mesh((jax.device_count(),), ("data",))

settings = {"order": "reverse", "hook": "allreduce()", "bucket_cap_mb": 25, "pack": "auto"}
tree = {"w": np.ones((16, 8), np.float32), "b": np.ones((8,), np.float32),
        "c": np.ones((8,), np.float32)}
if rank == 1 and mode.startswith("mismatch_"):  # rank 1 differs in one thing
  what = mode[len("mismatch_"):]
  if what == "order":
    settings["order"] = "forward"
  elif what == "hook":
    settings["hook"] = "int8_allreduce()"
  elif what == "cap":
    settings["bucket_cap_mb"] = 0.0001
  elif what == "pack":
    settings["pack"] = "variadic"
  elif what == "tree":
    tree["c"] = np.ones((9,), np.float32)
  elif what == "chain":  # one rank's buckets chained, the other's merged by XLA
    os.environ["DDP_JAX_BUCKET_CHAIN"] = "1"
  elif what == "host_memory":  # as if started without ddp-jax-run's malloc settings
    os.environ["GLIBC_TUNABLES"] = ""


if mode == "broadcast":  # mixed dtypes, scalars, bools: process 0's values everywhere
  import json
  mine = {"f": np.full((3, 2), 1.5 + rank, np.float32), "i": np.arange(4, dtype=np.int32) * (rank + 1),
          "b": np.array([True, rank == 0, False]), "h": np.full((2,), rank, np.float16),
          "s": np.float32(7 + rank), "e": np.zeros((0, 3), np.float32)}
  got = ddp_jax.broadcast_from_process0(mine)
  print("RESULT " + json.dumps({k: np.asarray(v).tolist() for k, v in got.items()}), flush=True)
  print("DTYPES " + json.dumps({k: str(np.asarray(v).dtype) for k, v in got.items()}), flush=True)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  placed = ddp_jax.broadcast_from_process0(mine, mesh)  # placed on the mesh, replicated
  print("PLACED " + json.dumps({k: [np.asarray(v).tolist(), str(v.sharding.spec)]
                                for k, v in placed.items()}), flush=True)
  sys.exit(0)
if mode == "unequal":  # forgot to broadcast: init_state refuses (digests, no array gather)
  tree["b"] = tree["b"] + rank


def loss_fn(p, x):
  return sum(jnp.sum(v) for v in jax.tree.leaves(p)) * jnp.mean(x)


def train_step(p, s, x):
  loss, g = ddp_jax.value_and_grad(loss_fn, "data")(p, x)
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s, jax.lax.pmean(loss, "data")


tx = optax.chain(ddp_jax.sync_gradients(
    "data", hook=ddp_jax.hooks.parse(settings["hook"]), order=settings["order"],
    bucket_cap_mb=settings["bucket_cap_mb"], first_bucket_cap_mb=settings["bucket_cap_mb"],
    pack=settings["pack"]), optax.sgd(0.1))
step = ddp_jax.data_parallel(train_step, mesh, "data", batch_argnums=2)
state = ddp_jax.init_state(tx, tree, mesh, "data")
x = ddp_jax.global_batch(np.ones((jax.local_device_count(),), np.float32), mesh)

if mode == "serve":  # stays up until stopped (signals, bind address)
  time.sleep(600)
params, state, _ = step(tree, state, x)  # the first collective (and the config check)
print(f"STEP 1 {float(jax.tree.leaves(params)[0].addressable_data(0).ravel()[0])}", flush=True)
if mode == "stuck" and rank == 1:
  time.sleep(600)  # alive, heartbeating, never reaching the next collective
if mode == "exit0" and rank == 1:
  sys.exit(0)  # ends its script early, cleanly
for _ in range(3):
  params, state, _ = step(params, state, x)
print(f"DONE {float(jax.tree.leaves(params)[0].addressable_data(0).ravel()[0])}", flush=True)
