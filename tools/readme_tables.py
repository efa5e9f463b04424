"""Write the README's result tables from what the reported run logged in training_logs/.

    python tools/readme_tables.py           # rewrite the tables in README.md
    python tools/readme_tables.py --check   # exit 1 if README.md's tables are not what this writes

Each table sits in README.md between two markers, ``<!-- begin: NAME -->`` and
``<!-- end: NAME -->``; everything between them is rewritten, everything else is left alone.
tests/test_readme.py fails when the README's tables differ from what this script writes.
"""

import argparse
import csv
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LOGS = REPO / "training_logs"

RESULT_ROWS = (  # (label, key in test_metrics.json and seeds.json)
    ("digit accuracy", "digit_acc"),
    ("sum accuracy", "sum_acc"),
    ("joint accuracy (both right)", "joint_acc"),
    ("sum accuracy given a correct digit", "sum_acc_given_correct_digit"),
    ("consistency (sum = digit + addend)", "consistency"),
    ("digit invariance (same digit for all 10 addends)", "digit_invariance"),
)


def read_logs(logs: Path) -> dict:
    def read_json(name):
        return json.loads((logs / name).read_text())

    with open(logs / "history.csv") as file:
        history = list(csv.DictReader(file))
    return {"record": read_json("run_record.json"), "metrics": read_json("test_metrics.json"),
            "seeds": read_json("seeds.json"), "held_out": read_json("held_out.json"),
            "pairs_needed": read_json("pairs_needed.json"), "history": history,
            # An evaluation of the committed model, kept beside the script that made it.
            "other_writers": json.loads((REPO / "tools" / "other_writers.json").read_text())}


def percent(value, digits=2):
    return f"{value:.{digits}f} %"


def machine(record) -> str:
    environment = record["environment"]
    if environment["device_type"] == "cuda":
        cudnn = environment["cudnn"]  # e.g. 91900 for 9.19.0
        cudnn = f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}"
        device = f"GPU: {environment['device_name']} (CUDA {environment['cuda']}, cuDNN {cudnn})"
    else:
        device = f"CPU: {environment['device_name']}, {environment['cpu_threads']} threads"
    speed = [name for name, used in ((f"{record['autocast']} autocast", record["autocast"]),
                                     ("torch.compile", record["torch_compile"]),
                                     ("the training step as a CUDA graph", record["cuda_graph"])) if used]
    return (f"{device}; Python {environment['python']}, torch {environment['torch']}, torchvision "
            f"{environment['torchvision']}" + (f"; {', '.join(speed)}" if speed else ""))


def results_table(logs) -> list[str]:
    record, metrics, summary = logs["record"], logs["metrics"], logs["seeds"]["summary"]
    runs = summary["digit_acc"]["runs"]
    settings = record["settings"]
    lines = [
        f"Measured on {machine(record)}. {record['parameters']:,} parameters, {settings['EPOCHS']} epochs, "
        f"trained on {record['train_images']:,} images (the validation split's too); "
        f"every test image with every addend: "
        f"{metrics['pairs']:,} pairs.",
        "",
        f"| test metric | main model (seed {record['seeds'][0]}) | "
        + ("mean ± std over {runs} seeds | min | max |".format(runs=runs) if runs > 1 else "|"),
        "| --- | ---: |" + (" ---: | ---: | ---: |" if runs > 1 else ""),
    ]
    for label, key in RESULT_ROWS:
        row = f"| {label} | {percent(metrics[key])} |"
        if runs > 1:
            stats = summary[key]
            row += f" {stats['mean']:.3f} ± {stats['std']:.3f} % | {percent(stats['min'])} | {percent(stats['max'])} |"
        lines.append(row)
    lines.append(f"| oracle adder (digit classifier + exact arithmetic) | {percent(metrics['oracle_sum_acc'])} |"
                 + (" | | |" if runs > 1 else ""))
    unseen = logs["held_out"]["unseen"]
    held = len(logs["held_out"]["held_out_pairs"])
    # "adds" only where the run bears it out: at least 99.9% of the unseen sums right given the digit.
    verb = "adds" if unseen["sum_acc_given_correct_digit"] >= 99.9 else "is asked for"
    lines += ["", f"The held-out model, trained on {100 - held} of the 100 (digit, addend) pairs, {verb} the other "
              f"{held}: {percent(unseen['sum_acc_given_correct_digit'])} of their sums are right when it reads the "
              f"digit right ({unseen['samples']:,} test pairs; its digit accuracy on them: "
              f"{percent(unseen['digit_acc'])})."]
    return lines


