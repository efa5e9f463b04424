"""Write tuning/logs/candidates.md: every tuning candidate's validation digit accuracy.

Reads the logs tune.py wrote (tuning/logs/NAME_seedSEED.log). A candidate is a log
name, or a log name and one of the extras tune.py scores at the end (``+tta``, ``+ema0.998``,
...). Each row gives the mean ± sample standard deviation over seeds of the final validation
digit accuracy, each seed's value, and, for candidates run with the same seeds as the
baseline, the mean ± std of their seed-by-seed difference from it. The baseline is the
candidate trained with the recipe, adder_utils.RECIPE with any ADDER_<KEY> overrides, as
tune.py reads it, scored with test-time shifts if the recipe has them; the settings column
names what differs from that recipe.

Run from the repository root: python tuning/summarize.py. With ``--logs DIR`` it reads the
logs in DIR instead and writes DIR/candidates.md: how a sweep's GPU runs (tuning/sweep.py) are
compared among themselves, since a GPU run draws other random numbers than a CPU run.
"""

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import adder_utils as au  # noqa: E402

LOGS = REPO / "tuning" / "logs"
RECIPE = au.settings_from_env(au.RECIPE)
# Settings added after some logs were written, with the value those logs trained with.
SETTINGS_ADDED_LATER = {"MAX_SCALE": 0.0, "ELASTIC": 0.0}
# Settings that do not change what tune.py trains: it scores both ways (the "+tta" rows).
NOT_TRAINED = {"TEST_TIME_SHIFTS"}


def read_log(path):
    """(name, seed, parameters, settings, {candidate: final validation digit accuracy}, device)
    or None while unfinished. The device is named in the settings by tune.py, but for the CPU."""
    lines = path.read_text().splitlines()
    header = re.match(r"(\S+) seed (\d+): (\d+) parameters; (.*)", lines[0]) if lines else None
    if not header:
        return None
    name, seed, parameters, settings = header.groups()
    device = re.search(r" DEVICE=(\S+)", settings)
    device = device.group(1) if device else "cpu"
    settings = re.sub(r" DEVICE=\S+", "", settings)  # one device per folder: main says which
    epochs = [re.search(r"^epoch +(\d+) .* val digit ([\d.]+)", line) for line in lines[1:]]
    epochs = [match for match in epochs if match]
    planned = re.search(r"(?:epochs|EPOCHS)=(\d+)", settings)
    if not epochs or int(epochs[-1].group(1)) != int(planned.group(1)):
        return None  # unfinished
    if any(line.startswith("result unseen pairs:") for line in lines):
        # A run that never saw some pairs (--held-out, --seen-set): what matters is those pairs.
        return name, int(seed), int(parameters), settings, held_out_results(lines), device
    results = {name: float(epochs[-1].group(2))}
    for line in lines:
        extra = re.match(r"result (\S+) val digit ([\d.]+)", line)
        if extra and extra.group(1) != "plain":
            results[f"{name} +{extra.group(1).removeprefix('plain+')}"] = float(extra.group(2))
    return name, int(seed), int(parameters), settings, results, device


def held_out_results(lines):
    """A held-out run's final validation digit and sum accuracy, its sum accuracy given a correct
    digit on the unseen and the seen pairs (with how many validation pairs), and its training
    seconds (the epochs' sum)."""
    final = re.search(r"val digit ([\d.]+) sum ([\d.]+) .* ([\d.]+)s$",
                      [line for line in lines if line.startswith("epoch")][-1])
    results = {"digit": final.group(1), "sum": final.group(2),
               "seconds": sum(float(re.search(r"([\d.]+)s$", line).group(1))
                              for line in lines if line.startswith("epoch"))}
    for which in ("unseen", "seen"):
        pairs = next((re.search(r"(\d+) validation pairs, sum given a correct digit ([\d.]+)", line)
                      for line in lines if line.startswith(f"result {which} pairs:")), None)
        results[which] = f"{pairs.group(2)} ({int(pairs.group(1)):,})" if pairs else ""
    return results


