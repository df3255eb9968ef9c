"""The benchmark's report: the progress bar, the environment it ran in, the table (rich, plain
text or markdown) and the plot. Split from bench.py, which re-exports these names."""
import os
import platform
import sys

import torch

import weighted_loss as wl

IMPLS = ("fused", "native", "compiled")


class _Progress:
    """rich's progress bar when rich is installed, else a one-line text counter on stderr."""

    def __init__(self, total, enabled=True):
        self.total, self.enabled, self.done, self.name = total, enabled, 0, ""
        self._rich = None
        if enabled:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
                self._rich = Progress(TextColumn("{task.description:36}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      TimeRemainingColumn(), transient=False)
            except ImportError:
                pass

    def __enter__(self):
        if self._rich:
            self._rich.start()
            self._task = self._rich.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._rich:
            self._rich.stop()
        elif self.enabled:
            print(file=sys.stderr)

    def describe(self, name):
        self.name = name
        if self._rich:
            self._rich.update(self._task, description=name)
        self._text()

    def advance(self):
        self.done += 1
        if self._rich:
            self._rich.advance(self._task)
        self._text()

    def _text(self):
        if self.enabled and not self._rich:
            n = 30 * self.done // max(self.total, 1)
            print(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {self.name:36}",
                  end="", file=sys.stderr, flush=True)


def environment(device):
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "weighted_loss": getattr(wl, "__version__", "0.1.0"), "platform": platform.platform(),
           "device_type": device.type}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = _cpu_name()
        env["cpu_capability"] = wl.cpu_capability()
        env["threads"] = torch.get_num_threads()
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


COLUMNS = [  # header, formatter
    ("case", lambda r: r["case"]),
    ("fused ms\nfwd / bwd / total", lambda r: ms_cell(r, "fused")),
    ("native ms\nfwd / bwd / total", lambda r: ms_cell(r, "native")),
    ("compiled ms\nfwd / bwd / total", lambda r: ms_cell(r, "compiled")),
    ("speedup vs\nnative / compiled", lambda r: f"{r['speedup_vs_native']:.2f}x / "
     + (f"{r['speedup_vs_compiled']:.2f}x" if "speedup_vs_compiled" in r else "-")),
    ("fused GB/s\n(% of copy)", lambda r: f"{r['fused_gbs']:.1f} ({100 * r['bandwidth_fraction']:.0f}%)"),
    ("peak MiB\nfused / native / compiled", lambda r: " / ".join(
        f"{r[f'peak_mem_{k}_mb']:.0f}" if r.get(f"peak_mem_{k}_mb") == r.get(f"peak_mem_{k}_mb")
        and f"peak_mem_{k}_mb" in r else "-" for k in IMPLS)),
    ("max abs diff vs native\nloss / grad", lambda r: f"{r['fused_max_loss_diff']:.1e} / "
     f"{r['fused_max_grad_diff']:.1e}"),
]


def ms_cell(r, kind, digits=2):
    """An implementation's forward / backward / total ms of row r, or "-" where it did not run."""
    if f"{kind}_fwd_bwd_ms" not in r:
        return "-"
    return " / ".join(f"{r[f'{kind}_{w}_ms']:.{digits}f}" for w in ("fwd", "bwd", "fwd_bwd"))


def speedups_cell(r, kinds):
    """Row r's "fused is Nx faster" against each of kinds (its speedup_vs_<kind>), "-" where
    that implementation did not run."""
    return " / ".join(f"{r[f'speedup_vs_{k}']:.2f}x" if f"speedup_vs_{k}" in r else "-"
                      for k in kinds)


def columns_markdown(columns, rows):
    """A markdown table of (header, cell(row)) columns over rows (the linear and segmentation
    suites' tables)."""
    head = [h for h, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"




def print_table(env, bw, rows):
    title = (f"{env['device']} ({env['device_type']}), torch {env['torch']}, copy bandwidth "
             f"{bw:.1f} GB/s")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        cells = [[h.replace("\n", " ") for h, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        for k, c in enumerate(cells):
            print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))
            if k == 0:
                print("-+-".join("-" * w for w in widths))
        return
    table = Table(title=title)
    for h, _ in COLUMNS:
        table.add_column(h, justify="left" if h == "case" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[f(r) for _, f in COLUMNS])
    console = Console()
    console.width = max(console.width, 210)  # a wide table reads better cut than folded
    console.print(table)


def markdown_table(env, bw, rows):
    """The table as markdown, for a README."""
    head = [h.replace("\n", " ") for h, _ in COLUMNS]
    lines = [f"{env['device']}, torch {env['torch']}, copy bandwidth {bw:.1f} GB/s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(f(r) for _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(path, env, bw, rows):
    """Speedup over native eager and achieved bandwidth per case, fused vs native vs compiled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    kinds = [k for k in IMPLS if any(f"{k}_fwd_bwd_ms" in r for r in rows)]
    colors = {"fused": "#1b7837", "native": "#8c8c8c", "compiled": "#2166ac"}
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 5.2))
    width = 0.8 / len(kinds)
    xs = range(len(rows))
    for panel, (ax, key, label) in enumerate(zip(
            axes, ("speedup", "gbs"),
            ("speedup over native eager (fwd+bwd)", "achieved GB/s (minimal bytes / fwd+bwd time)"))):
        for j, k in enumerate(kinds):
            vals = []
            for r in rows:
                if f"{k}_fwd_bwd_ms" not in r:
                    vals.append(0.0)
                elif key == "speedup":
                    vals.append(r["native_fwd_bwd_ms"] / r[f"{k}_fwd_bwd_ms"])
                else:
                    vals.append(r[f"{k}_gbs"])
            pos = [x + (j - (len(kinds) - 1) / 2) * width for x in xs]
            bars = ax.bar(pos, vals, width, label=k, color=colors[k])
            if key == "speedup":
                ax.bar_label(bars, fmt="%.1fx", fontsize=7, padding=1)
        if key == "gbs":
            ax.axhline(bw, color="black", linestyle="--", linewidth=1)
            ax.text(len(rows) - 0.5, bw, f"copy {bw:.0f} GB/s", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"weighted_loss vs PyTorch on {env['device']} (torch {env['torch']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
