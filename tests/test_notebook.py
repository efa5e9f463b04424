"""The notebook's own behaviour in the situations a user meets: no GPU, an interrupted run
resumed, a run resumed under changed settings, and a loss that blows up.

nbval (see pytest.ini) already runs the whole notebook top to bottom once. The training loop
is tested here directly: the notebook's own code cells, up to the one that defines
``train_model``, are executed in this process in the short CPU mode, and ``train_model`` is
called as the notebook calls it. One whole-notebook run checks that a resumed notebook ends
with what an uninterrupted run gives.
"""

import contextlib
import csv
import io
import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import pytest
import torch
from nbclient import NotebookClient

import adder_utils as au

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "MNIST_Adder.ipynb"
SETTINGS_CELL = "controls = au.settings_from_env("
TRAINING_CELL = "def train_model("


def execute_notebook():
    """Run the notebook from the repository root with the current environment variables."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()
    return notebook


def code_cells_through(marker):
    """The notebook's code cells, in order, up to and including the one containing ``marker``."""
    cells = []
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type == "code":
            cells.append(cell.source)
            if marker in cell.source:
                return cells
    raise AssertionError(f"no code cell of the notebook contains {marker!r}")


def one_cell(cells, marker):
    (cell,) = [cell for cell in cells if marker in cell]
    return cell


class NotebookSession:
    """The notebook's code up to ``train_model``, executed in this process like a kernel would.

    ``settings(**overrides)`` sets the ADDER_* variables to the short mode's plus the overrides
    (and no others) and re-runs the settings cell and the training cell, as a user who edits
    the settings and runs the notebook again would. A kernel started afterwards sees the same.
    """

    def __init__(self, monkeypatch, base_settings):
        self.monkeypatch = monkeypatch
        self.base_settings = base_settings
        self.cells = code_cells_through(TRAINING_CELL)
        self.namespace = {"__name__": "__notebook__"}
        self.settings()
        # Everything up to the training cell (setup, settings, device, data, model, loss, the
        # LR range test) runs once; later settings() calls re-run only the cells they change.
        for index, source in enumerate(self.cells):
            self.run(source, index)
        plt.close("all")

    def run(self, source, index=None):
        exec(compile(source, f"<notebook code cell {index}>", "exec"), self.namespace)

    def settings(self, **overrides):
        wanted = {**self.base_settings, **{f"ADDER_{name}": str(value) for name, value in overrides.items()}}
        for name in [name for name in os.environ if name.startswith("ADDER_") and name not in wanted]:
            self.monkeypatch.delenv(name)
        for name, value in wanted.items():
            self.monkeypatch.setenv(name, value)
        if "train_model" in self.namespace:
            self.run(one_cell(self.cells, SETTINGS_CELL))
            self.run(one_cell(self.cells, TRAINING_CELL))

    def train(self, seed=0, run_name=None, **options):
        """``train_model`` as the notebook calls it for the main run (on all the images, the
        validation split's too) unless told otherwise; returns (model, history, printed)."""
        options = {"all_images": True, **options}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            model, history = self.namespace["train_model"](seed, run_name or f"seed{seed}", **options)
        return model, history, printed.getvalue()


@pytest.fixture(scope="module")
def notebook(tmp_path_factory, short_run_settings):
    base_settings = {**short_run_settings, "ADDER_OUTPUT_DIR": str(tmp_path_factory.mktemp("notebook-setup"))}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO)  # the notebook's paths (data/, adder_utils.py) are relative to it
        yield NotebookSession(monkeypatch, base_settings)


@pytest.fixture(scope="module")
def uninterrupted(notebook, tmp_path_factory):
    """The main run trained without a break: its output folder, model and history."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    notebook.settings(OUTPUT_DIR=output_dir)
    model, history, _ = notebook.train()
    return output_dir, model, history


@pytest.fixture(scope="module")
def interrupted(notebook, tmp_path_factory):
    """An output folder whose main run stopped after epoch 1, as a disconnect would leave it."""
    output_dir = tmp_path_factory.mktemp("interrupted")
    notebook.settings(OUTPUT_DIR=output_dir, STOP_AFTER_EPOCH=1)
    with pytest.raises(RuntimeError, match="Stopped after epoch 1"):
        notebook.train()
    state = au.load_training_state(output_dir / "resume" / "seed0.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 1
    return output_dir


def copy_of(output_dir, tmp_path):
    """A scratch copy of a run's output folder, so that each test resumes from the same state."""
    return Path(shutil.copytree(output_dir, tmp_path / "run"))


def same_history(history, other):
    """The same epochs with the same log rows, timings left out (to rounding on a GPU, see below)."""
    rows, other_rows = ([{k: v for k, v in row.items() if k != "seconds"} for row in h] for h in (history, other))
    if torch.cuda.is_available():
        return len(rows) == len(other_rows) and all(
            row == pytest.approx(other_row, rel=1e-2) for row, other_row in zip(rows, other_rows)
        )
    return rows == other_rows


