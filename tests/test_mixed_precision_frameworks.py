"""Mixed-precision training as the frameworks run it, on the CPU: a transformers Trainer with
bf16=True (accelerate's CPU autocast) and a Lightning Trainer with precision="bf16-mixed", each
training a small classifier with float32 class weights, once with wl.CrossEntropyLoss and once
with nn.CrossEntropyLoss from the same start. Both must train (no dtype error) to the same
parameters. `make test` installs transformers, accelerate and lightning."""
import copy

import torch

import weighted_loss as wl

FEATURES, CLASSES, N = 12, 7, 96


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    counts = torch.bincount(y, minlength=CLASSES).float() + 1
    return x, y, wl.class_weights(counts, "max_ratio")


class Classifier(torch.nn.Module):
    """A model whose forward returns {"loss", "logits"} as transformers models do."""

    def __init__(self, criterion):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, CLASSES))
        self.criterion = criterion
        self.loss_dtypes = []

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self.criterion(logits, labels)
            self.loss_dtypes.append((logits.dtype, out["loss"].dtype))
        return out


def _close_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: {m}")


def test_hf_trainer_bf16(tmp_path):
    from transformers import Trainer, TrainingArguments

    x, y, w = _data()
    data = [{"x": x[i], "labels": y[i]} for i in range(N)]
    models = {}
    for name, crit in (("fused", wl.CrossEntropyLoss(weight=w)),
                       ("pytorch", torch.nn.CrossEntropyLoss(weight=w))):
        model = Classifier(crit)
        args = TrainingArguments(output_dir=str(tmp_path / name), bf16=True, use_cpu=True,
                                 max_steps=4, per_device_train_batch_size=24, learning_rate=0.05,
                                 report_to=[], save_strategy="no", logging_strategy="no",
                                 dataloader_num_workers=0, seed=0, data_seed=0)
        Trainer(model=model, args=args, train_dataset=data).train()
        models[name] = model
    fused, ref = models["fused"], models["pytorch"]
    # autocast was on (bfloat16 logits) and the loss came back in float32, as PyTorch's
    assert fused.loss_dtypes and set(fused.loss_dtypes) == {(torch.bfloat16, torch.float32)}
    assert set(ref.loss_dtypes) == {(torch.bfloat16, torch.float32)}
    _close_params(fused, ref)
    assert any((p - q).abs().max() > 0 for p, q in
               zip(fused.parameters(), Classifier(None).parameters())), "it trained"


def test_lightning_bf16_mixed():
    import lightning as L

    x, y, w = _data(1)

    class Module(L.LightningModule):
        def __init__(self, criterion):
            super().__init__()
            self.model = Classifier(criterion)

        def training_step(self, batch, _):
            return self.model(*batch)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)
    trained = {}
    for name, crit in (("fused", wl.CrossEntropyLoss(weight=w)),
                       ("pytorch", torch.nn.CrossEntropyLoss(weight=w))):
        module = Module(crit)
        trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=4,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, loader)
        trained[name] = module.model
    fused, ref = trained["fused"], trained["pytorch"]
    assert set(fused.loss_dtypes) == set(ref.loss_dtypes) == {(torch.bfloat16, torch.float32)}
    _close_params(fused, ref)


def test_deepcopy_of_weighted_criterion_keeps_weights():
    """Frameworks deepcopy models (EMA, Lightning's init): the criterion's weight buffer goes along."""
    _, _, w = _data()
    crit = wl.CrossEntropyLoss(weight=w)
    twin = copy.deepcopy(crit)
    assert torch.equal(twin.weight, w) and twin.weight is not crit.weight
