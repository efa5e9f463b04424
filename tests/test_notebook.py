"""The notebook's own behaviour, executed end to end in its short CPU mode.

nbval (see pytest.ini) checks that the notebook runs top to bottom; these tests run it in the
situations a user meets: no GPU, an interrupted run resumed, and a loss that blows up.
"""

import csv
import json
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import adder_utils as au

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "MNIST_Adder.ipynb"


def execute_notebook():
    """Run the notebook from the repository root with the current environment variables."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()
    return notebook


def final_results(output_dir: Path) -> dict:
    """Everything a run wrote that must not depend on how it was scheduled (timings left out)."""
    with open(output_dir / "history.csv") as file:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]
    return {
        "history": history,
        **{name: json.loads((output_dir / f"{name}.json").read_text()) for name in ("test_metrics", "seeds", "held_out")},
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message appears only without a GPU")
def test_device_cell_without_gpu_tells_colab_users_what_to_do(short_run_env, monkeypatch):
    monkeypatch.delenv("ADDER_ALLOW_CPU")
    with pytest.raises(CellExecutionError) as failure:
        execute_notebook()
    message = str(failure.value)
    assert "No CUDA GPU is available" in message
    assert "Runtime > Change runtime type" in message
    assert "ADDER_ALLOW_CPU=1" in message
    # It stopped at the device cell: nothing was trained or written.
    assert not (short_run_env / "model.pt").exists()


def test_interrupted_and_resumed_run_ends_exactly_like_an_uninterrupted_one(short_run_env, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("ADDER_SEEDS", "1")
    uninterrupted_dir = tmp_path_factory.mktemp("uninterrupted")
    monkeypatch.setenv("ADDER_OUTPUT_DIR", str(uninterrupted_dir))
    execute_notebook()

    interrupted_dir = tmp_path_factory.mktemp("interrupted")
    monkeypatch.setenv("ADDER_OUTPUT_DIR", str(interrupted_dir))
    monkeypatch.setenv("ADDER_STOP_AFTER_EPOCH", "1")
    with pytest.raises(CellExecutionError, match="Stopped after epoch 1"):
        execute_notebook()
    state = au.load_training_state(interrupted_dir / "resume" / "seed0.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 1

    monkeypatch.setenv("ADDER_STOP_AFTER_EPOCH", "0")
    monkeypatch.setenv("ADDER_RESUME", "1")
    notebook = execute_notebook()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "seed0: resuming after epoch 1" in printed

    assert final_results(interrupted_dir) == final_results(uninterrupted_dir)
    original = au.load_checkpoint(uninterrupted_dir / "model.pt").state_dict()
    resumed = au.load_checkpoint(interrupted_dir / "model.pt").state_dict()
    assert all(torch.equal(original[name], resumed[name]) for name in original)


def test_non_finite_loss_stops_training_naming_epoch_and_batch(short_run_env, monkeypatch):
    monkeypatch.setenv("ADDER_MAX_LR", "1e30")
    with pytest.raises(CellExecutionError, match=r"NaN or infinite in epoch 1, batch \d+"):
        execute_notebook()
    # The broken epoch was not saved as a resumable state.
    assert not (short_run_env / "resume" / "seed0.pt").exists()
