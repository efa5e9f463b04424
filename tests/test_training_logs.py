"""The committed results: the checkpoint reproduces them, and the README reports them as they are."""

import csv
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


def test_readme_reports_the_logged_figures():
    readme = (REPO / "README.md").read_text()
    metrics = read_json("test_metrics.json")
    for key in ("digit_acc", "sum_acc", "joint_acc"):
        assert f"{metrics[key]:.2f}" in readme, key
    summary = read_json("seeds.json")["summary"]
    for key in ("digit_acc", "joint_acc"):
        assert f"{summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}" in readme, key
    record = read_json("run_record.json")
    if record["cpu_run"]:
        assert "CPU run" in readme
    assert record["environment"]["device_name"] in readme


def test_readme_training_log_table_is_the_main_runs_history():
    readme = (REPO / "README.md").read_text()
    seed = read_json("run_record.json")["seeds"][0]
    with open(LOGS / "history.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["run"] == f"seed{seed}"]
    assert rows
    for row in rows:
        line = (
            f"| {row['epoch']} | {float(row['loss']):.4f} | {float(row['digit_acc']):.2f} | "
            f"{float(row['sum_acc']):.2f} | {float(row['joint_acc']):.2f} | {float(row['lr']):.2e} | "
            f"{float(row['seconds']):.1f} |"
        )
        assert line in readme, line
