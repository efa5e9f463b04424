"""What only a CUDA GPU reaches: a training step recorded as a CUDA graph, the notebook's GPU
defaults, predict on CUDA, resume on CUDA.

Skipped where there is no CUDA GPU (CI, most laptops); `.ci/gpu_run` runs them on one. The
notebook runs in its short mode (conftest.py), but with the device's defaults: ADDER_COMPILE
is unset, so on a GPU torch.compile is on, the training step is a CUDA graph, and autocast
is bfloat16 where bf16 is native and float16 elsewhere.

ADDER_GPU_TESTS_ON_CPU=1 runs them on the CPU instead, with the CPU's defaults: that is how
`.ci/gpu_run --short` rehearses them, so that their code has run before a GPU is at hand.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import adder_utils as au

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("ADDER_GPU_TESTS_ON_CPU") == "1":
    DEVICE = torch.device("cpu")
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "MNIST_Adder.ipynb"
CHECKPOINT = REPO / "training_logs" / "model.pt"


def execute_notebook(output_dir: Path, **settings):
    """Run the notebook from the repository root in short mode with the GPU defaults, writing
    into ``output_dir``; ``settings`` are extra ADDER_* variables (STOP_AFTER_EPOCH=1, ...)."""
    variables = {"ADDER_OUTPUT_DIR": str(output_dir), "ADDER_SEEDS": "1",
                 **{f"ADDER_{name}": str(value) for name, value in settings.items()}}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("ADDER_COMPILE", raising=False)  # the short mode turns it off; the GPU default is on
        if DEVICE.type == "cpu":
            patch.setenv("ADDER_ALLOW_CPU", "1")
        for name, value in variables.items():
            patch.setenv(name, value)
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO)}})
        client.execute()
    return notebook


def final_results(output_dir: Path) -> dict:
    """What a run wrote that must not depend on how it was scheduled (timings left out)."""
    with open(output_dir / "history.csv") as file:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]
    return {
        "history": history,
        **{name: json.loads((output_dir / f"{name}.json").read_text()) for name in ("test_metrics", "seeds", "held_out")},
    }


@pytest.fixture
def cudnn_as_the_notebook_sets_it():
    """Deterministic kernels and no TF32 in fp32 convolutions, as the notebook's device cell
    asks: otherwise two runs of the same fp32 step may round differently."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = saved


def cuda_training(fused, dtype=None, seed=0, steps=6):
    """The notebook's model and training step on DEVICE; float16 brings a GradScaler."""
    torch.manual_seed(seed)
    model = au.AdderNet().to(DEVICE)
    optimizer, scheduler = au.sgd_one_cycle(model.parameters(), au.RECIPE, total_steps=steps, fused=fused)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=dtype == torch.float16)

    def step(images, addends, digits, sums):
        images = au.augment(images, generator)
        with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            digit_logits, sum_logits = model(images, addends, digits)  # the true digits, as the notebook
            loss = F.cross_entropy(digit_logits, digits, label_smoothing=0.1) + F.cross_entropy(sum_logits, sums)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return model, optimizer, scheduler, generator, scaler, step


def batches_on_device(data_root, count=6, size=128):
    test_set = au.load_mnist(data_root, train=False, download=False)
    images = au.normalize_images(test_set.data[: count * size]).to(DEVICE)
    digits = test_set.targets[: count * size].to(DEVICE)
    addends = au.seeded_addends(count * size, seed=0).to(DEVICE)
    return [(images[i:i + size], addends[i:i + size], digits[i:i + size], digits[i:i + size] + addends[i:i + size])
            for i in range(0, count * size, size)]


@pytest.mark.usefixtures("cudnn_as_the_notebook_sets_it")
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "float16 and a GradScaler"])
def test_captured_step_replays_what_the_eager_step_computes(data_root, dtype):
    """The same step, eager and replayed from a CUDA graph: the same losses and weights, to
    rounding, and fresh augmentation draws from the registered generator at every replay."""
    batches = batches_on_device(data_root)
    eager_model, _, eager_scheduler, _, _, eager_step = cuda_training(fused=True, dtype=dtype)
    model, optimizer, scheduler, generator, scaler, step = cuda_training(fused=True, dtype=dtype)
    captured = au.CapturedStep(step, batches[0], model, optimizer, generators=[generator], scaler=scaler)
    assert (captured.graph is not None) == (DEVICE.type == "cuda")
    for batch in batches:
        eager_loss, loss = float(eager_step(*batch)), float(captured(*batch))
        eager_scheduler.step()
        scheduler.step()
        assert loss == pytest.approx(eager_loss, rel=1e-4), (loss, eager_loss)
    largest = max((value.double() - eager_model.state_dict()[name].double()).abs().max().item()
                  for name, value in model.state_dict().items())
    print(f"largest difference of a weight after {len(batches)} steps: {largest:.3g}")
    assert largest < 1e-4


@pytest.mark.usefixtures("cudnn_as_the_notebook_sets_it")
def test_captured_step_computes_the_plain_steps_updates_on_cuda(data_root):
    """Against the plain step of the notebook's loop (foreach SGD, the learning rate a Python number)."""
    batches = batches_on_device(data_root)
    plain_model, _, plain_scheduler, _, _, plain_step = cuda_training(fused=False)
    model, optimizer, scheduler, generator, _, step = cuda_training(fused=True)
    captured = au.CapturedStep(step, batches[0], model, optimizer, generators=[generator])
    for batch in batches:
        assert float(captured(*batch)) == pytest.approx(float(plain_step(*batch)), rel=1e-4)
        plain_scheduler.step()
        scheduler.step()
    for name, value in model.state_dict().items():
        assert torch.allclose(value.float(), plain_model.state_dict()[name].float(), rtol=1e-4, atol=1e-5), name


