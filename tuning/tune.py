"""One tuning run: the recipe (adder_utils.RECIPE, with any ADDER_<KEY> overrides) trained for
its epochs on the 55,000 training images and judged on the 5,000 validation images. The test
set is never loaded.

It trains as the notebook's ``train_model`` does (the same seeds, batches, augmentation,
optimizer, schedule and loss, bfloat16 autocast where native) and logs, per epoch, the mean
training loss and the validation digit / sum / joint accuracy. At the end it also scores, on the
same validation pairs, what costs no extra training:

* ``ema<decay>``: an exponential moving average of the weights, updated after every step, with
  its batch-norm statistics recomputed over the (unaugmented) training images;
* ``+tta``: test-time augmentation, the digit's softmax averaged over the image and its eight
  one-pixel shifts.

With ``--residual`` each convolution whose input and output widths match (4 of the recipe's 7)
gets an identity shortcut, ``relu(x + bn(conv(x)))``: a residual network at no extra parameter.

With ``--held-out`` the run never sees the recipe's HELD_OUT_PAIRS (digit, addend) pairs (drawn
as the notebook draws them) and reports, on the validation images, how often the sum of
an unseen pair is right when the digit is read right, and the same for the pairs it saw. With
``--seen-set chain`` it sees only the 19 pairs of ``au.long_chain_pairs()``, with
``--seen-set SEED`` only the 19 of ``au.interior_seen_pairs(19, SEED)``, and scores the same way.

With ``--true-digit-code`` the sum head reads the true digit's code in training (``AdderNet``'s
``digits`` argument); evaluation still reads the network's answer. With ``--baseline`` it
trains ``au.ConcatAdderNet``, the usual design, whose sum comes from layers over the image
features and the addend.

On a machine with a CUDA GPU it trains there, as the notebook does: data, batches and
augmentation on the GPU, fused SGD, autocast (bfloat16 where native, else float16 with a
GradScaler), and the training step recorded once as a CUDA graph (``au.recorded_step``, which
says why and goes on step by step where it cannot). Its random numbers then come from the GPU's
generator, so GPU runs are compared with GPU runs only: the log's settings end with
``DEVICE=cuda``, and ``tuning/sweep.py`` keeps them in a folder of their own. On a CPU it trains
exactly as before, unless ADDER_GPU_TESTS_ON_CPU=1 asks for the GPU's code path there (fused SGD,
the recording's warm-up), as ``.ci/gpu_run --short`` rehearses it.

Run from the repository root, one thread per run so that two runs share two cores:

    OMP_NUM_THREADS=1 ADDER_BATCH_SIZE=128 python tuning/tune.py NAME SEED > tuning/logs/NAME_seedSEED.log

``python tuning/summarize.py`` then turns the logs into tuning/logs/candidates.md.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import adder_utils as au  # noqa: E402

EMA_DECAYS = (0.998, 0.9995)  # averaging windows of about 500 and 2,000 steps


class IdentityShortcut(torch.nn.Module):
    """A conv-BN-ReLU block with its input added back before the ReLU."""

    def __init__(self, block: torch.nn.Sequential):
        super().__init__()
        self.conv_bn, self.relu = block[:2], block[2]

    def forward(self, x):
        return self.relu(x + self.conv_bn(x))


def with_identity_shortcuts(model: au.AdderNet) -> au.AdderNet:
    """The model with every width-keeping conv-BN-ReLU block of its backbone made residual."""
    for index, block in enumerate(model.backbone):
        if isinstance(block, torch.nn.Sequential) and block[0].in_channels == block[0].out_channels:
            model.backbone[index] = IdentityShortcut(block)
    return model


def validation_digit_accuracy(model, images, digits, tta):
    """Digit accuracy through predict, with or without its test-time shifts."""
    model.test_time_shifts = tta
    predicted, _ = au.predict(model, images, 0)  # the digit never depends on the addend
    return 100.0 * (predicted == digits).float().mean().item()


def pairs_result(label, model, images, digits, pairs):
    """Sum accuracy given a correct digit over every validation image of each pair's digit,
    paired with that pair's addend, through predict."""
    result = au.pair_accuracy(model, images, digits, pairs)
    return f"result {label} pairs: {result['samples']} validation pairs, sum given a correct digit " \
           f"{result['sum_acc_given_correct_digit']:.2f}, digit {result['digit_acc']:.2f}"


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("seed", type=int)
    parser.add_argument("--held-out", action="store_true", help="never train on the recipe's HELD_OUT_PAIRS")
    parser.add_argument("--seen-set", help="train on 19 pairs only: 'chain' (the long chain) or a seed "
                        "for interior_seen_pairs")
    parser.add_argument("--residual", action="store_true", help="identity shortcuts in the backbone")
    parser.add_argument("--true-digit-code", action="store_true",
                        help="the sum head reads the true digit in training")
    parser.add_argument("--baseline", action="store_true", help="train ConcatAdderNet, the usual design")
    arguments = parser.parse_args()
    if arguments.held_out and arguments.seen_set:
        parser.error("--held-out and --seen-set both choose the pairs: give one")
    if arguments.baseline and (arguments.residual or arguments.true_digit_code):
        parser.error("--baseline has no digit code to read and is not residual")
    return arguments


