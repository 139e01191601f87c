#!/usr/bin/env python3
"""Render the agent's state table (vdsm_ft/agent/states.py) as Markdown: the safety rows
once, the states where they differ, then each state's own rows.

    scripts/state_table.py            print it
    scripts/state_table.py --write    put it into docs/agent.md between the markers
    scripts/state_table.py --check    exit 1 if docs/agent.md's copy differs (tests run it)
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vdsm_ft.agent.states import ROWS, SAFETY, SAFETY_EXCEPT  # noqa: E402

DOC = os.path.join(REPO, "docs", "agent.md")
BEGIN = "<!-- state table: scripts/state_table.py --write -->"
END = "<!-- end of state table -->"


HEAD = ["| state | when | action | may lead to |", "|---|---|---|---|"]


def render() -> str:
    lines = ["Safety rows, first in every state:", ""] + HEAD
    lines += [f"| every state | {s.condition.value} | `{s.action.value}` | Down |"
              for s in SAFETY]
    lines += ["", "States whose safety rows differ (these conditions, in this order):", ""]
    lines += [f"- {state.value}: " + (", ".join(c.value for c in conditions) or "none")
              for state, conditions in SAFETY_EXCEPT.items()]
    lines += ["", "Then each state's own rows (a row that enters a state saves it before "
              "its action runs):", "",
              "| state | when | enters | action | may lead to |", "|---|---|---|---|---|"]
    for row in ROWS:
        leads = ", ".join(sorted(s.value for s in row.leads_to))
        enters = row.entering.value if row.entering else ""
        lines.append(f"| {row.state.value} | {row.condition.value} | {enters} |"
                     f" `{row.action.value}` | {leads} |")
    return "\n".join(lines) + "\n"


def _split(text: str) -> tuple[str, str]:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args()
    table = render()
    if not (args.write or args.check):
        sys.stdout.write(table)
        return 0
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    head, tail = _split(text)
    new = f"{head}{BEGIN}\n{table}{END}{tail}"
    if args.check:
        if new != text:
            sys.stderr.write(f"{DOC}: the state table differs from vdsm_ft/agent/states.py; "
                             "run scripts/state_table.py --write\n")
            return 1
        return 0
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
