"""
The long run of the session model: the state machine of
``tests/test_session_model.py`` with as many examples, as long sessions and
as many seeds as you give it.  CI runs the same machine derandomized and
short; this one draws new sessions from each seed.

    python fuzz/run_session_model.py --examples 2000 --seed 1
    python fuzz/run_session_model.py --minutes 15 --seed 7 --steps 60

With ``--minutes``, rounds of ``--examples`` run one after another with
seeds ``S``, ``S+1``, ... until the time is up.  Each defect is printed as
hypothesis found and shrank it, with the seed to rerun it, and the run goes
on with the next seed.  The exit status is 1 when any round failed.  At the
end it prints how often each command met each reply code, which shows what
the random sessions reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from hypothesis import HealthCheck, Phase, seed, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402
from test_session_model import OUTCOMES, SessionMachine  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402


def runRound(examples: int, steps: int, seedValue: int, database: str | None) -> str | None:
    """
    One round of ``examples`` sessions from ``seedValue``.

    :return: the failure report, or ``None``.
    """
    # A subclass per round: seed() marks the class it is given.
    machine = seed(seedValue)(type("SessionMachine", (SessionMachine,), {}))
    roundSettings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None if database is None else _directoryDatabase(database),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        print_blob=True,
    )
    try:
        run_state_machine_as_test(machine, settings=roundSettings)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return "".join(traceback.format_exception(e))
    return None


def _directoryDatabase(path: str):
    from hypothesis.database import DirectoryBasedExampleDatabase

    return DirectoryBasedExampleDatabase(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="sessions per round (default 1000)")
    parser.add_argument("--steps", type=int, default=50, help="rules per session at most (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round (default 0)")
    parser.add_argument("--minutes", type=float, default=0, help="run rounds until this much time has passed")
    parser.add_argument(
        "--database", default=None, help="keep failing examples in this folder (hypothesis replays them first)"
    )
    args = parser.parse_args(argv)
    # The handler crashes the model asks for would flood the output; the
    # machine's own observer still sees every event.
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)

    deadline = time.monotonic() + args.minutes * 60
    seedValue = args.seed
    failures = 0
    rounds = 0
    started = time.monotonic()
    while True:
        roundStart = time.monotonic()
        report = runRound(args.examples, args.steps, seedValue, args.database)
        rounds += 1
        status = "FAILED" if report else "ok"
        print(f"seed {seedValue}: {args.examples} sessions, {time.monotonic() - roundStart:.0f} s, {status}", flush=True)
        if report:
            failures += 1
            print(report, flush=True)
        seedValue += 1
        if time.monotonic() >= deadline:
            break
    print(f"\n{rounds} rounds ({rounds * args.examples} sessions) in {time.monotonic() - started:.0f} s, "
          f"{failures} failed")
    print("\ncommand and reply code: times seen")
    for label, count in sorted(OUTCOMES.items()):
        print(f"  {label:<16} {count}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
