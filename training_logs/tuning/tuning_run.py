"""A record, not part of the project: the script that made the tuning logs beside it.

Each log is one 20-epoch run on the validation split (5,000 images, seeded addends), on the
2-core CPU, three runs side by side with one thread each; "raw" is validation digit / joint
accuracy of the weights after the epoch, and "loss" the loss of the epoch's last batch.
Settings come from environment variables: cand = the defaults (batch 256, LR 0.2, weight
decay 1e-4); bs128 = BS=128 LR=0.15; wide1 = ARCH="{'widths': (12, 16, 20, 24, 28)}".
Run as: PYTHONPATH=. python training_logs/tuning/tuning_run.py NAME 20
"""
import os, sys, time

import torch

import adder_utils as au

torch.set_num_threads(1)
variant, epochs = sys.argv[1], int(sys.argv[2])
wd = float(os.environ.get("WD", "1e-4")); bs = int(os.environ.get("BS", "256")); lr = float(os.environ.get("LR", "0.2")); rot = float(os.environ.get("ROT", "10")); shift = float(os.environ.get("SHIFT", "2"))
torch.manual_seed(0)
train = au.load_mnist("data", True)
tr, va = au.split_indices(60000, 5000, 0)
x = au.normalize_images(train.data[tr]); d = train.targets[tr]
vx, vd = train.data[va], train.targets[va]; vadd = au.seeded_addends(5000, 1); vs = vd + vadd
g = torch.Generator().manual_seed(0)
m = au.AdderNet(**eval(os.environ.get('ARCH', '{}')))
print(au.count_parameters(m), flush=True)
opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
spe = len(x)//bs
sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs*spe)
crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
for ep in range(1, epochs+1):
    t=time.time(); m.train()
    for im,a,dd,s in au.random_batches(x, d, bs, g):
        with torch.autocast("cpu", torch.bfloat16):
            dl, sl = m(au.augment(im, g, rot, shift), a); loss = crit(dl, dd)+crit(sl, s)
        opt.zero_grad(); loss.backward(); opt.step(); sch.step(); 
    raw = au.accuracy_metrics(*au.predict(m, vx, vadd), vd, vs)
    print(variant, ep, f"loss {loss.item():.3f} raw {raw['digit_acc']:.2f}/{raw['joint_acc']:.2f} {time.time()-t:.0f}s", flush=True)
