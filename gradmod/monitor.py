"""Diagnostics: what the modulation did in every block, kept on the device until read."""

from __future__ import annotations

import bisect
import importlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Column", "Monitor", "SupportsAddScalar"]

#: A column of :meth:`Monitor.to_dict`: block indices, boundary flags or values.
Column = list[int] | list[bool] | list[float]

#: Records are stacked into one ``[n, C]`` device tensor every this many blocks, so that a long
#: run holds a few large tensors rather than one small tensor per record.
_CHUNK = 256


class SupportsAddScalar(Protocol):
    """Anything with ``add_scalar(tag, value, global_step)``, e.g.
    ``torch.utils.tensorboard.SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int, /) -> object: ...


class _Chunk:
    """Consecutive records with one column layout on one device."""

    __slots__ = ("blocks", "boundaries", "columns", "rows", "steps")

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        self.steps: list[int] = []
        self.boundaries: list[bool] = []
        self.blocks: list[Tensor] = []  # stacked [n, C] tensors
        self.rows: list[Tensor] = []  # [C] rows not stacked yet

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def device(self) -> torch.device:
        return (self.rows or self.blocks)[-1].device

    def append(self, step: int, boundary: bool, row: Tensor) -> None:
        self.steps.append(step)
        self.boundaries.append(boundary)
        self.rows.append(row)
        if len(self.rows) >= _CHUNK:
            self.blocks.append(torch.stack(self.rows))
            self.rows.clear()

    def values(self, first: int) -> Tensor:
        """The records from position ``first`` on, ``[n, C]`` (on the device)."""
        parts = [*self.blocks, torch.stack(self.rows)] if self.rows else self.blocks
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        return whole[first:]


def _columns(names: Sequence[str], scores: Sequence[tuple[str, int]]) -> tuple[str, ...]:
    cols = [f"coefficient/{n}" for n in names]
    for key, numel in scores:
        if numel == len(names):
            cols += [f"score/{key}/{n}" for n in names]
        elif numel == 1:
            cols.append(f"score/{key}")
        else:
            cols += [f"score/{key}/{i}" for i in range(numel)]
    cols += [f"grad_norm_before/{n}" for n in names]
    cols += [f"grad_norm_after/{n}" for n in names]
    return tuple(cols)


class Monitor:
    r"""Records, for every block of a :class:`~gradmod.ModulationContext`, what the modulation
    did: the coefficients, the method's scores, and each modality's encoder gradient norm
    before and after modulation.

    Opt-in: pass it to the context, ``ModulationContext(model, heads, monitor=Monitor())``;
    without one the engine does no extra work. Each block that exits cleanly adds one record (a
    block that raises adds none). Values stay on the device, with no host synchronisation,
    until they are read by :meth:`to_dict`, :meth:`to_dataframe`, :meth:`to_tensorboard` or
    :meth:`state_dict` (one transfer each).

    Columns (``<name>`` a modality, ``<key>`` a key of the method's
    :attr:`~gradmod.StepPlan.scores`):

    * ``step``: the block's index among the blocks this monitor recorded (0, 1, ...; not reset
      by :meth:`clear`); ``boundary``: the block's ``boundary`` flag (``False`` for the earlier
      micro-batches of an accumulation window);
    * ``coefficient/<name>``: the factor applied in the block (non-finite ones replaced by 1,
      as the engine does): what :attr:`ModulationContext.coefficients` returned after it;
    * ``score/<key>/<name>``: what the method decided the coefficients from (``score/<key>``
      for a 0-d score);
    * ``grad_norm_before/<name>``, ``grad_norm_after/<name>``: the L2 norm over all of encoder
      ``<name>``'s parameters of the gradient this block's backward gave them, before and after
      modulation (per tensor ``torch.linalg.vector_norm``, inside backward, in float32, or
      float64 for float64 encoders; the root of the sum of their squares; divided by the loss
      scale of a ``grad_scaler`` given to the context; on each rank its local gradient, before
      DDP's all-reduce). How they are obtained:

      - parameter mode (gradient level): "before" is observed by a hook just before gradmod's
        scaling hook (what it receives); "after" is ``|k|`` times it (what a multiplication by
        ``k`` returns, exact up to rounding; the tensors a method leaves unscaled enter
        unscaled) — or, where the method transforms the gradients (OGM-GE's noise), observed by
        a second hook just after the scaling hook. A monitor therefore keeps parameter mode on
        its per-tensor hooks (without one, the gradients are scaled in one call when the
        backward ends): the gradients are the same, but a ``torch.autograd.grad`` call inside
        the block returns modulated gradients with a monitor and unmodulated ones without;
      - feature mode: the parameters receive gradients already scaled at the features; "after"
        is observed, and ``before = after / |k|`` (exact, since backprop is linear; NaN where
        ``k = 0``);
      - AGM (coefficients on the mono-modal responses, each of which depends on every
        modality): "after" is observed; "before" is NaN, as it cannot be told apart from one
        backward;
      - a combining method (MMPareto, :attr:`~gradmod.StepPlan.combine`): "before" is
        observed (this block's gradient); "after" is what the engine added to ``.grad``: 0 in
        the earlier blocks of an accumulation window, the combination of the whole window
        (averaged over ranks) at its boundary;
      - update level (``act="update"``): gradients are not modulated (the coefficient scales
        the next update), so ``before = after`` (except OGM-GE's noise, observed as in
        parameter mode).

      A modality whose parameters got no gradient has norm 0; one whose parameters got two
      (two ``backward()`` in one block) has NaN.
    """

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []
        self._next = 0  # the step of the next record
        self._written = 0  # records with a smaller step were written by to_tensorboard
        self._last: tuple[tuple[str, ...], Tensor] | None = None
        self._layouts: dict[tuple[tuple[str, ...], tuple[tuple[str, int], ...]], tuple[str, ...]]
        self._layouts = {}

    def __len__(self) -> int:
        """The number of records held."""
        return sum(len(c) for c in self._chunks)

    def __repr__(self) -> str:
        return f"Monitor({len(self)} records)"

    # ------------------------------------------------------------------------------ engine
    def _record(
        self,
        names: tuple[str, ...],
        boundary: bool,
        coefficients: Tensor,
        scores: Mapping[str, Tensor],
        before: Tensor,
        after: Tensor,
    ) -> None:
        """Add one block's record (called by the engine after a clean block; device ops only)."""
        dtype, device = coefficients.dtype, coefficients.device
        flat = {k: v.detach().reshape(-1) for k, v in scores.items()}
        sig = (names, tuple((k, v.numel()) for k, v in flat.items()))
        columns = self._layouts.get(sig)
        if columns is None:
            columns = self._layouts[sig] = _columns(*sig)
        row = torch.cat(
            [
                coefficients.detach(),
                *(v.to(device, dtype) for v in flat.values()),
                before.to(device, dtype),
                after.to(device, dtype),
            ]
        )
        chunk = self._chunks[-1] if self._chunks else None
        if chunk is None or chunk.columns != columns or chunk.device != device:
            chunk = _Chunk(columns)
            self._chunks.append(chunk)
        chunk.append(self._next, boundary, row)
        self._next += 1
        self._last = (columns, row)

    # ------------------------------------------------------------------------------ export
    def latest(self) -> dict[str, Tensor]:
        """The last record's values as 0-d device tensors, by column (no host sync; empty
        before the first record): ready for ``LightningModule.log_dict``."""
        if self._last is None:
            return {}
        columns, row = self._last
        return dict(zip(columns, row.unbind(0), strict=True))

    def _table(self, first_step: int) -> dict[str, Column]:
        """The records with ``step >= first_step`` as columns (one host transfer)."""
        parts: list[tuple[_Chunk, int]] = []
        for c in self._chunks:
            start = bisect.bisect_left(c.steps, first_step)
            if start < len(c):
                parts.append((c, start))
        steps: list[int] = []
        boundaries: list[bool] = []
        columns: dict[str, list[float]] = {}
        for c, _ in parts:
            for col in c.columns:
                columns.setdefault(col, [])
        if parts:
            values = [c.values(start) for c, start in parts]
            device = values[0].device
            host = torch.cat([v.reshape(-1).to(device, torch.float64) for v in values]).cpu()
            offset = 0
            for (c, start), v in zip(parts, values, strict=True):
                n, width = v.shape
                block = host[offset : offset + n * width].view(n, width).T.tolist()
                offset += n * width
                steps += c.steps[start:]
                boundaries += c.boundaries[start:]
                present = dict(zip(c.columns, block, strict=True))
                for col, out in columns.items():
                    out.extend(present.get(col, [math.nan] * n))
        return {"step": steps, "boundary": boundaries, **columns}

    def to_dict(self) -> dict[str, Column]:
        """Every record, by column (see the class docstring): ``step`` (int), ``boundary``
        (bool), then float columns; a column absent from some records (another method's
        scores, another context's modalities) holds NaN there. One host transfer."""
        return self._table(0)

    def to_dataframe(self) -> Any:
        """:meth:`to_dict` as a ``pandas.DataFrame``, one row per record.

        Raises:
            ImportError: pandas is not installed (``pip install pandas``).
        """
        try:
            pd = importlib.import_module("pandas")
        except ImportError as e:
            raise ImportError(
                "Monitor.to_dataframe needs pandas: pip install pandas (or use Monitor.to_dict)"
            ) from e
        return pd.DataFrame(self.to_dict())

    def to_tensorboard(
        self,
        writer: SupportsAddScalar,
        prefix: str = "gradmod",
        global_step: int | None = None,
    ) -> int:
        """Write the records not written yet as scalars ``<prefix>/<column>`` (NaN values are
        left out) with ``writer.add_scalar`` (a ``torch.utils.tensorboard.SummaryWriter``, or
        anything with that method). Call it every few steps or at the end.

        Args:
            writer: receives ``add_scalar(tag, value, global_step)``.
            prefix: the tags' prefix (``""``: the bare column names).
            global_step: the step every written record is logged at (e.g. your optimizer step,
                when you call this after every step); default: each record's ``step``.

        Returns:
            The number of records written.
        """
        table = self._table(self._written)
        steps = table.pop("step")
        table.pop("boundary")
        head = f"{prefix}/" if prefix else ""
        for r, step in enumerate(steps):
            at = int(step) if global_step is None else int(global_step)
            for col, values in table.items():
                value = float(values[r])
                if not math.isnan(value):
                    writer.add_scalar(head + col, value, at)
        self._written = self._next
        return len(steps)

    def clear(self) -> None:
        """Drop every record (steps go on counting; :meth:`latest` is emptied too)."""
        self._chunks.clear()
        self._last = None

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The records as CPU tensors (one host transfer), for a checkpoint: ``columns``,
        ``values`` ``[R, C]`` float64 (NaN where a record lacks a column), ``step`` ``[R]``,
        ``boundary`` ``[R]``, and the counters ``next_step`` and ``written``."""
        table = self.to_dict()
        steps = table.pop("step")
        boundary = table.pop("boundary")
        columns = list(table)
        values = torch.tensor([table[c] for c in columns], dtype=torch.float64).reshape(
            len(columns), len(steps)
        )
        return {
            "columns": columns,
            "values": values.T.contiguous(),
            "step": torch.tensor(steps, dtype=torch.long),
            "boundary": torch.tensor(boundary, dtype=torch.bool),
            "next_step": self._next,
            "written": self._written,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the records by those saved with :meth:`state_dict` (kept on the CPU).

        Raises:
            ValueError: the entries' shapes do not agree.
        """
        columns = tuple(str(c) for c in state_dict["columns"])
        values = torch.as_tensor(state_dict["values"], dtype=torch.float64).cpu()
        steps = [int(s) for s in torch.as_tensor(state_dict["step"]).tolist()]
        boundary = [bool(b) for b in torch.as_tensor(state_dict["boundary"]).tolist()]
        if values.shape != (len(steps), len(columns)) or len(boundary) != len(steps):
            raise ValueError(
                f"Monitor state: values of shape {tuple(values.shape)} for {len(steps)} steps, "
                f"{len(boundary)} boundary flags and {len(columns)} columns"
            )
        if steps != sorted(steps):
            raise ValueError("Monitor state: steps must be increasing")
        self.clear()
        if steps:
            chunk = _Chunk(columns)
            chunk.steps, chunk.boundaries, chunk.blocks = steps, boundary, [values]
            self._chunks.append(chunk)
            self._last = (columns, values[-1])
        self._next = max(int(state_dict["next_step"]), steps[-1] + 1 if steps else 0)
        self._written = int(state_dict["written"])
