"""Print the acceptance goals of an ``expertpred evaluate`` run (its report.json).

    python benchmarks/goals.py runs/predictors/report.json

The goals are our thresholds for the predictor ladder, not a user's output, so
``expertpred evaluate`` and ``demo`` do not print them; this does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from expertpred.learn.evaluate import goals_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="report.json written by expertpred evaluate")
    args = ap.parse_args()
    Console(width=160).print(goals_table(json.loads(args.report.read_text())["goals"]))


if __name__ == "__main__":
    main()
