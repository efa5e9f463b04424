"""Run the notebook in its short CPU mode under pytest: a few thousand images, two epochs.

nbval starts the notebook's kernel from this process, so the kernel inherits these settings.
A variable already set in the environment wins, so a GPU machine can run longer versions.
"""

import os
import tempfile

import pytest

SHORT_RUN_ENV = {
    "ADDER_ALLOW_CPU": "1",
    "ADDER_COMPILE": "0",
    "ADDER_EPOCHS": "2",
    "ADDER_TRAIN_SIZE": "2048",
    "ADDER_VALIDATION_SIZE": "1000",  # which the scored models train on too
    "ADDER_TEST_SIZE": "500",
    "ADDER_SEEDS": "2",
    "ADDER_HELD_OUT_EPOCHS": "1",
    "ADDER_LR_TEST_STEPS": "20",
    "ADDER_PAIRS_STUDY_SEEDS": "1",
    "ADDER_PAIRS_STUDY_STEPS": "100",
}


def pytest_configure(config):
    for name, value in SHORT_RUN_ENV.items():
        os.environ.setdefault(name, value)
    # Never let a test run overwrite the committed training_logs/.
    os.environ.setdefault("ADDER_OUTPUT_DIR", tempfile.mkdtemp(prefix="adder-nbval-"))


@pytest.fixture(scope="session")
def short_run_settings():
    """The short mode's ADDER_* variables, for fixtures that set them in a wider scope."""
    return dict(SHORT_RUN_ENV)


@pytest.fixture
def short_run_env(monkeypatch, tmp_path):
    """The short mode's settings, with the notebook writing into this test's tmp_path."""
    for name, value in SHORT_RUN_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ADDER_OUTPUT_DIR", str(tmp_path))
    for name in ("ADDER_RESUME", "ADDER_STOP_AFTER_EPOCH", "ADDER_MAX_LR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path
