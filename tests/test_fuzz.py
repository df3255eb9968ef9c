"""The differential fuzzer (tests/fuzz.py) in the suite: seeds [0, n) on the CPU kernels and on
the emulated CUDA kernels, n = --fuzz-cases (default 200; thousands with, for example,
`pytest tests/test_fuzz.py --fuzz-cases 5000`, or WL_FUZZ_CASES). Each device's seeds run in a
subprocess under a time limit; a crash (a segfault, an abort) names the seed it left in the
progress file, and the run carries on from the next seed, so one crash hides no other failure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).with_name("fuzz.py")
ROOT = FUZZ.parent.parent


def _cases(config):
    n = config.getoption("--fuzz-cases")
    return int(n if n is not None else os.environ.get("WL_FUZZ_CASES", 200))


def run_fuzzer(device, start, count, tmp_path, per_case_s=10.0, env=None):
    """(failures, crashes, counts) of seeds [start, start + count) on device."""
    failures, crashes = [], []
    counts = {"cases": 0, "raised": 0, "invalid": 0}
    progress, out = tmp_path / f"{device}.progress", tmp_path / f"{device}.json"
    env = dict(env or os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    seed, end = start, start + count
    while seed < end:
        for f in (progress, out):
            f.unlink(missing_ok=True)
        cmd = [sys.executable, str(FUZZ), "--start", str(seed), "--count", str(end - seed),
               "--device", device, "--progress", str(progress), "--out", str(out)]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                               timeout=60 + per_case_s * (end - seed))
            rc, tail = r.returncode, (r.stdout + r.stderr)[-2000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", (e.stdout or b"")[-2000:]
        if out.exists():  # the seeds before the one under way
            res = json.loads(out.read_text())
            failures += res["failures"]
            counts = {k: counts[k] + res["counts"][k] for k in counts}
        state = progress.read_text() if progress.exists() else ""
        if state == "done" and rc in (0, 1):
            break
        # a crash or a hang in the seed under way: report it, go on from the next
        bad = int(state) if state.isdigit() else seed
        crashes.append({"seed": bad, "rc": rc, "output": tail})
        counts["cases"] += 1
        seed = bad + 1
    return failures, crashes, counts


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_fuzz_against_pytorch(device, request, tmp_path):
    n = _cases(request.config)
    failures, crashes, counts = run_fuzzer(device, 0, n, tmp_path)
    report = [f"{c['seed']}: crashed ({c['rc']})\n{c['output']}" for c in crashes]
    report += [f"{f['case']}\n    " + "\n    ".join(f["problems"]) for f in failures]
    assert not report, (f"{len(failures)} of {n} seeds failed, {len(crashes)} crashed on "
                        f"{device} (rerun one: python tests/fuzz.py --start SEED --count 1 "
                        f"--device {device}):\n" + "\n".join(report))
    # the fuzzer did run its cases, invalid ones and PyTorch-raising ones among them
    assert counts["cases"] == n
    assert n < 100 or (counts["invalid"] > 0 and counts["raised"] > 0)


def test_a_crash_names_its_seed_and_the_run_goes_on(tmp_path):
    """A case that kills the process (an abort at seed 3, through the fuzzer's test hook) is
    reported by its seed; the seeds before it keep their results and those after it run."""
    env = dict(os.environ, WL_FUZZ_ABORT_AT="3")
    failures, crashes, counts = run_fuzzer("cpu", 0, 6, tmp_path, env=env)
    assert [c["seed"] for c in crashes] == [3]
    assert failures == [] and counts["cases"] == 6
