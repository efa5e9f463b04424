"""Training speed: the project's on-device pipeline against the typical DataLoader one.

Run from the repository root:

    python benchmarks/train_speed.py            # the full benchmark (several minutes on a CPU)
    python benchmarks/train_speed.py --short    # a tiny run that only proves the script works (CI)

Every row trains the project's model (``adder_utils.AdderNet``) with the same training step
and changes only how the data reaches the model and how the model runs:

    reference          torchvision Dataset (PIL -> ToTensor -> Normalize per item) and a
                       DataLoader, eager fp32, no augmentation: how typical public solutions train
    data on device     the split on the device as one normalised tensor, batches cut with
                       torch.randperm there, addends drawn there; eager fp32, no augmentation
                       (the same work per image as the reference)
    + compile          the same, through torch.compile
    + bf16 autocast    the same, compiled and under bfloat16 autocast (only where bf16 is
                       native: against + compile, this is fp32 against bf16)
    notebook's CPU recipe
                       data on device, bf16 autocast where native, no compile, and the
                       notebook's random rotations and shifts on the device: the notebook's
                       default on a CPU
    notebook's GPU recipe
                       the same, through torch.compile: the notebook's default on a GPU (on a
                       CPU, the row that shows why compile is off there)
    + CUDA graphs      the same, compiled with mode="reduce-overhead", which replays the
                       step's kernels as CUDA graphs (CUDA only)

For each row it reports steady-state training images/s and the ratio to the reference,
seconds per epoch, training seconds from fresh weights to 99.0% validation digit accuracy,
warm-up and compile time (kept out of every other figure), and model FLOPs utilisation
against the matmul rate this machine reaches in the same run. The figures, with the machine
and versions that produced them, go to benchmarks/results_<cpu|cuda>.md and .json, rewritten
after every row (marked partial until the last), so a run cut short keeps what it measured.
A row that fails is reported as failed and the others still run.
"""

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# adder_utils.py sits at the repository root, one folder up; put that folder on the path so
# that `python benchmarks/train_speed.py` finds it without installing anything.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision import transforms  # noqa: E402

import adder_utils as au  # noqa: E402

# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

SETTINGS = {
    # The notebook's training recipe.
    "batch_size": 256,
    "max_lr": 0.2,             # OneCycle's peak learning rate
    "weight_decay": 1e-4,
    "label_smoothing": 0.1,    # on the digit loss only, as in the notebook
    "validation_size": 5000,   # taken from the 60,000 training images, as in the notebook
    "seed": 0,                 # the same initial weights and data order for every row
    # Throughput.
    "warmup_steps": 10,        # run before the clock starts; the first one holds the compile
    "timed_steps": 100,        # the throughput window: 25,600 images at batch 256
    "profiled_steps": 20,      # after the window, under torch.profiler: where a step's time goes
    # Time to target.
    "target_digit_acc": 99.0,  # validation digit accuracy, %
    "target_epochs": 5,        # the OneCycle schedule of the time-to-target run spans this many epochs
    "evals_per_epoch": 4,      # validation checks per epoch, off the clock
    # Sizes.
    "train_size": 0,           # 0: all 55,000 training images
    "eval_size": 0,            # 0: all 5,000 validation and 10,000 test images
    # The machine's matmul rate, the yardstick of model FLOPs utilisation.
    "matmul_size": 0,          # 0: 2048 on a CPU, 8192 on a GPU (2048 is too small to fill a GPU)
    "matmul_seconds": 1.0,     # time each matmul rate over at least this long
}

# --short: just enough to run every code path once; its figures measure nothing.
SHORT_SETTINGS = {
    "warmup_steps": 1,
    "timed_steps": 3,
    "profiled_steps": 2,
    "target_epochs": 1,
    "train_size": 1024,        # 4 steps per epoch
    "eval_size": 500,
    "matmul_size": 512,
    "matmul_seconds": 0.1,
}

# One dict per table row. Each row but the reference adds one change ("change") to the row
# it is compared with ("compared_with"), so the ratio of the two is what that change buys.
# "compile" is False or torch.compile's mode; "autocast" means bf16 autocast where bf16 is
# native (au.supports_bf16), as the notebook does; "needs" names what a row cannot run without.
PIPELINES = [
    {"key": "reference", "name": "reference: Dataset + DataLoader, eager fp32",
     "data_on_device": False, "compile": False, "autocast": False, "augment": False,
     "compared_with": None, "change": None},
    {"key": "device", "name": "data on device",
     "data_on_device": True, "compile": False, "autocast": False, "augment": False,
     "compared_with": "reference", "change": "data on the device"},
    {"key": "device_compile", "name": "+ compile",
     "data_on_device": True, "compile": "default", "autocast": False, "augment": False,
     "compared_with": "device", "change": "compile"},
    {"key": "device_compile_bf16", "name": "+ bf16 autocast",
     "data_on_device": True, "compile": "default", "autocast": True, "augment": False,
     "compared_with": "device_compile", "change": "bf16 autocast (fp32 -> bf16)", "needs": "bf16"},
    {"key": "notebook_cpu", "name": "notebook's CPU recipe: device, bf16, augmentation, no compile",
     "data_on_device": True, "compile": False, "autocast": True, "augment": True,
     "compared_with": "device", "change": "bf16 autocast where native and augmentation, without compile"},
    {"key": "notebook_gpu", "name": "notebook's GPU recipe: device, bf16, augmentation, compile",
     "data_on_device": True, "compile": "default", "autocast": True, "augment": True,
     "compared_with": "notebook_cpu", "change": "compile, on the notebook's recipe"},
    {"key": "notebook_gpu_cudagraphs", "name": "+ CUDA graphs (compile mode reduce-overhead)",
     "data_on_device": True, "compile": "reduce-overhead", "autocast": True, "augment": True,
     "compared_with": "notebook_gpu", "change": "CUDA graphs instead of compile's default mode",
     "needs": "cuda"},
]

