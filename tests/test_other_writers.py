"""tools/other_writers.py: the committed model on other writers' digits, as the README reports it."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_other_writers_figures_are_what_the_script_measures_with_the_committed_model():
    """tools/other_writers.json: the committed model on scikit-learn's digits, with and without
    to_mnist_format, as tools/other_writers.py measures it (where scikit-learn is installed)."""
    pytest.importorskip("sklearn", reason="tools/other_writers.py needs scikit-learn: pip install scikit-learn")
    sys.path.insert(0, str(REPO / "tools"))
    import other_writers

    measured, logged = other_writers.measure(), json.loads(other_writers.RESULT.read_text())
    for key in ("images", "writers", "digit_accuracy_percent", "digit_accuracy_by_digit_percent"):
        assert measured[key] == logged[key], key
    assert logged["digit_accuracy_percent"]["to_mnist_format"] > logged["digit_accuracy_percent"]["naive_resize"]
