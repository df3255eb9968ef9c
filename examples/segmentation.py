"""Which loss finds rare, small structures: a small 2-D U-Net trained on the CPU with each of the
segmentation losses users compare, through the fused losses, on generated images; per-class Dice
on held-out images, mean and standard deviation over seeds, the rarest class shown apart.

    python examples/segmentation.py [--seeds 3] [--steps 300] [--out segmentation_out]

The images (generated, described as what they are): 64 x 64, a noisy background (class 0, 92%
of the pixels) holding one ellipse (class 1, 6%), a few squares of 4-7 pixels (class 2, 1.5%)
and small squares of 2-4 pixels (the "dots", class 3, 0.8%), each class a different mean
intensity under strong noise and a blur, so the dots are hard to tell from the noise. Every run of a seed starts
from the same initial model and sees the same batches.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import weighted_loss as wl

SIZE, CLASSES = 64, 4
NAMES = ["background", "ellipse", "squares", "dots"]


def make_images(n, seed):
    """(images (n, 1, S, S), labels (n, S, S)) drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        r = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
        cy, cx, a, b, t = r(20, 44), r(20, 44), r(8, 14), r(5, 10), r(0, math.pi)
        u = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
        v = -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        labels[i][(u / a) ** 2 + (v / b) ** 2 <= 1] = 1
        for _ in range(int(r(1, 4))):
            s, y0, x0 = int(r(4, 8)), int(r(0, SIZE - 8)), int(r(0, SIZE - 8))
            labels[i, y0:y0 + s, x0:x0 + s] = 2
        for _ in range(int(r(2, 6))):
            s, y0, x0 = int(r(2, 5)), int(r(0, SIZE - 5)), int(r(0, SIZE - 5))
            labels[i, y0:y0 + s, x0:x0 + s] = 3
    means = torch.tensor([0.0, 0.8, 1.4, 2.0])
    img = means[labels] + 0.9 * torch.randn(n, SIZE, SIZE, generator=g)
    img = F.avg_pool2d(img.unsqueeze(1), 3, stride=1, padding=1)
    return img, labels


class UNet(nn.Module):
    """Two levels down and up, 16 and 32 channels."""

    def __init__(self, width=16):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.down1, self.down2 = block(1, width), block(width, 2 * width)
        self.mid = block(2 * width, 2 * width)
        self.up2, self.up1 = block(4 * width, width), block(2 * width, width)
        self.head = nn.Conv2d(width, CLASSES, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        m = self.mid(F.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(m, scale_factor=2), d2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2), d1], 1))
        return self.head(u1)


def losses(train_labels):
    """(name, loss(logits, labels)) of every configuration compared."""
    counts = torch.bincount(train_labels.view(-1), minlength=CLASSES)
    w = wl.class_weights(counts, "median")  # median frequency balancing, as in SegNet
    return [
        ("cross-entropy", lambda x, y: wl.cross_entropy(x, y)),
        ("weighted cross-entropy", lambda x, y: wl.cross_entropy(x, y, w)),
        ("focal (gamma 2)", lambda x, y: wl.focal_loss(x, y, 2.0)),
        ("Dice", lambda x, y: wl.dice_loss(x, y)),
        ("Dice + cross-entropy", lambda x, y: wl.dice_loss(x, y, lambda_ce=1.0)),
        # (the Dice unweighted, the class weight on the cross-entropy alone)
        ("Dice + weighted cross-entropy", lambda x, y: wl.dice_loss(x, y) +
         wl.cross_entropy(x, y, w)),
        ("generalized Dice", lambda x, y: wl.generalized_dice_loss(x, y)),
        ("Tversky (0.3, 0.7)", lambda x, y: wl.tversky_loss(x, y, alpha=0.3, beta=0.7)),
    ]


def dice_per_class(model, images, labels):
    """Hard Dice per class over the held-out set (a class absent and not predicted: 1)."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 32]).argmax(1) for i in range(0, len(images), 32)])
    model.train()
    out = []
    for c in range(CLASSES):
        p, t = pred == c, labels == c
        inter, total = (p & t).sum().item(), p.sum().item() + t.sum().item()
        out.append(1.0 if total == 0 else 2 * inter / total)
    return out


def train(loss_fn, images, labels, test, seed, steps, batch):
    torch.manual_seed(seed)
    model = UNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        loss = loss_fn(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dice_per_class(model, *test)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--out", default="segmentation_out")
    args = ap.parse_args(argv)
    images, labels = make_images(args.train, seed=1)
    test = make_images(256, seed=2)
    share = torch.bincount(labels.view(-1), minlength=CLASSES).double() / labels.numel()
    print("pixels per class (training set): " +
          ", ".join(f"{n} {100 * s:.2f}%" for n, s in zip(NAMES, share.tolist())))
    results = {}
    for name, fn in losses(labels):
        t0 = time.time()
        runs = [train(fn, images, labels, test, seed, args.steps, args.batch)
                for seed in range(args.seeds)]
        results[name] = runs
        d = torch.tensor(runs)
        print(f"{name:32s} mean Dice {d[:, 1:].mean():.3f}  dots {d[:, 3].mean():.3f} "
              f"+- {d[:, 3].std():.3f}  ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "segmentation.json"), "w") as f:
        json.dump({"args": vars(args), "pixel_share": share.tolist(), "classes": NAMES,
                   "dice": results}, f, indent=2)
    lines = ["| loss | " + " | ".join(NAMES[1:]) + " | mean (foreground) |",
             "|---|" + "---|" * CLASSES]
    for name, runs in results.items():
        d = torch.tensor(runs)
        cells = [f"{d[:, c].mean():.3f} +- {d[:, c].std():.3f}" for c in range(1, CLASSES)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {d[:, 1:].mean():.3f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "segmentation.md"), "w") as f:
        f.write(table)
    print(table)
    plot(results, os.path.join(args.out, "segmentation.png"))


def plot(results, path):
    """Held-out Dice per foreground class and loss, mean and standard deviation over seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = list(results)
    for c, off in ((1, -0.25), (2, 0), (3, 0.25)):
        d = torch.tensor([[r[c] for r in results[n]] for n in names])
        ax.bar([i + off for i in range(len(names))], d.mean(1), 0.25, yerr=d.std(1),
               label=NAMES[c])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("held-out Dice")
    ax.set_ylim(0, 1.1)
    ax.legend(loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
