"""Print the table that opens candidates.md: every tuning candidate's settings, parameters,
and the mean ± sample standard deviation over seeds of its final (epoch 20) validation digit
accuracy. (The notes below that table in candidates.md are written by hand.)

Run from the repository root: python training_logs/tuning/summarize.py
"""

import re
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
runs = defaultdict(list)
settings = {}
for log in sorted(HERE.glob("*_seed*.log")):
    lines = log.read_text().splitlines()
    header = re.match(r"(\S+) seed (\d+): (\d+) parameters; (.*)", lines[0])
    if not header:
        continue
    name, seed, parameters, recipe = header.groups()
    finals = [re.search(r"epoch +(\d+) .* val digit ([\d.]+) sum ([\d.]+)", line) for line in lines[1:]]
    finals = [match for match in finals if match]
    epochs = int(re.search(r"epochs=(\d+)", recipe).group(1))
    if not finals or int(finals[-1].group(1)) != epochs:
        continue  # unfinished run
    runs[name].append((int(seed), float(finals[-1].group(2)), float(finals[-1].group(3))))
    settings[name] = (int(parameters), recipe)

rows = ["| candidate | parameters | settings | seeds | final val digit acc, mean ± std (%) | per seed |",
        "| --- | ---: | --- | ---: | ---: | --- |"]
for name, results in sorted(runs.items(), key=lambda item: -statistics.mean(r[1] for r in item[1])):
    accuracies = [digit for _, digit, _ in sorted(results)]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    parameters, recipe = settings[name]
    rows.append(f"| {name} | {parameters:,} | {recipe} | {len(accuracies)} | "
                f"{statistics.mean(accuracies):.3f} ± {spread:.3f} | {', '.join(f'{a:.2f}' for a in accuracies)} |")
print("\n".join(rows))
