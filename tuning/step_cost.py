"""The CPU time of one training step with the sum head reading the network's answer and with it
reading the true digit (``AdderNet``'s ``digits``): 15-step means, alternating, three times each,
batch 256, one thread, bf16 autocast where the CPU has it. Random images: only the time matters.

Run from the repository root: OMP_NUM_THREADS=1 python tuning/step_cost.py
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adder_utils as au  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
model = au.AdderNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
images, digits, addends = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)), torch.randint(0, 10, (256,))
use_autocast = au.supports_bf16(torch.device("cpu"))


def seconds_per_step(steps, true_code):
    started = time.process_time()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            digit_logits, sum_logits = model(images, addends, digits if true_code else None)
            loss = F.cross_entropy(digit_logits, digits) + F.cross_entropy(sum_logits, digits + addends)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.process_time() - started) / steps


seconds_per_step(3, False)  # warm-up
times = {False: [], True: []}
for _ in range(3):
    for true_code in (False, True):
        times[true_code].append(seconds_per_step(15, true_code))
print(f"bf16 autocast: {use_autocast}")
for true_code, values in times.items():
    print(f"{'true digit code' if true_code else 'network answer '}: "
          f"{', '.join(f'{1000 * value:.1f}' for value in values)} ms CPU per step")
