"""
The short regression run: every benchmark of this folder once, scaled
down, printing the report (figures and ratios) each one gives.  For a before/after of a change
to a hot path (run it on both commits); the full runs and the figures they
give are in bench/README.md.

    python bench/quick.py                 # under 2 minutes
    python bench/quick.py --only server,client

One round and small counts make each ratio noisier than the full run's
(±10-20 % on this 2-core machine): a change shows as a move larger than
that, and a smaller one needs the full run, or the instruction counts of
bench/README.md ("Counting instructions").  Not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> the script and its arguments for a short run.
RUNS = {
    "server": ["server.py", "--rounds", "1", "--scale", "1.0"],
    "tls": ["tls.py", "--rounds", "1", "--scale", "1.0"],
    "durable": ["durable.py", "--rounds", "1", "--scale", "1.0"],
    "client": ["client.py", "--rounds", "1", "--messages", "2000"],
    "chunking": ["client.py", "--chunking", "--rounds", "1", "--messages", "2000"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(RUNS), help="which runs (comma-separated): " + ", ".join(RUNS))
    options = parser.parse_args()
    chosen = [name for name in options.only.split(",") if name]
    unknown = [name for name in chosen if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs: {', '.join(unknown)}")
    started = time.monotonic()
    failed = []
    for name in chosen:
        script, *args = RUNS[name]
        begun = time.monotonic()
        result = subprocess.run(
            [sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True, cwd=HERE
        )
        took = time.monotonic() - begun
        print(f"== {name} ({took:.0f} s)")
        if result.returncode != 0:
            failed.append(name)
            print(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}")
            continue
        # Each benchmark's own report: its figures and ratios.
        print(result.stdout.strip())
    print(f"== {time.monotonic() - started:.0f} s in all")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
