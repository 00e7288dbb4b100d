"""Input sharding across processes: DDP's ``DistributedSampler`` and global batches."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def shard_indices(num_samples: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                  drop_last: bool = False, num_replicas: int | None = None,
                  rank: int | None = None) -> np.ndarray:
  """This process's sample indices for ``epoch`` (PyTorch's ``DistributedSampler``).

  Every process draws the same permutation (seeded by ``seed + epoch``) and takes every
  ``num_replicas``-th index from position ``rank``. Without ``drop_last`` the list is
  padded by wrapping around so all ranks get the same count; with it, the tail that does
  not divide evenly is dropped. Defaults: ``jax.process_count()`` / ``jax.process_index()``.

  Examples:
    >>> shard_indices(10, shuffle=False, num_replicas=3, rank=1).tolist()
    [1, 4, 7, 0]
  """
  num_replicas = jax.process_count() if num_replicas is None else num_replicas
  rank = jax.process_index() if rank is None else rank
  if num_samples < 1:
    raise ValueError(f"shard_indices: num_samples must be >= 1, got {num_samples}.")
  if num_replicas < 1 or not 0 <= rank < num_replicas:
    raise ValueError(f"shard_indices: rank {rank} is not in [0, {num_replicas}).")
  if shuffle:
    indices = np.random.default_rng(seed + epoch).permutation(num_samples)
  else:
    indices = np.arange(num_samples)
  if drop_last:
    per = num_samples // num_replicas
    if per == 0:
      raise ValueError(f"shard_indices: {num_samples} samples cannot be split over "
                       f"{num_replicas} replicas with drop_last=True.")
  else:
    per = -(-num_samples // num_replicas)
  total = per * num_replicas
  if total > len(indices):
    indices = np.concatenate([indices] * (-(-total // len(indices))))
  return indices[:total][rank::num_replicas]


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh, axis_name="data") -> Any:
  """Builds global arrays, split over ``axis_name``, from each process's local batch.

  Every process passes its own rows (leading axis); the result is what a
  ``jax.shard_map`` step with ``in_specs=P(axis_name)`` expects. In a single process it
  is ``ddp_jax.shard``.
  """
  sharding = NamedSharding(mesh, P(axis_name))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
