"""The sum head's design choices, measured on the head alone (exact digit codes, no images).

The trial behind two choices of ``adder_utils.NumberLineSumHead``: a fixed
sharpness, and no label smoothing on the sum. Each variant trains alone on the pairs left
after holding some out (``held_out_pairs(count, seed, keep_every_sum=False, connected=False)``), with the
notebook's optimizer and schedule (``train_sum_head_alone``, 2,000 steps), and is scored on
the pairs it never saw. Deterministic on the CPU; about a minute in all.

Run from the repository root: python tuning/sum_head_variants.py (writes
tuning/logs/sum_head_variants.md).
"""

import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import adder_utils as au  # noqa: E402

OUTPUT = REPO / "tuning" / "logs" / "sum_head_variants.md"

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


# name: (head class, label smoothing on the sum)
VARIANTS = {
    "fixed sharpness (ours)": (au.NumberLineSumHead, 0.0),
    "fixed sharpness, label smoothing 0.1": (au.NumberLineSumHead, 0.1),
    "learned sharpness": (LearnedSharpness, 0.0),
    "learned log-sharpness": (LearnedLogSharpness, 0.0),
}
rows = ["| variant | held out | seen pairs right (%) | unseen pairs right (%), per seed |", "| --- | ---: | ---: | --- |"]
for name, (make_head, label_smoothing) in VARIANTS.items():
    for count in (10, 50, 70):
        seen, unseen = [], []
        for seed in range(3):
            allowed = au.pair_mask(au.held_out_pairs(count, seed, keep_every_sum=False, connected=False))
            torch.manual_seed(seed)
            table = au.adder_table(au.train_sum_head_alone(make_head(), allowed, seed, label_smoothing=label_smoothing))
            seen.append(au.table_accuracy(table, allowed))
            unseen.append(au.table_accuracy(table, ~allowed))
        rows.append(f"| {name} | {count} | {sum(seen) / 3:.1f} | {', '.join(f'{u:.0f}' for u in unseen)} |")
        print(rows[-1], flush=True)
OUTPUT.write_text(
    "# The sum head's design choices, on the head alone\n\n"
    "Written by `tuning/sum_head_variants.py` (CPU, deterministic): each row is 3 random sets of held-out "
    "pairs (seeds 0-2), 2,000 training steps each.\n\n" + "\n".join(rows) + "\n"
)
