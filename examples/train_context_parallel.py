"""Train a tiny model on one long sequence split across processes (context parallelism).

    torchrun --nproc-per-node 2 examples/train_context_parallel.py                 # CPU, gloo
    torchrun --nproc-per-node 4 examples/train_context_parallel.py --device cuda   # one GPU a rank, NCCL

Each rank holds a contiguous slice of the sequence and runs the attention layers through
``lightning_op.distributed.context_parallel_attn``: one all-gather of per-layer states forward and
one of state gradients backward, whatever the length. DDP over the same ranks adds up the
parameter gradients. Rank 0 also trains a copy of the model on the whole sequence in one process
and prints `check <name>: max_rel_err=<e> tol=<t>` for the losses and the first step's gradients;
every rank exits non-zero if one is above its tolerance.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import lightning_op
from lightning_op.distributed import context_parallel_attn


class Attention(nn.Module):
    """Causal linear attention with per-layer decays; ``group`` splits the sequence across its ranks."""

    def __init__(self, hidden, heads, layer_idx, num_layers, group=None):
        super().__init__()
        self.heads, self.group = heads, group
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.register_buffer("decay", lightning_op.slopes(heads, layer_idx, num_layers), persistent=False)

    def forward(self, x):
        b, n, hidden = x.shape
        q, k, v = (t.transpose(1, 2) for t in F.silu(self.qkv(x)).view(b, n, 3, self.heads, -1).unbind(2))
        if self.group is None:
            o = lightning_op.lightning_attn(q, k, v, self.decay)
        else:
            o = context_parallel_attn(q, k, v, self.decay, group=self.group)
        return self.out(o.transpose(1, 2).reshape(b, n, hidden))


class TinyLM(nn.Module):
    def __init__(self, vocab=256, hidden=64, heads=4, layers=2, group=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.attns = nn.ModuleList(Attention(hidden, heads, i, layers, group) for i in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.head(self.norm(x))


def relative_error(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="length of the one training sequence")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(device)
    tol = 1e-4  # float32 throughout; a missing cross-rank state shows as 1e-2 and more

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, args.tokens + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # equal contiguous slices (the last takes the remainder), weighted by their share of the tokens,
    # so that DDP's average of the ranks' gradients is the whole sequence's mean loss's
    bounds = [args.tokens * r // world for r in range(world + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])
    weight = (bounds[rank + 1] - bounds[rank]) * world / args.tokens

    torch.manual_seed(0)
    model = DistributedDataParallel(TinyLM(group=dist.group.WORLD).to(device))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if rank == 0:
        torch.manual_seed(0)
        whole = TinyLM().to(device)
        whole_optimiser = torch.optim.AdamW(whole.parameters(), lr=1e-3)
        print(f"lightning_op {lightning_op.__version__} | torch {torch.__version__} | {world} ranks on "
              f"{args.device} | {args.tokens} tokens, {bounds[1] - bounds[0]} a rank")

    failures = 0
    for step in range(args.steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(inputs[:, mine]).flatten(0, 1), targets[:, mine].flatten()) * weight
        loss.backward()
        optimiser.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        if rank == 0:
            whole_optimiser.zero_grad()
            whole_loss = F.cross_entropy(whole(inputs).flatten(0, 1), targets.flatten())
            whole_loss.backward()
            whole_optimiser.step()
            checks = {f"loss_step{step}_vs_one_process": relative_error(mean_loss, whole_loss)}
            if step == 0:
                checks["gradients_step0_vs_one_process"] = max(
                    relative_error(a.grad, b.grad) for a, b in zip(model.module.parameters(), whole.parameters())
                )
            print(f"step {step}: loss {mean_loss.item():.5f} (one process {whole_loss.item():.5f})")
            for name, error in checks.items():
                print(f"    check {name}: max_rel_err={error:.2e} tol={tol:.0e}")
                failures += not error <= tol  # NaN fails too

    verdict = torch.tensor([failures], device=device)
    dist.broadcast(verdict, 0)
    dist.destroy_process_group()
    sys.exit(1 if verdict.item() else 0)


if __name__ == "__main__":
    main()