def changed_settings(settings: str) -> str:
    """A tune.py log's settings, only those that differ from the recipe; older logs' as written."""
    if "STAGES=" not in settings:
        return settings
    logged = {key: str(value) for key, value in SETTINGS_ADDED_LATER.items()}
    logged.update(re.findall(r"(\w+)=(\(.*?\)\)|\S+)", settings))
    trained = au.settings_from_env(RECIPE, prefix="", environ=logged)  # read as ADDER_* overrides are
    changed = [f"{key}={value}" for key, value in trained.items()
               if key not in NOT_TRAINED and value != RECIPE[key]]
    changed += [f"{key}={value}" for key, value in logged.items() if key not in RECIPE]  # tune.py's flags
    return ", ".join(changed) or "the recipe"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, default=LOGS, help="the folder of tune.py's logs")
    logs = parser.parse_args().logs
    runs = defaultdict(dict)  # candidate -> {seed: accuracy}
    described, held_out_rows, devices = {}, [], set()
    for path in sorted(logs.glob("*_seed*.log")):
        log = read_log(path)
        if log is None:
            continue
        name, seed, parameters, settings, results, device = log
        devices.add(device)
        if "unseen" in results:
            held_out_rows.append(f"| {name} | {seed} | {parameters:,} | {changed_settings(settings)} | "
                                 f"{results['digit']} | {results['sum']} | {results['unseen']} | "
                                 f"{results['seen']} | {results['seconds']:.0f} |")
            continue
        for candidate, accuracy in results.items():
            runs[candidate][seed] = accuracy
            described[candidate] = (parameters, changed_settings(settings))

    if len(devices) > 1:
        raise SystemExit(f"{logs} holds runs on several devices ({', '.join(sorted(devices))}): "
                         "their random numbers differ, so they are not compared seed by seed")
    recipe_runs = [name for name, (_, settings) in described.items() if settings == "the recipe" and "+" not in name]
    if len(recipe_runs) > 1:
        raise SystemExit(f"several candidates are the recipe: {', '.join(recipe_runs)}")
    # The recipe's run, read as the recipe's predict reads it: with test-time shifts if it has them.
    baseline_name = recipe_runs[0] + (" +tta" if RECIPE["TEST_TIME_SHIFTS"] else "") if recipe_runs else None
    baseline = runs.get(baseline_name, {})
    rows = ["| candidate | parameters | settings (what differs from the recipe) | seeds | "
            f"val digit %, mean ± std | per seed | paired difference from `{baseline_name}` |",
            "| --- | ---: | --- | ---: | ---: | --- | ---: |"]
    for candidate, by_seed in sorted(runs.items(), key=lambda item: -statistics.mean(item[1].values())):
        values = [by_seed[seed] for seed in sorted(by_seed)]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        paired = ""
        if candidate != baseline_name and len(by_seed) > 1 and set(by_seed) <= set(baseline):
            differences = [by_seed[seed] - baseline[seed] for seed in sorted(by_seed)]
            paired = f"{statistics.mean(differences):+.3f} ± {statistics.stdev(differences):.3f}"
        parameters, settings = described[candidate]
        rows.append(f"| {candidate} | {parameters:,} | {settings} | {len(values)} | "
                    f"{statistics.mean(values):.3f}{spread} | {', '.join(f'{v:.2f}' for v in values)} | {paired} |")
    overrides = [f"{key}={value}" for key, value in RECIPE.items() if value != au.RECIPE[key]]
    recipe = "adder_utils.RECIPE" + (f" with {', '.join(overrides)}" if overrides else "")
    where = "a CUDA GPU" if devices == {"cuda"} else "the CPU, one core each"
    text = (
        "# Tuning candidates: validation digit accuracy\n\n"
        "Written by `tuning/summarize.py` from the logs beside it (`tuning/README.md` says how they were "
        "made and what was chosen). The 5,000 validation images come from the training set; the test set "
        f"is never loaded. The recipe here is {recipe}; the runs trained on {where}.\n\n" + "\n".join(rows) + "\n"
    )
    if held_out_rows:
        text += ("\nRuns that never saw some pairs (`tune.py --held-out`: the recipe's held-out pairs; "
                 "`--seen-set`: all but 19), scored on the validation images: the final digit and sum "
                 "accuracy (each image with its fixed addend), and the sum accuracy given a correct digit "
                 "over every validation image of each unseen (seen) pair's digit paired with that pair's "
                 "addend, with how many such pairs; the training seconds are the 20 epochs' sum on "
                 f"{where}:\n\n| run | seed | parameters | settings | val digit % | val sum % | "
                 "unseen pairs: sum given a correct digit % | seen pairs: sum given a correct digit % | "
                 "training seconds |\n| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n"
                 + "\n".join(held_out_rows) + "\n")
    (logs / "candidates.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
