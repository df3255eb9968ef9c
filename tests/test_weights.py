"""wl.class_weights, wl.pos_weight, the dataset counters, wl.sampler and the demo."""
import importlib.util
import math
import os
import warnings

import pytest
import torch

import weighted_loss as wl

SEED_COUNTS = [2741, 37919, 22858, 31235, 5499]


def labels_from(counts, extra=()):
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)] + [torch.tensor(extra, dtype=torch.long)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


def test_seed_numbers_max_ratio():
    w = wl.class_weights(SEED_COUNTS, "max_ratio")
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert [round(v, 2) for v in w.tolist()] == [13.83, 1.0, 1.66, 1.21, 6.90]


@pytest.mark.parametrize("method", wl.weights.METHODS)
def test_methods_match_their_formula(method):
    n = torch.tensor(SEED_COUNTS, dtype=torch.float64)
    N, C, beta = n.sum(), len(n), 0.9995
    expected = {
        "inverse": 1 / n,
        "max_ratio": n.max() / n,
        "balanced": N / (C * n),
        "median": 22858 / n,  # the middle of the five counts
        "effective_number": None,
    }[method]
    if expected is None:
        raw = (1 - beta) / (1 - beta ** n)
        expected = raw * C / raw.sum()
    got = wl.class_weights(SEED_COUNTS, method, beta=beta)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=0)
    if method == "effective_number":
        assert got.sum().item() == pytest.approx(C)


def test_median_of_an_even_number_of_classes():
    assert wl.class_weights([1, 2, 4, 8], "median").tolist() == pytest.approx([3.0, 1.5, 0.75, 0.375])


def test_effective_number_limits():
    # beta -> 0: every class weighs the same; beta -> 1: approaches 1/n (scaled)
    assert wl.class_weights([10, 1000], "effective_number", beta=0.0).tolist() == [1.0, 1.0]
    w = wl.class_weights([10, 1000], "effective_number", beta=1 - 1e-9)
    assert w[0] / w[1] == pytest.approx(100, rel=1e-4)


@pytest.mark.parametrize("method", wl.weights.METHODS)
def test_labels_and_counts_agree(method):
    y = labels_from(SEED_COUNTS)
    a = wl.class_weights(labels=y, method=method)
    b = wl.class_weights(SEED_COUNTS, method)
    c = wl.class_weights(torch.tensor(SEED_COUNTS, dtype=torch.float32), method)
    d = wl.class_weights(labels=y.numpy(), method=method)
    e = wl.class_weights(torch.tensor(SEED_COUNTS).numpy().astype("float64"), method)
    f = wl.class_weights(labels=y.tolist(), method=method)
    assert all(torch.equal(a, v) for v in (b, c, d, e, f))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_integer_counts_are_counts(dtype):
    """The forum's counts as most people write them: an integer tensor is counts, not labels."""
    w = wl.class_weights(torch.tensor(SEED_COUNTS, dtype=dtype), "max_ratio")
    assert w.shape == (5,)
    torch.testing.assert_close(w, torch.tensor([13.8340, 1.0, 1.6589, 1.2140, 6.8956]),
                               rtol=0, atol=1e-4)
    n = torch.tensor(SEED_COUNTS).numpy()  # an integer numpy array likewise
    assert torch.equal(wl.class_weights(n, "max_ratio"), w)


def test_counts_or_labels_exactly_one():
    with pytest.raises(ValueError, match="neither counts nor labels .* positionally.*labels="):
        wl.class_weights()
    with pytest.raises(ValueError, match="both counts and labels"):
        wl.class_weights([1, 2], labels=[0, 1])
    with pytest.raises(TypeError, match="'max_ratio' was given as the counts"):
        wl.class_weights("max_ratio")
    with pytest.raises(TypeError, match="positional"):
        wl.class_weights([1, 2], "inverse", 3)  # num_classes and the rest are keyword-only
    with pytest.raises(TypeError, match="labels: expected integer class indices, got .* 0.5"):
        wl.class_weights(labels=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"counts: .* got shape \(2, 2\); for labels pass labels="):
        wl.class_weights(torch.zeros(2, 2, dtype=torch.long))


