"""One optimizer step of transformers' Trainer on tiny models built from configs, and the same step
taken by hand on the whole batch: shared by tests/test_trainer_integration.py (one process) and
tests/trainer_worker.py (ranks of a gloo group). SGD without momentum, weight decay, warmup or
clipping: the step is lr x the gradient, so equal parameters mean equal gradients."""
import copy

import torch
import torch.nn.functional as F
import transformers

V, H, CLASSES, T = 61, 16, 5, 8
LR = 0.5


def class_weight():
    return torch.tensor([0.2, 3.0, 1.0, 7.5, 0.6])


def vocab_weight():
    return torch.linspace(0.1, 4.0, V)


def classifier():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, num_labels=CLASSES, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(cfg)


def causal_lm():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def rows(kind, n, seed=1):
    """n samples: imbalanced class labels (sequence classification) or token labels with a few
    -100 (language modelling), every micro-batch's labels weighted differently."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    if kind == "classify":
        labels = torch.multinomial(torch.tensor([0.5, 0.05, 0.25, 0.05, 0.15]), n,
                                   replacement=True, generator=g)
    else:
        labels = ids.clone()
        labels[torch.rand(n, T, generator=g) < 0.2] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def by_hand(model, samples, weight, kind):
    """Parameters after one SGD step on the whole batch with PyTorch's weighted cross-entropy."""
    model = copy.deepcopy(model)
    ids = torch.stack([s["input_ids"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    logits = model(input_ids=ids).logits
    if kind == "classify":
        loss = F.cross_entropy(logits, labels, weight=weight)
    else:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                               weight=weight)
    loss.backward()
    with torch.no_grad():
        return {n: (p - LR * p.grad).clone() for n, p in model.named_parameters()}


def train_step(model, samples, batch, accumulate, out_dir, trainer_cls=None, **trainer_kw):
    """Parameters after one Trainer step of `accumulate` micro-batches of `batch` samples."""
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0)
    model = copy.deepcopy(model)
    trainer = (trainer_cls or transformers.Trainer)(model=model, args=args,
                                                    train_dataset=samples, **trainer_kw)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    """Largest |a - b| over every parameter."""
    return max((a[n] - b[n]).abs().max().item() for n in a)
