"""The benchmark tool (python bench/suite.py): arguments, one case end to end, and what it
writes. Timings are not checked (benchmarks, not tests); the figures' consistency is."""
import argparse
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import suite as bench  # noqa: E402


def test_parse_shape():
    assert bench.parse_shape("8192x32000") == (8192, 32000)
    assert bench.parse_shape("16x19x512x512") == (16, 19, 512, 512)
    for bad in ("8192", "8192x", "axb", "0x5", "-1x4"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{bad}'"):
            bench.parse_shape(bad)


def test_parse_dtype():
    assert bench.parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(argparse.ArgumentTypeError, match="got 'int8'"):
        bench.parse_dtype("int8")


def _args(*argv):
    ns = argparse.Namespace(shape=None, dtype=None, loss=None, case=None, full=False)
    for k, v in zip(argv[::2], argv[1::2]):
        setattr(ns, k, v)
    return ns


def test_select_cases():
    assert [c[0] for c in bench.select_cases(_args())] == [c[0] for c in bench.QUICK]
    assert [c[0] for c in bench.select_cases(_args("full", True))] == [c[0] for c in bench.FULL]
    only_bce = bench.select_cases(_args("loss", ["bce"]))
    assert only_bce and all(c[1] == "bce" for c in only_bce)
    custom = bench.select_cases(_args("shape", [(64, 10)], "loss", ["ce", "bce"],
                                      "dtype", [torch.bfloat16]))
    assert [(c[0], c[1], c[2], c[3]) for c in custom] == [
        ("ce-64x10-bfloat16", "ce", (64, 10), torch.bfloat16),
        ("bce-64x10-bfloat16", "bce", (64, 10), torch.bfloat16)]
    as_f64 = bench.select_cases(_args("case", ["ce-8192x1000"], "loss", ["ce"],
                                      "dtype", [torch.float64]))
    assert [c[0] for c in as_f64] == ["ce-8192x1000-f32-as-float64"]


@pytest.mark.parametrize("loss,shape,kw", [("ce", (64, 10), {"label_smoothing": 0.1}),
                                           ("ce", (2, 5, 4, 4), {"ignore_index": 255}),
                                           ("bce", (32, 7), {}),
                                           ("focal", (2, 5, 4, 4), {}),
                                           ("sfocal", (16, 9), {"reduction": "mean"})])
def test_run_case_figures(loss, shape, kw):
    r = bench.run_case("c", loss, shape, torch.float32, kw, torch.device("cpu"), repeat=2,
                       use_compile=False)
    assert r["fused_max_loss_diff"] < 1e-5 and r["fused_max_grad_diff"] < 1e-6
    numel = math.prod(shape)
    assert r["bytes_min"] == (3 if loss in ("ce", "focal") else 5) * numel * 4
    for kind in ("fused", "native"):
        assert r[f"{kind}_fwd_bwd_ms"] > 0 and r[f"{kind}_fwd_ms"] > 0
        # the backward measured alone (on an untimed forward's graph), not a difference
        assert r[f"{kind}_bwd_ms"] > 0
        assert r[f"{kind}_gbs"] == pytest.approx(r["bytes_min"] / r[f"{kind}_fwd_bwd_ms"] / 1e6)
    assert r["speedup_vs_native"] == pytest.approx(r["native_fwd_bwd_ms"] / r["fused_fwd_bwd_ms"])
    assert "compiled_fwd_bwd_ms" not in r


def test_peak_memory_counts_the_gradient():
    """The CPU peak is what the call allocates: at least the gradient it returns."""
    x = torch.randn(1024, 1024)
    mb = bench.peak_mb(lambda: torch.empty_like(x).fill_(1.0), torch.device("cpu"))
    assert mb == pytest.approx(4.0, rel=0.01)
    x.requires_grad_(True)
    t = torch.randint(0, 1024, (1024,))
    import weighted_loss as wl
    fused = bench.peak_mb(lambda: torch.autograd.grad(wl.cross_entropy(x, t), x),
                          torch.device("cpu"))
    assert 4.0 <= fused < 4.1  # the gradient and the per-row lse


def test_main_writes_json_md_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = bench.main(["--device", "cpu", "--shape", "64x10", "--loss", "ce", "bce", "--repeat",
                       "2", "--no-compile", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ce-64x10-float32" in out and "bce-64x10-float32" in out and "wrote" in out
    js = list(tmp_path.glob("*.json"))
    png = list(tmp_path.glob("*.png"))
    md = list(tmp_path.glob("*.md"))
    assert len(js) == len(png) == len(md) == 1
    assert png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js[0].read_text())
    assert data["environment"]["device_type"] == "cpu" and data["copy_bandwidth_gbs"] > 0
    assert [c["case"] for c in data["cases"]] == [r["case"] for r in rows]
    assert "| ce-64x10-float32 |" in md[0].read_text()


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "12"])
    assert "--shape must look like" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--repeat", "0"])
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err