# The rows profiled with torch.profiler after their throughput window: the notebook's recipes.
PROFILED_ROWS = {"notebook_cpu", "notebook_gpu", "notebook_gpu_cudagraphs"}

# The targets of the issues that asked for this benchmark (12 for the CPU, 13 for an H100 or
# H200), per device type.
CPU_TARGET_SPEEDUP = 2.0
CPU_TARGET_MFU = 0.60          # model FLOP rate / this machine's fp32 matmul rate
GPU_TARGET_SPEEDUP = 50.0
GPU_TARGET_RUN_EPOCHS = 20     # the notebook's full run ...
GPU_TARGET_RUN_SECONDS = 3.0   # ... in at most this long, compile excluded
GPU_TARGET_VAL_SECONDS = 0.5   # 99.0% validation digit accuracy within this much training


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_data(root, settings, device):
    """The training split both ways (per-item Dataset, and one tensor on the device), and the
    validation and test images as ``au.predict`` takes them."""
    train_full = au.load_mnist(root, train=True, download=True)
    test_set = au.load_mnist(root, train=False, download=True)
    # The notebook's split: every row is judged on the same validation images.
    train_index, validation_index = au.split_indices(len(train_full), settings["validation_size"], seed=0)
    if settings["train_size"]:
        train_index = train_index[: settings["train_size"]]
    eval_size = settings["eval_size"] or None
    validation_index = validation_index[:eval_size]

    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((au.MNIST_MEAN,), (au.MNIST_STD,))]
    )
    reference_set = Subset(au.MNISTAdder(root, train=True, transform=normalize), train_index.tolist())

    validation_addends = au.seeded_addends(len(validation_index), seed=1)
    test_images = test_set.data[:eval_size]
    # The digit never depends on the addend (it enters after the digit is read), so one
    # seeded addend per test image is enough for digit accuracy.
    test_addends = au.seeded_addends(len(test_images), seed=2)
    return SimpleNamespace(
        reference_set=reference_set,
        train_images=au.normalize_images(train_full.data[train_index].to(device)),
        train_digits=train_full.targets[train_index].to(device),
        validation_images=train_full.data[validation_index],
        validation_addends=validation_addends,
        validation_digits=train_full.targets[validation_index],
        test_images=test_images,
        test_addends=test_addends,
        test_digits=test_set.targets[:eval_size],
    )


def reference_batches(dataset, batch_size, seed, device):
    """Endless ``(images, addends, digits, sums)`` batches the typical way: a DataLoader over
    the per-item Dataset, each item converted from PIL and normalised on the host."""
    torch.manual_seed(seed)  # MNISTAdder draws each item's addend from the global generator
    # num_workers=0 is DataLoader's default, which typical notebooks keep; on 2 cores,
    # worker processes would also compete with the training step for the same cores.
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        for (images, addends), (digits, sums) in loader:
            yield images.to(device), addends.to(device), digits.to(device), sums.to(device)


def device_batches(images, digits, batch_size, seed, augment):
    """Endless batches cut on the device by ``au.random_batches``, augmented as the notebook
    trains when ``augment``."""
    generator = torch.Generator(images.device).manual_seed(seed)
    while True:
        for batch_images, addends, batch_digits, sums in au.random_batches(images, digits, batch_size, generator):
            if augment:
                batch_images = au.augment(batch_images, generator)
            yield batch_images, addends, batch_digits, sums


def batches_for(pipeline, data, settings, device):
    if pipeline["data_on_device"]:
        return device_batches(
            data.train_images, data.train_digits, settings["batch_size"], settings["seed"], pipeline["augment"]
        )
    return reference_batches(data.reference_set, settings["batch_size"], settings["seed"], device)


# --------------------------------------------------------------------------------------
# Training step (the same for every row)
# --------------------------------------------------------------------------------------


def adder_loss(digit_logits, sum_logits, digits, sums, label_smoothing):
    """The notebook's loss: cross-entropy on the digit (label-smoothed) plus plain
    cross-entropy on the sum."""
    return F.cross_entropy(digit_logits, digits, label_smoothing=label_smoothing) + F.cross_entropy(sum_logits, sums)