def test_predict_on_cuda_agrees_with_the_cpu_on_the_committed_checkpoint(data_root):
    test_set = au.load_mnist(data_root, train=False, download=False)
    addends = au.seeded_addends(len(test_set.data), seed=2)
    cpu_model = au.load_checkpoint(CHECKPOINT)
    cuda_model = au.load_checkpoint(CHECKPOINT, device=DEVICE)
    cpu_digits, cpu_sums = au.predict(cpu_model, test_set.data, addends)

    # In full fp32 on both devices the logits differ only by summation order: every answer agrees.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fp32_digits, fp32_sums = au.predict(cuda_model, test_set.data, addends)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert torch.equal(fp32_digits, cpu_digits) and torch.equal(fp32_sums, cpu_sums)

    # With the defaults (TF32 convolutions from Ampere on) only near-ties may change.
    cuda_digits, cuda_sums = au.predict(cuda_model, test_set.data, addends)
    changed = torch.nonzero((cuda_digits != cpu_digits) | (cuda_sums != cpu_sums)).flatten()
    with torch.no_grad():
        images = au.normalize_images(test_set.data)
        cpu_logits, _ = cpu_model(images, addends)
        cuda_logits, _ = cuda_model(images.to(DEVICE), addends.to(DEVICE))
        # What predict takes the argmax of: the logits, or the test-time shifts' scores.
        scores = au.digit_scores_over_shifts(cpu_model, images, addends) if cpu_model.test_time_shifts else cpu_logits
    top_two = scores.topk(2, dim=1).values
    gaps = (top_two[:, 0] - top_two[:, 1])[changed].tolist()
    largest = (cuda_logits.cpu() - cpu_logits).abs().max().item()
    print(f"TF32 default: digit logits differ from the CPU's by up to {largest:.3g}; {len(changed)} of "
          f"{len(test_set.data)} answers differ, with top-two score gaps on the CPU of {gaps}")
    assert all(gap < 0.05 for gap in gaps), gaps
    assert len(changed) <= 5, changed.tolist()


FALLBACK_MESSAGES = (  # what the module prints where a fast path cannot run and it goes on the plain way
    "worker processes failed", "fused SGD with the learning rate in a tensor is not available",
    "float16 training does not work", "Recording the training step as a CUDA graph failed",
    "Replaying the recorded training step failed", "training step by step",
)


def this_boot() -> str:
    """Names this boot of this machine (Linux), so that a run is reused only where it was made."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return boot_id.read_text().strip() if boot_id.exists() else ""


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The notebook in short mode, uninterrupted. `.ci/gpu_run` runs the resume test in a later
    pytest process than the smoke check that made this run, so it names a folder to keep it in
    (ADDER_GPU_UNINTERRUPTED_DIR): a run finished there on this boot of this machine is reused,
    not made again. Only on the same machine: its compile cache holds the kernels the run used,
    so the resumed run computes with the same ones, bit for bit."""
    kept = os.environ.get("ADDER_GPU_UNINTERRUPTED_DIR")
    output_dir = Path(kept) if kept else tmp_path_factory.mktemp("gpu-uninterrupted")
    finished = output_dir / "finished_on_boot.txt"  # written last, so it names only a whole run
    if finished.exists() and finished.read_text() == this_boot():
        print(f"reusing the uninterrupted run in {output_dir}")
        return output_dir
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    notebook = execute_notebook(output_dir)
    (output_dir / "printed.txt").write_text("".join(  # what it printed, but the module's source it shows
        output.get("text", "") for cell in notebook.cells
        if cell.cell_type == "code" and "inspect.getsource" not in cell.source for output in cell.outputs))
    finished.write_text(this_boot())
    return output_dir


def test_notebook_short_mode_on_cuda_with_gpu_defaults(uninterrupted_run):
    printed = (uninterrupted_run / "printed.txt").read_text()
    fell_back = [message for message in FALLBACK_MESSAGES if message in printed]
    if DEVICE.type == "cpu":  # a CPU has no CUDA graph to record; the study's workers it has
        fell_back = [message for message in fell_back if message == "worker processes failed"]
    assert not fell_back, printed
    record = json.loads((uninterrupted_run / "run_record.json").read_text())
    assert record["environment"]["device_type"] == DEVICE.type
    assert record["cpu_run"] is (DEVICE.type == "cpu")
    assert record["torch_compile"] is (DEVICE.type == "cuda")
    dtype = au.autocast_dtype(DEVICE)
    assert record["autocast"] == (str(dtype).removeprefix("torch.") if dtype else None)
    assert record["cuda_graph"] is (DEVICE.type == "cuda")
    assert (uninterrupted_run / "model.pt").exists()


def test_resume_on_cuda_ends_exactly_like_an_uninterrupted_run(uninterrupted_run, tmp_path):
    with pytest.raises(CellExecutionError, match="Stopped after epoch 1"):
        execute_notebook(tmp_path, STOP_AFTER_EPOCH=1)
    execute_notebook(tmp_path, RESUME=1)

    original = au.load_checkpoint(uninterrupted_run / "model.pt").state_dict()
    resumed = au.load_checkpoint(tmp_path / "model.pt").state_dict()
    # Measured, so that a failure says how far apart the two runs ended.
    largest = {name: (original[name].double() - resumed[name].double()).abs().max().item() for name in original}
    worst = max(largest, key=largest.get)
    assert all(value == 0 for value in largest.values()), (
        f"resumed weights differ from the uninterrupted run's: largest {largest[worst]:.3g} in {worst}"
    )
    assert final_results(tmp_path) == final_results(uninterrupted_run)
