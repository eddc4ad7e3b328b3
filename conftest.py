"""pytest hooks for every pytest run in this repository (settings: pytest.ini).

* The summary lists skip reasons grouped by reason, with a count each.
* With SYMM_STACK_PYTEST_TOTALS=FILE set, the run's totals as pytest counts
  them are appended to FILE as one line "PASSED FAILED SKIPPED" (failed counts
  errors too); scripts/test.sh sums them over its pytest steps.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = terminalreporter.stats
    reasons = Counter(skip_reason(r) for r in stats.get("skipped", []))
    if reasons:
        terminalreporter.write_sep("=", "skipped, by reason")
        for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            terminalreporter.write_line(f"SKIPPED [{count}] {reason}")
    totals = os.environ.get("SYMM_STACK_PYTEST_TOTALS")
    if totals:

        def count(*keys: str) -> int:
            return sum(len(stats.get(key, [])) for key in keys)

        with open(totals, "a") as out:
            passed, failed = count("passed"), count("failed", "error")
            out.write(f"{passed} {failed} {count('skipped')}\n")
