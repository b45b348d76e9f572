"""Every method's example runs as written and shows the behaviour its docstring describes."""

from __future__ import annotations

import ast
import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, float]]:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    lines = re.findall(r"k = (\{.*\})", capsys.readouterr().out)
    assert lines, f"{name} printed no coefficients"
    return [ast.literal_eval(line) for line in lines]


def test_accelerate_example_slows_the_clear_modality_and_boosts_the_faint_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """examples/accelerate_mlb.py: one CPU process, bf16 autocast, accumulation over 2."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)  # accelerate's process-wide singletons
    state.GradientState._reset_state()
    try:
        epochs = run("accelerate_mlb.py", capsys)
    finally:
        state.AcceleratorState._reset_state(True)
        state.GradientState._reset_state()
    assert len(epochs) == 3
    assert all(0 < k["audio"] < 1 < k["video"] < 2 for k in epochs)


def test_ogm_ge_example_slows_the_clean_modality_inside_the_window_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    epochs = run("ogm_ge.py", capsys)
    assert len(epochs) == 8
    for k in epochs[:6]:  # window (0, 5): audio dominates and is slowed
        assert 0 < k["audio"] < 1 and k["video"] == 1.0
    for k in epochs[6:]:
        assert k == {"audio": 1.0, "video": 1.0}


def test_opm_example_drops_only_the_clean_modality_and_leaves_evaluation_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runpy.run_path(str(EXAMPLES / "opm.py"), run_name="__main__")
    out = capsys.readouterr().out
    q = [ast.literal_eval(x) for x in re.findall(r"q = (\{.*?\})", out)]
    dropped = [ast.literal_eval(x) for x in re.findall(r"dropped = (\{.*?\})", out)]
    assert len(q) == len(dropped) == 4
    assert all(0.5 < e["audio"] <= 0.75 and e["video"] == 0.0 for e in q)  # q_base (1 + lam)
    counts = [d["audio"] for d in dropped]
    assert counts == sorted(counts) and counts[0] > 0 and all(d["video"] == 0 for d in dropped)
    assert "eval: unchanged = True" in out
    assert float(re.findall(r"accuracy = ([0-9.]+)", out)[0]) > 0.9


def test_agm_example_slows_the_clean_modality_and_boosts_the_noisy_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    epochs = run("agm.py", capsys)
    assert len(epochs) == 5
    assert all(k["audio"] < 1 < k["video"] for k in epochs)


def test_mlb_example_slows_the_strong_modality_and_boosts_the_weak_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    epochs = run("mlb.py", capsys)
    assert len(epochs) == 5
    assert all(0 < k["audio"] < 1 < k["video"] < 2 for k in epochs)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lightning_example_slows_the_strong_modality_and_boosts_the_weak_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    epochs = run("lightning_mlb.py", capsys)
    assert len(epochs) == 4
    assert all(0 < k["audio"] < 1 < k["video"] for k in epochs)


def test_inforeg_example_holds_the_clean_modality_back_while_the_window_is_open(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runpy.run_path(str(EXAMPLES / "inforeg.py"), run_name="__main__")
    out = capsys.readouterr().out
    rates = [ast.literal_eval(x) for x in re.findall(r"rate = (\{.*?\})", out)]
    betas = [ast.literal_eval(x) for x in re.findall(r"beta = (\{.*\})", out)]
    assert len(rates) == len(betas) == 6
    assert rates[0] == {"audio": 1.0, "video": 1.0}
    open_ = [r["audio"] > 0.05 for r in rates]
    assert open_[:3] == [True] * 3 and not any(open_[3:])  # the audio window closes
    for is_open, b in zip(open_, betas, strict=True):
        assert b["video"] == 0.0  # video never leads
        assert (0.95 <= b["audio"] <= 0.95 * 2.72) if is_open else b["audio"] == 0.0


def test_mmpareto_example_resolves_the_noisy_modality_s_conflicts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """examples/mmpareto.py: the noisy video encoder's fused and unimodal gradients conflict
    early in training, the clean audio encoder's never; the fused model learns the task."""
    runpy.run_path(str(EXAMPLES / "mmpareto.py"), run_name="__main__")
    found = re.findall(r"conflict = (\{.*\}), accuracy = ([0-9.]+)", capsys.readouterr().out)
    assert len(found) == 4
    shares = [ast.literal_eval(s) for s, _ in found]
    accuracy = [float(a) for _, a in found]
    assert all(s["audio"] == 0.0 and 0.0 <= s["video"] <= 1.0 for s in shares)
    assert shares[0]["video"] > 0.0
    assert accuracy[-1] > 0.95
