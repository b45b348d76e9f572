"""The verdict of the parity scripts: each comparison is held to a tolerance (about ten times
what was measured, see the README), and a script exits 1 when any is exceeded."""

from __future__ import annotations

FAILED: list[str] = []


def judge(name: str, worst: float, tol: float) -> None:
    """Record ``name`` as failed when ``worst`` is above ``tol`` (or not a number)."""
    if not worst <= tol:
        FAILED.append(f"{name}: {worst:.2e} > {tol:.0e}")


def finish() -> None:
    """Exit 1, listing the failures, if any comparison exceeded its tolerance."""
    if FAILED:
        print("PARITY FAILED:\n  " + "\n  ".join(FAILED))
        raise SystemExit(1)
    print("all comparisons within tolerance")