def same_weights(model, other):
    """Bit for bit on the CPU. The README promises exactness there only: on a GPU, cuDNN may pick
    nondeterministic kernels, so a resumed run matches only to rounding."""
    theirs = other.state_dict()
    if torch.cuda.is_available():
        return all(torch.allclose(value.cpu().float(), theirs[name].cpu().float(), atol=1e-4)
                   for name, value in model.state_dict().items())
    return all(torch.equal(value.cpu(), theirs[name].cpu()) for name, value in model.state_dict().items())


def test_the_notebooks_recipe_is_the_modules(monkeypatch):
    """The settings cell reads its recipe from adder_utils.RECIPE: with no ADDER_* variable set, the same."""
    for name in [name for name in os.environ if name.startswith("ADDER_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(REPO)
    namespace = {"__name__": "__notebook__"}
    for index, source in enumerate(code_cells_through(SETTINGS_CELL)):  # in the project: no clone
        exec(compile(source, f"<notebook code cell {index}>", "exec"), namespace)
    assert namespace["recipe"] == au.RECIPE


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message appears only without a GPU")
def test_device_cell_without_gpu_tells_colab_users_what_to_do(short_run_env, monkeypatch):
    monkeypatch.delenv("ADDER_ALLOW_CPU")
    monkeypatch.chdir(REPO)
    namespace = {"__name__": "__notebook__"}
    with pytest.raises(RuntimeError) as failure:
        for index, source in enumerate(code_cells_through("au.choose_device(")):
            exec(compile(source, f"<notebook code cell {index}>", "exec"), namespace)
    message = str(failure.value)
    assert "No CUDA GPU is available" in message
    assert "Runtime > Change runtime type" in message
    assert "ADDER_ALLOW_CPU=1" in message
    assert "device" not in namespace  # it stopped at the device cell, before anything could train


def test_epoch_rows_hold_plain_numbers(uninterrupted):
    """The rows go to history.csv and the JSON logs. With fused SGD (the CUDA-graph path, which
    a CPU run takes too) the schedule reports its learning rate as a tensor."""
    _, _, history = uninterrupted
    assert all(type(value) in (int, float) for row in history for value in row.values()), history[0]


def test_scored_models_train_on_the_validation_images_too_and_the_validation_run_scores_them(
    notebook, monkeypatch, tmp_path
):
    trained_on = []
    real = au.random_batches
    monkeypatch.setattr(au, "random_batches", lambda images, *rest: trained_on.append(len(images)) or real(images, *rest))
    notebook.settings(OUTPUT_DIR=tmp_path, EPOCHS=1)
    _, history, printed = notebook.train()
    _, validation_history, _ = notebook.train(run_name="validation", all_images=False)
    namespace = notebook.namespace
    assert trained_on == [len(namespace["train_index"]) + len(namespace["validation_index"]), len(namespace["train_index"])]
    assert "digit_acc" not in history[0]
    assert printed.splitlines()[-1].split()[2:5] == ["-", "-", "-"]  # no validation scores printed
    assert {"digit_acc", "sum_acc", "joint_acc"} <= set(validation_history[0])


def test_interrupted_and_resumed_training_ends_exactly_like_an_uninterrupted_run(notebook, uninterrupted, interrupted, tmp_path):
    _, model, history = uninterrupted
    output_dir = copy_of(interrupted, tmp_path)
    notebook.settings(OUTPUT_DIR=output_dir, RESUME=1)
    resumed_model, resumed_history, printed = notebook.train()
    assert "seed0: resuming after epoch 1" in printed
    assert same_history(resumed_history, history)
    assert same_weights(resumed_model, model)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"MAX_LR": 0.1}, "MAX_LR: saved 0.2, now 0.1"),  # a lower LR after a diverging run
        ({"EPOCHS": 3}, "EPOCHS: saved 2, now 3"),  # a longer schedule
        ({"WEIGHT_DECAY": 0.0}, "WEIGHT_DECAY: saved 0.0001, now 0.0"),
    ],
)
def test_resume_refuses_a_changed_recipe_naming_the_change(notebook, interrupted, tmp_path, change, named):
    output_dir = copy_of(interrupted, tmp_path)
    saved = (output_dir / "resume" / "seed0.pt").read_bytes()
    notebook.settings(OUTPUT_DIR=output_dir, RESUME=1, **change)
    with pytest.raises(ValueError, match="different recipe") as failure:
        notebook.train()
    assert named in str(failure.value)
    assert "RESUME set to False" in str(failure.value)
    assert (output_dir / "resume" / "seed0.pt").read_bytes() == saved  # nothing trained over it


