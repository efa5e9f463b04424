"""Reusable parts of the MNIST Adder notebook, in the order the notebook meets them.

setup -> data -> model -> training helpers -> evaluation -> the sum head alone -> plotting ->
checkpoints and inference (with your own digit brought to MNIST's format).

The training loop itself lives in ``MNIST_Adder.ipynb``: it is what the notebook teaches.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional
from PIL import Image, ImageDraw
from torch import nn

# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------

NUM_DIGITS = 10  # digit classes 0-9, and addends 0-9
NUM_SUMS = 19  # sums 0-18

# The recipe: everything that decides what a training run learns, defined here once. The
# notebook's settings cell and the tuning scripts read it through settings_from_env, so there an
# ADDER_<KEY> variable overrides a key; the module's defaults (the sum head alone included) and
# the benchmark read it as it is. A resumed run must have the recipe it was saved with, because
# its saved optimizer and schedule carry it. Every value was chosen on the validation split
# (tuning/README.md says how), but for the seeds, which are fixed so that every run scored on the
# validation split sees the same images and addends, and every held-out run the same pairs.
# Once the recipe is fixed, the models scored on the test set train on the validation images
# too (the notebook's section 7).
RECIPE = {
    "STAGES": ((12, 12), (16, 16, 16), (24, 24)),  # conv widths at 28x28, 14x14 and 7x7
    "EPOCHS": 20,               # passes over the training images
    "BATCH_SIZE": 256,
    "MAX_LR": 0.2,              # OneCycle's peak learning rate (see the LR range test)
    "CYCLE_MOMENTUM": False,    # True: OneCycle moves the momentum 0.95 -> 0.85 -> 0.95 against the LR
    "MOMENTUM": 0.9,            # Nesterov momentum, constant (a CUDA graph needs it constant)
    "WEIGHT_DECAY": 1e-4,
    "LABEL_SMOOTHING": 0.1,     # on the digit loss only (the notebook's loss section says why)
    "MAX_ROTATION": 5.0,        # augmentation: random rotations up to this many degrees ...
    "MAX_SHIFT": 1.0,           # ... and shifts up to this many pixels ...
    "MAX_SCALE": 0.1,           # ... and scalings by up to this fraction (0: none) ...
    "ELASTIC": 0.0,             # ... and smooth elastic distortions moving pixels this far (RMS, 0: none)
    "TEST_TIME_SHIFTS": True,   # predict reads each digit from the image and its 8 one-pixel shifts
    "TRAIN_SIZE": 0,            # 0: the whole training split, 55,000 (the scored models add the validation split)
    "VALIDATION_SIZE": 5000,    # taken from the 60,000 training images ...
    "SPLIT_SEED": 0,            # ... which ones: split_indices' seed
    "VALIDATION_ADDEND_SEED": 1,  # the validation images' addends, drawn once: seeded_addends' seed
    "HELD_OUT_PAIRS": 81,       # (digit, addend) pairs the held-out model never trains on: all but 19 ...
    "HELD_OUT_SEED": 1,         # ... which ones: held_out_pairs(..., interior_sums=True)'s seed
    "HELD_OUT_EPOCHS": 20,
}

NO_GPU_MESSAGE = (
    "No CUDA GPU is available, and this notebook trains on the GPU.\n"
    "In Colab: Runtime > Change runtime type > Hardware accelerator: GPU (e.g. T4), "
    "then Runtime > Run all.\n"
    "To run on the CPU anyway (slow: about 10 to 40 s per epoch on 2 cores), set the "
    "environment variable ADDER_ALLOW_CPU=1 before starting the notebook."
)


def settings_from_env(defaults: dict, prefix: str = "ADDER_", environ=None) -> dict:
    """Return ``defaults`` with each key overridden by the environment variable PREFIX+KEY,
    read as the default's type (a tuple as a Python literal: ADDER_STAGES="((8, 8), (16,))").
    ``environ`` (os.environ if None) is where the variables are looked up."""
    environ = os.environ if environ is None else environ
    settings = {}
    for key, default in defaults.items():
        raw = environ.get(prefix + key)
        if raw is None:
            settings[key] = default
        elif isinstance(default, tuple):
            try:
                settings[key] = as_tuples(ast.literal_eval(raw))
            except (ValueError, SyntaxError, TypeError):
                raise ValueError(f"{prefix + key}={raw!r}: expected a tuple such as {default!r}") from None
        elif isinstance(default, bool):  # bool before int: bool is a subclass of int
            if raw.strip().lower() not in {"0", "1", "true", "false", "yes", "no"}:
                raise ValueError(f"{prefix + key}={raw!r}: expected 0/1, true/false or yes/no")
            settings[key] = raw.strip().lower() in {"1", "true", "yes"}
        elif default is None or isinstance(default, str):
            settings[key] = raw
        else:
            try:
                settings[key] = type(default)(raw)
            except ValueError:
                raise ValueError(
                    f"{prefix + key}={raw!r}: expected a {type(default).__name__}"
                ) from None
    return settings


def as_tuples(value):
    """Lists, nested or not, as tuples (a recipe's stages read back from JSON or a literal)."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuples(item) for item in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected numbers and tuples, got {value!r}")


def choose_device(allow_cpu: bool) -> torch.device:
    """The CUDA device; the CPU only when explicitly allowed, else a RuntimeError saying what to do."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_cpu:
        return torch.device("cpu")
    raise RuntimeError(NO_GPU_MESSAGE)


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively: an NVIDIA GPU from Ampere (compute capability
    8.0) on, or a CPU with AVX-512 BF16 or AMX. Elsewhere (a T4, say) bf16 is emulated, slow,
    and not always supported by torch.compile: ``autocast_dtype`` picks float16 on such a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype a training forward pass should autocast to on ``device``: bfloat16 where it is
    native; float16 on an older CUDA GPU (Colab's T4: its tensor cores run fp16, and a
    GradScaler keeps small gradients from underflowing); None (plain fp32) on other CPUs."""
    if supports_bf16(device):
        return torch.bfloat16
    if device.type == "cuda" and float16_training_works(device):
        return torch.float16
    return None


def float16_training_works(device: torch.device) -> bool:
    """Whether two training steps of a throwaway ``AdderNet`` run on ``device`` under float16
    autocast with a ``GradScaler``, to a finite loss. Where they do not (an old torch, a GPU
    without a kernel the step needs), it prints why and returns False, and training runs in
    fp32: a user never loses a run to the 16-bit path. The random numbers it uses come from a
    forked generator state, so the training runs after it draw what they would draw without it.
    """
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            model = AdderNet().to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            scaler = torch.amp.GradScaler(device.type)
            images = torch.randn(16, 1, 28, 28, device=device)
            digits = torch.arange(16, device=device) % NUM_DIGITS
            addends = digits.flip(0)
            for _ in range(2):
                with torch.autocast(device.type, dtype=torch.float16):
                    digit_logits, sum_logits = model(images, addends)
                    loss = F.cross_entropy(digit_logits, digits) + F.cross_entropy(sum_logits, digits + addends)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss came out {float(loss)}")
        return True
    except Exception as error:  # whatever went wrong, fp32 still trains
        print(f"float16 training does not work on this {device.type} ({type(error).__name__}: {error}); "
              "training in fp32 instead.")
        return False


def environment_info(device: torch.device) -> dict:
    """The machine and software versions a run used, for its run record."""
    info = {
        "device_type": device.type,
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        ),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo (Linux only; None elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The processor's model name."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The processor's feature flags (avx512f, amx_bf16, ...); empty where /proc/cpuinfo is missing."""
    return set((cpuinfo_field("flags") or "").split())


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

# Mean and standard deviation of the MNIST training pixels, scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class MNISTAdder(torchvision.datasets.MNIST):
    """MNIST as ``(image, addend) -> (digit, digit + addend)`` pairs.

    With ``addend_seed=None`` every draw of an image gets a fresh random addend 0-9, so
    over many epochs each image meets many addends (the training view). With a seed,
    each image keeps one fixed addend, so an evaluation gives the same numbers every time.

    This is the classic, per-item way to feed a model: clear, and what the benchmark's
    reference pipeline uses. The notebook's fast path keeps the same data on the training
    device as one tensor instead.
    """

    def __init__(self, root, train=True, transform=None, download=False, addend_seed=None):
        super().__init__(root, train=train, transform=transform, download=download)
        self.addends = None
        if addend_seed is not None:
            generator = torch.Generator().manual_seed(addend_seed)
            self.addends = torch.randint(0, NUM_DIGITS, (len(self.targets),), generator=generator)

    # torchvision looks for files under <root>/<class name>/raw; share MNIST's folder.
    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "raw")

    def __getitem__(self, index):
        image, digit = super().__getitem__(index)
        if self.addends is None:
            addend = int(torch.randint(0, NUM_DIGITS, ()))
        else:
            addend = int(self.addends[index])
        return (image, addend), (digit, digit + addend)


def load_mnist(root, train: bool, download: bool = True) -> MNISTAdder:
    """Load one MNIST split through torchvision, with a message that says what to do if it fails."""
    raw_folder = Path(root) / "MNIST" / "raw"
    try:
        return MNISTAdder(root, train=train, download=download)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
        put_files = f"Put the four official files ({', '.join(MNIST_FILES)}) in {raw_folder}/ and "
        if download:
            how_to_fix = put_files + (
                "run again: torchvision checks their md5 and extracts them without going online. "
                "Or give this machine internet access for the download."
            )
        else:
            how_to_fix = put_files + (
                "allow the download step (download=True, ADDER_DOWNLOAD=1): it extracts files "
                "that are already there, after checking their md5, and downloads only missing ones."
            )
        if raw_folder.exists():
            how_to_fix += (
                f" If the files there are damaged, delete {raw_folder} and try again."
            )
        raise RuntimeError(f"Could not load MNIST from {raw_folder}: {error}\n{how_to_fix}") from error


def split_indices(count: int, validation_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle ``range(count)`` with ``seed`` and cut it into (train, validation) index tensors."""
    if not 0 < validation_size < count:
        raise ValueError(f"validation_size must be between 1 and {count - 1}, got {validation_size}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[validation_size:], order[:validation_size]


def seeded_addends(count: int, seed: int) -> torch.Tensor:
    """``count`` fixed addends 0-9 drawn from ``seed``: the same evaluation pairs every time."""
    return torch.randint(0, NUM_DIGITS, (count,), generator=torch.Generator().manual_seed(seed))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Pixels (N, 28, 28), uint8 0-255 or float 0-1 -> model input (N, 1, 28, 28), standardised
    with MNIST's statistics."""
    pixels = images.float() if images.is_floating_point() else images.float() / 255.0
    return ((pixels - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def pair_mask(held_out=()) -> torch.Tensor:
    """The (digit, addend) pairs training may show, as a (10, 10) bool mask: ``mask[digit, addend]``
    is False for the ``held_out`` pairs and True for all the others."""
    mask = torch.ones(NUM_DIGITS, NUM_DIGITS, dtype=torch.bool)
    for digit, addend in held_out:
        mask[digit, addend] = False
    return mask


def held_out_pairs(count: int, seed: int, keep_every_sum: bool = True, connected: bool = True,
                   interior_sums: bool = False) -> list[tuple[int, int]]:
    """``count`` random (digit, addend) pairs to keep out of training, drawn with ``seed``.

    Every digit and every addend keeps at least one pair in training. With ``keep_every_sum``
    every sum 0-18 does too (so (0, 0) and (9, 9), its only pairs for 0 and 18, always stay
    in); with ``connected`` the pairs left in connect every digit and every addend
    (``seen_pairs_connect_every_value``), so that they fix the sum of every pair.

    With ``interior_sums`` the pairs left in are ``interior_seen_pairs(100 - count, seed)``:
    connected, and (0, 0) and (9, 9) always held out, which allows every count up to 81, where
    19 seen pairs are just enough to connect the 20 values. At that limit the end sums cannot
    be seen: a value held by 0 + 0 or 9 + 9 alone has no best place under cross-entropy
    (``NumberLineSumHead`` says why) and drifts, so there the project keeps the seen sums
    interior. Without it, pairs are drawn until they meet the conditions, as before.
    """
    largest = NUM_DIGITS * NUM_DIGITS - 2 * NUM_DIGITS + 1  # fewer seen pairs cannot connect 10 + 10 values
    if not 0 < count <= largest:
        raise ValueError(f"count must be 1 to {largest}, got {count}")
    pairs = [(digit, addend) for digit in range(NUM_DIGITS) for addend in range(NUM_DIGITS)]
    if interior_sums:
        if count < 2:
            raise ValueError(f"with interior_sums, (0, 0) and (9, 9) are held out: count must be 2 to {largest}")
        return sorted(set(pairs) - set(interior_seen_pairs(len(pairs) - count, seed)))
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        held = sorted(pairs[index] for index in order[:count])
        seen = pair_mask(held)
        every_value_seen = bool(seen.any(dim=1).all() and seen.any(dim=0).all())
        every_sum_seen = len({digit + addend for digit, addend in pairs if seen[digit, addend]}) == NUM_SUMS
        if (every_value_seen and (every_sum_seen or not keep_every_sum)
                and (seen_pairs_connect_every_value(seen) or not connected)):
            return held


def interior_seen_pairs(count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` (19 to 98) random (digit, addend) pairs that connect every digit and addend,
    none of them 0 + 0 or 9 + 9: a random spanning tree of the 10 digits and 10 addends (the
    pairs, other than those two, taken in a random order, each kept if it joins two groups not
    yet joined), plus ``count - 19`` more of the pairs left, drawn with ``seed``."""
    tree_size = 2 * NUM_DIGITS - 1
    candidates = [(digit, addend) for digit in range(NUM_DIGITS) for addend in range(NUM_DIGITS)
                  if 0 < digit + addend < NUM_SUMS - 1]
    if not tree_size <= count <= len(candidates):
        raise ValueError(f"count must be {tree_size} to {len(candidates)}, got {count}")
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed)).tolist()
    group = list(range(2 * NUM_DIGITS))  # union-find: digits 0-9, addends 10-19
    tree, others = [], []
    for index in order:
        digit, addend = candidates[index]
        digit_root, addend_root = _root(group, digit), _root(group, NUM_DIGITS + addend)
        if digit_root != addend_root:
            group[digit_root] = addend_root
            tree.append((digit, addend))
        else:
            others.append((digit, addend))
    return sorted(tree + others[: count - tree_size])


def long_chain_pairs() -> list[tuple[int, int]]:
    """The long chain: 19 seen pairs, d + (d + 1 mod 10) for every digit d and d + (d + 2 mod 10)
    for every digit but 9. They link the 20 values in one path, digit 9 - addend 0 - digit 8 -
    addend 9 - digit 7 - ... - digit 1 - addend 2 - digit 0 - addend 1, whose sums run 9, 8, 17,
    16, ..., 2, 1: every one interior. (9 + 1 would close the path into a circle.)"""
    pairs = [(digit, (digit + 1) % NUM_DIGITS) for digit in range(NUM_DIGITS)]
    pairs += [(digit, (digit + 2) % NUM_DIGITS) for digit in range(NUM_DIGITS - 1)]
    return sorted(pairs)


def _root(group: list[int], point: int) -> int:
    """The representative of ``point``'s group in a union-find list (with path halving)."""
    while group[point] != point:
        group[point] = group[group[point]]
        point = group[point]
    return point


def seen_pairs_connect_every_value(allowed: torch.Tensor) -> bool:
    """Whether the pairs ``allowed`` link the 10 digits and 10 addends into one group, each pair
    (d, a) a link between d and a. Only then do the seen pairs fix ``value(d) + value(a)`` for
    every pair (the notebook's "How few pairs are enough?" says why)."""
    group = list(range(2 * NUM_DIGITS))  # union-find: digits 0-9, addends 10-19
    for digit, addend in torch.nonzero(allowed).tolist():
        group[_root(group, digit)] = _root(group, NUM_DIGITS + addend)
    return len({_root(group, point) for point in range(2 * NUM_DIGITS)}) == 1


def draw_addends(digits: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random addend per digit, uniform over the addends ``allowed`` for that digit."""
    weights = allowed.to(digits.device)[digits].float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def random_batches(images, digits, batch_size, generator, allowed=None):
    """Yield ``(images, addends, digits, sums)`` batches: a fresh shuffle and fresh addends each call.

    Everything stays on the device the tensors live on; the last incomplete batch is dropped
    so that every step has the same shape (what ``torch.compile`` and CUDA like best).
    """
    allowed = pair_mask() if allowed is None else allowed
    device = images.device
    order = torch.randperm(len(images), device=device, generator=generator)
    addends = draw_addends(digits[order], allowed, generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        batch_addends = addends[start : start + batch_size]
        batch_digits = digits[index]
        yield images[index], batch_addends, batch_digits, batch_digits + batch_addends


def augment(images: torch.Tensor, generator: torch.Generator, max_rotation: float = RECIPE["MAX_ROTATION"],
            max_shift: float = RECIPE["MAX_SHIFT"], max_scale: float = RECIPE["MAX_SCALE"],
            elastic: float = RECIPE["ELASTIC"]):
    """Random small rotations (up to ``max_rotation`` degrees), shifts (up to ``max_shift``
    pixels) and scalings (by up to ``max_scale``, a fraction of the size) of a normalised batch,
    and, with ``elastic``, a smooth random distortion that moves each pixel by about that many
    pixels (RMS), done on its device in one resampling. No flips: a mirrored 2 or 5 is not a
    digit."""
    count = len(images)
    uniform = torch.rand(count, 3, device=images.device, generator=generator) * 2 - 1
    angle = uniform[:, 0] * math.radians(max_rotation)
    shift = uniform[:, 1:] * (2 * max_shift / images.shape[-1])  # grid coordinates span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    if max_scale:  # drawn only when asked for, so that runs without it keep their random numbers
        # The grid says where each output pixel reads from: reading from 1.1x as far out shows
        # the digit at 1/1.1 of its size.
        scale = 1 + (torch.rand(count, device=images.device, generator=generator) * 2 - 1) * max_scale
        cos, sin = cos * scale, sin * scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic:  # drawn only when asked for, as the scaling
        grid = grid + smooth_displacements(count, images.shape[-1], elastic, generator, images.device).to(grid.dtype)
    # "border" repeats the edge pixels, which are background, instead of padding with 0,
    # which after normalisation would be a grey frame.
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def smooth_displacements(count: int, size: int, rms_pixels: float, generator: torch.Generator, device,
                         smoothness: float = 4.0) -> torch.Tensor:
    """``count`` random displacement fields for a ``size`` x ``size`` image, as offsets to add to
    an ``affine_grid`` (shape (count, size, size, 2), in its units: the image spans 2).

    Each is white noise blurred by a Gaussian of ``smoothness`` pixels (Simard et al., 2003,
    used 4 on MNIST), so that neighbouring pixels move together and strokes bend instead of
    breaking, scaled so that a pixel moves ``rms_pixels`` on average (RMS, in each direction).
    """
    radius = int(2 * smoothness)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2 * smoothness**2))
    kernel = kernel / kernel.sum()
    noise = torch.randn(2 * count, 1, size, size, device=device, generator=generator)
    field = F.conv2d(noise, kernel.view(1, 1, 1, -1), padding=(0, radius))
    field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    # A unit-variance noise blurred so has a standard deviation of 1 / (2 sqrt(pi) smoothness).
    field = field * (rms_pixels * 2 * math.sqrt(math.pi) * smoothness * 2 / size)
    return field.view(count, 2, size, size).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A 3x3 convolution (no bias: batch norm brings its own), batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def convolutional_backbone(stages) -> nn.Sequential:
    """Image (N, 1, 28, 28) -> features (N, last width): stages of 3x3 conv-BN-ReLU blocks of
    the given widths, a 2x2 max-pool between stages, then global average pooling."""
    layers, channels = [], 1
    for index, stage in enumerate(stages):
        if index:
            layers.append(nn.MaxPool2d(2))
        for width in stage:
            layers.append(conv_bn_relu(channels, width))
            channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class NumberLineSumHead(nn.Module):
    """(digit code, addend code) -> 19 sum logits, through one learned point on a number line.

    The 20 input numbers are the digit's and the addend's one-hot codes. A linear layer with a
    single output places the pair at a point ``z``: its weights are a learned *value* for each
    digit and each addend, so ``z = value(digit) + value(addend) + bias``. Each sum ``s`` then
    scores by how close it lies to ``z``: ``logit_s = -SHARPNESS * (z - s)**2``, computed as
    ``SHARPNESS * (2 z s - s**2)``, without the ``-SHARPNESS * z**2`` that every sum shares
    and softmax ignores.

    Built in: the 19 sums sit at 0, 1, ..., 18 on a line, and how sharply the score falls
    with distance. Learned, from random starting values: where each digit and each addend
    sits on that line. A pair never seen in training still lands at the sum of its two
    learned values, so this head can add pairs it never saw, where a head with one free logit
    per sum (``OneHotClassSumHead``) can only memorise the pairs it saw (notebook, section 10).

    Why it finds the exact values with plain cross-entropy (a convex loss in its weights), and
    why the sharpness is fixed: the notebook's section 10.

    The end sums 0 and 18 are different. Up to a term common to every sum, which the softmax
    ignores, the logits are ``SHARPNESS * (2 z s - s**2)``, linear in ``z``, and the gradient of
    the cross-entropy in ``z`` is proportional to the softmax's mean sum minus the target. For
    a target 1 to 17 that mean reaches the target at one point, near ``z = target``: an optimum.
    It never reaches 0 or 18, so a pair with sum 0 or 18 pushes ``z`` below 0 or past 18 for as
    long as training runs (only weight decay slows it). Such a pair still reads right, but a
    value held in place by it alone (0 + 0 as the only seen pair of digit 0, say) drifts, and
    so do the unseen pairs that use that value. With many seen pairs other pairs hold every
    value; at the limit, 19 seen pairs, the project keeps the seen sums interior
    (``held_out_pairs(..., interior_sums=True)``, ``long_chain_pairs``), and trains the head
    on the true digit (``AdderNet.forward``'s ``digits``).
    """

    SHARPNESS = 2.0  # k: neighbouring sums' logits differ by 2 when z sits on a sum

    def __init__(self):
        super().__init__()
        self.value = nn.Linear(2 * NUM_DIGITS, 1)  # random start: PyTorch's default init
        # The sums' positions on the line: built in, not learned (a buffer, not a parameter).
        self.register_buffer("sum_positions", torch.arange(NUM_SUMS, dtype=torch.float32), persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # In float32 even under bfloat16 autocast: bf16 keeps 8 bits of mantissa, so near 16
        # a point could only move in steps of 1/16, too coarse for an exact sum.
        with torch.autocast(codes.device.type, enabled=False):
            point = self.value(codes.float())  # (N, 1): z
            return self.SHARPNESS * (2 * point * self.sum_positions - self.sum_positions**2)

    @torch.no_grad()
    def learned_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the head places each digit and each addend: ``(digit_values, addend_values)``.

        Only the sum of a digit value and an addend value matters, so a constant could move
        from every digit to every addend; digit 0 is reported at 0 (the bias goes to the
        addends), so that a head that adds exactly gives ``digit_values[d] == d`` and
        ``addend_values[a] == a``.
        """
        weights = self.value.weight.flatten().float().cpu()
        digit_weights, addend_weights = weights[:NUM_DIGITS], weights[NUM_DIGITS:]
        return digit_weights - digit_weights[0], addend_weights + digit_weights[0] + float(self.value.bias)


class AdderNet(nn.Module):
    """Image -> digit logits (10); (digit answer, addend) -> sum logits (19).

    The image goes through a small convolutional backbone: stages of 3x3 conv-BN-ReLU blocks
    with a 2x2 max-pool between stages (28 -> 14 -> 7), then global average pooling and a
    linear layer to 10 digit logits. ``stages`` gives each stage's output widths. The sum head
    never sees pixels: it reads the network's own digit answer, as a one-hot vector, next to
    the addend's one-hot vector, and places the pair on a number line (``NumberLineSumHead``).
    So the digit cannot depend on the addend, and the sum agrees with the digit once the head
    has learned to add. An argmax has no gradient: the digit loss trains the backbone, the sum
    loss trains the sum head. In training, ``forward`` may be given the true digits for the sum
    head to read instead (see ``forward``). ``test_time_shifts`` tells ``predict`` to read each
    digit from the image and its eight one-pixel shifts; it changes nothing else.
    """

    def __init__(self, stages=RECIPE["STAGES"], test_time_shifts: bool = RECIPE["TEST_TIME_SHIFTS"]):
        super().__init__()
        self.stages = tuple(tuple(stage) for stage in stages)
        self.test_time_shifts = bool(test_time_shifts)
        self.backbone = convolutional_backbone(self.stages)
        self.digit_head = nn.Linear(self.stages[-1][-1], NUM_DIGITS)
        self.sum_head = NumberLineSumHead()

    def config(self) -> dict:
        """What ``AdderNet(**config)`` needs to rebuild this model."""
        return {"stages": [list(stage) for stage in self.stages], "test_time_shifts": self.test_time_shifts}

    def forward(self, images: torch.Tensor, addends: torch.Tensor, digits: torch.Tensor | None = None):
        """``digits``, the true labels, in training only: the sum head then reads the true digit's
        code instead of the network's answer. A misread training image would otherwise give the
        head a pair whose target belongs to another digit; with few seen pairs such a pair is
        mostly one never seen, which nothing in training counters, and it bends the learned
        values. Without ``digits`` (evaluation, ``predict``) the head reads the network's answer.
        """
        digit_logits = self.digit_head(self.backbone(images))
        read = digit_logits.argmax(dim=1) if digits is None else digits
        digit_code = F.one_hot(read, NUM_DIGITS)
        addend_code = F.one_hot(addends, NUM_DIGITS)
        sum_logits = self.sum_head(torch.cat([digit_code, addend_code], dim=1))
        return digit_logits, sum_logits


class ConcatAdderNet(nn.Module):
    """The usual design, kept only as a baseline to compare ``AdderNet`` with: the same backbone
    and digit head, and the sum read by fully connected layers from the image features next to
    the addend's one-hot code, ``concat(features, one_hot(addend)) -> Linear -> ReLU -> Linear(19)``.

    One free logit per sum, as ``OneHotClassSumHead``: it can learn the pairs it sees, and
    nothing in it makes it add a pair it never saw. The sum loss trains the backbone too. Same
    call and outputs as ``AdderNet`` (``digits`` is accepted and ignored: no digit code to
    replace), so the same training code, ``predict`` and ``pair_accuracy`` work; with
    ``test_time_shifts`` ``predict`` averages its sum scores over the shifts as well.
    """

    def __init__(self, stages=RECIPE["STAGES"], test_time_shifts: bool = RECIPE["TEST_TIME_SHIFTS"], hidden: int = 16):
        super().__init__()
        self.stages = tuple(tuple(stage) for stage in stages)
        self.test_time_shifts = bool(test_time_shifts)
        self.backbone = convolutional_backbone(self.stages)
        features = self.stages[-1][-1]
        self.digit_head = nn.Linear(features, NUM_DIGITS)
        self.sum_layers = nn.Sequential(nn.Linear(features + NUM_DIGITS, hidden), nn.ReLU(), nn.Linear(hidden, NUM_SUMS))

    def forward(self, images: torch.Tensor, addends: torch.Tensor, digits: torch.Tensor | None = None):
        features = self.backbone(images)
        addend_code = F.one_hot(addends, NUM_DIGITS).to(features.dtype)
        return self.digit_head(features), self.sum_layers(torch.cat([features, addend_code], dim=1))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# Training helpers (the loop itself is in the notebook)
# --------------------------------------------------------------------------------------


def sgd_one_cycle(parameters, recipe: dict, total_steps: int, fused: bool = False):
    """The recipe's optimizer and schedule: SGD with Nesterov momentum and weight decay, under
    OneCycle (warm-up to ``MAX_LR`` over the first 30% of the steps, then down to almost 0).

    With ``CYCLE_MOMENTUM`` OneCycle also moves the momentum against the learning rate (0.95 at
    the start and the end, 0.85 at the peak), overwriting ``MOMENTUM``. ``fused=True`` keeps the
    learning rate in a tensor on the parameters' device, which the schedule updates in place, and
    updates all parameters in one kernel: what a step recorded as a CUDA graph needs. Loading a
    saved state (``optimizer.load_state_dict``) then copies the saved learning rate into that same
    tensor, instead of putting the saved tensor, loaded on the CPU, in its place: a recorded
    graph keeps reading the tensor it was recorded with. Where fused SGD with a tensor learning
    rate is not available, it says so and returns the plain optimizer, which ``recorded_step``
    then runs step by step.
    """
    parameters = list(parameters)
    settings = {"momentum": recipe["MOMENTUM"], "nesterov": True, "weight_decay": recipe["WEIGHT_DECAY"]}
    if fused:
        try:
            device = parameters[0].device
            # One step on a throwaway tensor first: an older torch may refuse a tensor learning
            # rate only when it steps, and then the plain step would fail with it too.
            probe = torch.zeros(2, device=device, requires_grad=True)
            probe.grad = torch.ones_like(probe)
            torch.optim.SGD([probe], lr=torch.tensor(0.1, device=device), fused=True, **settings).step()
            optimizer = torch.optim.SGD(parameters, lr=torch.tensor(recipe["MAX_LR"], device=device), fused=True,
                                        **settings)
        except (RuntimeError, TypeError, ValueError) as error:  # a torch or device without it
            print(f"fused SGD with the learning rate in a tensor is not available here ({type(error).__name__}: "
                  f"{error}); using plain SGD, so the training step cannot be recorded as a CUDA graph.")
            fused = False
    if not fused:
        optimizer = torch.optim.SGD(parameters, lr=recipe["MAX_LR"], **settings)
    if fused:
        device_lrs = [group["lr"] for group in optimizer.param_groups]

        def keep_the_lr_tensors(optimizer):
            for group, device_lr in zip(optimizer.param_groups, device_lrs):
                device_lr.copy_(torch.as_tensor(group["lr"]))
                group["lr"] = device_lr

        optimizer.register_load_state_dict_post_hook(keep_the_lr_tensors)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe["MAX_LR"], total_steps=total_steps,
                                                    cycle_momentum=recipe["CYCLE_MOMENTUM"])
    return optimizer, scheduler


class CapturedStep:
    """A training step recorded once as a CUDA graph, then replayed for every batch.

    A step of this small network launches a few hundred tiny kernels, and on a GPU launching
    them takes longer than running them. A CUDA graph launches the whole step at once. The
    catch: a graph replays the exact kernels it recorded, on the exact memory it recorded. So
    ``step(*batch)`` (a whole training step: forward, loss, backward, ``optimizer.step()``; it
    returns the loss) always runs on the same input tensors, into which each new batch is
    copied, and nothing in it may change between steps except tensors on the device:

    * the learning rate must be a tensor (``sgd_one_cycle(..., fused=True)``), which the
      schedule updates in place; a hyperparameter kept as a Python number is frozen at its
      recorded value, so a schedule that changes one (momentum cycling) is refused;
    * no host sync inside the step (``.item()``, ``print(loss)``), and the same shapes every
      step (``random_batches`` drops the last incomplete batch);
    * a ``torch.Generator`` the step draws from (the augmentation's) must be named in
      ``generators``, so that each replay draws fresh numbers from it, as the eager step would.

    Recording needs a few warm-up steps first (they create the gradients, the optimizer's
    momentum buffers and the kernels' workspaces, and let torch.compile compile). They are then
    undone: weights, batch-norm statistics, momentum buffers, random states and the ``scaler``'s
    scale go back to what they were, so training continues exactly as if they had never run.

    On a CPU nothing is recorded: after the same warm-up, undone, ``step`` runs as it is.
    """

    def __init__(self, step, example_batch, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generators=(), scaler=None, warmup_steps: int = 3):
        self.step = step
        self.optimizer = optimizer
        self.inputs = [tensor.clone() for tensor in example_batch]
        self.recorded_hyperparameters = self._python_hyperparameters()
        cuda = self.inputs[0].is_cuda
        saved = self._save_state(model, generators, scaler)
        try:
            self._warm_up_and_record(step, model, generators, scaler, saved, cuda, warmup_steps)
        except BaseException:
            # Training must go on from where it was, whichever way it goes on.
            self._restore_state(model, generators, scaler, saved)
            raise

    def _warm_up_and_record(self, step, model, generators, scaler, saved, cuda, warmup_steps):
        """The warm-up steps, undone, then (on a GPU) the recording."""
        if cuda:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side_stream):  # as PyTorch's CUDA graph notes ask for warm-up
                    for _ in range(warmup_steps):
                        step(*self.inputs)
            finally:
                torch.cuda.current_stream().wait_stream(side_stream)
        else:
            for _ in range(warmup_steps):
                step(*self.inputs)
        self._restore_state(model, generators, scaler, saved)
        self.graph = None
        if cuda:
            self.graph = torch.cuda.CUDAGraph()
            # Up to torch 2.13 a graph must be told of each generator it draws from; from 2.14
            # on it finds them itself, and the method is deprecated (and may go).
            register = getattr(self.graph, "register_generator_state", None)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*register_generator_state.*")
                for generator in generators if register else ():
                    register(generator)
            with torch.cuda.graph(self.graph):
                self.loss = step(*self.inputs)

    def __call__(self, *batch) -> torch.Tensor:
        """One training step on ``batch``; returns its loss (a tensor the next step overwrites)."""
        # Checked on every device, so that a CPU run already refuses what a GPU would get wrong.
        if self._python_hyperparameters() != self.recorded_hyperparameters:
            raise RuntimeError(
                "An optimizer setting kept as a Python number changed after the step was recorded "
                "as a CUDA graph, which would go on with the recorded value: keep it constant, or "
                "hold it in a tensor (the learning rate: sgd_one_cycle(..., fused=True); momentum "
                "cycling: CYCLE_MOMENTUM=False)."
            )
        if self.graph is None:  # nothing recorded: no need for the input tensors either
            return self.step(*batch)
        for static, new in zip(self.inputs, batch):
            static.copy_(new)
        try:
            self.graph.replay()
        except RuntimeError as error:
            # Only an error that leaves the GPU usable can be trained past; another one will
            # stop the plain step too, with the GPU's own message.
            print(f"Replaying the recorded training step failed ({error}); training on step by step.")
            self.graph = None
            return self.step(*batch)
        return self.loss

    def _python_hyperparameters(self):
        return [{key: value for key, value in group.items() if isinstance(value, (int, float))}
                for group in self.optimizer.param_groups]

    def _save_state(self, model, generators, scaler):
        momentum = {id(p): self.optimizer.state.get(p, {}).get("momentum_buffer") for p in model.parameters()}
        return {
            "model": {name: value.clone() for name, value in model.state_dict().items()},
            "momentum": {key: None if buffer is None else buffer.clone() for key, buffer in momentum.items()},
            "generators": [generator.get_state() for generator in generators],
            "scaler": None if scaler is None else scaler.state_dict(),
        }

    def _restore_state(self, model, generators, scaler, saved):
        model.load_state_dict(saved["model"])  # copies in place: the graph keeps its tensors
        for parameter in model.parameters():
            buffer = self.optimizer.state.get(parameter, {}).get("momentum_buffer")
            if buffer is not None:
                before = saved["momentum"][id(parameter)]
                # No buffer yet means a first step, whose buffer is the gradient: the same as
                # momentum times a zero buffer plus the gradient.
                buffer.copy_(before) if before is not None else buffer.zero_()
        for generator, state in zip(generators, saved["generators"]):
            generator.set_state(state)
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])


def recorded_step(step, example_batch, model: nn.Module, optimizer: torch.optim.Optimizer,
                  generators=(), scaler=None):
    """``step`` recorded as a ``CapturedStep`` where that works, else ``step`` itself.

    The notebook's loop calls what this returns. Recording needs the learning rate in a tensor
    (``sgd_one_cycle(..., fused=True)``) and a torch and GPU that can record the step; where
    either is missing or recording fails (an old torch without ``register_generator_state``, a
    driver error), it prints why and returns the plain step, with the warm-up undone, so a user
    never loses a run to the fast path.
    """
    if not all(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups):
        print("The learning rate is a Python number, which a CUDA graph would freeze: training step by step.")
        return step
    try:
        return CapturedStep(step, example_batch, model, optimizer, generators, scaler)
    except Exception as error:
        print(f"Recording the training step as a CUDA graph failed ({type(error).__name__}: {error}); "
              "training step by step instead.")
        return step


class EpochMeter:
    """Sums the loss of an epoch on the device, so the hot loop never waits for the host.

    It also remembers the first batch whose loss was NaN or infinite; ``finite_mean`` reads
    everything once, at the end of the epoch, and refuses to go on past a non-finite loss.
    """

    def __init__(self, device):
        self.loss_sum = torch.zeros((), device=device)
        self.batches = 0
        self.first_bad_batch = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, batch_index: int) -> None:
        loss = loss.detach().float()
        is_bad = ~torch.isfinite(loss) & (self.first_bad_batch < 0)
        self.first_bad_batch = torch.where(is_bad, batch_index, self.first_bad_batch)
        self.loss_sum += loss
        self.batches += 1

    def finite_mean(self, epoch: int) -> float:
        """The epoch's mean loss; FloatingPointError naming the epoch and batch if any was not finite."""
        first_bad = int(self.first_bad_batch)
        if first_bad >= 0:
            raise FloatingPointError(
                f"The training loss became NaN or infinite in epoch {epoch}, batch {first_bad} "
                "(counting from 0). Training stopped instead of going on with broken weights; "
                "the last good epoch's resumable state is kept. Try a lower learning rate "
                "(MAX_LR) in a fresh run: set RESUME to False, because a resumed run keeps the "
                "learning rate and schedule it was saved with."
            )
        return float(self.loss_sum) / max(self.batches, 1)


def check_same_recipe(saved: dict | None, current: dict, path) -> None:
    """Refuse to resume a run whose saved recipe differs from the current one.

    The saved optimizer and scheduler bring back the old peak LR and schedule length, so a run
    resumed under changed settings would silently go on with the old ones. Raises ValueError
    naming every setting that differs, and how to start fresh instead.
    """
    saved = saved or {}
    changed = [
        f"{key}: saved {saved.get(key, '(not set)')!r}, now {current.get(key, '(not set)')!r}"
        for key in sorted(saved.keys() | current.keys())
        if key not in saved or key not in current or saved[key] != current[key]
    ]
    if changed:
        raise ValueError(
            f"Cannot resume from {path}: it was saved with a different recipe ("
            + "; ".join(changed)
            + "). Put those settings back to resume it, or start that run fresh with "
            "RESUME set to False."
        )


def smooth_lr_range_test(record: list[tuple[float, float]], smoothing=0.9):
    """Smooth an LR range test's (lr, loss) record.

    Returns the lrs, the smoothed losses and a suggested peak LR: one tenth of the LR where
    the smoothed loss is lowest (past that point training starts to diverge).
    """
    lrs, smoothed = [], []
    average = 0.0
    for step, (lr, loss) in enumerate(record, start=1):
        average = smoothing * average + (1 - smoothing) * loss
        lrs.append(lr)
        smoothed.append(average / (1 - smoothing**step))  # bias correction, as in Adam
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    return lrs, smoothed, lrs[lowest] / 10


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def accuracy_metrics(digit_pred, sum_pred, digits, sums) -> dict:
    """Digit, sum and joint accuracy in %. Joint: both outputs right on the same sample."""
    digit_right = digit_pred == digits
    sum_right = sum_pred == sums
    return {
        "digit_acc": 100.0 * digit_right.float().mean().item(),
        "sum_acc": 100.0 * sum_right.float().mean().item(),
        "joint_acc": 100.0 * (digit_right & sum_right).float().mean().item(),
    }


def pair_with_every_addend(images: torch.Tensor, digits: torch.Tensor):
    """Pair each image with each addend 0-9: returns (images, addends, digits, sums), 10x as long.

    Pairs are ordered image by image, so ``reshape(-1, 10)`` gives one row per image.
    """
    addends = torch.arange(NUM_DIGITS).repeat(len(images))
    repeated_digits = digits.repeat_interleave(NUM_DIGITS)
    return images.repeat_interleave(NUM_DIGITS, dim=0), addends, repeated_digits, repeated_digits + addends


def accuracy_by_group(correct: torch.Tensor, groups: torch.Tensor, num_groups: int) -> list:
    """Accuracy in % of ``correct`` within each group 0..num_groups-1 (None for an empty group)."""
    totals = torch.bincount(groups, minlength=num_groups)
    rights = torch.bincount(groups, weights=correct.double(), minlength=num_groups)
    return [None if t == 0 else 100.0 * float(r) / int(t) for r, t in zip(rights, totals)]


def confusion_matrix(predicted: torch.Tensor, actual: torch.Tensor, num_classes=NUM_DIGITS) -> torch.Tensor:
    """``matrix[true, predicted]`` counts."""
    return torch.bincount(actual * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def sum_accuracy_given_correct_digit(digit_pred, sum_pred, digits, sums) -> float:
    """Sum accuracy in % over the samples whose digit was read right: the adder alone."""
    digit_right = digit_pred == digits
    if not digit_right.any():
        return float("nan")
    return 100.0 * (sum_pred[digit_right] == sums[digit_right]).float().mean().item()


def consistency(digit_pred, sum_pred, addends) -> float:
    """How often, in %, the predicted sum equals the predicted digit plus the addend."""
    return 100.0 * (sum_pred == digit_pred + addends).float().mean().item()


def digit_invariance(digit_pred_by_addend: torch.Tensor) -> float:
    """% of images whose digit prediction is the same for every addend.

    ``digit_pred_by_addend`` is (images, addends): one row per image.
    """
    same = (digit_pred_by_addend == digit_pred_by_addend[:, :1]).all(dim=1)
    return 100.0 * same.float().mean().item()


def evaluate_every_addend(model: nn.Module, images, digits, batch_size: int | None = None) -> dict:
    """Score each image with each addend 0-9 through ``predict``; return metrics and diagnostics.

    Deterministic: no random addends, and the model in eval mode.
    """
    pair_images, addends, pair_digits, pair_sums = pair_with_every_addend(images, digits)
    digit_pred, sum_pred = predict(model, pair_images, addends, batch_size=batch_size)
    digit_right = digit_pred == pair_digits
    joint_right = digit_right & (sum_pred == pair_sums)
    oracle_sum_pred = digit_pred + addends  # the digit classifier plus exact arithmetic
    results = {
        "images": len(images),
        "pairs": len(pair_images),
        **accuracy_metrics(digit_pred, sum_pred, pair_digits, pair_sums),
        "sum_acc_given_correct_digit": sum_accuracy_given_correct_digit(
            digit_pred, sum_pred, pair_digits, pair_sums
        ),
        "consistency": consistency(digit_pred, sum_pred, addends),
        "digit_invariance": digit_invariance(digit_pred.reshape(-1, NUM_DIGITS)),
        "oracle_sum_acc": 100.0 * (oracle_sum_pred == pair_sums).float().mean().item(),
        "joint_acc_by_addend": accuracy_by_group(joint_right, addends, NUM_DIGITS),
        "joint_acc_by_sum": accuracy_by_group(joint_right, pair_sums, NUM_SUMS),
        "pairs_by_sum": torch.bincount(pair_sums, minlength=NUM_SUMS).tolist(),
    }
    # One answer per image: the most common over its 10 addends (all the same at 100% invariance).
    image_digit_pred = torch.mode(digit_pred.reshape(-1, NUM_DIGITS), dim=1).values
    results["confusion_matrix"] = confusion_matrix(image_digit_pred, digits).tolist()
    results["wrong_images"] = torch.nonzero(image_digit_pred != digits).flatten().tolist()
    return results


def pair_accuracy(model, images, digits, pairs: list[tuple[int, int]]) -> dict:
    """Digit, sum and joint accuracy over the given (digit, addend) pairs only, each image of
    such a digit paired with its pair's addend."""
    pair_images, addends, pair_digits = [], [], []
    for digit, addend in pairs:
        chosen = images[digits == digit]
        pair_images.append(chosen)
        addends.append(torch.full((len(chosen),), addend))
        pair_digits.append(torch.full((len(chosen),), digit))
    pair_images, addends, pair_digits = map(torch.cat, (pair_images, addends, pair_digits))
    digit_pred, sum_pred = predict(model, pair_images, addends)
    results = accuracy_metrics(digit_pred, sum_pred, pair_digits, pair_digits + addends)
    results["sum_acc_given_correct_digit"] = sum_accuracy_given_correct_digit(
        digit_pred, sum_pred, pair_digits, pair_digits + addends
    )
    results["samples"] = len(pair_images)
    return results


def sum_accuracy_by_pair(model: nn.Module, images, digits) -> torch.Tensor:
    """A (10, 10) table of sum accuracy given a correct digit, per pair: entry [d, a] is the %
    of the images of digit d read right whose sum with addend a is right too (every image with
    every addend, through ``predict``), so that it shows the adding apart from the reading."""
    pair_images, addends, pair_digits, pair_sums = pair_with_every_addend(images, digits)
    digit_pred, sum_pred = predict(model, pair_images, addends)
    digit_right = digit_pred == pair_digits
    cell = (pair_digits * NUM_DIGITS + addends)[digit_right]
    read = torch.bincount(cell, minlength=NUM_DIGITS * NUM_DIGITS)
    added = torch.bincount(cell[(sum_pred == pair_sums)[digit_right]], minlength=NUM_DIGITS * NUM_DIGITS)
    return (100.0 * added / read.clamp(min=1)).reshape(NUM_DIGITS, NUM_DIGITS)


def exact_codes(digits: torch.Tensor, addends: torch.Tensor) -> torch.Tensor:
    """The sum head's input for exact digits: the digit's one-hot code next to the addend's."""
    return torch.cat([F.one_hot(digits, NUM_DIGITS), F.one_hot(addends, NUM_DIGITS)], dim=1).float()


@torch.no_grad()
def adder_table(sum_head: nn.Module) -> torch.Tensor:
    """A sum head's answer for every exact (digit, addend) pair: a (10, 10) table whose entry
    [digit, addend] should be digit + addend. Given ``model.sum_head``, it shows what the head
    learned, apart from how well the backbone reads digits.
    """
    device = next(sum_head.parameters()).device
    digits, addends = torch.meshgrid(torch.arange(NUM_DIGITS), torch.arange(NUM_DIGITS), indexing="ij")
    codes = exact_codes(digits.flatten(), addends.flatten())
    was_training = sum_head.training
    sum_head.eval()
    try:
        return sum_head(codes.to(device)).argmax(dim=1).reshape(NUM_DIGITS, NUM_DIGITS).cpu()
    finally:
        sum_head.train(was_training)


def table_accuracy(table: torch.Tensor, mask: torch.Tensor) -> float:
    """% of the (digit, addend) cells where ``mask`` is True that ``table`` adds right."""
    right = table == torch.arange(NUM_DIGITS)[:, None] + torch.arange(NUM_DIGITS)
    return 100.0 * right[mask].float().mean().item()


# The final test metrics compared across seeds.
SEED_METRICS = (
    "digit_acc",
    "sum_acc",
    "joint_acc",
    "sum_acc_given_correct_digit",
    "consistency",
    "digit_invariance",
)


def summarize_runs(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for a single run), min and max of one metric over runs."""
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else None,
        "min": float(array.min()),
        "max": float(array.max()),
        "runs": len(array),
    }


# --------------------------------------------------------------------------------------
# Does it add? The sum head alone
# --------------------------------------------------------------------------------------


class OneHotClassSumHead(nn.Sequential):
    """The usual sum head, for comparison: an MLP from the two one-hot codes (20 numbers) to
    one free logit per sum class (20 -> 16 -> 19). Nothing in it says that sums are ordered or
    that a sum is made of a digit's part and an addend's part: cross-entropy fits its answers
    to the pairs it sees, and nothing ties its answer for an unseen pair to that pair's sum.
    It can memorise the pairs it saw, not add new ones (the notebook's section 10 measures it)."""

    def __init__(self, hidden: int = 16):
        super().__init__(nn.Linear(2 * NUM_DIGITS, hidden), nn.ReLU(), nn.Linear(hidden, NUM_SUMS))


def train_sum_head_alone(sum_head: nn.Module, allowed: torch.Tensor, seed: int, steps: int = 2000,
                         recipe: dict = RECIPE, label_smoothing: float = 0.0) -> nn.Module:
    """Train a sum head on exact digit codes, only on the ``allowed`` pairs, with the recipe's
    batch size, optimizer and schedule (``sgd_one_cycle``) and cross-entropy (plain, as in the
    notebook, unless ``label_smoothing`` is given).

    No images: the digits are exact, so this measures what the head itself can learn, in
    seconds on a CPU. Returns the head, trained, in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)  # the only randomness left: batches and addends
    optimizer, scheduler = sgd_one_cycle(sum_head.parameters(), recipe, total_steps=steps)
    batch_size = recipe["BATCH_SIZE"]
    seen_digits = torch.nonzero(allowed.any(dim=1)).flatten()  # every digit, unless told otherwise
    sum_head.train()
    for _ in range(steps):
        digits = seen_digits[torch.randint(0, len(seen_digits), (batch_size,), generator=generator)]
        addends = draw_addends(digits, allowed, generator)
        loss = F.cross_entropy(sum_head(exact_codes(digits, addends)), digits + addends,
                               label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return sum_head.eval()


SUM_HEADS = {"one-hot class head": OneHotClassSumHead, "number-line head": NumberLineSumHead}


def pairs_needed_run(count: int, seed: int, head_name: str, steps: int) -> dict:
    """One run of ``pairs_needed_study``: hold out ``count`` random pairs (drawn with ``seed``;
    every digit and addend still seen), train a head of that kind alone on the rest, score it."""
    allowed = pair_mask(held_out_pairs(count, seed, keep_every_sum=False, connected=False))
    torch.manual_seed(seed)
    table = adder_table(train_sum_head_alone(SUM_HEADS[head_name](), allowed, seed, steps))
    return {"held_out": count, "seed": seed, "head": head_name,
            "connected": seen_pairs_connect_every_value(allowed),
            "seen_acc": table_accuracy(table, allowed), "unseen_acc": table_accuracy(table, ~allowed)}


def pairs_needed_study(held_out_counts, seeds, steps: int = 2000, workers: int | None = None) -> list[dict]:
    """For each count of held-out pairs, each seed and each kind of sum head, one
    ``pairs_needed_run``: one row each, in that order.

    Each run has one thread, since a head this small gains nothing from more, and the runs go
    side by side in ``workers`` processes (one per CPU core if None; 1: all in this process).
    The workers are started fresh ("spawn"), never forked: once a process has run a backward
    pass with a GPU present, autograd has started a thread per device, and a process forked
    from it cannot run a backward pass of its own (PyTorch's wiki page "Autograd and Fork"),
    and the notebook calls this after training on the GPU. Where the workers cannot run, it
    says why and runs the study in this process; the rows are the same either way.
    """
    runs = [(count, seed, head_name, steps) for count in held_out_counts for seed in seeds for head_name in SUM_HEADS]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers, len(runs))
    if workers > 1:
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                return list(pool.map(_pairs_needed_run_alone, runs))
        except Exception as error:  # e.g. a sandbox that allows no new processes
            print(f"The study's worker processes failed ({type(error).__name__}: {error}); "
                  "running its runs one after another in this process instead.")
    threads = torch.get_num_threads()
    try:
        return [_pairs_needed_run_alone(run) for run in runs]
    finally:
        torch.set_num_threads(threads)  # the caller's training keeps its threads


def _pairs_needed_run_alone(run: tuple) -> dict:
    """``pairs_needed_run(*run)`` with one thread: several run side by side, one per core."""
    torch.set_num_threads(1)
    return pairs_needed_run(*run)


# --------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------


def plot_history(history: list[dict], title: str | None = None):
    """Training loss, and validation error (100 - accuracy) on a log scale, per epoch.

    A log scale shows both the first epochs (errors of tens of %) and the last ones (under 1 %).
    """
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, error_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
    loss_axis.plot(epochs, [row["loss"] for row in history], marker="o")
    # Log scale: an untrained sum head places every pair near 0 while the sums average 9, and
    # its loss grows with the squared distance, so the first epoch's loss dwarfs the rest.
    loss_axis.set_yscale("log")
    loss_axis.set(xlabel="epoch", ylabel="training loss (digit CE + sum CE, log scale)", title="Training loss")
    for key, label, style in [("digit_acc", "digit", "-"), ("sum_acc", "sum", "--"), ("joint_acc", "joint", ":")]:
        errors = [max(100.0 - row[key], 0.01) for row in history]  # a log scale cannot show 0
        error_axis.plot(epochs, errors, style, marker="o", markersize=3, label=label)
    error_axis.set_yscale("log")
    error_axis.set(xlabel="epoch", ylabel="validation error (%, log scale)", title="Validation error")
    error_axis.legend()
    for axis in (loss_axis, error_axis):
        axis.grid(alpha=0.3, which="both")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_lr_range_test(lrs, smoothed_losses, chosen_lr):
    """Loss against learning rate (log scale), with the chosen peak LR marked."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.8))
    axis.plot(lrs, smoothed_losses)
    axis.axvline(chosen_lr, color="tab:red", linestyle="--", label=f"peak LR {chosen_lr:.3g}")
    axis.set_xscale("log")
    top = smoothed_losses[0] * 1.5
    axis.set_ylim(min(smoothed_losses) * 0.9, top)
    axis.set(xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_predictions(images, addends, digit_pred, sum_pred, digits, columns=8, title=None):
    """A grid of images, each titled 'digit + addend = sum' as predicted; wrong answers in red.

    ``images`` are raw uint8 (N, 28, 28); the other arguments are length-N integer tensors.
    """
    import matplotlib.pyplot as plt

    count = len(images)
    rows = max(1, math.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.45 * columns, 1.75 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        digit, addend = int(digits[index]), int(addends[index])
        got_digit, got_sum = int(digit_pred[index]), int(sum_pred[index])
        right = got_digit == digit and got_sum == digit + addend
        axis.imshow(np.asarray(images[index]), cmap="gray_r")
        label = f"{got_digit}+{addend}={got_sum}"
        if not right:
            label += f"\ntrue {digit}+{addend}={digit + addend}"
        axis.set_title(label, fontsize=9, color="black" if right else "tab:red")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_learned_values(sum_heads: dict):
    """Where each sum head placed the digits and the addends on its number line, against
    where exact addition puts them (the diagonal). ``sum_heads``: {label: NumberLineSumHead}."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, which in zip(axes, ("digit", "addend")):
        axis.plot(range(NUM_DIGITS), range(NUM_DIGITS), color="lightgrey", linewidth=4, label="exact")
        for (label, head), marker in zip(sum_heads.items(), "ox^sv"):
            digit_values, addend_values = head.learned_values()
            values = digit_values if which == "digit" else addend_values
            axis.plot(range(NUM_DIGITS), values.tolist(), marker, linestyle="none", label=label)
        axis.set(xlabel=which, title=f"learned value of each {which}", xticks=range(NUM_DIGITS))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("position on the number line")
    axes[1].legend()
    figure.tight_layout()
    return figure


def plot_pairs_needed(rows: list[dict]):
    """Accuracy on the pairs never seen against how many of the 100 pairs were held out, one
    line per kind of sum head: the mean over seeds, and each seed as a dot (hollow where the
    seen pairs did not connect every digit and addend)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for head_name, color in zip(sorted({row["head"] for row in rows}, reverse=True), ("tab:blue", "tab:orange")):
        head_rows = [row for row in rows if row["head"] == head_name]
        counts = sorted({row["held_out"] for row in head_rows})
        means = [np.mean([r["unseen_acc"] for r in head_rows if r["held_out"] == count]) for count in counts]
        axis.plot(counts, means, color=color, label=f"{head_name} (mean)")
        for row in head_rows:
            axis.scatter(row["held_out"], row["unseen_acc"], s=25, edgecolors=color,
                         facecolors=color if row["connected"] else "none", zorder=3)
    axis.set(xlabel="pairs held out of the 100 (never seen in training)",
             ylabel="sums right on the unseen pairs (%)", ylim=(-5, 105),
             title="How few pairs are enough? (the sum head alone)")
    axis.legend(loc="center left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_pair_tables(tables: dict, seen: torch.Tensor):
    """One 10x10 table per design, a cell per (digit, addend) pair coloured by its sum accuracy
    given a correct digit (``sum_accuracy_by_pair``), the pairs seen in training outlined, and
    the mean over the pairs never seen in each title."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tables), figsize=(4.8 * len(tables), 4.6), squeeze=False)
    for axis, (name, table) in zip(axes[0], tables.items()):
        table = torch.as_tensor(table, dtype=torch.float32)
        image = axis.imshow(table.numpy(), cmap="RdYlGn", vmin=0, vmax=100)
        for digit, addend in torch.nonzero(seen).tolist():
            axis.add_patch(plt.Rectangle((addend - 0.5, digit - 0.5), 1, 1, fill=False, linewidth=2))
        unseen = table[~seen]
        axis.set(title=f"{name}\nunseen pairs: {unseen.mean():.1f} % on average" if len(unseen) else name,
                 xlabel="addend", ylabel="digit", xticks=range(NUM_DIGITS), yticks=range(NUM_DIGITS))
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="sum right given a correct digit (%); outlined: seen")
    return figure


def plot_confusion_matrix(matrix):
    """The 10x10 digit confusion matrix, counts written in the cells (log colour scale)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    matrix = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.imshow(matrix + 1, cmap="Blues", norm=LogNorm())
    for true in range(matrix.shape[0]):
        for predicted in range(matrix.shape[1]):
            count = matrix[true, predicted]
            if count:
                color = "white" if true == predicted else "black"
                axis.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color=color)
    axis.set(
        xlabel="predicted digit",
        ylabel="true digit",
        xticks=range(NUM_DIGITS),
        yticks=range(NUM_DIGITS),
        title="Test digit confusion matrix",
    )
    figure.tight_layout()
    return figure


def plot_own_digit(image, mnist_image, probabilities, addend: int, digit: int, total: int):
    """Your own digit read: the image as given, the 28x28 image the network reads (light on
    black, as MNIST), and the ten digit probabilities, titled 'digit + addend = sum'."""
    import matplotlib.pyplot as plt

    figure, (given_axis, read_axis, probability_axis) = plt.subplots(
        1, 3, figsize=(10, 3.3), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    if isinstance(image, Image.Image) and image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA")  # a palette, 1-bit or 16-bit picture, as it looks
    pixels = np.asarray(image)
    given_axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
    given_axis.set_title(f"as given ({pixels.shape[1]}x{pixels.shape[0]})")
    read_axis.imshow(np.asarray(mnist_image), cmap="gray", vmin=0, vmax=255)
    read_axis.set_title("as the network reads it (28x28)")
    for axis in (given_axis, read_axis):
        axis.set_xticks([])
        axis.set_yticks([])
    probabilities = np.asarray(probabilities, dtype=float)
    colours = ["tab:blue" if value == digit else "lightgrey" for value in range(NUM_DIGITS)]
    probability_axis.bar(range(NUM_DIGITS), probabilities, color=colours)
    probability_axis.set(xticks=range(NUM_DIGITS), ylim=(0, 1), xlabel="digit", ylabel="probability",
                         title="the digit's probabilities")
    figure.suptitle(f"{digit} + {addend} = {total}", fontsize=14)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------
# Checkpoints and inference
# --------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "mnist-adder"
CHECKPOINT_VERSION = 1


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.chmod(temporary, 0o644)  # mkstemp makes it owner-only; a checkpoint is an ordinary file
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def safe_load(path) -> dict:
    """``torch.load`` with ``weights_only=True`` (no code runs from the file), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: not a checkpoint")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage, or a pickle that needs code to load
        raise ValueError(
            f"{path} is not a readable weights-only checkpoint (truncated, damaged, or not "
            f"saved by this project): {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        ) from error
    if not isinstance(contents, dict) or contents.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an MNIST Adder checkpoint")
    if contents.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {contents.get('version')!r}; "
            f"this code reads version {CHECKPOINT_VERSION}"
        )
    return contents


def save_checkpoint(model: AdderNet, path, metadata: dict | None = None) -> None:
    """Save the model's weights with what is needed to rebuild and describe it."""
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": "model",
            "model_config": model.config(),
            "parameter_count": count_parameters(model),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metadata": metadata or {},
        },
        path,
    )


def load_checkpoint(path, device="cpu") -> AdderNet:
    """Rebuild the model saved by ``save_checkpoint``, on ``device``, in eval mode. On a CPU its
    weights are kept channels-last: the CPU's convolutions (oneDNN) run about twice as fast on
    that layout, with the same answers."""
    contents = safe_load(path)
    if contents.get("kind") != "model":
        raise ValueError(f"{path} is a {contents.get('kind')!r} checkpoint, not a model checkpoint")
    try:  # a model_config that does not name test_time_shifts reads digits from the image alone
        model = AdderNet(**{"test_time_shifts": False, **contents["model_config"]})
        model.load_state_dict(contents["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"{path} holds weights of a different model: {str(error).splitlines()[0][:300]}"
        ) from error
    model = model.to(device)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def save_training_state(path, state: dict) -> None:
    """Save a resumable training state (model, optimizer, scheduler, RNG, epoch, history)."""
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "training", **state}, path)


def load_training_state(path) -> dict:
    """Load what ``save_training_state`` saved."""
    contents = safe_load(path)
    if contents.get("kind") != "training":
        raise ValueError(f"{path} is a {contents.get('kind')!r} checkpoint, not a training state")
    return contents


# What predict's shape errors say, since most wrong shapes are photos, scans and drawings.
TO_MNIST_FORMAT_HINT = (
    "predict reads MNIST's format (a light digit on black, size-normalised and centred); "
    "au.to_mnist_format(image) brings another image of one digit (a photo, a scan, a drawing) to it"
)


def _as_image_batch(images) -> torch.Tensor:
    """Check raw images and return them as a float (N, 1, 28, 28) tensor in [0, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype == object or not (
            np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
        ):
            raise TypeError(f"images must hold numbers, got a numpy array of {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if images.dtype == torch.bool or images.is_complex():
        raise TypeError(f"images must be uint8 pixels or floats in [0, 1], got {images.dtype}")
    given_shape = tuple(images.shape)
    if images.ndim == 2:
        images = images.unsqueeze(0)
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(
                f"images must have one (grey) channel, got {images.shape[1]} channels in shape "
                f"{tuple(images.shape)}. {TO_MNIST_FORMAT_HINT}"
            )
        images = images.squeeze(1)
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(
            f"images must be 28x28, Nx28x28 or Nx1x28x28, got shape {given_shape}. {TO_MNIST_FORMAT_HINT}"
        )
    if len(images) == 0:
        raise ValueError("images is empty")
    if images.is_floating_point():
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        if images.min() < 0 or images.max() > 1:
            raise ValueError(
                f"float images must lie in [0, 1], got values from {float(images.min()):.3g} to "
                f"{float(images.max()):.3g}; pass uint8 pixels 0-255 or divide by 255"
            )
        return images.float()
    if images.min() < 0 or images.max() > 255:
        raise ValueError("integer images must be pixels 0-255")
    return images.float() / 255.0


def _as_addends(addends, count: int) -> torch.Tensor:
    """Check addends (an int or a sequence of ints 0-9) and return an int64 tensor of length ``count``."""

    def refuse(what):
        raise TypeError(f"addends must be an int or a sequence of ints 0-9, got {what}")

    if isinstance(addends, (bool, np.bool_)):
        refuse(f"the bool {addends!r}")
    if isinstance(addends, (int, np.integer)):
        addends = torch.tensor(int(addends))
    elif isinstance(addends, (list, tuple)):
        for addend in addends:
            if isinstance(addend, (bool, np.bool_)) or not isinstance(addend, (int, np.integer)):
                refuse(f"{addend!r} in the sequence")
        addends = torch.tensor([int(addend) for addend in addends], dtype=torch.long)
    elif isinstance(addends, np.ndarray):
        if not np.issubdtype(addends.dtype, np.integer):
            refuse(f"a numpy array of {addends.dtype}")
        addends = torch.from_numpy(addends.astype(np.int64))
    elif isinstance(addends, torch.Tensor):
        if addends.is_floating_point() or addends.is_complex() or addends.dtype == torch.bool:
            refuse(f"a tensor of {addends.dtype}")
        addends = addends.long().cpu()
    else:
        refuse(f"{type(addends).__name__} {addends!r}")

    if addends.ndim == 0:  # one addend for every image
        addends = addends.expand(count)
    if addends.ndim != 1:
        raise ValueError(f"addends must be one-dimensional, got shape {tuple(addends.shape)}")
    if len(addends) != count:
        raise ValueError(f"got {len(addends)} addends for {count} images")
    if addends.min() < 0 or addends.max() > 9:
        raise ValueError(f"addends must be 0-9, got values from {int(addends.min())} to {int(addends.max())}")
    return addends


def shifted_views(batch: torch.Tensor):
    """A normalised batch and its eight one-pixel shifts (blank background shifted in)."""
    background = -MNIST_MEAN / MNIST_STD  # a 0 pixel, normalised
    padded = F.pad(batch, (1, 1, 1, 1), value=background)
    size = batch.shape[-1]
    return [padded[..., dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)]


def digit_scores_over_shifts(model: nn.Module, batch: torch.Tensor, addends: torch.Tensor) -> torch.Tensor:
    """The digit scores that test-time shifts take the argmax of: the softmax of the digit
    logits, summed over a normalised batch and its eight one-pixel shifts."""
    return sum(model(view, addends)[0].float().softmax(dim=1) for view in shifted_views(batch))


def answers(model: nn.Module, batch: torch.Tensor, addends: torch.Tensor):
    """The model's (digit, sum) answers for a normalised batch. With ``model.test_time_shifts``
    the digit is the one most probable on average over the image and its eight one-pixel
    shifts, and the sum head adds that digit."""
    if not getattr(model, "test_time_shifts", False):
        digit_logits, sum_logits = model(batch, addends)
        return digit_logits.argmax(dim=1), sum_logits.argmax(dim=1)
    digits = digit_scores_over_shifts(model, batch, addends).argmax(dim=1)
    if isinstance(model, ConcatAdderNet):  # its sum is read from the image too: over the same views
        sum_scores = sum(model(view, addends)[1].float().softmax(dim=1) for view in shifted_views(batch))
        return digits, sum_scores.argmax(dim=1)
    return digits, model.sum_head(exact_codes(digits, addends)).argmax(dim=1)


PREDICT_BATCH_GPU = 10_000
PREDICT_BATCH_CPU = 256


@torch.no_grad()
def predict(model: nn.Module, images, addends, batch_size: int | None = None):
    """Read the digit and add the addend: returns ``(digits, sums)``, int64 tensors of shape (N,).

    ``images``: one 28x28 image or an Nx28x28 batch (Nx1x28x28 too), numpy or torch, as uint8
    pixels 0-255 or floats in [0, 1]. ``addends``: an int or a sequence of N ints 0-9.
    Bad input raises TypeError or ValueError naming the problem. In eval mode, so the same
    model always gives the same answers. ``batch_size`` (the answers do not depend on it):
    if None, 10,000 on a GPU, where fewer launches pay, and 256 on a CPU, where batches that
    stay in its caches run about twice as fast.
    """
    pixels = _as_image_batch(images)
    addends = _as_addends(addends, len(pixels))
    device = next(model.parameters()).device
    batch_size = batch_size or (PREDICT_BATCH_GPU if device.type == "cuda" else PREDICT_BATCH_CPU)
    was_training = model.training
    model.eval()
    digit_batches, sum_batches = [], []
    try:
        for start in range(0, len(pixels), batch_size):
            batch = normalize_images(pixels[start : start + batch_size].to(device))
            digits, sums = answers(model, batch, addends[start : start + batch_size].to(device))
            digit_batches.append(digits.cpu())
            sum_batches.append(sums.cpu())
    finally:
        model.train(was_training)
    return torch.cat(digit_batches), torch.cat(sum_batches)


# Your own digit --------------------------------------------------------------------------

# MNIST's format, as LeCun, Cortes and Burges made it from NIST's binary digits: the digit's
# bounding box scaled to fit a 20x20 box, aspect ratio kept, with the grey levels that
# anti-aliasing gives, then placed in a 28x28 field with its centre of mass at the centre.
MNIST_BOX = 20
MNIST_FIELD = 28
# Levels within this share of the ink's contrast count as paper: scanner and camera noise, and
# the faintest anti-aliased edge, would otherwise stretch the digit's bounding box.
PAPER_NOISE = 0.1
# Less contrast than this (of the full 0-255 range) between ink and paper is no digit at all.
MIN_CONTRAST = 0.05
# MNIST's strokes, in pixels of the 20x20 box, as stroke_width measures them on 1,000 training
# digits enlarged tenfold: 1.9 the median, 1.2 the thinnest twentieth. A pen on a big picture
# draws far thinner strokes, which the network misreads (a fifth of 300 MNIST test digits thinned
# to 0.5 pixel are), so strokes thinner than MNIST's thinnest are thickened to its median.
MNIST_STROKE = 1.9
THIN_STROKE = 1.2


def _grey_levels(image) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One image as PIL, numpy (H, W[, C]) or torch ([C,] H, W) -> float grey (H, W) in [0, 1],
    and its alpha (H, W) in [0, 1] or None."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16"):
            image = image.convert("RGBA" if "transparency" in image.info or "A" in image.mode else "RGB")
        image = np.array(image)
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
            raise TypeError(f"image must hold numbers, got a numpy array of {image.dtype}")
        if np.issubdtype(image.dtype, np.unsignedinteger) and image.dtype != np.uint8:
            image = image.astype(np.int64)  # torch has few operations on uint16 and wider
        # numpy holds colour last, as np.asarray(a PIL image) gives it; torch holds it first.
        pixels = torch.from_numpy(np.array(image))  # a copy: np.asarray of a PIL image is read-only
        if pixels.ndim == 3:
            pixels = pixels.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        pixels = image.detach().cpu()
    else:
        raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if pixels.is_complex():
        raise TypeError(f"image must hold real numbers, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 2, 3, 4):
        raise ValueError(
            f"image must be one image: H x W, or with 1-4 channels (grey, grey + alpha, RGB, RGBA), "
            f"H x W x C in numpy or C x H x W in torch; got shape {tuple(image.shape)}"
        )
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    if pixels.dtype == torch.bool:
        pixels = pixels.float()
    elif pixels.is_floating_point():
        pixels = pixels.float()
        if not torch.isfinite(pixels).all():
            raise ValueError("image contains NaN or infinite values")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"float images must lie in [0, 1], got values from {float(pixels.min()):.3g} "
                             f"to {float(pixels.max()):.3g}; pass uint8 pixels 0-255 or divide by 255")
    else:
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError("integer images must be pixels 0-255 (or 0-65535 for 16 bits)")
        pixels = pixels.float() / (255.0 if pixels.max() <= 255 else 65535.0)
    colour, alpha = (pixels[:-1], pixels[-1]) if pixels.shape[0] in (2, 4) else (pixels, None)
    if len(colour) == 3:
        colour = torchvision.transforms.v2.functional.rgb_to_grayscale(colour)
    return colour[0], alpha


def stroke_width(ink: torch.Tensor) -> float:
    """The mean width, in pixels, of the strokes in an (H, W) ink image: a stroke of width w and
    length L covers w * L pixels, of which 2 * L lie on its edge."""
    mask = (ink > 0.5).float()[None]
    inside = -F.max_pool2d(-F.pad(mask, (1, 1, 1, 1)), 3, stride=1)  # pixels with no paper beside them
    edge = (mask - inside).sum()
    return float(2 * mask.sum() / edge.clamp(min=1))


def _thicken(digit: torch.Tensor, scale: float) -> torch.Tensor:
    """A digit (H, W) of thin strokes, to be scaled by ``scale`` into the 20x20 box, with its
    strokes grown to MNIST's width. The growing happens at five times the box's size: big
    enough for a thin stroke to stay a line, small enough to be quick for a phone's photo."""
    working_scale = 5
    size = [max(1, round(side * scale * working_scale)) for side in digit.shape]
    digit = torchvision.transforms.v2.functional.resize(digit[None], size, antialias=True).clamp(0, 1)
    digit = digit / digit.max()
    growth = MNIST_STROKE * working_scale - stroke_width(digit[0])
    kernel = 2 * max(1, round(growth / 2)) + 1  # a max-pool grows a stroke by kernel - 1
    margin = kernel // 2
    return F.max_pool2d(F.pad(digit, (margin, margin, margin, margin)), kernel, stride=1)[0]


def to_mnist_format(image, dark_on_light: bool | None = None) -> torch.Tensor:
    """One image of one digit -> the (28, 28) uint8 tensor ``predict`` reads, made the way MNIST
    was made: the digit's bounding box scaled to fit 20x20 (aspect ratio kept, anti-aliased),
    then placed in a 28x28 field with its centre of mass at the centre.

    Why: the network learned MNIST's digits, light on black, all of one size and centred. A
    photo, a scan or a drawing differs in all of these, and squeezing it whole to 28x28 leaves
    a small, off-centre, dark-on-light digit that the network misreads.

    ``image``: a PIL image, a numpy array (H x W, or H x W x C as ``np.asarray`` of a PIL image
    gives) or a torch tensor (H x W or C x H x W, as torchvision gives); grey, grey + alpha, RGB
    or RGBA; uint8, 16-bit or float in [0, 1]; any size. Transparent pixels (a drawing on a
    transparent canvas) count as paper. ``dark_on_light``: whether the ink is darker than the
    paper; None detects it from the image's border, which is paper. The contrast is stretched,
    so a faint pencil stroke comes out as full ink; a thick marker stays a thick stroke, and a
    pen's stroke, far thinner than MNIST's once the digit is scaled down, is thickened to
    MNIST's usual width (the one step MNIST did not need: its digits were drawn to size).

    One digit on a plain background only: a picture of several digits would be squeezed into
    one box and misread, so cut each digit out first; shadows or paper texture stronger than a
    tenth of the ink's contrast count as ink, so crop them away or light the page evenly. A
    blank image (no ink that stands out from the paper) raises ValueError rather than guessing.
    """
    grey, alpha = _grey_levels(image)
    if alpha is not None and alpha.min() < alpha.max():
        # Drawn on a transparent layer: the ink is where alpha is; lay it on a paper that contrasts.
        ink_level = float((grey * alpha).sum() / alpha.sum())
        grey = alpha * grey + (1 - alpha) * (1.0 if ink_level < 0.5 else 0.0)
    border = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if dark_on_light is None:
        dark_on_light = bool(border.median() > (grey.min() + grey.max()) / 2)
    ink = 1 - grey if dark_on_light else grey
    paper = (1 - border if dark_on_light else border).median()
    contrast = ink.max() - paper
    if contrast < MIN_CONTRAST:
        looked_for = "dark digit on a light background" if dark_on_light else "light digit on a dark background"
        # Only where the picture has ink of some kind can the other polarity find it.
        other_way = ("" if grey.max() - grey.min() < MIN_CONTRAST else
                     f"; if the digit is the other way round, pass dark_on_light={not dark_on_light}")
        raise ValueError(
            "no digit found: the image is blank (its ink differs from the paper by "
            f"{max(float(contrast), 0.0):.1%} of the full range). Give an image of one {looked_for}{other_way}"
        )
    ink = ((ink - paper) / contrast).clamp(0, 1)
    ink = torch.where(ink > PAPER_NOISE, ink, 0.0)

    rows, columns = ink.any(dim=1).nonzero()[:, 0], ink.any(dim=0).nonzero()[:, 0]
    digit = ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    scale = MNIST_BOX / max(digit.shape)
    if stroke_width(digit) * scale < THIN_STROKE:
        digit = _thicken(digit, scale)
        scale = MNIST_BOX / max(digit.shape)
    size = [max(1, round(side * scale)) for side in digit.shape]
    digit = torchvision.transforms.v2.functional.resize(digit[None], size, antialias=True)[0].clamp(0, 1)
    # Resizing a thin stroke down greys it: its darkest point becomes full ink again, as in MNIST.
    digit = digit / digit.max()

    field = torch.zeros(MNIST_FIELD, MNIST_FIELD)
    height, width = digit.shape
    mass = digit / digit.sum()
    centre_row = float((mass.sum(dim=1) * torch.arange(height)).sum())
    centre_column = float((mass.sum(dim=0) * torch.arange(width)).sum())
    middle = (MNIST_FIELD - 1) / 2
    # Whole-pixel moves, as MNIST's: no resampling blurs the digit again. The box stays inside.
    top = min(max(round(middle - centre_row), 0), MNIST_FIELD - height)
    left = min(max(round(middle - centre_column), 0), MNIST_FIELD - width)
    field[top : top + height, left : left + width] = digit
    return (field * 255).round().to(torch.uint8)


@torch.no_grad()
@torch.no_grad()
def digit_probabilities(model: nn.Module, images) -> torch.Tensor:
    """The ten digit probabilities behind ``predict``'s digit answers, (N, 10): with test-time
    shifts their mean over the image and its eight one-pixel shifts, whose argmax it answers."""
    pixels = _as_image_batch(images)
    device = next(model.parameters()).device
    batch = normalize_images(pixels.to(device))
    no_addends = torch.zeros(len(batch), dtype=torch.long, device=device)  # the digit never reads them
    was_training = model.training
    model.eval()
    try:
        if getattr(model, "test_time_shifts", False):
            scores = digit_scores_over_shifts(model, batch, no_addends)  # a sum of nine softmaxes
            return (scores / scores.sum(dim=1, keepdim=True)).cpu()
        return model(batch, no_addends)[0].float().softmax(dim=1).cpu()
    finally:
        model.train(was_training)


def example_digit_image() -> Image.Image:
    """A 7 drawn by this project (not from MNIST) as a user's photo or drawing might show one:
    dark blue ink on white, large, off-centre, in a 240x320 RGB picture. The notebook reads it
    when no image of your own is given."""
    picture = Image.new("RGB", (320, 240), "white")
    pen = ImageDraw.Draw(picture)
    ink = (20, 30, 90)
    pen.line([(40, 30), (150, 26), (165, 30)], fill=ink, width=14, joint="curve")  # the top bar
    pen.line([(165, 30), (120, 120), (95, 205)], fill=ink, width=14, joint="curve")  # the stem
    pen.line([(100, 110), (160, 108)], fill=ink, width=12)  # the crossbar many people write
    return picture


def write_json(path, data) -> None:
    """Write ``data`` as indented JSON (creating folders as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