def test_labels_of_any_shape_are_counted():
    seg = torch.tensor([[[0, 1], [1, 255]], [[2, 2], [255, 1]]])
    w = wl.class_weights(labels=seg, method="inverse", num_classes=3, ignore_index=255)
    torch.testing.assert_close(w, torch.tensor([1.0, 1 / 3, 1 / 2]))


@pytest.mark.parametrize("ignore", [-100, 255])
def test_ignore_index_is_excluded(ignore):
    y = labels_from([5, 10, 20], extra=[ignore] * 50)
    w = wl.class_weights(labels=y, num_classes=3, ignore_index=ignore)
    torch.testing.assert_close(w, torch.tensor([1 / 5, 1 / 10, 1 / 20]))
    with pytest.raises(ValueError, match=f"label {ignore} is"):
        wl.class_weights(labels=y, num_classes=3)


def test_num_classes_sets_C_and_checks_labels():
    y = torch.tensor([0, 1, 1, 2])
    with pytest.warns(UserWarning, match=r"classes \[3, 4\] have a count of 0"):
        w = wl.class_weights(labels=y, method="inverse", num_classes=5)
    assert w.tolist() == pytest.approx([1.0, 0.5, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="label 2 is out of range for num_classes=2"):
        wl.class_weights(labels=y, num_classes=2)


@pytest.mark.parametrize("method", wl.weights.METHODS)
def test_zero_count_rule(method):
    with pytest.warns(UserWarning, match=r"classes \[1\] have a count of 0; their weight is 0"):
        w = wl.class_weights([10, 0, 40], method)
    assert torch.isfinite(w).all() and w[1] == 0 and (w[[0, 2]] > 0).all()
    with pytest.raises(ValueError, match="every class has a count of 0"):
        wl.class_weights([0, 0], method)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of .* got 'sqrt'"):
        wl.class_weights([1, 2], "sqrt")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got 1"):
        wl.class_weights([1, 2], "effective_number", beta=1)
    with pytest.raises(ValueError, match="got -3.0 for class 1"):
        wl.class_weights([1, -3])
    with pytest.raises(ValueError, match="got nan for class 0"):
        wl.class_weights([float("nan"), 1])
    with pytest.raises(ValueError, match="num_classes=3 does not match the 2 counts"):
        wl.class_weights([1, 2], num_classes=3)
    with pytest.raises(ValueError, match="ignore_index=255 applies to labels"):
        wl.class_weights([1, 2], ignore_index=255)
    with pytest.raises(TypeError, match="counts: expected a tensor, numpy array or sequence .* got str"):
        wl.class_weights("abc")


def test_pos_weight_binary_and_multilabel():
    t = torch.cat([torch.zeros(900), torch.ones(100)])
    pw = wl.pos_weight(t)
    assert pw.shape == (1,) and pw.dtype == torch.float32 and pw.item() == 9.0
    assert wl.pos_weight(t.bool()).item() == 9.0
    m = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0]])
    assert wl.pos_weight(m).tolist() == pytest.approx([3.0, 3.0, 1 / 3])
    seg = torch.zeros(2, 3, 4, 4)
    seg[:, 0, :2] = 1  # channel 0: 16 of 32 positive
    seg[0, 1, 0, 0] = 1  # channel 1: 1 of 32
    with pytest.warns(UserWarning, match=r"columns \[2\] have no positives"):
        assert wl.pos_weight(seg).tolist() == [1.0, 31.0, 0.0]


