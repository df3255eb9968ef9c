"""The GPU benchmark of bench/gpu_check.sh: `python bench/suite.py --full`'s measurements
(fused vs native eager vs torch.compile, forward / backward / total, CUDA events, peak memory,
copy bandwidth of the same run) written as the GPU results file the CUDA issue asks for:
bench/results/<date>-<gpu>.json (keys: device, torch, cuda, tests_passed, tests_failed,
copy_bandwidth_gbs, cases with loss, N, C, dtype, fused/native/compiled_fwd_bwd_ms, bytes_min,
bandwidth_fraction, peak_mem_fused_mb, peak_mem_native_mb, and every other figure) and a markdown
table beside it.

    python bench/gpu_bench.py --out bench/results [--tests-passed N --tests-failed M] [--repeat 20]
    python bench/gpu_bench.py --key ...     the key cases only (bench/gpu_check.sh), the linear
                                            head's among them; the files rewritten after each case
"""
import argparse
import datetime
import json
import os

import torch

import suite
import suite_linear
import suite_segmentation
from suite import FULL, environment, measure


def markdown(res):
    lines = [
        f"# GPU check {res['date']}: {res['device']}",
        "",
        f"torch {res['torch']}, CUDA {res['cuda']}; tests passed {res['tests_passed']}, failed "
        f"{res['tests_failed']}; compute-sanitizer: {res['sanitizers']}; copy bandwidth "
        f"{res['copy_bandwidth_gbs'] or 0:.0f} GB/s.",
        "",
        "Times in ms, forward + backward (forward / backward).",
        "",
        "| case | fused | native | compiled | bytes min | % of copy bw | vs native | "
        "vs compiled | peak MiB fused / native |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def t(c, kind):
        if f"{kind}_fwd_bwd_ms" not in c:
            return "-"
        return (f"{c[kind + '_fwd_bwd_ms']:.3f} ({c[kind + '_fwd_ms']:.3f} / "
                f"{c[kind + '_bwd_ms']:.3f})")

    for c in res["cases"]:
        vs_compiled = f"{c['speedup_vs_compiled']:.2f}x" if "speedup_vs_compiled" in c else "-"
        lines.append(
            f"| {c['case']} | {t(c, 'fused')} | {t(c, 'native')} | {t(c, 'compiled')} | "
            f"{c['bytes_min'] / 1e9:.2f} GB | {100 * c['bandwidth_fraction']:.0f}% | "
            f"{c['speedup_vs_native']:.2f}x | {vs_compiled} | {c['peak_mem_fused_mb']:.0f} / "
            f"{c['peak_mem_native_mb']:.0f} |")
    if res.get("linear_cases"):
        lines += ["", "Fused linear + cross-entropy (bench/suite_linear.py):", "",
                  suite_linear.markdown_table(res["linear_cases"])]
    if res.get("segmentation_cases"):
        lines += ["", "Dice + cross-entropy (bench/suite_segmentation.py; MONAI and nnU-Net where "
                  "their packages travelled with the tree):", "",
                  suite_segmentation.markdown_table(res["segmentation_cases"])]
    return "\n".join(lines) + "\n"


# the key cases of a short GPU run (bench/gpu_check.sh), as the CUDA issue names them
KEY = ["ce-8192x128256-bf16", "ce-32768x32000-bf16", "ce-seg-16x19x512x512-bf16-ign255",
       "bce-8192x8192-bf16-posw"]
KEY_LINEAR = ["linear-16384x4096x128256-bf16"]  # with PyTorch's F.linear_cross_entropy where
# the torch has it (2.13 on: its default path is "native", its chunked one "chunked")
KEY_SEGMENTATION = ["dice-ce-2x14x128x128x128-bf16"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tests-passed", type=int, default=-1)
    ap.add_argument("--tests-failed", type=int, default=-1)
    ap.add_argument("--sanitizers", default="not-run",
                    help="compute-sanitizer's verdicts, e.g. 'memcheck=clean racecheck=clean'")
    ap.add_argument("--case", action="append", help="run only cases whose name contains this")
    ap.add_argument("--device", default="cuda", help="cuda; cpu rehearses this script's code")
    ap.add_argument("--key", action="store_true",
                    help="only the key cases (KEY, KEY_LINEAR): the short GPU run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    if args.key:
        cases = [c for c in FULL if c[0] in KEY]
        linear = [c for c in suite_linear.FULL if c[0] in KEY_LINEAR]
        segmentation = [c for c in suite_segmentation.FULL if c[0] in KEY_SEGMENTATION]
    else:
        cases = [c for c in FULL if not args.case or any(k in c[0] for k in args.case)]
        linear = [c for c in suite_linear.QUICK + suite_linear.FULL
                  if args.case and any(k in c[0] for k in args.case)]
        segmentation = [c for c in suite_segmentation.QUICK + suite_segmentation.FULL
                        if args.case and any(k in c[0] for k in args.case)]
    res = {"date": datetime.date.today().isoformat(), "device": env["device"], "torch": env["torch"],
           "cuda": env.get("cuda"), "tests_passed": args.tests_passed, "tests_failed": args.tests_failed,
           "sanitizers": args.sanitizers, "copy_bandwidth_gbs": None, "environment": env,
           "cases": [], "linear_cases": [], "segmentation_cases": []}
    os.makedirs(args.out, exist_ok=True)
    gpu = env["device"].replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = os.path.join(args.out, f"{res['date']}-{gpu}")

    def write():  # after every case: a run cut short still leaves what it measured
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(markdown(res))

    for case in cases:
        bw, rows = measure([case], device, args.repeat, progress=False)
        res["copy_bandwidth_gbs"] = bw
        r = rows[0]
        res["cases"].append(r)
        print(f"{r['case']:34} fused {r['fused_fwd_bwd_ms']:8.3f} ms  native "
              f"{r['native_fwd_bwd_ms']:8.3f}  compiled "
              f"{r.get('compiled_fwd_bwd_ms', float('nan')):8.3f}  "
              f"{100 * r['bandwidth_fraction']:5.1f}% of copy bw ({bw:.0f} GB/s)", flush=True)
        write()
    for key, module, chosen in (("linear_cases", suite_linear, linear),
                                ("segmentation_cases", suite_segmentation, segmentation)):
        for case in chosen:
            r = module.run_case(*case, device, args.repeat, True, suite)
            res[key].append(r)
            figures = {k: v for k, v in r.items() if "ms" in k or "mb" in k}
            print(f"{r['case']:34} {json.dumps(figures)}", flush=True)
            write()
    write()
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
