"""Class-weighted losses under transformers' Trainer (weighted_loss/integrations/trainer.py): one
optimizer step with gradient accumulation 1 and 4 gives the parameters of one step on the whole
batch with PyTorch's weighted cross-entropy (tiny Llama models from configs, SGD: equal
parameters are equal gradients), for CrossEntropyTrainerLoss and for a model fused with class
weights; a plain Trainer's unweighted count is refused, and the bias it would give is real."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # make test installs it (test-deps)
import trainer_cases as tc  # noqa: E402
from weighted_loss.integrations.transformers import (  # noqa: E402
    CrossEntropyTrainerLoss, WeightedLossTrainer, fuse_linear_cross_entropy)

TOL = 2e-6  # float32 parameters after a step of LR 0.5: a few ulps of the larger ones


def _step_size(ref, model):
    start = dict(model.named_parameters())
    return max((ref[n] - start[n]).abs().max().item() for n in ref)


@pytest.mark.parametrize("kind", ["classify", "lm"])
@pytest.mark.parametrize("batch,accumulate", [(16, 1), (4, 4)])
def test_loss_func_step_equals_one_big_batch(kind, batch, accumulate, tmp_path):
    model = tc.classifier() if kind == "classify" else tc.causal_lm()
    w = tc.class_weight() if kind == "classify" else tc.vocab_weight()
    samples = tc.rows(kind, 16)
    ref = tc.by_hand(model, samples, w, kind)
    loss = CrossEntropyTrainerLoss(weight=w, shift_labels=kind == "lm")
    got = tc.train_step(model, samples, batch, accumulate, tmp_path,
                        trainer_cls=WeightedLossTrainer, compute_loss_func=loss)
    assert tc.max_diff(got, ref) <= TOL * max(1.0, _step_size(ref, model))


@pytest.mark.parametrize("accumulate", [1, 4])
def test_fused_weighted_model_step_equals_one_big_batch(accumulate, tmp_path):
    model = tc.causal_lm()
    w = tc.vocab_weight()
    samples = tc.rows("lm", 16)
    ref = tc.by_hand(model, samples, w, "lm")
    fused = fuse_linear_cross_entropy(tc.causal_lm(), weight=w)
    got = tc.train_step(fused, samples, 16 // accumulate, accumulate, tmp_path,
                        trainer_cls=WeightedLossTrainer)
    assert tc.max_diff(got, ref) <= TOL * max(1.0, _step_size(ref, model))


def test_unweighted_loss_runs_under_the_plain_trainer(tmp_path):
    """Without class weights Trainer's count is the right denominator: no subclass needed."""
    model = tc.classifier()
    samples = tc.rows("classify", 16)
    ref = tc.by_hand(model, samples, None, "classify")
    got = tc.train_step(model, samples, 4, 4, tmp_path,
                        compute_loss_func=CrossEntropyTrainerLoss(label_smoothing=0.0))
    assert tc.max_diff(got, ref) <= TOL * max(1.0, _step_size(ref, model))


def test_plain_trainer_count_is_refused_with_weights_and_is_biased(tmp_path):
    model = tc.classifier()
    w = tc.class_weight()
    samples = tc.rows("classify", 16)
    with pytest.raises(ValueError, match="WeightedLossTrainer"):
        tc.train_step(model, samples, 4, 4, tmp_path,
                      compute_loss_func=CrossEntropyTrainerLoss(weight=w))
    with pytest.raises(ValueError, match="WeightedLossTrainer"):
        tc.train_step(fuse_linear_cross_entropy(tc.causal_lm(), weight=tc.vocab_weight()),
                      tc.rows("lm", 8), 4, 2, tmp_path)

    def by_count(outputs, labels, num_items_in_batch=None):  # what the plain Trainer gives
        return F.cross_entropy(outputs.logits, labels, weight=w, reduction="sum") / \
            num_items_in_batch

    ref = tc.by_hand(model, samples, w, "classify")
    biased = tc.train_step(model, samples, 4, 4, tmp_path, compute_loss_func=by_count)
    assert tc.max_diff(biased, ref) > 100 * TOL * max(1.0, _step_size(ref, model))


def test_trainer_loss_matches_pytorch_on_segmentation_logits():
    """(N, C, H, W) logits with (N, H, W) labels, and the batch mean without num_items."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    labels[0, 0] = -100
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    loss = CrossEntropyTrainerLoss(weight=w, label_smoothing=0.1)
    want = F.cross_entropy(logits, labels, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(loss({"logits": logits}, labels), want)
    total = w[labels[labels >= 0]].double().sum()
    got = loss({"logits": logits}, labels, num_items_in_batch=total)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["loss-classify", "fused-lm"])
def test_step_over_processes_equals_one_big_batch(case, world, tmp_path):
    """torchrun-style DDP over gloo (average_tokens_across_devices, Trainer's default): every
    rank's parameters after the step equal one process's on all the ranks' samples."""
    from test_distributed import _run
    for r in _run(case, world, tmp_path, worker="trainer_worker.py"):
        assert r["world"] == world
        assert r["diff"] <= TOL * max(1.0, r["step"]), r
