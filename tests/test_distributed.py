"""The exact weighted mean under data parallelism (weighted_loss.distributed): 2 and 4 gloo ranks,
run as processes on this machine (tests/distributed_worker.py, forked by tests/ranks.py), each with a differently
imbalanced, unequal share of one batch and some ignored targets. Every rank's loss equals the
single-process loss of the whole batch, and the gradients after DDP's averaging (also with two
accumulated micro-batches) equal the single-process gradients. Vocab-parallel cross-entropy
(tests/vocab_parallel_worker.py): each rank holds a shard of the classes, and its loss and the
gradient of its shard equal the unsharded F.cross_entropy's. A rank that hangs fails the test."""
import json
import os
import socket

import pytest
import torch

import weighted_loss as wl
from ranks import run_ranks

TIMEOUT_S = 180


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(case, world, tmp_path, worker="distributed_worker.py"):
    # the ranks: forks of a process that imported the weighted_loss this test imported
    # (tests/ranks.py), with the environment torchrun would give them
    root = os.path.dirname(os.path.dirname(os.path.abspath(wl.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1", PYTHONPATH=path)
    codes, logs = run_ranks(worker, case, world, tmp_path, env, TIMEOUT_S)
    if None in codes:
        pytest.fail(f"{case} with {world} ranks hung (killed after {TIMEOUT_S} s)")
    for r, (code, log) in enumerate(zip(codes, logs)):
        assert code == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["ce-ddp", "ce-module", "ce-accum", "bce-ddp", "linear-ddp",
                                  "linear-accum"])
def test_global_mean_equals_one_process(case, world, tmp_path):
    got = _run(case, world, tmp_path)
    for g in got:
        assert abs(g["loss"] - g["ref_loss"]) <= 1e-5 * abs(g["ref_loss"]), g
        assert g["grad_diff"] <= 1e-5 * g["grad_scale"], g
        if "plain_grad_diff" in g:  # the bias the option removes is real here
            assert g["plain_grad_diff"] > 100 * max(g["grad_diff"], 1e-7), g


def test_global_mean_under_torch_compile(tmp_path):
    for g in _run("ce-compile", 2, tmp_path):
        assert abs(g["loss"] - g["ref_loss"]) <= 1e-5 * abs(g["ref_loss"]), g
        assert g["grad_diff"] <= 1e-5 * g["grad_scale"], g


def test_total_weight_for_accumulation_single_process():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 6, (40,), generator=g)
    y[::7] = -100
    w = torch.rand(6, generator=g) + 0.2
    full = torch.nn.functional.cross_entropy(x, y, weight=w)
    (gf,) = torch.autograd.grad(full, x)
    total = wl.total_weight([y[:15], y[15:]], w)
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, w.double()[y[y >= 0]].sum())
    parts = [wl.cross_entropy(x[:15], y[:15], weight=w, total_weight=total),
             wl.cross_entropy(x[15:], y[15:], weight=w, total_weight=total)]
    torch.testing.assert_close(parts[0] + parts[1], full)
    (ga,) = torch.autograd.grad(parts[0] + parts[1], x)
    torch.testing.assert_close(ga, gf)


def test_errors_name_the_argument():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="reduction='mean', got reduction='sum'"):
        wl.cross_entropy(x, y, reduction="sum", total_weight=3.0)
    with pytest.raises(TypeError, match="total_weight must be a number or a tensor, got str"):
        wl.cross_entropy(x, y, total_weight="3")
    with pytest.raises(ValueError, match=r"1-element tensor, got shape \(2,\)"):
        wl.cross_entropy(x, y, total_weight=torch.ones(2))
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        wl.cross_entropy(x, y, process_group=object())
    with pytest.raises(TypeError, match="class indices"):
        wl.total_weight(torch.rand(4))


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_unsharded(world, tmp_path):
    """float32 and bfloat16; (N, C), (N, C, d1, d2) and (C,) logits; with and without class
    weights and label smoothing; every reduction; ~15% ignored targets."""
    for g in _run("vp", world, tmp_path, "vocab_parallel_worker.py"):
        assert g["checked"] == 72 and g["reweight"] == 24 and not g["failures"], g


def test_vocab_parallel_under_torch_compile(tmp_path):
    for g in _run("vp-compile", 2, tmp_path, "vocab_parallel_worker.py"):
        assert not g["failures"], g


def test_vocab_parallel_errors_name_the_argument(tmp_path):
    """A weight of the wrong length, and an uneven split of the classes, raise on every rank."""
    for g in _run("vp-errors", 4, tmp_path, "vocab_parallel_worker.py"):
        assert not g["failures"], g
        assert "[9, 8, 8, 8] classes" in g["uneven"], g
        assert "[8, 9, 8, 8] classes" in g["uneven_after_even"], g
        assert "[8, 9, 8, 8] classes" in g["uneven_weighted"], g