def test_select_linear_cases():
    import suite_linear
    assert [c[0] for c in bench.select_linear_cases(_args())] == [c[0] for c in suite_linear.QUICK]
    assert [c[0] for c in bench.select_linear_cases(_args("full", True, "loss", ["linear"]))] == \
        [c[0] for c in suite_linear.FULL]
    assert bench.select_linear_cases(_args("loss", ["ce"])) == []
    assert bench.select_linear_cases(_args("shape", [(64, 10)])) == []


def test_run_linear_case_figures():
    import suite_linear
    r = suite_linear.run_case("lin", 64, 16, 300, torch.float32, torch.device("cpu"), 2, False,
                              bench)
    assert r["fused_max_loss_diff"] < 1e-5 and r["fused_max_grad_diff"] < 1e-5
    assert r["flops"] == 6 * 64 * 16 * 300
    for kind in ("fused", "native"):
        assert r[f"{kind}_fwd_bwd_ms"] > 0 and r[f"peak_mem_{kind}_mb"] > 0
        assert r[f"{kind}_fwd_ms"] > 0 and r[f"{kind}_bwd_ms"] > 0  # each measured alone
    assert r["memory_vs_native"] == pytest.approx(r["peak_mem_fused_mb"] / r["peak_mem_native_mb"])
    assert r["matmuls_ms"] > 0 and r["fused_vs_matmuls"] > 0
    assert "| lin |" in suite_linear.markdown_table([r])


def test_gpu_results_table_from_cpu_figures():
    """bench/gpu_bench.py's markdown (the GPU run's committed table) from a CPU case's figures, so
    that the GPU session's one call does not fail on it."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_bench.py")
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    bw, rows = bench.measure([("c", "ce", (64, 10), torch.float32, {})], torch.device("cpu"), 2,
                             use_compile=False, progress=False)
    res = {"date": "2026-11-30", "device": "cpu", "torch": torch.__version__, "cuda": None,
           "tests_passed": 1, "tests_failed": 0, "sanitizers": "memcheck=clean",
           "copy_bandwidth_gbs": bw, "cases": rows}
    text = gpu_bench.markdown(res)
    assert "compute-sanitizer: memcheck=clean" in text and "| c |" in text


def test_autocast_case_uses_less_memory_than_pytorchs_upcast():
    """An autocast case: both run under torch.autocast with float32 weights; PyTorch makes float32
    copies of the bfloat16 logits (and their gradient), the fused kernels read them in place."""
    r = bench.run_case("c", "ce", (512, 1000), torch.bfloat16, {"autocast": True},
                       torch.device("cpu"), repeat=1, use_compile=False)
    assert r["options"] == {"autocast": True}
    assert r["fused_max_loss_diff"] < 1e-4
    logits_mb = 512 * 1000 * 2 / 2**20
    assert r["peak_mem_fused_mb"] < 1.1 * logits_mb  # the bfloat16 gradient, and little else
    assert r["peak_mem_native_mb"] > 4 * logits_mb  # float32 copies of the logits' size
