"""The oracle: PyTorch DDP itself, N gloo ranks on localhost, training a small MLP.

    python tests/mp_scripts/torch_ddp.py --world 4 --job IN.npz OUT.npz fp16 0.1 0.9 [--job ...]

Each job: IN.npz holds the initial weights (torch layout: w1 (32, 20), b1, w2 (10, 32),
b2) and the global batches xs (steps, world * per_rank, 20), ys (steps, world *
per_rank); rank r takes rows [r * per_rank, (r + 1) * per_rank) of each; the hook
(allreduce or fp16), the SGD learning rate and momentum follow. Rank 0 writes the final
weights to OUT.npz. The jobs run one after the other in one set of ranks.
"""

import argparse
import os
import socket
import sys

import numpy as np


def train(rank, world, inp, out, hook, lr, momentum):
  import torch
  import torch.nn.functional as F
  from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
  from torch.nn.parallel import DistributedDataParallel as DDP

  d = np.load(inp)
  model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
  with torch.no_grad():
    for layer, w, b in ((model[0], "w1", "b1"), (model[2], "w2", "b2")):
      layer.weight.copy_(torch.from_numpy(d[w]))
      layer.bias.copy_(torch.from_numpy(d[b]))
  ddp = DDP(model)
  if hook == "fp16":
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
  opt = torch.optim.SGD(ddp.parameters(), lr=float(lr), momentum=float(momentum))
  per = d["xs"].shape[1] // world
  for x, y in zip(d["xs"], d["ys"]):
    rows = slice(rank * per, (rank + 1) * per)
    loss = F.cross_entropy(ddp(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]).long())
    opt.zero_grad()
    loss.backward()
    opt.step()
  if rank == 0:
    np.savez(out, w1=model[0].weight.detach().numpy(), b1=model[0].bias.detach().numpy(),
             w2=model[2].weight.detach().numpy(), b2=model[2].bias.detach().numpy())


def run(rank, args, port):
  import torch
  import torch.distributed as dist

  torch.set_num_threads(1)
  os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
  dist.init_process_group("gloo", rank=rank, world_size=args.world)
  for job in args.job:
    train(rank, args.world, *job)
  dist.barrier()  # every rank done (rank 0 wrote the results)
  # gloo's teardown sometimes aborts a rank after the fp16 hook ("terminate called without
  # an active exception": seen in CI and in benchmarks/bench_peer.py): skip it.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--world", type=int, default=4)
  p.add_argument("--job", nargs=5, action="append", required=True,
                 metavar=("IN", "OUT", "HOOK", "LR", "MOMENTUM"))
  args = p.parse_args()
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  import torch.multiprocessing as mp
  mp.spawn(run, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
  main()
