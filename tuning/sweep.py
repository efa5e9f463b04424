"""Many tune.py runs within a time budget, one after another, every candidate with the same seeds.

    python tuning/sweep.py --budget 5400 --seeds 5 --logs tuning/logs CANDIDATES_FILE

The candidates file has one candidate a line: a name, then ``KEY=VALUE`` overrides of the recipe
(passed to tune.py as ``ADDER_<KEY>``) and tune.py flags (``--residual``); ``#`` starts a comment.
A candidate with no overrides and no flags is the recipe, which the others are compared with:

    scale10
    lr025     MAX_LR=0.25
    batch384  BATCH_SIZE=384 MAX_LR=0.3

The runs go seed by seed (every candidate's seed 0, then every candidate's seed 1, ...), so that
a budget cut leaves every candidate with the same seeds. A run whose log is finished is skipped,
so a second call goes on where the first stopped. A run starts only when the budget left holds
the longest run so far with a margin; the first always starts. It exits with 3 when the budget
ran out first (run it again to go on), 1 when a run failed, 0 when every run is done. Then
``python tuning/summarize.py`` (``--logs DIR`` for another folder) writes the folder's
candidates.md.

On a 2-core CPU two sweeps run side by side, one thread each (``OMP_NUM_THREADS=1``), each file
with the recipe's line and candidates of its own: about 8 minutes a run. Run the recipe's seeds
first: once their logs are finished both sweeps skip them, where two unfinished ones would be run
by both into the same logs. On an H200 a run takes under 30 s (the step recorded as a CUDA
graph); a GPU's runs draw other random numbers, so they go in a folder of their own (``--logs
tuning/logs/gpu``).
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARGIN = 1.25  # a run may take this much longer than the longest so far
UNFINISHED = 3  # the exit status when the budget ran out before the last run


def read_candidates(path: Path) -> list[tuple[str, dict, list[str]]]:
    """(name, {KEY: VALUE}, [flags]) for each candidate line of ``path``."""
    candidates = []
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        name, overrides, flags = words[0], {}, []
        for word in words[1:]:
            if word.startswith("--"):
                flags.append(word)
            elif "=" in word:
                key, value = word.split("=", 1)
                overrides[key] = value
            else:
                raise ValueError(f"{path}: {word!r} in candidate {name!r} is neither KEY=VALUE nor a --flag")
        candidates.append((name, overrides, flags))
    names = [name for name, _, _ in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: candidate names repeat: {names}")
    return candidates


def finished(log: Path) -> bool:
    """tune.py's log is finished once it has its end scores."""
    return log.exists() and "result plain val digit" in log.read_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", type=Path)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 to SEEDS-1 for every candidate")
    parser.add_argument("--budget", type=float, required=True, help="seconds this call may take")
    parser.add_argument("--logs", type=Path, required=True, help="the folder for the runs' logs")
    arguments = parser.parse_args()
    started = time.monotonic()
    candidates = read_candidates(arguments.candidates)
    arguments.logs.mkdir(parents=True, exist_ok=True)
    longest, ran, skipped, failed = 0.0, 0, 0, False
    for seed in range(arguments.seeds):
        for name, overrides, flags in candidates:
            log = arguments.logs / f"{name}_seed{seed}.log"
            if finished(log):
                skipped += 1
                continue
            left = arguments.budget - (time.monotonic() - started)
            if ran and left < longest * MARGIN:
                print(f"stopping: {left:.0f} s left, and a run has taken up to {longest:.0f} s; "
                      f"{ran} runs done in this call, {skipped} in earlier ones. Run again to go on.")
                return UNFINISHED
            environment = {**os.environ, **{f"ADDER_{key}": value for key, value in overrides.items()}}
            began = time.monotonic()
            with open(log, "w") as output:
                status = subprocess.run([sys.executable, str(REPO / "tuning" / "tune.py"), name, str(seed), *flags],
                                        stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=REPO).returncode
            seconds = time.monotonic() - began
            longest, ran, failed = max(longest, seconds), ran + 1, failed or status != 0
            print(f"{name} seed {seed}: {'done' if status == 0 else f'FAILED (exit {status}), see {log}'} "
                  f"in {seconds:.1f} s", flush=True)
    print(f"every run of {len(candidates)} candidates x {arguments.seeds} seeds tried: {ran} in this call, "
          f"{skipped} finished in earlier ones" + ("; some failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
