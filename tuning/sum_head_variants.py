"""The sum head's design choices, measured on the head alone (exact digit codes, no images).

A record of the trial behind two choices of ``adder_utils.NumberLineSumHead``: a fixed
sharpness, and no label smoothing on the sum. Each variant trains alone on the pairs left
after holding some out (``held_out_pairs(count, seed, keep_every_sum=False)``), with the
notebook's optimizer and schedule (``train_sum_head_alone``, 2,000 steps), and is scored on
the pairs it never saw. Deterministic on the CPU; about a minute in all.

Run from the repository root: PYTHONPATH=. python training_logs/tuning/sum_head_variants.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import adder_utils as au

torch.set_num_threads(1)


class LearnedSharpness(nn.Module):
    """The number line with a learned sharpness k: logits k (2 z s - s^2) written as
    y s - k s^2 (still linear in the parameters), positions in units of 3 around 9 so that
    SGD at LR 0.2 stays stable (with positions 0-18 it did not)."""

    def __init__(self):
        super().__init__()
        self.value = nn.Linear(20, 1)
        self.sharpness = nn.Parameter(torch.empty(1).uniform_(0.5, 1.5))
        self.register_buffer("positions", (torch.arange(19.0) - 9) / 3)

    def forward(self, codes):
        return self.value(codes) * self.positions - self.sharpness * self.positions**2


class LearnedLogSharpness(nn.Module):
    """logits -exp(log k) (z - s)^2 with z and log k learned directly (not convex)."""

    def __init__(self):
        super().__init__()
        self.value = nn.Linear(20, 1)
        self.log_sharpness = nn.Parameter(torch.empty(1).uniform_(-1.0, 1.0))
        self.register_buffer("positions", torch.arange(19.0))

    def forward(self, codes):
        return -self.log_sharpness.exp() * (self.value(codes) - self.positions) ** 2


def train_with_label_smoothing(head, allowed, seed, steps=2000, smoothing=0.1):
    """train_sum_head_alone's loop with label smoothing on the sum."""
    real = F.cross_entropy
    F.cross_entropy = lambda logits, target: real(logits, target, label_smoothing=smoothing)
    try:
        return au.train_sum_head_alone(head, allowed, seed, steps)
    finally:
        F.cross_entropy = real


variants = {
    "fixed sharpness (ours)": lambda head, allowed, seed: au.train_sum_head_alone(head, allowed, seed),
    "fixed sharpness, label smoothing 0.1": train_with_label_smoothing,
}
heads = {
    "fixed sharpness (ours)": au.NumberLineSumHead,
    "fixed sharpness, label smoothing 0.1": au.NumberLineSumHead,
    "learned sharpness": LearnedSharpness,
    "learned log-sharpness": LearnedLogSharpness,
}
print("| variant | held out | seen pairs right (%) | unseen pairs right (%), per seed |")
print("| --- | ---: | ---: | --- |")
for name, make_head in heads.items():
    train = variants.get(name, variants["fixed sharpness (ours)"])
    for count in (10, 50, 70):
        seen, unseen = [], []
        for seed in range(3):
            allowed = au.allowed_pairs_without(au.held_out_pairs(count, seed, keep_every_sum=False))
            torch.manual_seed(seed)
            table = au.adder_table(train(make_head(), allowed, seed))
            seen.append(au.table_accuracy(table, allowed))
            unseen.append(au.table_accuracy(table, ~allowed))
        print(f"| {name} | {count} | {sum(seen) / 3:.1f} | {', '.join(f'{u:.0f}' for u in unseen)} |", flush=True)
