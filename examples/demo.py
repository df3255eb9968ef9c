"""What class weights do: one small model trained on an imbalanced 5-class problem with no
weights, with each class_weights() method, with a weighted sampler instead, and with the focal
loss (gamma = 2, alone and with balanced weights as its alpha), all through the fused losses;
prints per-class recall, balanced accuracy and the loss curves, and saves a plot.

    python examples/demo.py [--epochs 6] [--out demo_out] [--seed 0] [--scale 1.0]

The data: 8-dimensional Gaussian classes with strongly overlapping means and the class counts 2741,
37919, 22858, 31235, 5499 (the ones users ask about); a held-out test set from the same
distribution (a fifth of the size). Every run starts from the same initial model and sees the
same batches (except the sampler run, which draws its own).
"""
import argparse
import copy
import json
import os
import time

import torch
from torch import nn

import weighted_loss as wl

COUNTS = [2741, 37919, 22858, 31235, 5499]
DIM = 8


def make_data(counts, seed, sample_seed, dim=DIM, spread=0.5):
    """Features and labels, shuffled: class k ~ N(mu_k, I), the means mu_k ~ N(0, spread^2 I)
    drawn from `seed` (so a training and a test set share them), the samples from sample_seed."""
    means = spread * torch.randn(len(counts), dim, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(sample_seed)
    xs, ys = [], []
    for k, n in enumerate(counts):
        xs.append(means[k] + torch.randn(n, dim, generator=g))
        ys.append(torch.full((n,), k, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def model_for(classes, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, classes))


def runs(train_y):
    """(name, weight, sampler, focal gamma) of every configuration the demo compares."""
    C = len(COUNTS)
    out = [("no weights", None, None, 0.0)]
    counts = torch.bincount(train_y, minlength=C)  # an integer tensor of counts, as people write it
    for method in ("inverse", "max_ratio", "balanced", "median"):
        out.append((method, wl.class_weights(counts, method), None, 0.0))
    for beta in (0.999, 0.9999):  # or from the labels themselves, by keyword
        out.append((f"effective_number b={beta}",
                    wl.class_weights(labels=train_y, method="effective_number", num_classes=C,
                                     beta=beta), None, 0.0))
    out.append(("sampler (inverse)", None, "inverse", 0.0))
    out.append(("focal g=2", None, None, 2.0))
    out.append(("focal g=2 + balanced", wl.class_weights(counts, "balanced"), None, 2.0))
    return out


def recall_per_class(model, x, y, classes):
    with torch.no_grad():
        pred = model(x).argmax(1)
    return [((pred == k) & (y == k)).sum().item() / max((y == k).sum().item(), 1)
            for k in range(classes)], (pred == y).float().mean().item()


def train(name, weight, sampler_method, gamma, data, init, args):
    (xtr, ytr), (xte, yte) = data
    model = copy.deepcopy(init)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = wl.FocalLoss(gamma, weight) if gamma > 0 else wl.CrossEntropyLoss(weight=weight)
    plain = nn.CrossEntropyLoss()  # the unweighted test loss: comparable across runs
    g = torch.Generator().manual_seed(args.seed + 1)
    smp = wl.sampler(ytr, sampler_method, generator=g) if sampler_method else None
    curve, test_curve = [], []
    for _ in range(args.epochs):
        model.train()
        # an epoch's sample order: the weighted sampler's draws, or a shuffle (batches are sliced
        # from the tensors directly, much faster than a DataLoader over single samples)
        order = torch.tensor(list(smp)) if smp is not None else torch.randperm(len(ytr), generator=g)
        total, n = 0.0, 0
        for start in range(0, len(order), args.batch):
            idx = order[start:start + args.batch]
            xb, yb = xtr[idx], ytr[idx]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() * len(yb)
            n += len(yb)
        curve.append(total.item() / n)
        model.eval()
        with torch.no_grad():
            test_curve.append(plain(model(xte), yte).item())
    recall, acc = recall_per_class(model, xte, yte, len(COUNTS))
    return {"run": name, "weight": None if weight is None else [round(v, 6) for v in weight.tolist()],
            "train_loss": curve, "test_loss_unweighted": test_curve, "recall": recall,
            "balanced_accuracy": sum(recall) / len(recall), "accuracy": acc}


def print_results(results, counts):
    C = len(counts)
    head = f"{'run':26}" + "".join(f"{'rec ' + str(k):>8}" for k in range(C)) + \
        f"{'bal.acc':>9}{'acc':>8}"
    print("\nper-class recall on the test set (training class counts "
          + ", ".join(map(str, counts)) + ")")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['run']:26}" + "".join(f"{v:8.3f}" for v in r["recall"])
              + f"{r['balanced_accuracy']:9.3f}{r['accuracy']:8.3f}")
    print("\nloss curves per epoch: training loss as optimized (weighted; not comparable across "
          "runs) | unweighted test loss")
    for r in results:
        print(f"{r['run']:26}" + " ".join(f"{v:.3f}" for v in r["train_loss"]) + " | "
              + " ".join(f"{v:.3f}" for v in r["test_loss_unweighted"]))


def plot(path, results, counts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    for r in results:
        a.plot(range(1, len(r["test_loss_unweighted"]) + 1), r["test_loss_unweighted"], marker="o",
               label=r["run"])
    a.set_xlabel("epoch")
    a.set_title("unweighted cross-entropy on the test set", fontsize=10)
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    C = len(COUNTS)
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        pos = [k + (j - (len(results) - 1) / 2) * width for k in range(C)]
        b.bar(pos, r["recall"], width, label=f"{r['run']} (bal. acc {r['balanced_accuracy']:.3f})")
    b.set_xticks(range(C))
    b.set_xticklabels([f"class {k}\nn={n}" for k, n in enumerate(counts)], fontsize=8)
    b.set_ylim(0, 1.3)
    b.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    b.set_title("recall per class on the test set", fontsize=10)
    b.legend(fontsize=7, loc="upper center", ncol=2)
    b.grid(axis="y", alpha=0.3)
    fig.suptitle("weighted_loss demo: class weights and the focal loss on an imbalanced 5-class "
                 "problem", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the class counts (e.g. 0.1 for a quick run)")
    ap.add_argument("--out", default="demo_out")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.scale > 0:
        ap.error(f"--scale must be positive, got {args.scale}")
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    counts = [max(1, round(n * args.scale)) for n in COUNTS]
    train_data = make_data(counts, args.seed, args.seed + 1)
    xte, yte = make_data([max(1, n // 5) for n in counts], args.seed, args.seed + 2)
    init = model_for(len(COUNTS), args.seed)
    results = []
    t0 = time.time()
    for name, weight, smp, gamma in runs(train_data[1]):
        print(f"training: {name}" + ("" if weight is None else
                                     f"  weight={[round(v, 4) for v in weight.tolist()]}"),
              flush=True)
        results.append(train(name, weight, smp, gamma, (train_data, (xte, yte)), init, args))
    print_results(results, counts)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"counts": counts, "epochs": args.epochs, "seed": args.seed, "runs": results},
                  f, indent=2)
    wrote = [os.path.join(args.out, "demo.json")]
    try:
        plot(os.path.join(args.out, "demo.png"), results, counts)
        wrote.append(os.path.join(args.out, "demo.png"))
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"\n{time.time() - t0:.0f} s; wrote " + ", ".join(wrote))
    return results


if __name__ == "__main__":
    main()