def make_optimizer(model, settings, total_steps):
    """The notebook's SGD with Nesterov momentum under a OneCycle schedule of ``total_steps``."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings["max_lr"], momentum=0.9, nesterov=True,
        weight_decay=settings["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["max_lr"], total_steps=total_steps)
    return optimizer, scheduler


def train_step(forward, optimizer, scheduler, batch, autocast, label_smoothing, cuda_graphs=False):
    """One step; returns the loss as a device tensor, so the loop never waits for the host."""
    images, addends, digits, sums = batch
    if cuda_graphs:
        # Tells compile's CUDA graphs that a new step begins, so that this step may reuse
        # the memory of the last one's outputs (which the caller no longer holds).
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        digit_logits, sum_logits = forward(images, addends)
        loss = adder_loss(digit_logits, sum_logits, digits, sums, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def cpu_features():
    """The vector and matrix extensions the matmul rates depend on: a virtual machine's CPU
    name ("Intel(R) Xeon(R) Processor") often says nothing about them."""
    return sorted({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} & au.cpu_flags())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(forward, optimizer, scheduler, batches, steps, pipeline, settings, device):
    """Train ``steps`` steps; return their wall-clock seconds and the summed loss (a device tensor).

    Wall clock between two synchronisations, not CUDA events: the host-side data loading of
    the reference is part of what is being timed.
    """
    loss_sum = torch.zeros((), device=device)
    synchronize(device)
    started = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        loss = train_step(forward, optimizer, scheduler, batch, pipeline["autocast"], settings["label_smoothing"],
                          cuda_graphs=pipeline["compile"] == "reduce-overhead")
        loss_sum += loss
    synchronize(device)
    return time.perf_counter() - started, loss_sum


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def accuracy(model, images, addends, digits):
    digit_pred, sum_pred = au.predict(model, images, addends)
    return au.accuracy_metrics(digit_pred, sum_pred, digits, digits + addends)


def train_to_target(model, forward, pipeline, data, settings, device):
    """From ``model``'s current (fresh) weights, train under a OneCycle schedule of
    ``target_epochs`` epochs until validation digit accuracy reaches the target.

    Validation runs every 1/evals_per_epoch epoch with the clock stopped. The raw weights are
    judged: the notebook's weight average lags behind them early in training.
    """
    steps_per_epoch = len(data.train_digits) // settings["batch_size"]
    evals_per_epoch = settings["evals_per_epoch"]
    evaluation_steps = sorted(
        {round(k * steps_per_epoch / evals_per_epoch) for k in range(1, evals_per_epoch * settings["target_epochs"] + 1)}
        - {0}
    )
    optimizer, scheduler = make_optimizer(model, settings, total_steps=evaluation_steps[-1])
    batches = batches_for(pipeline, data, settings, device)
    training_seconds, steps_done, checks, reached = 0.0, 0, [], None
    first_epoch_seconds = None
    for evaluation_step in evaluation_steps:
        seconds, _ = timed_steps(
            forward, optimizer, scheduler, batches, evaluation_step - steps_done, pipeline, settings, device
        )
        training_seconds += seconds
        steps_done = evaluation_step
        if steps_done == steps_per_epoch:
            first_epoch_seconds = training_seconds
        digit_acc = accuracy(model, data.validation_images, data.validation_addends, data.validation_digits)["digit_acc"]
        checks.append({
            "step": steps_done,
            "epochs": steps_done / steps_per_epoch,
            "images": steps_done * settings["batch_size"],
            "training_seconds": training_seconds,
            "val_digit_acc": digit_acc,
        })
        if digit_acc >= settings["target_digit_acc"]:
            reached = checks[-1]
            break
    test_digit_acc = accuracy(model, data.test_images, data.test_addends, data.test_digits)["digit_acc"]
    return {
        "target_val_digit_acc": settings["target_digit_acc"],
        "reached": reached is not None,
        "seconds": reached["training_seconds"] if reached else None,
        "images": reached["images"] if reached else None,
        "best_val_digit_acc": max(check["val_digit_acc"] for check in checks),
        "test_digit_acc_at_stop": test_digit_acc,
        "schedule_epochs": settings["target_epochs"],
        "first_epoch_seconds": first_epoch_seconds,
        "checks": checks,
    }


def measure_pipeline(pipeline, data, settings, device):
    """Warm-up (and compile), the steady throughput window, then the time-to-target run."""
    torch.manual_seed(settings["seed"])
    model = au.AdderNet().to(device)
    initial_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    if pipeline["compile"]:
        torch._dynamo.reset()  # so this row pays its own compile, not a cache hit from the row before
        forward = torch.compile(model, mode=pipeline["compile"])
    else:
        forward = model
    model.train()

    warmup_steps, window_steps = settings["warmup_steps"], settings["timed_steps"]
    profiled_steps = settings["profiled_steps"] if pipeline["key"] in PROFILED_ROWS else 0
    optimizer, scheduler = make_optimizer(model, settings, total_steps=warmup_steps + window_steps + profiled_steps)
    batches = batches_for(pipeline, data, settings, device)
    run = (forward, optimizer, scheduler, batches)
    first_step_seconds, _ = timed_steps(*run, 1, pipeline, settings, device)
    rest_of_warmup_seconds, _ = timed_steps(*run, warmup_steps - 1, pipeline, settings, device)
    window_seconds, loss_sum = timed_steps(*run, window_steps, pipeline, settings, device)
    window_mean_loss = float(loss_sum) / window_steps  # the window's one host sync
    if not math.isfinite(window_mean_loss):
        raise FloatingPointError(f"{pipeline['name']}: the loss became NaN or infinite while timing")
    images_per_second = window_steps * settings["batch_size"] / window_seconds
    profile, profile_error = None, None
    if profiled_steps:
        try:  # a profiler failure must not lose the row's measurements
            profile = where_the_time_goes(run, profiled_steps, window_seconds / window_steps, pipeline, settings, device)
        except Exception as error:
            profile_error = describe_error(error)
            print(f"{pipeline['name']}: profiling failed: {profile_error}", flush=True)

    # Back to the fresh weights in place: the compiled code stays valid, so the clock of the
    # time-to-target run starts with compiling already done.
    model.load_state_dict(initial_weights)
    time_to_target = train_to_target(model, forward, pipeline, data, settings, device)

    steps_per_epoch = len(data.train_digits) // settings["batch_size"]
    return {
        **{key: pipeline[key] for key in ("key", "name", "data_on_device", "compile", "autocast", "augment", "compared_with", "change")},
        "images_per_second": images_per_second,
        "epoch_images": steps_per_epoch * settings["batch_size"],
        "epoch_seconds": steps_per_epoch * settings["batch_size"] / images_per_second,
        "epoch_seconds_measured": time_to_target["first_epoch_seconds"],
        "warmup_seconds": first_step_seconds + rest_of_warmup_seconds,
        "first_step_seconds": first_step_seconds,
        "warmup_steps": warmup_steps,
        "timed_steps": window_steps,
        "timed_seconds": window_seconds,
        "timed_mean_loss": window_mean_loss,
        "time_to_target": time_to_target,
        "profile": profile,
        "profile_error": profile_error,
    }


def describe_error(error):
    """An exception in one line: its type and the first line of its message, cut at 300 characters."""
    message = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {message}"


def where_the_time_goes(run, steps, seconds_per_step, pipeline, settings, device, top=8):
    """Train ``steps`` more steps under torch.profiler: the device's kernel time per step
    against the wall-clock time per step of the unprofiled window (``seconds_per_step``), the
    kernels launched per step, and the operations that take the most time on the host and on
    the device. A model this small is bound by launching kernels when the host spends longer
    per step than the device."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        profiled_seconds, _ = timed_steps(*run, steps, pipeline, settings, device)

    def per_step_ms(microseconds):
        return microseconds / steps / 1000

    # Kernels, copies and fills on the GPU. They run one at a time on this single stream, so
    # their durations add up to the time the device was busy.
    device_time = {}
    for event in profiler.events():
        if event.device_type == DeviceType.CUDA:
            name = event.name[:90]
            total, count = device_time.get(name, (0.0, 0))
            device_time[name] = (total + event.time_range.elapsed_us(), count + 1)
    host_ops = sorted(profiler.key_averages(), key=lambda average: average.self_cpu_time_total, reverse=True)
    wall_ms = seconds_per_step * 1000
    result = {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "profiled_wall_ms_per_step": profiled_seconds * 1000 / steps,
        "top_host_ops": [
            {"name": average.key[:90], "self_ms_per_step": per_step_ms(average.self_cpu_time_total),
             "calls_per_step": average.count / steps}
            for average in host_ops[:top]
        ],
        "device_ops_per_step": None, "device_busy_ms_per_step": None, "device_busy_fraction": None,
        "top_device_ops": [],
    }
    if device_time:
        busy_ms = per_step_ms(sum(total for total, _ in device_time.values()))
        result.update({
            "device_ops_per_step": sum(count for _, count in device_time.values()) / steps,
            "device_busy_ms_per_step": busy_ms,
            "device_busy_fraction": busy_ms / wall_ms,
            "top_device_ops": [
                {"name": name, "ms_per_step": per_step_ms(total), "calls_per_step": count / steps}
                for name, (total, count) in sorted(device_time.items(), key=lambda item: item[1][0], reverse=True)[:top]
            ],
        })
    return result


