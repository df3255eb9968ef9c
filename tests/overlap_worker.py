"""One rank of tests/test_overlap_distributed.py, run as `python overlap_worker.py CASE OUT_DIR`
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each rank takes an unequal share of one
batch of label maps (sorted, so every rank sees a different class mix; some positions ignored),
trains a 1x1 convolution under DDP (gloo) with an overlap loss and process_group=, and compares its
loss and gradients with one process on the whole batch through the reference
(tests/references.py). Writes OUT_DIR/<rank>.json."""
import copy
import datetime
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import weighted_loss as wl
from references import nnunet_reference, overlap_reference

CIN, C, N, S = 3, 4, 10, 6


def global_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, CIN, S, S, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.tensor([0.7, 0.15, 0.1, 0.05]), N * S * S, replacement=True,
                          generator=g).view(N, S, S)
    y[torch.rand(N, S, S, generator=g) < 0.1] = 255
    order = torch.argsort((y == 0).double().mean((1, 2)), stable=True)
    return x[order], y[order], torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)


def main():
    case, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    x_all, y_all, w = global_batch()
    sizes = [N * (r + 1) // sum(range(1, world + 1)) for r in range(world)]
    sizes[-1] = N - sum(sizes[:-1])
    start = sum(sizes[:rank])
    x, y = x_all[start:start + sizes[rank]], y_all[start:start + sizes[rank]]

    torch.manual_seed(1)
    model = torch.nn.Conv2d(CIN, C, 1).double()
    ref = copy.deepcopy(model)
    kw = dict(ignore_index=255)
    if case == "dice-batch":
        kw.update(weight=w, lambda_ce=1.0, batch=True, label_smoothing=0.1)
        fn, ref_fn = wl.dice_loss, overlap_reference
    elif case == "dice-items":
        kw.update(weight=w, lambda_ce=0.5, include_background=False)
        fn, ref_fn = wl.dice_loss, overlap_reference
    elif case == "generalized-batch":
        kw.update(lambda_ce=1.0, batch=True)
        fn = wl.generalized_dice_loss
        ref_fn = lambda a, b, **k: overlap_reference(a, b, kind="generalized", **k)  # noqa: E731
    if case == "nnunet-ddp":  # nnU-Net's ddp=True batch Dice (its cross-entropy off)
        from weighted_loss.integrations.nnunet import DC_and_CE_loss
        fn = DC_and_CE_loss(dict(batch_dice=True, do_bg=False, smooth=1e-5, ddp=True), {},
                            weight_ce=0, ignore_label=255)
        ref_loss = nnunet_reference(ref(x_all), y_all.unsqueeze(1).double(), batch_dice=True,
                                    do_bg=False, ignore_label=255, weight_ce=0.0)
        ddp = DDP(model)
        loss = fn(ddp(x), y.unsqueeze(1).double())
    else:
        ref_loss = ref_fn(ref(x_all), y_all, **kw)
        ddp = DDP(model)
        loss = fn(ddp(x), y, process_group=group, **kw)
    loss.backward()
    value = loss.item()
    ref_loss.backward()
    got = {"rank": rank, "loss": value, "ref_loss": ref_loss.item(),
           "grad_diff": max((p.grad - q.grad).abs().max().item()
                            for p, q in zip(model.parameters(), ref.parameters())),
           "grad_scale": max(q.grad.abs().max().item() for q in ref.parameters())}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(got, f)
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # (distributed_worker.py says why)


if __name__ == "__main__":
    main()