def main():
    arguments = parse_arguments()
    name, seed = arguments.name, arguments.seed
    held_out, residual = arguments.held_out, arguments.residual
    recipe = au.settings_from_env(au.RECIPE)
    train_full = au.load_mnist("data", train=True)
    train_index, validation_index = au.split_indices(
        len(train_full), recipe["VALIDATION_SIZE"], seed=recipe["SPLIT_SEED"])
    if recipe["TRAIN_SIZE"]:
        train_index = train_index[: recipe["TRAIN_SIZE"]]
    images = au.normalize_images(train_full.data[train_index])
    digits = train_full.targets[train_index]
    validation_images = train_full.data[validation_index]
    validation_digits = train_full.targets[validation_index]
    validation_addends = au.seeded_addends(len(validation_index), seed=recipe["VALIDATION_ADDEND_SEED"])
    validation_sums = validation_digits + validation_addends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, digits = images.to(device), digits.to(device)
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    # The epochs' validation figures read the digit plainly; the end scores it both ways.
    model = (au.ConcatAdderNet if arguments.baseline else au.AdderNet)(recipe["STAGES"], test_time_shifts=False)
    if residual:
        model = with_identity_shortcuts(model)
    settings = " ".join(f"{key}={value}" for key, value in recipe.items()
                        if held_out or not key.startswith("HELD_OUT"))
    settings += " RESIDUAL=True" if residual else ""
    settings += f" SEEN_SET={arguments.seen_set}" if arguments.seen_set else ""
    settings += " TRUE_DIGIT_CODE=True" if arguments.true_digit_code else ""
    settings += " BASELINE=True" if arguments.baseline else ""
    settings += f" DEVICE={device.type}" if device.type != "cpu" else ""  # the CPU's logs never named it
    held_out_pairs = (au.held_out_pairs(recipe["HELD_OUT_PAIRS"], seed=recipe["HELD_OUT_SEED"], interior_sums=True)
                      if held_out else [])  # as the notebook draws them
    if arguments.seen_set:
        seen = (au.long_chain_pairs() if arguments.seen_set == "chain"
                else au.interior_seen_pairs(2 * au.NUM_DIGITS - 1, int(arguments.seen_set)))
        held_out_pairs = [tuple(pair) for pair in torch.nonzero(au.pair_mask(seen)).tolist()]  # the other 81
    print(f"{name} seed {seed}: {au.count_parameters(model)} parameters; {settings}", flush=True)
    model = model.to(device)
    steps_per_epoch = len(images) // recipe["BATCH_SIZE"]
    gpu_path = device.type == "cuda" or os.environ.get("ADDER_GPU_TESTS_ON_CPU") == "1"
    optimizer, scheduler = au.sgd_one_cycle(model.parameters(), recipe, recipe["EPOCHS"] * steps_per_epoch,
                                            fused=gpu_path)
    averages = {decay: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)) for decay in EMA_DECAYS}
    digit_criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe["LABEL_SMOOTHING"])
    autocast_dtype = au.autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    def training_step(batch_images, addends, batch_digits, sums):
        batch_images = au.augment(batch_images, generator, recipe["MAX_ROTATION"], recipe["MAX_SHIFT"],
                                  recipe["MAX_SCALE"], recipe["ELASTIC"])
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                            cache_enabled=False):
            digit_logits, sum_logits = model(batch_images, addends, batch_digits if arguments.true_digit_code else None)
            loss = digit_criterion(digit_logits, batch_digits) + F.cross_entropy(sum_logits, sums)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    step = training_step
    if gpu_path:  # as the notebook trains there: one CUDA graph, replayed
        example = (images[:recipe["BATCH_SIZE"]], torch.zeros_like(digits[:recipe["BATCH_SIZE"]]),
                   digits[:recipe["BATCH_SIZE"]], digits[:recipe["BATCH_SIZE"]])
        step = au.recorded_step(training_step, example, model, optimizer, generators=[generator], scaler=scaler)

    for epoch in range(1, recipe["EPOCHS"] + 1):
        started = time.perf_counter()
        model.train()
        meter = au.EpochMeter(device)
        batches = au.random_batches(images, digits, recipe["BATCH_SIZE"], generator, au.pair_mask(held_out_pairs))
        for batch_index, batch in enumerate(batches):
            loss = step(*batch)
            scheduler.step()
            meter.update(loss, batch_index)
            for average in averages.values():
                average.update_parameters(model)
        mean_loss = meter.finite_mean(epoch)
        seconds = time.perf_counter() - started
        metrics = au.accuracy_metrics(*au.predict(model, validation_images, validation_addends),
                                      validation_digits, validation_sums)
        print(f"epoch {epoch:2d} loss {mean_loss:.4f} val digit {metrics['digit_acc']:.2f} "
              f"sum {metrics['sum_acc']:.2f} joint {metrics['joint_acc']:.2f} {seconds:.1f}s", flush=True)

    if held_out_pairs:
        seen_pairs = [tuple(pair) for pair in torch.nonzero(au.pair_mask(held_out_pairs)).tolist()]
        print(f"held out: {held_out_pairs}", flush=True)
        print(f"seen: {seen_pairs}", flush=True)
        print(pairs_result("unseen", model, validation_images, validation_digits, held_out_pairs), flush=True)
        print(pairs_result("seen", model, validation_images, validation_digits, seen_pairs), flush=True)
    variants = {"plain": model}
    for decay, average in averages.items():
        # The averaged weights never ran forward in training mode: measure their batch-norm
        # statistics on the training images, in batches of the training size.
        update_bn(images.split(recipe["BATCH_SIZE"]), average.module.backbone)
        variants[f"ema{decay}"] = average.module
    for label, variant in variants.items():
        for tta in (False, True):
            accuracy = validation_digit_accuracy(variant, validation_images, validation_digits, tta)
            print(f"result {label}{'+tta' if tta else ''} val digit {accuracy:.2f}", flush=True)


if __name__ == "__main__":
    main()