def count_training_flops(batch_size, label_smoothing, device):
    """FLOPs of one training step (forward and backward), as ``FlopCounterMode`` counts them."""
    torch.manual_seed(0)
    model = au.AdderNet().to(device).train()
    images = torch.randn(batch_size, 1, 28, 28, device=device)
    addends = torch.randint(0, au.NUM_DIGITS, (batch_size,), device=device)
    digits = torch.randint(0, au.NUM_DIGITS, (batch_size,), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        digit_logits, sum_logits = model(images, addends)
        loss = adder_loss(digit_logits, sum_logits, digits, digits + addends, label_smoothing)
        forward_flops = counter.get_total_flops()
        loss.backward()
    training_flops = counter.get_total_flops()
    by_operator = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    return {
        "method": (
            "torch.utils.flop_counter.FlopCounterMode over one eager fp32 forward and backward "
            f"of a batch of {batch_size}, divided by the batch size. It counts convolutions and "
            "matrix multiplies (a multiply-add is 2 FLOPs), including the backward's "
            "input and weight gradients (the first convolution has no input gradient); it does "
            "not count batch norm, ReLU, pooling, softmax, the loss, the optimizer or the "
            "augmentation. The compiled and bf16 rows run the same operations."
        ),
        "forward_flops_per_image": forward_flops / batch_size,
        "training_flops_per_image": training_flops / batch_size,
        "training_flops_by_operator_per_image": {op: count / batch_size for op, count in by_operator.items()},
    }


def matmul_rate(device, dtype, size, min_seconds):
    """GFLOP/s of ``torch.mm`` on two size x size matrices (2 n^3 FLOPs each), timed over at
    least ``min_seconds`` after two warm-up products."""
    generator = torch.Generator(device).manual_seed(0)
    left = torch.randn(size, size, device=device, generator=generator).to(dtype)
    right = torch.randn(size, size, device=device, generator=generator).to(dtype)
    product = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(2):  # the BLAS library picks and loads its kernels on the first calls
        torch.mm(left, right, out=product)
    repeats, seconds, burst = 0, 0.0, 1
    while seconds < min_seconds:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(burst):
            torch.mm(left, right, out=product)
        synchronize(device)
        seconds += time.perf_counter() - started
        repeats += burst
        burst *= 2
    return 2 * size**3 * repeats / seconds / 1e9


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def add_ratios_and_utilisation(rows, flops, matmul):
    """Add each row's ratios to the reference and to the row it is compared with, its model
    FLOP rate, and its model FLOPs utilisation."""
    by_key = {row["key"]: row for row in rows}
    reference = by_key.get("reference")
    for row in rows:
        row["x_reference"] = row["images_per_second"] / reference["images_per_second"] if reference else None
        compared = by_key.get(row["compared_with"])
        row["x_compared_with"] = row["images_per_second"] / compared["images_per_second"] if compared else None
        row["model_gflops_per_second"] = row["images_per_second"] * flops["training_flops_per_image"] / 1e9
        row["mfu_vs_fp32_matmul"] = row["model_gflops_per_second"] / matmul["fp32_gflops_per_second"]
        row["mfu_vs_bf16_matmul"] = (
            row["model_gflops_per_second"] / matmul["bf16_gflops_per_second"] if row["autocast"] else None
        )


def check_targets(rows, device):
    """The issue's targets for this device type: each with the measured value and whether it is met."""
    project_rows = [row for row in rows if row["key"] != "reference"]
    if not project_rows or "reference" not in {row["key"] for row in rows}:
        return []  # nothing to judge yet (or the reference failed)
    fastest = max(project_rows, key=lambda row: row["images_per_second"])
    speedup_target = CPU_TARGET_SPEEDUP if device.type == "cpu" else GPU_TARGET_SPEEDUP
    targets = [{
        "target": f"training images/s at least {speedup_target:g}x the reference",
        "value": f"{fastest['x_reference']:.2f}x ({fastest['name']})",
        "met": fastest["x_reference"] >= speedup_target,
    }]
    if device.type == "cpu":
        utilisation = max(row["mfu_vs_fp32_matmul"] for row in project_rows)
        targets.append({
            "target": f"model training FLOP rate at least {CPU_TARGET_MFU:.0%} of the fp32 matmul rate",
            "value": f"{utilisation:.1%} (best row)",
            "met": utilisation >= CPU_TARGET_MFU,
        })
    else:
        run_seconds = GPU_TARGET_RUN_EPOCHS * fastest["epoch_seconds"]
        targets.append({
            "target": f"{GPU_TARGET_RUN_EPOCHS}-epoch run in at most {GPU_TARGET_RUN_SECONDS:g} s, compile excluded",
            "value": f"{run_seconds:.1f} s ({GPU_TARGET_RUN_EPOCHS} x s/epoch of {fastest['name']})",
            "met": run_seconds <= GPU_TARGET_RUN_SECONDS,
        })
        reached = [row for row in project_rows if row["time_to_target"]["reached"]]
        quickest = min(reached, key=lambda row: row["time_to_target"]["seconds"], default=None)
        if quickest is None:
            value, met = "99.0% validation digit accuracy not reached", False
        else:
            outcome = quickest["time_to_target"]
            value = (f"{outcome['seconds']:.2f} s to {outcome['target_val_digit_acc']}% validation, "
                     f"test {outcome['test_digit_acc_at_stop']:.2f}% then ({quickest['name']})")
            met = outcome["seconds"] <= GPU_TARGET_VAL_SECONDS
        targets.append({
            "target": f"99.0% validation digit accuracy within {GPU_TARGET_VAL_SECONDS:g} s of training",
            "value": value,
            "met": met,
        })
    return targets


def describe_time_to_target(outcome):
    if outcome["reached"]:
        return (f"{outcome['seconds']:.1f} s ({outcome['images']:,} img; "
                f"test {outcome['test_digit_acc_at_stop']:.2f}%)")
    return f"not reached in {outcome['schedule_epochs']} ep (best {outcome['best_val_digit_acc']:.2f}%)"


def describe_epoch_seconds(row):
    if row["epoch_seconds_measured"] is None:
        return f"{row['epoch_seconds']:.1f}"
    return f"{row['epoch_seconds']:.1f} (run: {row['epoch_seconds_measured']:.1f})"


def optional(value, spec):
    return "-" if value is None else format(value, spec)


def markdown_report(results):
    env, matmul, flops = results["environment"], results["matmul"], results["flop_counting"]
    target = results["settings"]["target_digit_acc"]
    lines = [f"# Training speed on {env['device_type'].upper()}: {env['device_name']}", ""]
    if results["short"]:
        lines += ["**Short mode (`--short`): a check that the benchmark runs. These figures measure nothing.**", ""]
    if results["partial"]:
        lines += ["**Partial: the run stopped (or is still running) before its last row.**", ""]
    lines += [
        f"- date: {results['date']}",
        f"- machine: {env['cpu']} ({env['logical_cpus']} logical CPUs; "
        f"{', '.join(env['cpu_features']) or 'no AVX-512/AMX'}; torch CPU capability "
        f"{env['torch_cpu_capability']}), {env['cpu_threads']} torch threads; device: {env['device_name']}",
        f"- versions: python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"numpy {env['numpy']}, CUDA {env['cuda']}",
        f"- command: `{results['command']}`",
        f"- settings: {', '.join(f'{key}={value}' for key, value in results['settings'].items())}",
        "",
        "| pipeline | images/s | x reference | s/epoch | time to "
        f"{target}% val digit | warm-up + compile s | model GFLOP/s | MFU vs fp32 mm | MFU vs bf16 mm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['name']} | {row['images_per_second']:,.0f} | {optional(row['x_reference'], '.2f')} | "
            f"{describe_epoch_seconds(row)} | {describe_time_to_target(row['time_to_target'])} | "
            f"{row['warmup_seconds']:.1f} | {row['model_gflops_per_second']:.1f} | "
            f"{row['mfu_vs_fp32_matmul']:.1%} | {optional(row['mfu_vs_bf16_matmul'], '.1%')} |"
        )
    for skipped in results["skipped"]:
        lines.append(f"| {skipped['name']} | skipped: {skipped['reason']} | | | | | | | |")
    for failed in results["failed"]:
        lines.append(f"| {failed['name']} | FAILED: {failed['error']} | | | | | | | |")

    lines += ["", "What each change contributes (images/s of the row with it / the row without it):", "",
              "| change | without | with | speed-up |", "| --- | --- | --- | ---: |"]
    names = {pipeline["key"]: pipeline["name"] for pipeline in PIPELINES}
    measured = {row["key"]: row for row in results["rows"]}
    for pipeline in PIPELINES[1:]:
        row = measured.get(pipeline["key"])
        speedup = f"{row['x_compared_with']:.2f}x" if row and row["x_compared_with"] else "not measured"
        lines.append(f"| {pipeline['change']} | {names[pipeline['compared_with']]} | {pipeline['name']} | {speedup} |")

    lines += [
        "",
        f"Matmul rate of this machine, measured in this run (torch.mm, {matmul['size']}x{matmul['size']}, "
        f"2n^3 FLOPs): fp32 {matmul['fp32_gflops_per_second']:,.0f} GFLOP/s, "
        f"bf16 {matmul['bf16_gflops_per_second']:,.0f} GFLOP/s.",
        "",
        f"Model FLOPs: {flops['training_flops_per_image'] / 1e6:.2f} MFLOP per training image "
        f"(forward {flops['forward_flops_per_image'] / 1e6:.2f} MFLOP). {flops['method']} "
        "MFU = images/s x training FLOPs per image / matmul rate.",
        "",
        "Targets:",
        "",
    ]
    for item in results["targets"]:
        lines.append(f"- {'met' if item['met'] else 'NOT met'}: {item['target']}: {item['value']}")
    lines += profile_report(results["rows"])
    lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def profile_report(rows):
    """The "where the time goes" section: one paragraph and two short tables per profiled row."""
    profiled = [row for row in rows if row.get("profile")]
    if not profiled:
        return []
    lines = ["", "Where the time goes (torch.profiler over the steps after each row's timed window):"]
    for row in profiled:
        profile = row["profile"]
        lines += ["", f"**{row['name']}**: {profile['wall_ms_per_step']:.2f} ms per step of wall-clock time "
                      f"({profile['profiled_wall_ms_per_step']:.2f} ms under the profiler, {profile['steps']} steps)."]
        if profile["device_busy_ms_per_step"] is not None:
            lines[-1] += (f" The GPU ran {profile['device_ops_per_step']:.0f} kernels, copies and fills per step, "
                          f"busy {profile['device_busy_ms_per_step']:.3f} ms: "
                          f"{profile['device_busy_fraction']:.0%} of the wall-clock step.")
            lines += ["", "| on the GPU | ms per step | calls per step |", "| --- | ---: | ---: |"]
            lines += [f"| `{op['name']}` | {op['ms_per_step']:.3f} | {op['calls_per_step']:g} |"
                      for op in profile["top_device_ops"]]
        lines += ["", "| on the host (self time) | ms per step | calls per step |", "| --- | ---: | ---: |"]
        lines += [f"| `{op['name']}` | {op['self_ms_per_step']:.3f} | {op['calls_per_step']:g} |"
                  for op in profile["top_host_ops"]]
    return lines


def notes_for(settings, device, short):
    notes = [
        "Every row runs the same training step (the notebook's loss, SGD with Nesterov momentum, "
        "OneCycle to max_lr, the loss summed on the device with no per-step .item()), so the rows "
        "differ only in the data pipeline and in how the model runs.",
        "The reference and the three rows after it do the same work per image (no "
        "augmentation, as typical solutions). The notebook's recipes add its augmentation "
        "(random rotation and shift, on the device): more work per image, which the notebook "
        "does for better final accuracy in the full 20-epoch run.",
        "bf16 autocast runs only where bf16 is native (au.supports_bf16: NVIDIA GPUs from "
        "Ampere on, CPUs with AVX-512 BF16 or AMX), as in the notebook; elsewhere the "
        "notebook's recipes train in fp32 and the '+ bf16 autocast' row is skipped.",
        f"images/s: steady state over {settings['timed_steps']} timed steps after "
        f"{settings['warmup_steps']} warm-up step(s); the warm-up (whose first step holds "
        "torch.compile's compilation) is reported on its own and is in no other figure. "
        "s/epoch = images per epoch (whole batches) / images/s; in brackets, the first epoch "
        "as timed in the time-to-target run, when that run got so far.",
        f"Time to {settings['target_digit_acc']}% val digit: each row starts from the same fresh "
        f"weights, under a OneCycle schedule spanning {settings['target_epochs']} epochs, with "
        f"validation every 1/{settings['evals_per_epoch']} epoch off the clock (raw weights, no "
        "weight average). Compilation is done before that clock starts.",
        f"Where the time goes: the notebook's recipes train {settings['profiled_steps']} more steps "
        "under torch.profiler after their timed window. Its overhead slows those steps, so the "
        "wall-clock time per step is the unprofiled window's; the device's busy time is the sum "
        "of the kernels', copies' and fills' durations on the GPU (one stream, so they never "
        "overlap). When the device is busy for a small fraction of the step, the host's work "
        "(Python, the dispatcher, launching kernels) sets the pace, not the GPU's arithmetic.",
    ]
    if device.type == "cuda":
        notes.append(
            "On the GPU, 'fp32' matmuls run in full fp32 (PyTorch's default, TF32 off for "
            "matmuls), while cuDNN convolutions may use TF32 (PyTorch's default for them). "
            "cuDNN runs with benchmark=False and deterministic=True, as in the notebook."
        )
        notes.append(
            "CUDA graphs: torch.compile(mode='reduce-overhead') records the compiled forward and "
            "backward as CUDA graphs and replays them, so the many tiny kernels of this small "
            "model are launched as one; the optimizer step stays outside the graphs."
        )
    if short:
        notes.append(
            "Short mode skips the torch.compile rows (the notebook's GPU recipe among them): "
            "compiling takes tens of seconds (30-60 s on a 2-core CPU). "
            "Run without --short to measure them."
        )
    return notes


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_arguments():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--short", action="store_true",
                        help="a tiny run that only proves the script works (what CI runs); skips the "
                             "compile rows, and writes results_<device>_short.* so it never "
                             "overwrites a full run's results")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent),
                        help="folder for results_<device>.md and .json")
    parser.add_argument("--data-root", default="data",
                        help="MNIST folder (torchvision layout: <root>/MNIST/raw)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when there is one")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--rows", default=",".join(pipeline["key"] for pipeline in PIPELINES),
                        help="comma-separated keys of the rows to measure (a retry of some rows)")
    # SUPPRESS: the default depends on --short, so the help says it instead of argparse.
    parser.add_argument("--target-epochs", type=int, default=argparse.SUPPRESS,
                        help=f"epochs the time-to-target schedule spans (default: {SETTINGS['target_epochs']}; "
                             f"{SHORT_SETTINGS['target_epochs']} with --short)")
    return parser.parse_args()


