"""The README: its tables are what tools/readme_tables.py writes from training_logs/, and its
code runs as written. Nothing here reads the README's prose."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
sys.path.insert(0, str(REPO / "tools"))

import readme_tables  # noqa: E402


def copy_of_the_logs(tmp_path) -> Path:
    """training_logs/ without what the tables do not read, for a test to alter."""
    return Path(shutil.copytree(REPO / "training_logs", tmp_path / "logs",
                                ignore=shutil.ignore_patterns("*.pt", "*.png", "gpu_run", "resume")))


def test_readme_tables_are_what_the_script_writes_from_the_logs():
    readme = README.read_text()
    assert readme_tables.render(readme) == readme, "README.md is out of date: run python tools/readme_tables.py"


def test_readme_tables_follow_the_logs(tmp_path):
    """The check above can fail: logs that differ give other tables."""
    logs = copy_of_the_logs(tmp_path)
    metrics = json.loads((logs / "test_metrics.json").read_text())
    metrics["digit_acc"] = 12.345
    (logs / "test_metrics.json").write_text(json.dumps(metrics))
    readme = README.read_text()
    rendered = readme_tables.render(readme, logs)
    assert rendered != readme and "| digit accuracy | 12.35 % |" in rendered


def test_readme_says_the_held_out_model_adds_only_when_it_does(tmp_path):
    logs = copy_of_the_logs(tmp_path)
    held_out = json.loads((logs / "held_out.json").read_text())
    held = len(held_out["held_out_pairs"])
    for accuracy, verb in [(100.0, "adds"), (99.0, "is asked for")]:
        held_out["unseen"]["sum_acc_given_correct_digit"] = accuracy
        (logs / "held_out.json").write_text(json.dumps(held_out))
        assert f"pairs, {verb} the other {held}:" in readme_tables.render(README.read_text(), logs)


def test_readme_tables_need_their_markers():
    with pytest.raises(ValueError, match="<!-- begin: results -->"):
        readme_tables.render("# a README without tables\n")


def test_readme_python_example_runs_as_written(data_root, monkeypatch):
    """The 'Use the trained model' snippet, run from the project root."""
    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    monkeypatch.chdir(REPO)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["digits"].shape == namespace["sums"].shape == (3,)
    assert (namespace["sums"] - namespace["digits"]).tolist() == [3, 0, 9]


def test_a_resumed_run_is_not_timed_as_a_whole_notebook():
    assert readme_tables.whole_notebook_time({"notebook_seconds": 312.4}) == "took 312 s"
    resumed = readme_tables.whole_notebook_time({"notebook_seconds": 95.0, "resumed": True})
    assert "ran in parts" in resumed and "the last took 95 s" in resumed
