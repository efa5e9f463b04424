"""Shared fixtures for the adder_utils tests: MNIST loaded once, and scratch copies of its files."""

import shutil
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")  # before anything imports pyplot: the tests draw no windows

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import adder_utils as au  # noqa: E402

DATA_ROOT = REPO_ROOT / "data"
RAW_FOLDER = DATA_ROOT / "MNIST" / "raw"
EXTRACTED_FILES = tuple(name.removesuffix(".gz") for name in au.MNIST_FILES)


@pytest.fixture(scope="session")
def data_root():
    """data/, where the notebook keeps MNIST. torchvision extracts the official .gz files there
    on first use (offline: CI copies them in); if they are missing the test fails, saying how to fix it."""
    for train in (True, False):
        au.load_mnist(DATA_ROOT, train=train, download=True)
    return DATA_ROOT


@pytest.fixture(scope="session")
def mnist_test(data_root):
    """The MNIST test split as an MNISTAdder (fresh addends), read from data/ once per session."""
    return au.load_mnist(data_root, train=False, download=False)


@pytest.fixture(scope="session")
def test_images(mnist_test):
    """The first 64 raw uint8 test images (64, 28, 28) and their digits."""
    return mnist_test.data[:64].clone(), mnist_test.targets[:64].clone()


@pytest.fixture
def raw_copy(tmp_path, data_root):
    """``raw_copy(*names)``: a scratch <root>/MNIST/raw holding copies of the named files from
    data/MNIST/raw. Returns the scratch root. Tests change only these copies, never data/."""

    def make(*names):
        raw = tmp_path / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(RAW_FOLDER / name, raw / name)
        return tmp_path

    return make
