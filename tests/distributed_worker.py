"""One rank of tests/test_distributed.py, run as `python distributed_worker.py CASE OUT_DIR` with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each rank takes an unequal share of one global
batch whose labels are sorted (so every rank sees a different class mix, some ignored targets), trains
a linear layer under DDP (gloo) with the fused loss and process_group=, and compares its loss and
gradients with one process on the whole batch through PyTorch's own loss. Writes OUT_DIR/<rank>.json."""
import copy
import datetime
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import weighted_loss as wl

C, H, N = 7, 16, 120


class LMHead(torch.nn.Module):
    """A language model's last layer as the fused linear loss uses it: the forward passes the
    hidden states through, the loss reads proj's weight and bias (the model is DDP's)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(H, C)

    def forward(self, h):
        return h


def global_batch(loss):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g)
    if loss == "bce":
        y = (torch.rand(N, C, generator=g) < torch.linspace(0.05, 0.6, C)).float()
        return x, y, None
    probs = torch.tensor([0.02, 0.4, 0.05, 0.25, 0.08, 0.15, 0.05])
    y = torch.multinomial(probs, N, replacement=True, generator=g)
    y[torch.rand(N, generator=g) < 0.1] = -100
    order = torch.argsort(y, stable=True)  # ranks get different classes
    counts = torch.bincount(y[y >= 0], minlength=C).double() + 1
    return x[order], y[order], (counts.max() / counts).float()


def main():
    case, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    loss_kind = case.split("-")[0]
    x_all, y_all, w = global_batch(loss_kind)
    sizes = [N * (r + 1) // sum(range(1, world + 1)) for r in range(world)]
    sizes[-1] = N - sum(sizes[:-1])
    start = sum(sizes[:rank])
    x, y = x_all[start:start + sizes[rank]], y_all[start:start + sizes[rank]]

    torch.manual_seed(1)
    model = LMHead() if loss_kind == "linear" else torch.nn.Linear(H, C)
    ref = copy.deepcopy(model)
    if loss_kind == "bce":
        ref_loss = F.binary_cross_entropy_with_logits(ref(x_all), y_all)
    elif loss_kind == "linear":
        ref_loss = F.cross_entropy(ref.proj(x_all), y_all, weight=w)
    else:
        ref_loss = F.cross_entropy(ref(x_all), y_all, weight=w)
    ref_loss.backward()

    ddp = DDP(model)
    if case == "ce-ddp":
        loss = wl.cross_entropy(ddp(x), y, weight=w, process_group=group)
        loss.backward()
        value = loss.item()
    elif case == "ce-module":
        fn = wl.CrossEntropyLoss(weight=w, process_group=group)
        loss = fn(ddp(x), y)
        loss.backward()
        value = loss.item()
    elif case == "ce-accum":  # two micro-batches, the denominator of the whole step
        half = x.shape[0] // 2
        parts = [(x[:half], y[:half]), (x[half:], y[half:])]
        total = wl.total_weight([p[1] for p in parts], w, process_group=group)
        value = 0.0
        with ddp.no_sync():
            loss = wl.cross_entropy(ddp(parts[0][0]), parts[0][1], weight=w, process_group=group,
                                    total_weight=total)
            loss.backward()
            value += loss.item()
        loss = wl.cross_entropy(ddp(parts[1][0]), parts[1][1], weight=w, process_group=group,
                                total_weight=total)
        loss.backward()
        value += loss.item()
    elif case == "ce-compile":  # the grouped loss traced whole: functional collectives
        fn = torch.compile(lambda out, t: wl.cross_entropy(out, t, weight=w, process_group=group),
                           fullgraph=True)
        loss = fn(ddp(x), y)
        loss.backward()
        value = loss.item()
    elif case == "linear-ddp":  # the fused linear head, chunks of 9 rows
        head = ddp.module.proj
        loss = wl.linear_cross_entropy(ddp(x), head.weight, y, head.bias, weight=w,
                                       chunk_size=9, process_group=group)
        loss.backward()
        value = loss.item()
    elif case == "linear-accum":  # two micro-batches, the denominator of the whole step
        head = ddp.module.proj
        half = x.shape[0] // 2
        parts = [(x[:half], y[:half]), (x[half:], y[half:])]
        total = wl.total_weight([p[1] for p in parts], w, process_group=group)
        fn = wl.LinearCrossEntropyLoss(weight=w, chunk_size=9, process_group=group)
        value = 0.0
        with ddp.no_sync():
            loss = fn(ddp(parts[0][0]), head.weight, parts[0][1], head.bias, total_weight=total)
            loss.backward()
            value += loss.item()
        loss = fn(ddp(parts[1][0]), head.weight, parts[1][1], head.bias, total_weight=total)
        loss.backward()
        value += loss.item()
    elif case == "bce-ddp":
        loss = wl.binary_cross_entropy_with_logits(ddp(x), y, process_group=group)
        loss.backward()
        value = loss.item()
    else:
        raise SystemExit(f"unknown case {case}")

    got = {"rank": rank, "loss": value, "ref_loss": ref_loss.item(),
           "grad_diff": max((p.grad - q.grad).abs().max().item()
                            for p, q in zip(model.parameters(), ref.parameters())),
           "grad_scale": max(q.grad.abs().max().item() for q in ref.parameters())}
    # what plain DDP would give (each rank its own weighted mean, then averaged): must differ
    if case == "ce-ddp":
        torch.manual_seed(1)
        plain = DDP(torch.nn.Linear(H, C))
        F.cross_entropy(plain(x), y, weight=w).backward()
        got["plain_grad_diff"] = max((p.grad - q.grad).abs().max().item()
                                     for p, q in zip(plain.parameters(), ref.parameters()))
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(got, f)
    # DDP's reducer before the group it uses: the other order aborted at exit now and then
    # ("terminate called without an active exception")
    dist.barrier()
    del ddp
    if case == "ce-ddp":
        del plain
    gc.collect()
    dist.destroy_process_group()
    # Functional collectives over gloo leave a thread that, now and then, aborts the interpreter
    # at exit ("terminate called without an active exception", 3 of 30 runs of an all-gather
    # loop with torch 2.13, never with the process group destroyed and os._exit): the results
    # are written and the group torn down, so skip the interpreter's teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
