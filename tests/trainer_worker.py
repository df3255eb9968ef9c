"""One rank of tests/test_trainer_integration.py's multi-process cases, run as
`python trainer_worker.py CASE OUT_DIR` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set:
one step of WeightedLossTrainer (DDP over gloo, as torchrun would run it, 2 micro-batches of 4
samples per rank) against one step taken by hand on every rank's samples in one process. Writes
OUT_DIR/<rank>.json with the largest parameter difference and the largest step."""
import json
import os
import sys

import torch

import trainer_cases as tc
from weighted_loss.integrations.transformers import (
    CrossEntropyTrainerLoss, WeightedLossTrainer, fuse_linear_cross_entropy)


def main():
    case, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("LOCAL_RANK", str(rank))
    kind = "classify" if case == "loss-classify" else "lm"
    model = tc.classifier() if kind == "classify" else tc.causal_lm()
    w = tc.class_weight() if kind == "classify" else tc.vocab_weight()
    samples = tc.rows(kind, 8 * world)  # one step: every rank's 2 x 4 samples
    ref = tc.by_hand(model, samples, w, kind)
    if case == "loss-classify":
        got = tc.train_step(model, samples, 4, 2, os.path.join(out, str(rank)),
                            trainer_cls=WeightedLossTrainer,
                            compute_loss_func=CrossEntropyTrainerLoss(weight=w))
    else:
        got = tc.train_step(fuse_linear_cross_entropy(model, weight=w), samples, 4, 2,
                            os.path.join(out, str(rank)), trainer_cls=WeightedLossTrainer)
    start = dict(model.named_parameters())
    step = max((ref[n] - start[n]).abs().max().item() for n in ref)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"diff": tc.max_diff(got, ref), "step": step,
                   "world": torch.distributed.get_world_size()}, f)
    torch.distributed.destroy_process_group()  # else gloo's threads may abort the exit


if __name__ == "__main__":
    main()
