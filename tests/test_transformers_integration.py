"""weighted_loss.integrations.transformers: a transformers causal LM trained through the fused
linear cross-entropy (tiny models built from configs: no downloads) gives the model's own loss
and gradients; eval and generation are unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # make test installs it (test-deps)
from weighted_loss.integrations.transformers import fuse_linear_cross_entropy  # noqa: E402

V, H = 97, 32


def _llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _gemma2():
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=H, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=5.0)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(cfg)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _step(model, **kw):
    model.train()
    model.zero_grad()
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b, tol=2e-5):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa.loss, ob.loss, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=tol, atol=tol, msg=n)


@pytest.mark.parametrize("make", [_llama, _gemma2], ids=["llama", "gemma2-softcap"])
def test_loss_and_gradients_are_the_models_own(make):
    ids, labels = _batch()
    ref = make()
    fused = fuse_linear_cross_entropy(copy.deepcopy(ref))
    a = _step(fused, input_ids=ids, labels=labels)
    assert a[0].logits is None  # not materialized
    _same(a, _step(ref, input_ids=ids, labels=labels))
    # Trainer's num_items_in_batch (the step's count: the loss is a sum over it), shift_labels
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    n = torch.tensor(40)
    shift[1, -4:] = -100  # shift_labels win over labels, as in the model's own loss
    kw = dict(input_ids=ids, labels=labels, shift_labels=shift, num_items_in_batch=n)
    _same(_step(fused, **kw), _step(ref, **kw))


def test_eval_generation_and_no_labels_unchanged():
    ids, labels = _batch()
    ref = _llama()
    fused = fuse_linear_cross_entropy(copy.deepcopy(ref))
    ref.eval(), fused.eval()
    with torch.no_grad():
        a, b = fused(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(a.loss, b.loss)
        assert torch.equal(fused.generate(ids[:, :4], max_new_tokens=3, do_sample=False),
                           ref.generate(ids[:, :4], max_new_tokens=3, do_sample=False))
    fused.train()
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_class_weights_smoothing_and_16_bit():
    ids, labels = _batch()
    ref = _llama()
    w = torch.rand(V, generator=torch.Generator().manual_seed(3)) + 0.5
    fused = fuse_linear_cross_entropy(copy.deepcopy(ref), weight=w, label_smoothing=0.1)
    loss = _step(fused, input_ids=ids, labels=labels)[0].loss
    ref.train()
    logits = ref(input_ids=ids).logits.float()
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    expect = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), weight=w,
                             label_smoothing=0.1)
    torch.testing.assert_close(loss, expect, rtol=2e-5, atol=2e-5)
    # a bfloat16 model: a float32 loss, as the model's own (which upcasts its logits)
    half = fuse_linear_cross_entropy(copy.deepcopy(ref).to(torch.bfloat16))
    out = _step(half, input_ids=ids, labels=labels)[0]
    own = copy.deepcopy(ref).to(torch.bfloat16).train()(input_ids=ids, labels=labels).loss
    assert out.loss.dtype == own.dtype == torch.float32
    assert abs(out.loss.item() - own.item()) < 0.05 * own.item()


def test_patching_twice_replaces_the_options_and_needs_a_linear_head():
    ids, labels = _batch()
    ref = _llama()
    fused = fuse_linear_cross_entropy(copy.deepcopy(ref), label_smoothing=0.3)
    fused = fuse_linear_cross_entropy(fused)  # the options replaced, not stacked
    _same(_step(fused, input_ids=ids, labels=labels), _step(ref, input_ids=ids, labels=labels))
    bad = _llama()
    bad.get_output_embeddings = lambda: torch.nn.Identity()
    with pytest.raises(TypeError, match="linear head"):
        fuse_linear_cross_entropy(bad)


def test_logits_to_keep_takes_the_labels_of_the_positions_kept():
    ids, labels = _batch()
    ref = _llama()
    fused = fuse_linear_cross_entropy(copy.deepcopy(ref))
    loss = _step(fused, input_ids=ids, labels=labels, logits_to_keep=5)[0].loss
    ref.train()
    logits = ref(input_ids=ids).logits[:, -5:]
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:][:, -5:]
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1)),
                               rtol=2e-5, atol=2e-5)
