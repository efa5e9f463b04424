"""The committed results: the checkpoints reproduce them, and the run record names the machine."""

import json
from pathlib import Path

import pytest

import adder_utils as au

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "training_logs"


def read_json(name):
    return json.loads((LOGS / name).read_text())


@pytest.fixture(scope="module")
def test_set(data_root):
    return au.load_mnist(data_root, train=False, download=False)


def test_committed_checkpoint_reproduces_the_logged_test_metrics(test_set):
    model = au.load_checkpoint(LOGS / "model.pt")
    results = au.evaluate_every_addend(model, test_set.data, test_set.targets)
    assert results == read_json("test_metrics.json")


def test_committed_checkpoint_predicts_from_raw_pixels(test_set):
    model = au.load_checkpoint(LOGS / "model.pt")
    digits, sums = au.predict(model, test_set.data[0], 3)
    assert digits.tolist() == [int(test_set.targets[0])]
    assert sums.tolist() == [int(test_set.targets[0]) + 3]


def test_run_record_names_the_machine_and_versions():
    record = read_json("run_record.json")
    environment = record["environment"]
    for key in ("device_type", "device_name", "torch", "torchvision", "python"):
        assert environment[key]
    assert record["cpu_run"] == (environment["device_type"] == "cpu")
    assert record["parameters"] == au.count_parameters(au.load_checkpoint(LOGS / "model.pt"))
    assert len(record["seeds"]) == record["settings"]["SEEDS"]


def test_logged_learned_values_are_the_held_out_checkpoints():
    held_out = read_json("held_out.json")
    digit_values, addend_values = au.load_checkpoint(LOGS / "held_out_model.pt").sum_head.learned_values()
    assert held_out["learned_digit_values"] == digit_values.tolist()
    assert held_out["learned_addend_values"] == addend_values.tolist()


def test_held_out_checkpoint_loads_knows_its_pairs_and_adds_them(test_set):
    """The held-out model: its metadata names the pairs it never saw, and through predict it
    still gives their sums, as held_out.json says."""
    model = au.load_checkpoint(LOGS / "held_out_model.pt")
    pairs = [tuple(pair) for pair in read_json("held_out.json")["held_out_pairs"]]
    metadata = au.safe_load(LOGS / "held_out_model.pt")["metadata"]
    assert [tuple(pair) for pair in metadata["held_out_pairs"]] == pairs
    assert au.pair_accuracy(model, test_set.data, test_set.targets, pairs) == read_json("held_out.json")["unseen"]
    digit, addend = pairs[0]
    image = test_set.data[(test_set.targets == digit).nonzero()[0, 0]]
    digits, sums = au.predict(model, image, addend)
    assert sums.tolist() == [digits.item() + addend]
