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


README = REPO / "README.md"


def readme_prose():
    """The README with every run of whitespace made one space, so that line breaks do not matter."""
    return " ".join(README.read_text().split())

# The first cell of each row of the README's results table, and the metric it reports.
RESULTS_ROWS = {
    "digit accuracy": "digit_acc",
    "sum accuracy": "sum_acc",
    "joint accuracy (both right)": "joint_acc",
    "sum accuracy given a correct digit": "sum_acc_given_correct_digit",
    "consistency (sum = digit + addend)": "consistency",
    "digit invariance (same digit for all 10 addends)": "digit_invariance",
}


def table_rows(text):
    """Every markdown table row in ``text``, as a list of stripped cells."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.strip().startswith("|") and not line.strip().startswith("| ---")
    ]


def row_labelled(label, text, cells):
    """The one table row of ``cells`` cells whose first cell is ``label``."""
    rows = [row for row in table_rows(text) if row[0] == label and len(row) == cells]
    assert len(rows) == 1, f"the README should have one {cells}-column table row labelled {label!r}, found {len(rows)}"
    return rows[0]


def history_rows(run):
    with open(LOGS / "history.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["run"] == run]
    assert rows, f"history.csv has no rows for run {run}"
    return rows


def test_readme_results_table_is_the_logged_metrics():
    readme = README.read_text()
    metrics = read_json("test_metrics.json")
    summary = read_json("seeds.json")["summary"]
    for label, key in RESULTS_ROWS.items():
        statistics = summary[key]
        assert row_labelled(label, readme, 5)[1:] == [
            f"{metrics[key]:.2f} %",
            f"{statistics['mean']:.3f} ± {statistics['std']:.3f} %",
            f"{statistics['min']:.2f} %",
            f"{statistics['max']:.2f} %",
        ], label
    oracle = row_labelled("oracle adder (digit classifier + exact arithmetic)", readme, 5)
    assert oracle[1] == f"{metrics['oracle_sum_acc']:.2f} %"
    assert f"{metrics['pairs']:,} pairs" in readme_prose() and metrics["pairs"] == 10 * metrics["images"]


def test_readme_names_the_run_that_made_the_results():
    readme = readme_prose()
    record = read_json("run_record.json")
    environment = record["environment"]
    if record["cpu_run"]:
        assert "CPU run" in readme
    assert environment["device_name"] in readme
    for name, version in (("Python", environment["python"]), ("torch", environment["torch"]),
                          ("torchvision", environment["torchvision"])):
        assert f"{name} {version}" in readme, name
    seed = record["seeds"][0]
    assert (
        f"(seed {seed}, {record['parameters']:,} parameters, {record['settings']['EPOCHS']} epochs)" in readme
    )


def test_readme_timings_are_the_logged_ones():
    readme = readme_prose()
    record = read_json("run_record.json")
    assert f"{record['main_run_training_seconds']:.0f} s of training" in readme
    assert f"({record['main_run_seconds']:.0f} s with validation and checkpoints)" in readme
    assert f"took {record['notebook_seconds']:,.0f} s" in readme


def test_readme_counts_of_wrong_images_and_sums_are_the_logged_ones():
    readme = readme_prose()
    metrics = read_json("test_metrics.json")
    assert f"The {len(metrics['wrong_images'])} test images the main model reads wrong" in readme
    by_addend = {f"{value:.2f}" for value in metrics["joint_acc_by_addend"]}
    if len(by_addend) == 1:  # the README says "for every addend" only when it is so
        assert f"Joint accuracy is {by_addend.pop()}% for every addend" in readme
    else:
        assert "for every addend" not in readme
    by_sum, pairs = metrics["joint_acc_by_sum"], metrics["pairs_by_sum"]
    assert f"{by_sum[0]:.2f}% for sum 0 ({pairs[0]:,} pairs" in readme
    assert f"{by_sum[18]:.2f}% for sum 18 ({pairs[18]:,} pairs" in readme


def test_readme_seed_table_is_the_logged_runs():
    readme = README.read_text()
    runs = read_json("seeds.json")["runs"]
    assert [run["seed"] for run in runs] == read_json("run_record.json")["seeds"]
    for run in runs:
        final_validation = float(history_rows(f"seed{run['seed']}")[-1]["digit_acc"])
        assert row_labelled(str(run["seed"]), readme, 5)[1:] == [
            f"{run['digit_acc']:.2f}", f"{run['sum_acc']:.2f}", f"{run['joint_acc']:.2f}", f"{final_validation:.2f}"
        ], f"seed {run['seed']}"


def test_readme_held_out_experiment_is_the_logged_one():
    readme = README.read_text()
    held_out = read_json("held_out.json")
    pairs = [tuple(pair) for pair in held_out["held_out_pairs"]]
    assert ", ".join(f"({digit}, {addend})" for digit, addend in pairs) in readme_prose()
    for label, key in (("the 90 seen in training", "seen"), ("the 10 held out", "unseen")):
        result = held_out[key]
        assert row_labelled(label, readme, 4)[1:] == [
            f"{result['samples']:,}", f"{result['sum_acc']:.2f}%", f"{result['sum_acc_given_correct_digit']:.2f}%"
        ], label
    table = held_out["adder_table"]
    answers = ", ".join(f"{digit}+{addend} -> {table[digit][addend]}" for digit, addend in pairs)
    assert answers in readme_prose()


def test_readme_learned_values_are_the_checkpoints():
    readme = README.read_text()
    for label, checkpoint in (("main model", "model.pt"), ("held-out model", "held_out_model.pt")):
        head = au.load_checkpoint(LOGS / checkpoint).sum_head
        for which, values in zip(("digits", "addends"), head.learned_values()):
            assert row_labelled(f"{label}, {which}", readme, 11)[1:] == [f"{v:.2f}" for v in values.tolist()]
    held_out = read_json("held_out.json")
    digit_values, addend_values = au.load_checkpoint(LOGS / "held_out_model.pt").sum_head.learned_values()
    assert held_out["learned_digit_values"] == digit_values.tolist()
    assert held_out["learned_addend_values"] == addend_values.tolist()


def test_readme_pairs_needed_table_is_the_logged_study():
    readme = README.read_text()
    study = read_json("pairs_needed.json")
    for count in study["held_out_counts"]:
        rows = {head: [r for r in study["rows"] if r["held_out"] == count and r["head"] == head]
                for head in ("number-line head", "one-hot class head")}
        connected = sum(r["connected"] for r in rows["number-line head"])
        assert row_labelled(str(count), readme, 4)[1:] == [
            f"{connected} of {len(rows['number-line head'])}",
            ", ".join(f"{r['unseen_acc']:.0f}" for r in rows["number-line head"]) + " %",
            ", ".join(f"{r['unseen_acc']:.0f}" for r in rows["one-hot class head"]) + " %",
        ], count


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