def seeds_table(logs) -> list[str]:
    lines = ["| seed | test digit | test sum | test joint |",
             "| ---: | ---: | ---: | ---: |"]
    for run in logs["seeds"]["runs"]:
        lines.append(f"| {run['seed']} | {percent(run['digit_acc'])} | {percent(run['sum_acc'])} | "
                     f"{percent(run['joint_acc'])} |")
    return lines


def training_log_table(logs) -> list[str]:
    """The validation run's rows (the learning curve), then how long the main run took."""
    record = logs["record"]
    rows = [row for row in logs["history"] if row["run"] == "validation"]
    lines = ["| epoch | loss | val digit | val sum | val joint | lr | seconds |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['epoch']} | {float(row['loss']):.4f} | {float(row['digit_acc']):.2f} | "
                     f"{float(row['sum_acc']):.2f} | {float(row['joint_acc']):.2f} | {float(row['lr']):.2e} | "
                     f"{float(row['seconds']):.2f} |")
    seconds = record["seconds_per_epoch"]  # the main run's
    # With a CUDA graph the compilation happens in the set-up, before the first epoch.
    setup = (f", after {record['main_run_setup_seconds']:.1f} s of set-up (compilation, warm-up steps and "
             "the CUDA graph's recording)") if record["cuda_graph"] else ""
    compiled = " (it holds torch.compile's compilation)" if record["torch_compile"] and not setup else ""
    later = sorted({f"{value:.2f}" for value in (min(seconds[1:], default=0), max(seconds[1:], default=0))})
    lines += ["", f"The main run (seed {record['seeds'][0]}, {record['train_images']:,} images) trained "
              f"{sum(seconds):.1f} s{setup}: {seconds[0]:.2f} s for the first epoch{compiled}, "
              f"then {' to '.join(later)} s an epoch. The "
              f"whole notebook ({record['settings']['SEEDS']} seeds, the validation run, the held-out runs, the "
              f"learning-rate test and the sum-head study) {whole_notebook_time(record)}."]
    return lines


def whole_notebook_time(record) -> str:
    """How long the notebook ran, or, for a run resumed after an interruption, how long the part
    that finished it ran (the epochs' seconds above are those of every part)."""
    if record.get("resumed"):
        return (f"ran in parts, each resuming the one before (`RESUME`); the last took "
                f"{record['notebook_seconds']:.0f} s, and `training_logs/gpu_run/summary.txt` times each")
    return f"took {record['notebook_seconds']:.0f} s"


