"""The tuning runs of the accuracy issue: one 20-epoch training run on the validation split.

A record of how the candidates in ``candidates.md`` were measured, not part of the project's
API. It trains like the notebook's ``train_model`` (SGD with Nesterov momentum under
OneCycle, augmentation on the fly, bfloat16 autocast where native, digit loss with label
smoothing plus sum loss without) and prints, per epoch, the validation digit / sum / joint
accuracy of the weights after that epoch. The test set is never loaded.

Settings come from environment variables (defaults: the notebook's recipe):
  STAGES="((8, 16), (20, 24), (32,))"  BS=256  LR=0.2  WD=1e-4  LS=0.1  ROT=10  SHIFT=2
  EPOCHS=20
Run from the repository root, one thread per run so that two runs share the 2 cores:
  PYTHONPATH=. python training_logs/tuning/tune.py NAME SEED > training_logs/tuning/NAME_seedSEED.log
"""

import ast
import os
import sys
import time

import torch
import torch.nn.functional as F

import adder_utils as au

torch.set_num_threads(1)
name, seed = sys.argv[1], int(sys.argv[2])
stages = ast.literal_eval(os.environ.get("STAGES", "((8, 16), (20, 24), (32,))"))
batch_size = int(os.environ.get("BS", "256"))
max_lr = float(os.environ.get("LR", "0.2"))
weight_decay = float(os.environ.get("WD", "1e-4"))
label_smoothing = float(os.environ.get("LS", "0.1"))
max_degrees = float(os.environ.get("ROT", "10"))
max_shift = float(os.environ.get("SHIFT", "2"))
epochs = int(os.environ.get("EPOCHS", "20"))

train_full = au.load_mnist("data", train=True)
train_index, validation_index = au.split_indices(len(train_full), 5000, seed=0)
images = au.normalize_images(train_full.data[train_index])
digits = train_full.targets[train_index]
validation_images = train_full.data[validation_index]
validation_digits = train_full.targets[validation_index]
validation_addends = au.seeded_addends(len(validation_index), seed=1)
validation_sums = validation_digits + validation_addends

torch.manual_seed(seed)
generator = torch.Generator().manual_seed(seed)
model = au.AdderNet(stages)
print(f"{name} seed {seed}: {au.count_parameters(model)} parameters; stages={stages} bs={batch_size} "
      f"lr={max_lr} wd={weight_decay} ls={label_smoothing} rot={max_degrees} shift={max_shift} epochs={epochs}",
      flush=True)
optimizer = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
steps_per_epoch = len(images) // batch_size
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * steps_per_epoch)
use_autocast = au.supports_bf16(torch.device("cpu"))
for epoch in range(1, epochs + 1):
    started = time.perf_counter()
    model.train()
    for batch_images, addends, batch_digits, sums in au.random_batches(images, digits, batch_size, generator):
        batch_images = au.augment(batch_images, generator, max_degrees, max_shift)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            digit_logits, sum_logits = model(batch_images, addends)
            loss = F.cross_entropy(digit_logits, batch_digits, label_smoothing=label_smoothing) + F.cross_entropy(
                sum_logits, sums
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    digit_pred, sum_pred = au.predict(model, validation_images, validation_addends)
    metrics = au.accuracy_metrics(digit_pred, sum_pred, validation_digits, validation_sums)
    print(f"epoch {epoch:2d} last-batch loss {loss.item():.4f} val digit {metrics['digit_acc']:.2f} "
          f"sum {metrics['sum_acc']:.2f} joint {metrics['joint_acc']:.2f} {time.perf_counter() - started:.1f}s",
          flush=True)
# The final weights, for later looks on the validation split (not committed: /tmp).
os.makedirs("/tmp/tuning_models", exist_ok=True)
torch.save(model.state_dict(), f"/tmp/tuning_models/{name}_seed{seed}.pt")
