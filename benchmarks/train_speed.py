"""Training speed of the notebook's recipe, against the way typical public solutions train.

    python benchmarks/train_speed.py            # the full benchmark: results_<cpu|cuda>.md and .json
    python benchmarks/train_speed.py --short    # a tiny run that only proves the script works (CI)

Every row trains adder_utils.AdderNet with the recipe (adder_utils.RECIPE: the same loss,
optimizer and schedule) and changes something against the row it builds on ("compared_with");
benchmarks/README.md says what each row is and what the targets are. For each row: steady-state
training images/s, seconds per epoch and for the recipe's 20 epochs, warm-up seconds
(compilation and CUDA-graph recording, kept out of every other figure), the training seconds
from fresh weights to 99.0% validation digit accuracy under a short schedule, and, for the
rows in PROFILED, a profile of where a step's time goes. Results are rewritten after every row, so a run cut short keeps
what it measured; a row that fails is reported as failed and the others still run.
"""

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # adder_utils.py, one folder up
import adder_utils as au  # noqa: E402

SETTINGS = {
    "warmup_steps": 10,        # before the clock starts; they hold the compile and the graph recording
    "timed_steps": 200,        # the throughput window
    "profiled_steps": 20,      # then, under torch.profiler
    "target_digit_acc": 99.0,  # validation digit accuracy, %
    "target_epochs": 3,        # the OneCycle schedule of the time-to-target run
    "evals_per_epoch": 4,      # validation checks per epoch, off the clock
    "train_size": 0,           # 0: all 55,000 training images
}
SHORT_SETTINGS = {"warmup_steps": 2, "timed_steps": 3, "profiled_steps": 2, "target_epochs": 1, "train_size": 1024}

# The project's targets (benchmarks/README.md): on an H100 or H200, and on a CPU.
TARGETS = {"cuda": {"x_reference": 50.0, "recipe_seconds": 3.0, "target_seconds": 0.5},
           "cpu": {"x_reference": 2.0}}

# One row each; "compared_with" is the row without this one's change.
ROWS = [
    {"key": "reference", "name": "reference: Dataset + DataLoader, eager fp32", "compared_with": None},
    {"key": "device", "name": "data on the device", "compared_with": "reference",
     "data_on_device": True},
    {"key": "notebook", "name": "the recipe step by step: + augmentation, autocast, compile on a GPU",
     "compared_with": "device", "data_on_device": True, "augment": True, "autocast": True, "compile": "gpu"},
    {"key": "compiled_cpu", "name": "+ torch.compile on a CPU too (the notebook leaves it off there)",
     "compared_with": "notebook", "needs_cpu": True, "data_on_device": True, "augment": True, "autocast": True,
     "compile": "always"},
    {"key": "captured", "name": "+ the whole step recorded as one CUDA graph (on a GPU): the notebook's step",
     "compared_with": "notebook", "data_on_device": True, "augment": True, "autocast": True, "compile": "gpu",
     "captured": True},
    {"key": "channels_last", "name": "+ channels-last memory format", "compared_with": "captured",
     "needs_cuda": True, "data_on_device": True, "augment": True, "autocast": True, "compile": "gpu",
     "captured": True, "channels_last": True},
    {"key": "cudnn_benchmark", "name": "+ cuDNN picks its kernels by timing (resume not bit-exact)",
     "compared_with": "channels_last", "needs_cuda": True, "data_on_device": True, "augment": True,
     "autocast": True, "compile": "gpu", "captured": True, "channels_last": True, "cudnn_benchmark": True},
    {"key": "captured_eager", "name": "the notebook's step without torch.compile: recorded, but never compiled",
     "compared_with": "captured", "needs_cuda": True, "data_on_device": True, "augment": True, "autocast": True,
     "captured": True},
    {"key": "float16", "name": "Colab T4's path, forced: float16 autocast + GradScaler",
     "compared_with": "notebook", "needs_cuda": True, "data_on_device": True, "augment": True,
     "autocast": "float16", "compile": "gpu"},
    {"key": "float16_captured", "name": "+ the whole step recorded as one CUDA graph",
     "compared_with": "float16", "needs_cuda": True, "data_on_device": True, "augment": True,
     "autocast": "float16", "compile": "gpu", "captured": True},
]
PROFILED = {"notebook", "captured", "channels_last", "captured_eager"}