def held_out_table(logs) -> list[str]:
    held_out = logs["held_out"]
    pairs = [tuple(pair) for pair in held_out["held_out_pairs"]]
    table = held_out["adder_table"]
    seen = [(d, a) for d in range(10) for a in range(10) if (d, a) not in pairs]
    named = (f"Held out: {', '.join(f'{d}+{a}' for d, a in pairs)}." if len(pairs) <= len(seen)
             else f"The only pairs seen in training: {', '.join(f'{d}+{a}' for d, a in seen)}.")
    lines = [named, "", "| pairs | test samples | digit accuracy | sum accuracy | sum accuracy given a correct digit |",
             "| --- | ---: | ---: | ---: | ---: |"]
    rows = [(f"the {100 - len(pairs)} seen in training", held_out["seen"]),
            (f"the {len(pairs)} held out", held_out["unseen"])]
    if "baseline" in held_out:  # the usual design beside it, on the same pairs and on all 100
        baseline = held_out["baseline"]
        rows += [(f"usual design: the {100 - len(pairs)} seen", baseline["seen"]),
                 (f"usual design: the {len(pairs)} held out", baseline["unseen"]),
                 ("usual design trained on all 100", {"samples": baseline["all_pairs_trained"]["pairs"],
                                                      **baseline["all_pairs_trained"]})]
    for label, result in rows:
        lines.append(f"| {label} | {result['samples']:,} | {percent(result['digit_acc'])} | "
                     f"{percent(result['sum_acc'])} | {percent(result['sum_acc_given_correct_digit'])} |")
    wrong = [(d, a) for d, a in pairs if table[d][a] != d + a]
    lines += ["", f"Its sum head, asked for the {len(pairs)} held-out pairs with the true digits' one-hot codes, "
              "answers "
              + (f"all {len(pairs)} right." if not wrong else
                 f"{len(pairs) - len(wrong)} right; wrong: " + ", ".join(f"{d}+{a} -> {table[d][a]}" for d, a in wrong) + ".")]
    return lines


def pairs_needed_table(logs) -> list[str]:
    study = logs["pairs_needed"]
    lines = ["| pairs held out | seen pairs connect every value | number-line head: unseen pairs right | "
             "one-hot class head: unseen pairs right |",
             "| ---: | ---: | ---: | ---: |"]
    for count in study["held_out_counts"]:
        rows = {head: [row for row in study["rows"] if row["held_out"] == count and row["head"] == head]
                for head in ("number-line head", "one-hot class head")}
        line_rows = rows["number-line head"]
        lines.append(f"| {count} | {sum(row['connected'] for row in line_rows)} of {len(line_rows)} sets | "
                     + " | ".join(", ".join(f"{row['unseen_acc']:.0f}" for row in rows[head]) + " %"
                                  for head in ("number-line head", "one-hot class head")) + " |")
    return lines


def other_writers_table(logs) -> list[str]:
    result = logs["other_writers"]
    accuracy = result["digit_accuracy_percent"]
    return [f"On {result['images']:,} digits by {result['writers']} other writers ({result['dataset']}: "
            f"{result['image_format']}), `{result['checkpoint']}` reads "
            f"**{percent(accuracy['to_mnist_format'])}** right through `au.to_mnist_format`, and "
            f"{percent(accuracy['naive_resize'])} with each whole image simply resized to 28x28. Measured on the CPU "
            f"({result['cpu']}, torch {result['torch']}) by `tools/other_writers.py`; nothing was tuned on them."]


TABLES = {
    "results": results_table,
    "seeds": seeds_table,
    "training-log": training_log_table,
    "held-out": held_out_table,
    "pairs-needed": pairs_needed_table,
    "other-writers": other_writers_table,
}


def render(readme: str, logs_dir: Path = LOGS) -> str:
    """``readme`` with every table block rewritten from the logs in ``logs_dir``."""
    logs = read_logs(logs_dir)
    for name, make_table in TABLES.items():
        pattern = re.compile(rf"(<!-- begin: {name} -->\n).*?(^<!-- end: {name} -->)", re.DOTALL | re.MULTILINE)
        if len(pattern.findall(readme)) != 1:
            raise ValueError(f"README.md needs one block '<!-- begin: {name} -->' ... '<!-- end: {name} -->'")
        table = "\n".join(make_table(logs)) + "\n"
        readme = pattern.sub(lambda match: match.group(1) + table + match.group(2), readme)
    return readme


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the tables are out of date")
    arguments = parser.parse_args()
    current = README.read_text()
    written = render(current)
    if arguments.check:
        if written != current:
            sys.exit("README.md's tables differ from training_logs/: run python tools/readme_tables.py")
        return
    README.write_text(written)


if __name__ == "__main__":
    main()