def test_pos_weight_rules_and_errors():
    with pytest.warns(UserWarning, match=r"columns \[0\] have no negatives"):
        assert wl.pos_weight(torch.ones(4, 1)).tolist() == [0.0]
    with pytest.raises(ValueError, match="must be 0/1 .* got 0.5"):
        wl.pos_weight(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        wl.pos_weight(torch.tensor(1.0))


def test_weights_work_in_the_losses():
    g = torch.Generator().manual_seed(0)
    y = labels_from([30, 300, 120])
    x = torch.randn(len(y), 3, generator=g, requires_grad=True)
    w = wl.class_weights(labels=y, method="max_ratio")
    fused = wl.CrossEntropyLoss(weight=w)(x, y)
    native = torch.nn.CrossEntropyLoss(weight=w)(x, y)
    torch.testing.assert_close(fused, native)
    fused.backward()
    assert torch.isfinite(x.grad).all()
    t = (torch.rand(200, 4, generator=g) < torch.tensor([0.05, 0.2, 0.5, 0.9])).float()
    logits = torch.randn(200, 4, generator=g)
    pw = wl.pos_weight(t)
    torch.testing.assert_close(wl.BCEWithLogitsLoss(pos_weight=pw)(logits, t),
                               torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, t))


class Pairs(torch.utils.data.Dataset):
    def __init__(self, y):
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.zeros(2), self.y[i]


@pytest.mark.parametrize("batched", [False, True])
def test_count_labels_from_dataset_and_loader(batched):
    y = labels_from([7, 50, 0, 13], extra=[255] * 9)
    data = Pairs(y)
    if batched:
        data = torch.utils.data.DataLoader(data, batch_size=16)
    counts = wl.count_labels(data, num_classes=4, ignore_index=255, progress=False)
    assert counts.tolist() == [7, 50, 0, 13]
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        w = wl.class_weights_from(data, "inverse", num_classes=4, ignore_index=255, progress=False)
    assert w.tolist() == pytest.approx([1 / 7, 1 / 50, 0, 1 / 13])
    with pytest.raises(ValueError, match="label 255 is negative|label 255"):
        wl.count_labels(data, num_classes=4, progress=False)


def test_count_labels_segmentation_masks_with_progress(capsys):
    masks = [(torch.zeros(2), torch.tensor([[0, 1], [1, 255]])) for _ in range(3)]
    assert wl.count_labels(masks, ignore_index=255).tolist() == [3, 6]


def test_count_positives_and_pos_weight_from_counts():
    t = (torch.rand(64, 3, generator=torch.Generator().manual_seed(1)) < 0.25).float()
    data = torch.utils.data.DataLoader(list(zip(torch.zeros(64, 1), t)), batch_size=10)
    pos, total = wl.count_positives(data, progress=False)
    assert total == 64 and pos.tolist() == t.sum(0).tolist()
    torch.testing.assert_close(wl.pos_weight_from_counts(pos, total), wl.pos_weight(t))


def test_sampler_oversamples_rare_classes():
    y = labels_from([50, 950])
    g = torch.Generator().manual_seed(0)
    s = wl.sampler(y, "inverse", generator=g)
    assert isinstance(s, torch.utils.data.WeightedRandomSampler) and len(s) == len(y)
    drawn = y[torch.tensor(list(s))]
    share = (drawn == 0).float().mean().item()
    assert 0.45 < share < 0.55  # about half, against 5% in the data
    assert len(wl.sampler(y, num_samples=10)) == 10
    with pytest.raises(ValueError, match="labels must be a 1-D integer"):
        wl.sampler(torch.rand(5))


def test_demo_runs(tmp_path, capsys):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "demo.py")
    spec = importlib.util.spec_from_file_location("demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    results = demo.main(["--scale", "0.02", "--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    names = [r["run"] for r in results]
    assert names[0] == "no weights" and "sampler (inverse)" in names and len(names) == 10
    assert names[-2:] == ["focal g=2", "focal g=2 + balanced"]
    for r in results:
        assert len(r["recall"]) == 5 and 0 <= r["balanced_accuracy"] <= 1
        assert math.isclose(r["balanced_accuracy"], sum(r["recall"]) / 5)
        assert all(math.isfinite(v) for v in r["train_loss"] + r["test_loss_unweighted"])
    assert "per-class recall" in out and "bal.acc" in out
    assert (tmp_path / "demo.json").exists()
