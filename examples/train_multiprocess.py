"""Data-parallel training across processes, launched like torchrun:

    ddp-jax-run --nproc-per-node 2 --cpu-devices 4 examples/train_multiprocess.py --steps 300

Every process joins with ``ddp_jax.initialize()`` (gloo collectives on CPU; NCCL on
GPUs), starts from process 0's parameters, reads its own shard of scikit-learn's
digits each epoch (``ddp_jax.shard_indices``, PyTorch's DistributedSampler), and builds
the global batch from the local ones (``ddp_jax.global_batch``). Process 0 shows a
progress bar and saves the loss plot; at the end every process checks it holds the same
parameters (``ddp_jax.verify_replicas``).
"""

from __future__ import annotations

import argparse
import os


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-per-device", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--hook", default="allreduce()")
  p.add_argument("--out", default="examples/out")
  args = p.parse_args()

  import jax
  import numpy as np
  import optax
  from train_cpu_mesh import data_parallel_step, digits, make_hook, mlp

  import ddp_jax

  info = ddp_jax.initialize()
  rank = info["process_id"]
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  x, y, train_idx, test_idx = digits()
  model = mlp()
  params = model.init(jax.random.key(rank), x[:1])  # different per process on purpose
  params = ddp_jax.broadcast_from_process0(params, mesh)  # ... until process 0's win
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=make_hook(args.hook)),
                   optax.adam(args.lr))
  step, params, opt_state = data_parallel_step(model, tx, params, mesh)
  local = args.batch_per_device * jax.local_device_count()
  bar = range(args.steps)
  if rank == 0:
    from tqdm import trange
    bar = trange(args.steps, desc=f"{info['num_processes']} processes")
  losses, epoch, cursor, mine = [], 0, 0, None
  for _ in bar:
    if mine is None or cursor + local > len(mine):
      mine = train_idx[ddp_jax.shard_indices(len(train_idx), epoch=epoch, drop_last=True)]
      epoch, cursor = epoch + 1, 0
    idx = mine[cursor: cursor + local]
    cursor += local
    xb, yb = ddp_jax.global_batch((x[idx], y[idx]), mesh)
    params, opt_state, loss = step(params, opt_state, xb, yb)
    losses.append(float(loss))
  ddp_jax.verify_replicas(params, check_values=True)
  host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
  acc = float((np.argmax(model.apply(host, x[test_idx]), -1) == y[test_idx]).mean())
  print(f"process {rank}: test accuracy {acc:.4f}, final loss {np.mean(losses[-20:]):.4f}, "
        f"parameters identical on all {info['num_processes']} processes", flush=True)
  if rank == 0:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=1)
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"digits MLP, {info['num_processes']} processes x "
                 f"{jax.local_device_count()} devices, acc={acc:.3f}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss_multiprocess.png"), dpi=100)
    print(f"loss plot: {args.out}/loss_multiprocess.png", flush=True)


if __name__ == "__main__":
  main()
