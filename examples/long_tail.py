"""Which loss fixes my imbalance? The same small model trained with each method on real long-tailed
data and on the demo's five-class counts, 5 seeds each; mean and spread of balanced accuracy,
worst-class recall, macro-F1 and plain accuracy; a table and a plot.

    pip install -r examples/requirements.txt      # scikit-learn (the data) and matplotlib
    python examples/long_tail.py [--seeds 5] [--out long_tail_out]

The data:
- digits-LT: the UCI handwritten digits that ship with scikit-learn (``load_digits``: 1,797 real
  8x8 images, 10 classes). A balanced test set (60 per class) is held out first, as for
  CIFAR-10-LT; the training set takes n_c = n_max * ratio^(-c / 9) of each remaining class
  (n_max = 110), at imbalance ratios 10 and 100 (110 images of class 0 down to 11, or to 1).
- demo-5: the demo's overlapping 8-dimensional Gaussians (examples/demo.py) at its class counts
  2741, 37919, 22858, 31235, 5499, the test set from the same (imbalanced) distribution.

The methods, all through weighted_loss: none; 1/n class weights; effective-number weights
(beta = 1 - 1 / max(n)); a weighted sampler (1/n); the focal loss (gamma = 2); the logit-adjusted loss
(``logit_adjustment=wl.logit_adjustment(counts, tau=1)``, Menon et al. 2021); the plain model's
logits adjusted after training (``wl.adjust_logits``, the same trained model as "none"); and
class weights deferred to the last quarter of the epochs (1/n, Cao et al.'s DRW schedule). Every
method of a seed starts from the same initial model and, except the sampler, sees the same batches.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from torch import nn

import weighted_loss as wl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import COUNTS as DEMO_COUNTS  # noqa: E402
from demo import make_data as demo_data  # noqa: E402

METHODS = ["none", "1/n weights", "effective number", "sampler", "focal g=2",
           "logit-adjusted loss", "post-hoc adjustment", "deferred 1/n weights"]
METRICS = ["balanced_accuracy", "worst_recall", "macro_f1", "accuracy"]


def digits_lt(ratio: float, seed: int, n_max: int = 110, test_per_class: int = 60):
    """(train, test) of the long-tailed digits: standardized features, a balanced test set."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        te.append(idx[:test_per_class])
        n = max(1, int(round(n_max * ratio ** (-c / 9))))
        tr.append(idx[test_per_class:test_per_class + n])
    tr, te = torch.cat(tr), torch.cat(te)
    tr = tr[torch.randperm(len(tr), generator=g)]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1.0)
    return ((x[tr] - mean) / std, y[tr]), ((x[te] - mean) / std, y[te])


