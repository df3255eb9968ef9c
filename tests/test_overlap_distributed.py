"""The overlap losses across processes (process_group=): 2 and 4 gloo ranks, each an unequal
share of one batch of label maps (tests/overlap_worker.py, forked by tests/ranks.py). Every rank's
loss equals one process's on the whole batch, and the gradients after DDP's averaging equal its
gradients: a batch Dice is the group's batch's, a per-item Dice the mean over the group's items,
the cross-entropy term the group's weighted mean; nnU-Net's ddp=True batch Dice too."""
import pytest

from test_distributed import _run


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["dice-batch", "dice-items", "generalized-batch", "nnunet-ddp"])
def test_overlap_over_processes_equals_one_process(case, world, tmp_path):
    if case == "nnunet-ddp":
        pytest.importorskip("nnunetv2")
    for g in _run(case, world, tmp_path, worker="overlap_worker.py"):
        assert abs(g["loss"] - g["ref_loss"]) <= 1e-10 * max(1.0, abs(g["ref_loss"])), g
        assert g["grad_diff"] <= 1e-10 * g["grad_scale"], g