def load_data(root, train_size, device):
    train_full = au.load_mnist(root, train=True)
    train_index, validation_index = au.split_indices(
        len(train_full), au.RECIPE["VALIDATION_SIZE"], seed=au.RECIPE["SPLIT_SEED"])
    if train_size:
        train_index = train_index[:train_size]
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize((au.MNIST_MEAN,), (au.MNIST_STD,))])
    return {
        "reference_set": Subset(au.MNISTAdder(root, train=True, transform=normalize), train_index.tolist()),
        "images": au.normalize_images(train_full.data[train_index].to(device)),
        "digits": train_full.targets[train_index].to(device),
        "validation": (train_full.data[validation_index],
                       au.seeded_addends(len(validation_index), seed=au.RECIPE["VALIDATION_ADDEND_SEED"]),
                       train_full.targets[validation_index]),
    }


def endless_batches(row, data, generator, batch_size):
    """(images, addends, digits, sums) batches on the device: cut there, or from a DataLoader."""
    if row.get("data_on_device"):
        while True:
            yield from au.random_batches(data["images"], data["digits"], batch_size, generator)
    # The typical way: a DataLoader over the per-item Dataset (PIL -> tensor -> normalised on the
    # host, one item at a time), in the main process as DataLoader's default.
    loader = DataLoader(data["reference_set"], batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    device = data["images"].device
    while True:
        for (images, addends), (digits, sums) in loader:
            yield images.to(device), addends.to(device), digits.to(device), sums.to(device)


def build_training(row, total_steps, device):
    """The row's model, schedule and training step, from the same fresh weights for every row."""
    torch.manual_seed(0)
    model = au.AdderNet(au.RECIPE["STAGES"]).to(device)
    if row.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = au.sgd_one_cycle(model.parameters(), au.RECIPE, total_steps, fused=bool(row.get("captured")))
    compiled = row.get("compile") == "always" or (row.get("compile") == "gpu" and device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    dtype = {True: au.autocast_dtype(device), "float16": torch.float16}.get(row.get("autocast"))
    # float16 needs its loss scaled; elsewhere the scaler is disabled and passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator(device).manual_seed(0)

    def step(images, addends, digits, sums):  # the notebook's training step
        if row.get("augment"):
            images = au.augment(images, generator)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            digit_logits, sum_logits = forward(images, addends, digits)  # the true digits, as the notebook
            loss = (F.cross_entropy(digit_logits, digits, label_smoothing=au.RECIPE["LABEL_SMOOTHING"])
                    + F.cross_entropy(sum_logits, sums))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return model, scheduler, step, generator, optimizer, scaler, dtype


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(row, data, settings, device, total_steps):
    """Build the row's training, run its warm-up steps (compiling, recording), return it ready."""
    model, scheduler, step, generator, optimizer, scaler, dtype = build_training(row, total_steps, device)
    batches = endless_batches(row, data, generator, au.RECIPE["BATCH_SIZE"])
    synchronize(device)
    started = time.perf_counter()
    if row.get("captured"):
        step = au.CapturedStep(step, next(batches), model, optimizer, generators=[generator], scaler=scaler,
                               warmup_steps=settings["warmup_steps"])
    else:
        for _, batch in zip(range(settings["warmup_steps"]), batches):
            step(*batch)
    synchronize(device)
    return model, scheduler, step, batches, dtype, time.perf_counter() - started


def train(step, scheduler, batches, steps, device):
    """``steps`` training steps; their wall-clock seconds (the host's share is part of what is timed)."""
    synchronize(device)
    started = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        step(*batch)
        scheduler.step()
    synchronize(device)
    return time.perf_counter() - started


def time_to_target(row, data, settings, device):
    """Training seconds from fresh weights to the target validation digit accuracy, under a
    OneCycle schedule of ``target_epochs``, checked every 1/evals_per_epoch epoch off the clock."""
    steps_per_epoch = len(data["digits"]) // au.RECIPE["BATCH_SIZE"]
    checks = [round(k * steps_per_epoch / settings["evals_per_epoch"])
              for k in range(1, settings["evals_per_epoch"] * settings["target_epochs"] + 1)]
    model, scheduler, step, batches, _, _ = prepare(row, data, settings, device, total_steps=checks[-1])
    seconds, done, best = 0.0, 0, 0.0
    for check in checks:
        seconds += train(step, scheduler, batches, check - done, device)
        done = check
        images, addends, digits = data["validation"]
        digit_pred, _ = au.predict(model, images, addends)
        best = max(best, 100.0 * (digit_pred == digits).float().mean().item())
        if best >= settings["target_digit_acc"]:
            return {"seconds": seconds, "epochs": done / steps_per_epoch, "val_digit_acc": best}
    return {"seconds": None, "epochs": done / steps_per_epoch, "val_digit_acc": best}


def profile_steps(step, scheduler, batches, steps, device, top=6):
    """Where a step's time goes: the device's busy time per step (kernels, copies and fills, one
    stream, so they add up; user annotations left out, as they span kernels already counted),
    the operations launched per step, and the top operations on the device and on the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        train(step, scheduler, batches, steps, device)
    on_device = {}
    for event in profiler.events():
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            total, count = on_device.get(event.name[:80], (0.0, 0))
            on_device[event.name[:80]] = (total + event.time_range.elapsed_us(), count + 1)
    host = sorted(profiler.key_averages(), key=lambda average: average.self_cpu_time_total, reverse=True)
    return {
        "device_busy_ms_per_step": sum(total for total, _ in on_device.values()) / steps / 1000 if on_device else None,
        "device_ops_per_step": sum(count for _, count in on_device.values()) / steps if on_device else None,
        "top_device_ops": [(name, total / steps / 1000) for name, (total, _) in
                           sorted(on_device.items(), key=lambda item: -item[1][0])[:top]],
        "top_host_ops": [(average.key[:80], average.self_cpu_time_total / steps / 1000) for average in host[:top]],
    }


def measure(row, data, settings, device):
    torch.backends.cudnn.benchmark = bool(row.get("cudnn_benchmark"))
    torch.backends.cudnn.deterministic = not row.get("cudnn_benchmark")
    try:
        steps = settings["timed_steps"] + settings["profiled_steps"] + 1
        _, scheduler, step, batches, dtype, warmup_seconds = prepare(row, data, settings, device, total_steps=steps)
        seconds = train(step, scheduler, batches, settings["timed_steps"], device)
        profile = profile_steps(step, scheduler, batches, settings["profiled_steps"], device) \
            if row["key"] in PROFILED else None
        target = time_to_target(row, data, settings, device) if row["key"] != "reference" else None
    finally:  # back to the notebook's settings
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    step_ms = 1000 * seconds / settings["timed_steps"]
    steps_per_epoch = len(data["digits"]) // au.RECIPE["BATCH_SIZE"]
    return {"key": row["key"], "name": row["name"], "compared_with": row["compared_with"],
            "autocast": str(dtype).removeprefix("torch.") if dtype else "none",
            "images_per_second": au.RECIPE["BATCH_SIZE"] / step_ms * 1000, "step_ms": step_ms,
            "epoch_seconds": steps_per_epoch * step_ms / 1000,
            "recipe_seconds": au.RECIPE["EPOCHS"] * steps_per_epoch * step_ms / 1000,
            "warmup_seconds": warmup_seconds, "time_to_target": target, "profile": profile}


def training_flops_per_image(device, batch_size=64):
    """Convolution and matmul FLOPs of one forward and backward, per image (FlopCounterMode)."""
    model = au.AdderNet().to(device)
    images = torch.randn(batch_size, 1, 28, 28, device=device)
    addends = torch.randint(0, 10, (batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        digit_logits, sum_logits = model(images, addends)
        (digit_logits.logsumexp(1).mean() + sum_logits.logsumexp(1).mean()).backward()
    return counter.get_total_flops() / batch_size


def matmul_tflops(device, dtype, size=4096, repeats=20):
    left, right = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(left, right)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(left, right)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def report(results):
    environment, rows, settings = results["environment"], results["rows"], results["settings"]
    lines = [f"# Training speed on {environment['device_type'].upper()}: {environment['device_name']}", ""]
    if results["short"]:
        lines += ["**Short mode: a check that the benchmark runs; these figures measure nothing.**", ""]
    if results["partial"]:
        lines += ["**Partial: the run stopped before its last row.**", ""]
    lines += [
        f"{results['date']}; CPU {environment['cpu']} ({environment['cpu_threads']} threads); Python "
        f"{environment['python']}, torch {environment['torch']}, torchvision {environment['torchvision']}, CUDA "
        f"{environment['cuda']}. `{results['command']}`; settings: "
        + ", ".join(f"{key}={value}" for key, value in settings.items()) + ".", "",
        f"| pipeline | autocast | images/s | x reference | x the row it builds on | ms/step | s/epoch | "
        f"{au.RECIPE['EPOCHS']} epochs, s | warm-up s | to {settings['target_digit_acc']}% val digit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {row["key"]: row for row in rows}
    for row in rows:
        before = by_key.get(row["compared_with"])
        target = row["time_to_target"]
        reached = "-" if target is None else (
            f"{target['seconds']:.2f} s ({target['epochs']:.2f} epochs)" if target["seconds"] is not None
            else f"not in {target['epochs']:.0f} epochs (best {target['val_digit_acc']:.2f}%)")
        lines.append(
            f"| {row['name']} | {row['autocast']} | {row['images_per_second']:,.0f} | "
            f"{row['images_per_second'] / by_key['reference']['images_per_second'] if 'reference' in by_key else 0:.1f} | "
            f"{row['images_per_second'] / before['images_per_second'] if before else 1:.2f} | {row['step_ms']:.2f} | "
            f"{row['epoch_seconds']:.2f} | {row['recipe_seconds']:.1f} | {row['warmup_seconds']:.1f} | {reached} |")
    lines += [f"| {row['name']} | {row['outcome']} | | | | | | | | |" for row in results["not_measured"]]
    lines += ["", f"Arithmetic: {results['mflop_per_image']:.1f} MFLOP per training image (convolutions and "
              f"matmuls, forward and backward); a large {results['matmul_dtype']} matmul runs at "
              f"{results['matmul_tflops']:.1f} TFLOP/s here, so one step's arithmetic needs "
              f"{results['mflop_per_image'] * au.RECIPE['BATCH_SIZE'] / results['matmul_tflops'] / 1e3:.3f} ms at that rate.",
              "", "Targets:", ""]
    lines += [f"- {'met' if item['met'] else 'NOT met'}: {item['target']}: {item['measured']}" for item in results["targets"]]
    for row in rows:
        if row["profile"]:
            profile = row["profile"]
            lines += ["", f"**Where the time goes: {row['name']}.** A step takes {row['step_ms']:.2f} ms of wall-clock time."]
            if profile["device_busy_ms_per_step"] is not None:
                lines[-1] += (f" The GPU is busy {profile['device_busy_ms_per_step']:.3f} ms of it "
                              f"({profile['device_busy_ms_per_step'] / row['step_ms']:.0%}), running "
                              f"{profile['device_ops_per_step']:.0f} kernels, copies and fills.")
                lines += ["", "| on the GPU | ms per step |", "| --- | ---: |"]
                lines += [f"| `{name}` | {ms:.3f} |" for name, ms in profile["top_device_ops"]]
            lines += ["", "| on the host (self time) | ms per step |", "| --- | ---: |"]
            lines += [f"| `{name}` | {ms:.3f} |" for name, ms in profile["top_host_ops"]]
    return "\n".join(lines) + "\n"


def check_targets(rows, device):
    by_key = {row["key"]: row for row in rows}
    if "reference" not in by_key or len(rows) < 2:
        return []
    goals = TARGETS[device.type]
    fastest = max(rows[1:], key=lambda row: row["images_per_second"])
    ratio = fastest["images_per_second"] / by_key["reference"]["images_per_second"]
    targets = [{"target": f"at least {goals['x_reference']:g}x the reference's images/s", "met": ratio >= goals["x_reference"],
                "measured": f"{ratio:.1f}x ({fastest['name']})"}]
    if "recipe_seconds" in goals:
        targets.append({"target": f"the recipe's {au.RECIPE['EPOCHS']} epochs in at most {goals['recipe_seconds']:g} s of training",
                        "met": fastest["recipe_seconds"] <= goals["recipe_seconds"],
                        "measured": f"{fastest['recipe_seconds']:.1f} s ({fastest['name']})"})
        reached = [row for row in rows if row["time_to_target"] and row["time_to_target"]["seconds"] is not None]
        quickest = min(reached, key=lambda row: row["time_to_target"]["seconds"], default=None)
        targets.append({"target": f"99.0% validation digit accuracy within {goals['target_seconds']:g} s of training",
                        "met": bool(quickest) and quickest["time_to_target"]["seconds"] <= goals["target_seconds"],
                        "measured": f"{quickest['time_to_target']['seconds']:.2f} s ({quickest['name']})" if quickest
                        else "not reached"})
    return targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a tiny run that only proves the script works")
    parser.add_argument("--rows", default=",".join(row["key"] for row in ROWS), help="comma-separated row keys")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--data-root", default="data")
    arguments = parser.parse_args()
    settings = {**SETTINGS, **(SHORT_SETTINGS if arguments.short else {})}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # As the notebook: cuDNN's fixed choice of deterministic kernels, and full fp32 outside autocast.
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = False
    environment = au.environment_info(device)
    print(f"Benchmarking on {device.type.upper()}: {environment['device_name']}", flush=True)
    data = load_data(arguments.data_root, settings["train_size"], device)
    matmul_dtype = torch.bfloat16 if au.supports_bf16(device) else torch.float32
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "short": arguments.short,
        "partial": True, "command": " ".join(["python"] + sys.argv), "environment": environment, "settings": settings,
        "mflop_per_image": training_flops_per_image(device) / 1e6, "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
        "matmul_tflops": matmul_tflops(device, matmul_dtype, size=512 if arguments.short else 4096),
        "rows": [], "not_measured": [], "targets": [],
    }
    output = Path(arguments.output_dir) / (f"results_{device.type}" + ("_short" if arguments.short else ""))
    wanted = set(arguments.rows.split(","))
    for row in ROWS:
        outcome = ("not asked for" if row["key"] not in wanted
                   else "skipped: needs a CUDA GPU" if row.get("needs_cuda") and device.type != "cuda"
                   else "skipped: a CPU-only row" if row.get("needs_cpu") and device.type != "cpu"
                   else "skipped in short mode: compiling takes tens of seconds"
                   if arguments.short and row.get("compile") == "always" else None)
        if outcome:
            results["not_measured"].append({"key": row["key"], "name": row["name"], "outcome": outcome})
            continue
        try:
            measured = measure(row, data, settings, device)
        except Exception as error:  # a failing row (a capture, a compile) must not lose the others
            message = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            results["not_measured"].append({"key": row["key"], "name": row["name"], "outcome": message})
            print(f"{row['name']}: {message}", flush=True)
        else:
            results["rows"].append(measured)
            print(f"{row['name']}: {measured['images_per_second']:,.0f} images/s, warm-up {measured['warmup_seconds']:.1f} s",
                  flush=True)
        results["targets"] = check_targets(results["rows"], device)
        au.write_json(output.with_suffix(".json"), results)
        output.with_suffix(".md").write_text(report(results))
    results["partial"] = False
    au.write_json(output.with_suffix(".json"), results)
    output.with_suffix(".md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
