"""Learning to add at the limit, on the sum head alone: trained on 19 of the 100 pairs.

19 seen pairs are the fewest that connect the 10 digits and 10 addends (a spanning tree), and
then they fix ``value(d) + value(a)`` of every pair. Each seen set here is such a tree:

* the long chain (``au.long_chain_pairs()``) and random trees (``au.interior_seen_pairs(19, seed)``,
  seeds 0-4), every seen sum interior (1 to 17);
* for contrast, staircases d + d and d + (d + 1), in which 0 + 0 or 9 + 9 (or both) is the only
  pair of a digit or an addend.

Each head trains alone on exact codes (``train_sum_head_alone``: the recipe's optimizer and
schedule, 2,000 steps), 3 training seeds per set, and is scored on the 81 pairs it never saw.
For the number-line head the table also gives how far its points land from the true sums,
the largest ``|z - (d + a)|`` over all 100 pairs: the sums are read from z by rounding, so
under 0.5 means every pair right. Deterministic on the CPU, one thread; about two minutes.

Run from the repository root: python tuning/held_out_19.py (writes
tuning/logs/held_out_19.md).
"""

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import adder_utils as au  # noqa: E402

OUTPUT = REPO / "tuning" / "logs" / "held_out_19.md"
SEEDS = (0, 1, 2)  # training seeds: the head's initial values and its batches

torch.set_num_threads(1)


def staircase(with_zero: bool, with_eighteen: bool) -> list[tuple[int, int]]:
    """19 seen pairs in one path through d + d and d + (d + 1); 0 + 0 and 9 + 9 each either the
    only pair of addend 0 / digit 9, or replaced by 1 + 0 / 9 + 8."""
    pairs = [(digit, digit) for digit in range(1, 9)] + [(digit, digit + 1) for digit in range(9)]
    pairs.append((0, 0) if with_zero else (1, 0))
    pairs.append((9, 9) if with_eighteen else (9, 8))
    return sorted(pairs)


SEEN_SETS = {
    "long chain": au.long_chain_pairs(),
    **{f"random tree, seed {seed}": au.interior_seen_pairs(19, seed) for seed in range(5)},
    "staircase with 0+0 and 9+9": staircase(True, True),
    "staircase with 0+0": staircase(True, False),
    "staircase with 9+9": staircase(False, True),
}


@torch.no_grad()
def largest_point_error(head: au.NumberLineSumHead) -> float:
    """The largest distance of a pair's point z from its true sum, over all 100 pairs."""
    digits, addends = torch.meshgrid(torch.arange(au.NUM_DIGITS), torch.arange(au.NUM_DIGITS), indexing="ij")
    points = head.value(au.exact_codes(digits.flatten(), addends.flatten())).flatten()
    return float((points - (digits + addends).flatten()).abs().max())


def main():
    started = time.process_time()
    rows = ["| seen set (19 pairs) | seen sums | number line: unseen pairs right (%), per seed | "
            "largest \\|z - (d + a)\\|, per seed | one-hot class head: unseen right (%), per seed |",
            "| --- | --- | --- | --- | --- |"]
    for name, seen in SEEN_SETS.items():
        allowed = ~au.pair_mask(seen)  # pair_mask marks the pairs given as not allowed
        assert allowed.sum() == 19 and au.seen_pairs_connect_every_value(allowed)
        line, errors, classes = [], [], []
        for seed in SEEDS:
            torch.manual_seed(seed)
            head = au.train_sum_head_alone(au.NumberLineSumHead(), allowed, seed)
            line.append(au.table_accuracy(au.adder_table(head), ~allowed))
            errors.append(largest_point_error(head))
            torch.manual_seed(seed)
            one_hot = au.train_sum_head_alone(au.OneHotClassSumHead(), allowed, seed)
            classes.append(au.table_accuracy(au.adder_table(one_hot), ~allowed))
        sums = sorted(digit + addend for digit, addend in seen)
        rows.append(f"| {name} | {sums[0]} to {sums[-1]} | {', '.join(f'{u:.1f}' for u in line)} | "
                    f"{', '.join(f'{e:.2f}' for e in errors)} | {', '.join(f'{u:.1f}' for u in classes)} |")
        print(rows[-1], flush=True)
    seconds = time.process_time() - started
    OUTPUT.write_text(
        "# Trained on 19 of the 100 pairs: the sum head alone\n\n"
        "Written by `tuning/held_out_19.py` (CPU, one thread, deterministic): each seen set is 19 pairs "
        "that connect every digit and addend; each head trains alone on exact codes for 2,000 steps, "
        f"training seeds {', '.join(map(str, SEEDS))}, and is scored on the 81 pairs it never saw. "
        f"{seconds:.0f} CPU seconds in all.\n\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
