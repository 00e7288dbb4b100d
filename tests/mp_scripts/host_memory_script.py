"""Page faults per call of a step whose output is a fresh 100 MB buffer, as started by
ddp-jax-run (``--host-memory hugepages`` or ``system``). Prints ``RESULT {...}``."""

import json
import resource

import jax
import jax.numpy as jnp

from ddp_jax._host_memory import host_memory_mode

x = jnp.ones((25_000_000,), jnp.float32)
double = jax.jit(lambda a: a * 2.0)
jax.block_until_ready(double(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  jax.block_until_ready(double(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print("RESULT " + json.dumps({"mode": host_memory_mode(), "faults_per_call": faults}),
      flush=True)
