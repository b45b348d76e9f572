"""gradmod's error types."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConfigurationError", "ContextError", "GradmodError", "StepError"]


class GradmodError(Exception):
    """Base class of every error gradmod raises on purpose."""


class ConfigurationError(GradmodError, ValueError):
    """The modality groups, classifiers or fusion head do not fit together.

    Raised before any gradient is touched. ``problems`` lists every problem found, so that one
    run reports them all.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"gradmod found {len(self.problems)} configuration problem(s):\n{lines}")

    def __reduce__(self) -> tuple[type[ConfigurationError], tuple[list[str]]]:
        # picklable as itself (multiprocessing, DDP spawn): rebuilt from the problem list
        return (type(self), (self.problems,))


class StepError(GradmodError, ValueError):
    """The inputs of one step (features, targets) are unusable; nothing was modulated."""


class ContextError(GradmodError, RuntimeError):
    """A context was used in a way it cannot support: entered while already active (nested, or
    from a second thread), or over parameters that another active context modulates.

    Raised on entering the block, before the method's state or any gradient changes.
    """
