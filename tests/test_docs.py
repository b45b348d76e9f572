"""The README's code runs as written, and the README's commands are what CI runs."""

from __future__ import annotations

import ast
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_is_the_example_script(capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart block is examples/quickstart.py verbatim (less its docstring), and runs."""
    script = (ROOT / "examples" / "quickstart.py").read_text()
    body = script.split('"""', 2)[2].lstrip("\n")
    assert body in python_blocks(README), "README quickstart and examples/quickstart.py differ"
    outs = []
    for _ in range(2):
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1], "the quickstart is not reproducible (seed it)"
    k = ast.literal_eval(outs[0].strip().splitlines()[-1])
    assert 0 < k["audio"] < 1 < k["video"] < 2  # the clear modality slowed, the faint one boosted


def test_public_api_has_docstrings_and_no_stray_comments() -> None:
    """help(gradmod.ModulationContext) shows documentation, not source comments."""
    import inspect

    import gradmod

    assert "balanced()" in (gradmod.__doc__ or "")
    for name, member in inspect.getmembers(gradmod.ModulationContext):
        if name.startswith("__") and name not in ("__init__", "__enter__", "__exit__", "__call__"):
            continue
        if name.startswith("_") and not name.startswith("__"):
            continue
        if callable(member) or isinstance(member, property):
            assert inspect.getdoc(member), f"ModulationContext.{name} has no docstring"
            if inspect.isfunction(member):
                assert inspect.getcomments(member) is None, f"a comment shows in help({name})"
    for name in gradmod.__all__:
        obj = getattr(gradmod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"gradmod.{name} has no docstring"


def test_ci_runs_the_readme_test_command() -> None:
    block = re.search(r"<!-- test-command -->(.*?)<!-- /test-command -->", README, flags=re.S)
    assert block is not None
    lines = [ln for ln in block.group(1).splitlines() if ln.startswith("python ")]
    assert len(lines) == 1 and "pytest" in lines[0]
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_adding_a_method_example_runs_and_conforms() -> None:
    """The method written in docs/adding-a-method.md registers, runs through the engine with
    the coefficients its rule gives (checked by hand), and passes conformance checks."""
    from unittest import mock

    import test_conformance as conformance
    import torch

    import gradmod
    from gradmod.methods import REGISTRY

    text = (ROOT / "docs" / "adding-a-method.md").read_text()
    (block,) = python_blocks(text)
    with mock.patch.dict(REGISTRY):  # the registration is undone afterwards
        namespace: dict[str, object] = {}
        exec(compile(block, "adding-a-method.md", "exec"), namespace)
        assert "loss-share" in REGISTRY
        run = conformance.Run("loss-share", "gradient/parameter")
        xs, y = run.inputs(3)
        run.block(xs, y)
        with torch.no_grad():
            norms = torch.stack([run.model.enc[n](xs[n]).norm() for n in run.names]).double()
        torch.testing.assert_close(run.ctx.coefficients, 3 * norms / norms.sum())
        assert isinstance(run.ctx.method, gradmod.Method)
        for use in conformance.USES:
            conformance.test_the_plan_is_applied_exactly("loss-share", use)
            conformance.test_state_dict_round_trip_and_exact_resume("loss-share", use)