def demo5(seed: int):
    xtr, ytr = demo_data(DEMO_COUNTS, seed, seed + 1)
    xte, yte = demo_data([n // 5 for n in DEMO_COUNTS], seed, seed + 2)
    return (xtr, ytr), (xte, yte)


DATASETS = {  # name: (loader, epochs, batch, lr)
    "digits-LT ratio 10": (lambda s: digits_lt(10, s), 60, 32, 2e-3),
    "digits-LT ratio 100": (lambda s: digits_lt(100, s), 60, 32, 2e-3),
    "demo-5": (demo5, 6, 1024, 3e-3),
}


def metrics(logits, y, classes):
    pred = logits.argmax(1)
    recall, f1 = [], []
    for k in range(classes):
        tp = ((pred == k) & (y == k)).sum().item()
        support, predicted = (y == k).sum().item(), (pred == k).sum().item()
        r = tp / support if support else 0.0
        p = tp / predicted if predicted else 0.0
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"balanced_accuracy": sum(recall) / classes, "worst_recall": min(recall),
            "macro_f1": sum(f1) / classes, "accuracy": (pred == y).float().mean().item(),
            "recall": recall}


def train(method, data, classes, seed, epochs, batch, lr):
    """The test logits of the model trained with `method` (two for "none": plain and adjusted)."""
    (xtr, ytr), (xte, yte) = data
    counts = torch.bincount(ytr, minlength=classes)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(xtr.shape[1], 128), nn.ReLU(), nn.Linear(128, classes))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    inverse = wl.class_weights(counts, "inverse")
    weight = {"1/n weights": inverse,
              # beta = 1 - 1 / max(n): 1 / (1 - beta) at the largest class's size (with
              # beta = 0.999 and n <= 110 the weights would be 1/n to 5%: the same model)
              "effective number": wl.class_weights(counts, "effective_number",
                                                   beta=1.0 - 1.0 / counts.max().item())
              }.get(method)
    adjustment = wl.logit_adjustment(counts, tau=1.0)
    sampler = wl.sampler(ytr, "inverse", generator=g) if method == "sampler" else None
    for epoch in range(epochs):
        if method == "deferred 1/n weights":  # plain, then 1/n over the last quarter (DRW)
            weight = inverse if epoch >= epochs - max(1, epochs // 4) else None
        order = torch.tensor(list(sampler)) if sampler is not None else \
            torch.randperm(len(ytr), generator=g)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            logits = model(xtr[idx])
            if method == "focal g=2":
                loss = wl.focal_loss(logits, ytr[idx], 2.0)
            else:
                loss = wl.cross_entropy(
                    logits, ytr[idx], weight=weight,
                    logit_adjustment=adjustment if method == "logit-adjusted loss" else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = model(xte)
    if method == "none":  # the same model, adjusted after training
        return {"none": logits, "post-hoc adjustment": wl.adjust_logits(logits, adjustment)}
    return {method: logits}


def run(seeds, names=None):
    results = {}
    for name, (load, epochs, batch, lr) in DATASETS.items():
        if names and name not in names:
            continue
        per_method = {m: [] for m in METHODS}
        for seed in range(seeds):
            data = load(seed)
            classes = int(data[0][1].max()) + 1
            for method in METHODS:
                if method == "post-hoc adjustment":
                    continue  # from the "none" run
                for m, logits in train(method, data, classes, seed, epochs, batch, lr).items():
                    per_method[m].append(metrics(logits, data[1][1], classes))
        counts = torch.bincount(load(0)[0][1]).tolist()
        results[name] = {"train_counts_seed0": counts, "runs": per_method}
        print(table(name, per_method, counts), flush=True)
    return results


def summary(runs, metric):
    v = torch.tensor([r[metric] for r in runs], dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def table(name, per_method, counts):
    lines = [f"\n{name} (training counts {counts}; mean ± std over "
             f"{len(next(iter(per_method.values())))} seeds)",
             f"| method | balanced acc. | worst-class recall | macro-F1 | accuracy |",
             "|---|---|---|---|---|"]
    for m, runs in per_method.items():
        cells = [f"{mu:.3f} ± {sd:.3f}" for mu, sd in (summary(runs, k) for k in METRICS)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        x = range(len(METHODS))
        for j, (metric, color) in enumerate((("balanced_accuracy", "C0"),
                                             ("accuracy", "C1"), ("worst_recall", "C3"))):
            mus, sds = zip(*(summary(res["runs"][m], metric) for m in METHODS))
            ax.bar([i + (j - 1) * 0.27 for i in x], mus, 0.27, yerr=sds, color=color, capsize=2,
                   label=metric.replace("_", " "))
        ax.set_xticks(list(x))
        ax.set_xticklabels(METHODS, rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1.18)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.suptitle("weighted_loss: imbalance methods on long-tailed data (mean ± std over seeds)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--datasets", nargs="*", choices=list(DATASETS), default=None)
    ap.add_argument("--out", default="long_tail_out")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("long_tail.py needs scikit-learn for its data: "
                 "pip install -r examples/requirements.txt")
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    t0 = time.time()
    results = run(args.seeds, args.datasets)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "long_tail.json"), "w") as f:
        json.dump({"seeds": args.seeds, "results": results}, f, indent=1)
    wrote = [os.path.join(args.out, "long_tail.json")]
    try:
        plot(os.path.join(args.out, "long_tail.png"), results)
        wrote.append(os.path.join(args.out, "long_tail.png"))
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"\n{time.time() - t0:.0f} s; wrote " + ", ".join(wrote))
    return results


if __name__ == "__main__":
    main()