def main():
    arguments = parse_arguments()
    settings = {**SETTINGS, **(SHORT_SETTINGS if arguments.short else {})}
    if hasattr(arguments, "target_epochs"):
        settings["target_epochs"] = arguments.target_epochs
    if arguments.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(arguments.device)
    if not settings["matmul_size"]:
        settings["matmul_size"] = 2048 if device.type == "cpu" else 8192
    # As the notebook: cuDNN's fixed heuristic and deterministic algorithms; the same for every row.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True

    environment = {
        **au.environment_info(device),
        "cpu_features": cpu_features(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
    }
    print(f"Benchmarking on {device.type.upper()}: {environment['device_name']}, "
          f"{environment['cpu_threads']} threads, torch {environment['torch']}", flush=True)

    pipelines, skipped = choose_pipelines(arguments, device)
    for row in skipped:
        print(f"Skipping {row['name']}: {row['reason']}", flush=True)

    matmul = {
        "size": settings["matmul_size"],
        "fp32_gflops_per_second": matmul_rate(device, torch.float32, settings["matmul_size"], settings["matmul_seconds"]),
        "bf16_gflops_per_second": matmul_rate(device, torch.bfloat16, settings["matmul_size"], settings["matmul_seconds"]),
    }
    print(f"matmul {matmul['size']}: fp32 {matmul['fp32_gflops_per_second']:,.0f} GFLOP/s, "
          f"bf16 {matmul['bf16_gflops_per_second']:,.0f} GFLOP/s", flush=True)
    flops = count_training_flops(settings["batch_size"], settings["label_smoothing"], device)
    print(f"model: {flops['training_flops_per_image'] / 1e6:.2f} MFLOP per training image", flush=True)

    data = load_data(arguments.data_root, settings, device)
    print(f"training on {len(data.train_digits):,} images, validating on {len(data.validation_digits):,}", flush=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "short": arguments.short,
        "partial": True,
        "command": " ".join(["python"] + sys.argv),
        "environment": environment,
        "settings": settings,
        "matmul": matmul,
        "flop_counting": flops,
        "rows": [],
        "skipped": skipped,
        "failed": [],
        "notes": notes_for(settings, device, arguments.short),
    }
    stem = f"results_{device.type}" + ("_short" if arguments.short else "")
    output_dir = Path(arguments.output_dir)
    print(f"{'pipeline':<44} {'images/s':>9} {'warm-up s':>9} {'to target':>32}")
    for pipeline in pipelines:
        try:
            row = measure_pipeline(pipeline, data, settings, device)
        except Exception as error:  # one row's failure (a compile mode, say) must not lose the others
            message = describe_error(error)
            results["failed"].append({"key": pipeline["key"], "name": pipeline["name"], "error": message})
            print(f"{pipeline['name']:<44} FAILED: {message}", flush=True)
        else:
            results["rows"].append(row)
            print(f"{row['name']:<44} {row['images_per_second']:>9,.0f} {row['warmup_seconds']:>9.1f} "
                  f"{describe_time_to_target(row['time_to_target']):>32}", flush=True)
        write_results(results, flops, matmul, device, output_dir, stem)
    results["partial"] = False
    report = write_results(results, flops, matmul, device, output_dir, stem)
    print()
    print(report)
    print(f"Wrote {output_dir / stem}.md and .json")


def choose_pipelines(arguments, device):
    """The rows this run measures, and the others with the reason each is skipped."""
    bf16 = au.supports_bf16(device)
    chosen, skipped = [], []
    asked = set(arguments.rows.split(","))
    unknown = asked - {pipeline["key"] for pipeline in PIPELINES}
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
    for pipeline in PIPELINES:
        if pipeline["key"] not in asked:
            reason = "not asked for (--rows)"
        elif pipeline.get("needs") == "cuda" and device.type != "cuda":
            reason = "needs a CUDA GPU"
        elif pipeline.get("needs") == "bf16" and not bf16:
            reason = "bf16 is not native on this device"
        elif pipeline["compile"] and (arguments.short or arguments.no_compile):
            reason = ("short mode: compiling takes tens of seconds" if arguments.short else "--no-compile")
        else:
            # bf16 autocast only where bf16 is native, as the notebook does.
            chosen.append({**pipeline, "autocast": pipeline["autocast"] and bf16})
            continue
        skipped.append({"key": pipeline["key"], "name": pipeline["name"], "reason": reason})
    return chosen, skipped


def write_results(results, flops, matmul, device, output_dir, stem):
    """Write the results so far to <stem>.json and <stem>.md; return the report."""
    add_ratios_and_utilisation(results["rows"], flops, matmul)
    results["targets"] = check_targets(results["rows"], device)
    au.write_json(output_dir / f"{stem}.json", results)
    report = markdown_report(results)
    (output_dir / f"{stem}.md").write_text(report)
    return report


if __name__ == "__main__":
    main()
