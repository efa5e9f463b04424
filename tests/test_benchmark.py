"""The training-speed benchmark runs end to end in its short mode and writes complete results.

Nothing here is timed or compared with a speed: a test machine's speed proves nothing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import train_speed  # noqa: E402

ROW_FIELDS = {"key", "name", "compared_with", "autocast", "images_per_second", "step_ms", "epoch_seconds",
              "recipe_seconds", "warmup_seconds", "time_to_target", "profile"}


def test_short_benchmark_writes_results(tmp_path):
    completed = subprocess.run(
        [sys.executable, "benchmarks/train_speed.py", "--short", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    results = json.loads((tmp_path / f"results_{device_type}_short.json").read_text())
    report = (tmp_path / f"results_{device_type}_short.md").read_text()

    assert results["short"] is True and results["partial"] is False
    assert not [row for row in results["not_measured"] if row["outcome"].startswith("FAILED")]
    measured = {row["key"] for row in results["rows"]}
    expected = {row["key"] for row in train_speed.ROWS
                if (device_type == "cuda" or not row.get("needs_cuda")) and not row.get("needs_cpu")}
    assert measured == expected
    assert measured | {row["key"] for row in results["not_measured"]} == {row["key"] for row in train_speed.ROWS}
    for row in results["rows"]:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["images_per_second"] > 0 and row["warmup_seconds"] > 0
        assert row["recipe_seconds"] == pytest.approx(row["epoch_seconds"] * train_speed.au.RECIPE["EPOCHS"])
        assert (row["time_to_target"] is None) == (row["key"] == "reference")
        assert (row["profile"] is not None) == (row["key"] in train_speed.PROFILED)
        assert row["name"] in report
    for row in results["not_measured"]:
        assert f"| {row['name']} | {row['outcome']} |" in report
    assert results["targets"] and all(isinstance(target["met"], bool) for target in results["targets"])
    assert results["mflop_per_image"] > 0 and results["matmul_tflops"] > 0
    assert "Short mode" in report and "Targets" in report and "Where the time goes" in report


def test_every_row_changes_one_thing_against_a_row_before_it():
    keys = [row["key"] for row in train_speed.ROWS]
    for index, row in enumerate(train_speed.ROWS[1:], start=1):
        assert row["compared_with"] in keys[:index], row["key"]


def test_the_step_gives_the_model_the_true_digits_as_the_notebooks_step_does(monkeypatch):
    """In training the notebook's sum head reads the true digit, not the network's answer
    (AdderNet.forward's ``digits``): the benchmark must time that step, not another."""
    given_digits = []
    forward = train_speed.au.AdderNet.forward

    def recording_forward(self, images, addends, digits=None):
        given_digits.append(digits)
        return forward(self, images, addends, digits)

    monkeypatch.setattr(train_speed.au.AdderNet, "forward", recording_forward)
    row = next(row for row in train_speed.ROWS if row["key"] == "notebook")
    _, _, step, *_ = train_speed.build_training(row, total_steps=1, device=torch.device("cpu"))
    images, addends, digits = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    step(images, addends, digits, digits + addends)
    assert len(given_digits) == 1 and torch.equal(given_digits[0], digits)
