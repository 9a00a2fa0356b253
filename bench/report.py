"""How every bench script reports: its markdown table printed last, and written to --out when given."""
from __future__ import annotations


def emit(table: str, out: str | None) -> None:
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")
