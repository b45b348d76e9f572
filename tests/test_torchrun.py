"""examples/ddp.py launched by torchrun (2 gloo CPU processes) against the same script run as one
process over the full batches: the ranks end bit-identical, and equal to the one-process run.

The script is run as a user runs it (``python -m torch.distributed.run ... examples/ddp.py``), in
a subprocess that imports this checkout's gradmod; ``--save DIR`` writes each rank's final
model, heads and coefficients.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2  # 16 optimizer steps of the recommended configuration (Adam, update level)


def launch(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    r = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("torchrun")
    epochs = ("--epochs", str(EPOCHS))
    two = launch(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "--monitor-interval=0.1",
        "examples/ddp.py",
        *epochs,
        "--save",
        str(out / "two"),
    )
    one = launch("examples/ddp.py", *epochs, "--save", str(out / "one"))

    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, weights_only=True)

    return {
        "stdout_two": two,
        "stdout_one": one,
        "ranks": [load(out / "two" / f"rank{r}.pt") for r in range(2)],
        "one": load(out / "one" / "rank0.pt"),
    }


def tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    """Every tensor of a saved state, by a flat name."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for m, sd in state["heads"].items():
        out.update({f"heads.{m}.{k}": v for k, v in sd.items()})
    out["coefficients"] = state["coefficients"]
    return out


def test_rank_zero_prints_one_line_per_epoch(runs: dict[str, Any]) -> None:
    pattern = r"epoch (\d+): k = \{.*\}, test accuracy [\d.]+ \((\d) process"
    for key, world in (("stdout_two", 2), ("stdout_one", 1)):
        lines = [(int(e), int(w)) for e, w in re.findall(pattern, runs[key])]
        assert lines == [(e, world) for e in range(EPOCHS)], runs[key]


def test_ranks_end_bit_identical(runs: dict[str, Any]) -> None:
    """Global coefficients and all-reduced head gradients: every rank applies the same update."""
    r0, r1 = (tensors(s) for s in runs["ranks"])
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name


def test_two_processes_equal_one_process_over_the_full_batches(runs: dict[str, Any]) -> None:
    """Equal shards and mean losses: the DDP average of the two half-batch gradients is the full
    batch's gradient, MLB's scores are summed over the ranks, and the unimodal losses are each
    rank's mean averaged like DDP's. So the 2-process run is the 1-process run, up to rounding."""
    two, one = tensors(runs["ranks"][0]), tensors(runs["one"])
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
    # not a trivial agreement: the modulation was strong (k starts at 1)
    k = one["coefficients"].tolist()
    assert k[0] < 0.9 and k[1] > 1.1
