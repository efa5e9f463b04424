"""The notebook as Colab opens it: alone in an empty folder, fetching the project from REPO_URL.

ADDER_REPO_URL points the setup cell at a git repository these tests make on the spot, so
nothing here touches the network.
"""

import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "MNIST_Adder.ipynb"


def execute_alone(folder: Path):
    """Copy the notebook alone into ``folder`` and run it there, as Colab would."""
    shutil.copy(NOTEBOOK, folder / NOTEBOOK.name)
    notebook = nbformat.read(folder / NOTEBOOK.name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    client.execute()
    return notebook


def make_project_repository(path: Path) -> Path:
    """A git repository holding the project's module, as the real one would."""
    path.mkdir()
    shutil.copy(REPO / "adder_utils.py", path / "adder_utils.py")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "adder_utils.py"], ["commit", "-q", "-m", "project"]):
        subprocess.run(git + command, cwd=path, check=True)
    return path


def test_notebook_alone_clones_the_project_and_runs(short_run_env, monkeypatch, tmp_path_factory):
    origin = make_project_repository(tmp_path_factory.mktemp("origin") / "mnist-adder")
    monkeypatch.setenv("ADDER_REPO_URL", origin.as_uri())
    monkeypatch.setenv("ADDER_DATA_ROOT", str(REPO / "data"))  # the clone has no data/ of its own
    monkeypatch.setenv("ADDER_SEEDS", "1")
    colab = tmp_path_factory.mktemp("colab")

    execute_alone(colab)

    assert (colab / "mnist-adder" / "adder_utils.py").exists()
    assert (short_run_env / "model.pt").exists() and (short_run_env / "run_record.json").exists()


def test_notebook_alone_with_an_unreachable_url_says_how_to_go_on(short_run_env, monkeypatch, tmp_path):
    missing = tmp_path / "no-such-repository"
    monkeypatch.setenv("ADDER_REPO_URL", missing.as_uri())
    colab = tmp_path / "colab"
    colab.mkdir()

    with pytest.raises(CellExecutionError) as failure:
        execute_alone(colab)

    message = str(failure.value)
    assert f"Could not fetch the project (git clone {missing.as_uri()})" in message
    assert "set REPO_URL in this cell" in message
    assert "upload adder_utils.py through Colab's Files pane" in message
    assert sorted(path.name for path in colab.iterdir()) == ["MNIST_Adder.ipynb"]  # stopped at once