def test_resume_of_a_finished_run_refuses_new_settings_instead_of_skipping_training(notebook, uninterrupted, tmp_path):
    output_dir = copy_of(uninterrupted[0], tmp_path)
    notebook.settings(OUTPUT_DIR=output_dir, RESUME=1, EPOCHS=3)
    with pytest.raises(ValueError, match="EPOCHS: saved 2, now 3"):
        notebook.train()


def test_resume_of_a_finished_run_with_the_same_settings_trains_nothing(notebook, uninterrupted, tmp_path):
    _, model, history = uninterrupted
    output_dir = copy_of(uninterrupted[0], tmp_path)
    notebook.settings(OUTPUT_DIR=output_dir, RESUME=1)
    resumed_model, resumed_history, printed = notebook.train()
    assert "seed0: resuming after epoch 2" in printed
    assert resumed_history == history  # the saved rows, seconds included: no epoch ran again
    assert same_weights(resumed_model, model)


def test_non_finite_loss_stops_training_naming_epoch_and_batch(notebook, tmp_path):
    notebook.settings(OUTPUT_DIR=tmp_path, MAX_LR="1e30")
    with pytest.raises(FloatingPointError, match=r"NaN or infinite in epoch 1, batch \d+") as failure:
        notebook.train()
    assert "RESUME to False" in str(failure.value)  # the advice: a fresh run, not a resumed one
    # The broken epoch was not saved as a resumable state.
    assert not (tmp_path / "resume" / "seed0.pt").exists()


def test_whole_notebook_resumed_after_a_disconnect_ends_like_an_uninterrupted_run(
    notebook, uninterrupted, interrupted, tmp_path
):
    """The one whole-notebook check beyond nbval's run: RESUME reaches the kernel, and the
    resumed notebook's main model and log are those of the uninterrupted training."""
    _, model, history = uninterrupted
    output_dir = copy_of(interrupted, tmp_path)
    notebook.settings(OUTPUT_DIR=output_dir, RESUME=1, SEEDS=1)  # the kernel inherits these
    executed = execute_notebook()
    printed = "".join(
        output.get("text", "") for cell in executed.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "seed0: resuming after epoch 1" in printed
    assert same_weights(au.load_checkpoint(output_dir / "model.pt"), model)
    with open(output_dir / "history.csv") as file:
        logged = [row for row in csv.DictReader(file) if row["run"] == "seed0"]
    assert [int(row["epoch"]) for row in logged] == [row["epoch"] for row in history]
    for row, expected in zip(logged, history):
        for key in ("loss", "lr"):  # the main run trains on the validation images too: no scores
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-6), (row["epoch"], key)


OWN_DIGIT_SECTION = "## 12. Your own digit"


def run_own_digit_section(monkeypatch, own_digit=None):
    """The section 'Your own digit' alone, with the committed model as the notebook's ``model``,
    as nbval runs it: not in Colab, nobody to draw. Returns its namespace and what it printed."""
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    start = next(index for index, cell in enumerate(cells) if cell.source.startswith(OWN_DIGIT_SECTION))
    assert start == len(cells) - 4, "the section is the notebook's last: a markdown cell and three code cells"
    if own_digit is None:
        monkeypatch.delenv("ADDER_OWN_DIGIT", raising=False)
    else:
        monkeypatch.setenv("ADDER_OWN_DIGIT", str(own_digit))
    namespace = {"__name__": "__notebook__", "os": os, "plt": plt, "au": au,
                 "model": au.load_checkpoint(REPO / "training_logs" / "model.pt")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for index, cell in enumerate(cells[start:], start):
            if cell.cell_type == "code":
                exec(compile(cell.source, f"<notebook code cell {index}>", "exec"), namespace)
    plt.close("all")
    return namespace, printed.getvalue()


def test_own_digit_section_reads_the_projects_example_without_waiting_for_input(monkeypatch):
    namespace, printed = run_own_digit_section(monkeypatch)
    assert "No picture given" in printed and "ADDER_OWN_DIGIT" in printed  # it says how to give one
    assert printed.strip().endswith("7 + 3 = 10")
    assert namespace["own_digit"].shape == (28, 28) and namespace["own_digit"].dtype == torch.uint8


def test_own_digit_section_reads_the_picture_that_adder_own_digit_names(monkeypatch, tmp_path, data_root):
    """A picture file: an MNIST test digit (a 2) enlarged, dark on white, off-centre, as a PNG."""
    from PIL import Image

    test_set = au.load_mnist(data_root, train=False, download=False)
    digit, image = int(test_set.targets[1]), test_set.data[1]
    page = Image.new("L", (400, 300), 255)
    page.paste(Image.fromarray(255 - image.numpy()).resize((180, 180), Image.BILINEAR), (200, 20))
    page.save(tmp_path / "digit.png")
    _, printed = run_own_digit_section(monkeypatch, tmp_path / "digit.png")
    assert "No picture given" not in printed
    assert printed.strip() == f"{digit} + 3 = {digit + 3}"
