"""How well the committed model reads handwriting that is not MNIST's: scikit-learn's digits.

    pip install scikit-learn   # only this script needs it; the notebook does not
    python tools/other_writers.py

The digits are the test set of UCI's "Optical Recognition of Handwritten Digits" (Alpaydin and
Kaynak, 1998), shipped inside scikit-learn as ``load_digits``, so nothing is downloaded: 1,797
digits written on forms by 13 people (of the 43 who filled in forms, 30 wrote UCI's training set and
13 others this test set): a data set of its own, separate from MNIST. Each is an 8x8
image whose pixels count the ink (0-16) in 4x4 blocks of a 32x32 bitmap, light on dark.

Every image is read by ``au.predict`` with ``training_logs/model.pt`` on the CPU in two ways:
through ``au.to_mnist_format``, and naively, the whole image resized to 28x28. Nothing is tuned
on these digits. The result goes to ``tools/other_writers.json``, beside this script; rerun it
whenever ``training_logs/model.pt`` changes.
"""

import sys
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import adder_utils as au  # noqa: E402

CHECKPOINT = REPO / "training_logs" / "model.pt"
RESULT = Path(__file__).with_suffix(".json")  # beside this script: an evaluation, not a training run's log


def naive_resize(ink: torch.Tensor) -> torch.Tensor:
    """(N, H, W) ink in [0, 1], light on dark -> (N, 28, 28) uint8: the whole image squeezed."""
    resized = TF.resize(ink[:, None], [28, 28], antialias=True)[:, 0].clamp(0, 1)
    return (resized * 255).round().to(torch.uint8)


def measure() -> dict:
    """Read every digit both ways with the committed model; the accuracies and what was read."""
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.from_numpy(digits.images).float() / 16.0  # counts of on pixels in 16-pixel blocks
    truth = torch.from_numpy(digits.target).long()
    model = au.load_checkpoint(CHECKPOINT)

    formatted = torch.stack([au.to_mnist_format(image) for image in ink])
    read = {"to_mnist_format": au.predict(model, formatted, 0)[0], "naive_resize": au.predict(model, naive_resize(ink), 0)[0]}
    return {
        "dataset": "the test set of UCI's Optical Recognition of Handwritten Digits, as scikit-learn's load_digits ships it",
        "writers": 13,
        "writers_note": "UCI's description: 43 people filled in the forms, 30 for its training set and 13 others "
                        "for this test set; a data set of its own, separate from MNIST",
        "images": len(truth),
        "image_format": "8x8 images whose pixels count the ink (0-16) in 4x4 blocks of a 32x32 bitmap, light on dark",
        "checkpoint": "training_logs/model.pt",
        "digit_accuracy_percent": {name: round(100 * float((answers == truth).float().mean()), 2)
                                   for name, answers in read.items()},
        "digit_accuracy_by_digit_percent": {
            name: [round(100 * float((answers[truth == d] == d).float().mean()), 1) for d in range(10)]
            for name, answers in read.items()},
        "naive_resize": "the whole 8x8 image resized to 28x28 (antialiased bilinear), no bounding box, no centring",
        "device": "cpu",
        "cpu": au.cpu_name(),
        "torch": torch.__version__,
        "scikit_learn": sklearn.__version__,
    }


def main():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("This script reads scikit-learn's digits: pip install scikit-learn")
    result = measure()
    au.write_json(RESULT, result)
    accuracy = result["digit_accuracy_percent"]
    print(f"{result['images']} digits by {result['writers']} writers: to_mnist_format "
          f"{accuracy['to_mnist_format']:.2f} %, naive resize {accuracy['naive_resize']:.2f} % "
          f"-> {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
