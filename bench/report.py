"""How every bench script reports: its markdown table printed last, and written to --out when given; and the
relative L2 error its error columns give."""
from __future__ import annotations


def emit(table: str, out: str | None) -> None:
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


def rel_l2(x, ref) -> float:
    """||x - ref|| / ||ref|| of two torch tensors, in fp32: the spec's error measure (its bf16 bound is 1e-2 against
    float64), for every bench script's error columns."""
    return float((x.float() - ref.float()).norm() / ref.float().norm())
