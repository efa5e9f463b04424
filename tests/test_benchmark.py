"""The training-speed benchmark runs end to end in its short mode and writes complete results.

Nothing here is timed or compared with a speed: a test machine's speed proves nothing.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

import adder_utils as au

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every row the benchmark knows; --short skips the torch.compile ones and says so, and a
# machine without CUDA (or without native bf16) skips the rows that need it.
ALL_ROWS = {"reference", "device", "device_compile", "device_compile_bf16", "notebook_cpu", "notebook_gpu",
            "notebook_gpu_cudagraphs"}
COMPILE_ROWS = {"device_compile", "device_compile_bf16", "notebook_gpu", "notebook_gpu_cudagraphs"}
ROW_FIELDS = {
    "name", "images_per_second", "x_reference", "epoch_seconds", "warmup_seconds",
    "first_step_seconds", "model_gflops_per_second", "mfu_vs_fp32_matmul", "mfu_vs_bf16_matmul",
    "time_to_target",
}


def test_short_benchmark_writes_results(tmp_path):
    completed = subprocess.run(
        [sys.executable, "benchmarks/train_speed.py", "--short", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    device_type = "cuda" if "Benchmarking on CUDA" in completed.stdout else "cpu"
    report = (tmp_path / f"results_{device_type}_short.md").read_text()
    results = json.loads((tmp_path / f"results_{device_type}_short.json").read_text())

    assert results["short"] is True and results["partial"] is False
    assert results["failed"] == []
    measured = {row["key"] for row in results["rows"]}
    skipped = {row["key"] for row in results["skipped"]}
    assert measured | skipped == ALL_ROWS and not measured & skipped
    assert skipped == COMPILE_ROWS
    bf16_native = au.supports_bf16(torch.device(device_type))
    for row in results["rows"]:  # bf16 autocast exactly where bf16 is native, as in the notebook
        assert row["autocast"] == (bf16_native and row["key"] == "notebook_cpu")

    for row in results["rows"]:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["images_per_second"] > 0
        assert row["epoch_seconds"] > 0
        assert row["warmup_seconds"] > 0
        assert row["mfu_vs_fp32_matmul"] > 0
        assert (row["mfu_vs_bf16_matmul"] is not None) == row["autocast"]
        assert row["name"] in report
        outcome = row["time_to_target"]
        assert outcome["checks"], "the time-to-target run never validated"
        assert outcome["reached"] == (outcome["seconds"] is not None)
    assert next(row for row in results["rows"] if row["key"] == "reference")["x_reference"] == 1.0

    # Where the time goes: the notebook's recipes are profiled, the other rows not.
    assert "Where the time goes" in report
    for row in results["rows"]:
        profile = row["profile"]
        assert (profile is not None) == (row["key"] in {"notebook_cpu", "notebook_gpu", "notebook_gpu_cudagraphs"})
        if profile is None:
            continue
        assert profile["steps"] == results["settings"]["profiled_steps"]
        assert profile["wall_ms_per_step"] > 0 and profile["profiled_wall_ms_per_step"] > 0
        assert profile["top_host_ops"] and all(op["self_ms_per_step"] >= 0 for op in profile["top_host_ops"])
        on_gpu = device_type == "cuda"
        assert (profile["device_busy_ms_per_step"] is not None) == on_gpu
        assert bool(profile["top_device_ops"]) == on_gpu
        assert f"**{row['name']}**" in report

    assert results["matmul"]["fp32_gflops_per_second"] > 0
    assert results["matmul"]["bf16_gflops_per_second"] > 0
    flops = results["flop_counting"]
    assert flops["training_flops_per_image"] > flops["forward_flops_per_image"] > 0
    assert "FlopCounterMode" in flops["method"]

    environment = results["environment"]
    for key in ("cpu", "cpu_threads", "device_name", "torch", "torchvision"):
        assert environment[key], key
    assert results["targets"] and all(isinstance(item["met"], bool) for item in results["targets"])
    assert "Short mode" in report and "Targets" in report and "Partial" not in report
    for row in results["skipped"]:
        assert f"| {row['name']} | skipped: {row['reason']} |" in report
