"""gradmod in a ``lightning.Trainer``: one callback, one line in ``training_step``.

::

    from gradmod.integrations.lightning import Modulation, step_inputs

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.audio, self.video = AudioEncoder(), VideoEncoder()
            self.fusion = nn.Linear(64, 10)
            self.heads = nn.ModuleDict({"audio": nn.Linear(32, 10), "video": nn.Linear(32, 10)})

        def training_step(self, batch, batch_idx):
            xa, xv, y = batch
            feats = {"audio": self.audio(xa), "video": self.video(xv)}
            step_inputs(self, features=feats, targets=y)  # the one line
            return F.cross_entropy(self.fusion(torch.cat([*feats.values()], 1)), y)

    trainer = L.Trainer(callbacks=[Modulation(classifiers="heads")])

The callback builds the :class:`~gradmod.ModulationContext` when fitting starts (on the
trainer's optimizer: the coefficients act on the update by default, ``act="update"``) and puts
the ``with`` block around Lightning's backward. Everything else follows the trainer:

* **accumulation** (``accumulate_grad_batches=n``): Lightning divides the loss by ``n``, so the
  method's own gradients get ``weight=1/n``; ``boundary`` is true on the batch after which the
  trainer steps (every ``n``-th batch and the last batch of the epoch);
* **precision**: the precision plugin's ``GradScaler`` (``16-mixed``) is handed to the context;
  ``bf16-mixed`` needs nothing;
* **checkpoints**: the context's state (the method's and the update level's) is saved in the
  callback's entry of the checkpoint and restored on ``fit(ckpt_path=...)``;
* **epochs**: ``ctx.set_epoch`` at every epoch start (OGM-GE's window);
* **DDP** (``strategy="ddp"``): heads that the method trains itself (MLB, CGGM) are left out of
  DDP's gradient reduction (gradmod averages their gradients over the ranks itself), so they can
  stay submodules of the LightningModule without ``find_unused_parameters``;
* **logging**: each modality's coefficient and the method's scores through the module's logger
  (``gradmod/coefficient/<modality>``, ``gradmod/<score>/<modality>``), every
  ``log_every_n_steps`` of the trainer.

Exception safety: the block is entered in ``on_before_backward`` and left in
``on_after_backward``; when the backward (or anything else) raises, Lightning calls
``on_exception``, which leaves the block with the exception — hooks removed, the method's state
unchanged — before the exception propagates out of ``fit``.

Manual optimization and strategies that accumulate gradients themselves (DeepSpeed) are refused
with a :class:`~gradmod.ConfigurationError`: use the plain API inside ``training_step`` there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from .._context import Act, Mode, ModulationContext
from .._errors import ConfigurationError, StepError
from .._groups import EncoderSpec, FusionSpec
from .._protocol import Method
from ..monitor import Monitor

__all__ = ["Modulation", "step_inputs"]

ModuleSpec = nn.Module | str
Classifiers = Mapping[str, ModuleSpec] | nn.ModuleDict | str


def step_inputs(
    module: pl.LightningModule, *, features: Mapping[str, Tensor], targets: Tensor
) -> None:
    """Hand this step's encoder outputs and targets to the trainer's :class:`Modulation`
    callback (call it in ``training_step``, before returning the loss).

    Raises:
        ConfigurationError: the module's trainer has no :class:`Modulation` callback.
    """
    trainer = module.trainer
    found = [c for c in trainer.callbacks if isinstance(c, Modulation)]  # type: ignore[attr-defined]
    if len(found) != 1:
        raise ConfigurationError(
            [
                f"step_inputs() needs exactly one gradmod Modulation callback in the trainer; "
                f"found {len(found)}: pass Trainer(callbacks=[Modulation(...)])"
            ]
        )
    found[0]._inputs = (features, targets)


class Modulation(pl.Callback):
    """A ``lightning.Trainer`` callback that modulates the encoders' gradients (or updates).

    Args:
        classifiers: the unimodal heads: a mapping modality -> module or dotted path in the
            LightningModule, or the path of a ``ModuleDict`` in it (``"heads"``). ``None`` for
            methods without heads (OGM-GE's parts come from ``fusion``).
        encoders: modality -> encoder (module, dotted path in the LightningModule, or
            parameters); default: each classifier key is its encoder's path.
        method, fusion, mode, allow_frozen: as for :class:`~gradmod.ModulationContext`.
        act: ``"update"`` (default) puts the coefficients on the trainer's optimizer's update,
            ``"gradient"`` on the gradients (required for AGM and ``MLB(scale="official")``).
        optimizer_index: which of the trainer's optimizers steps the encoders.
        log: log the coefficients and scores through the LightningModule's logger (with a
            ``monitor``, also each modality's encoder gradient norms before and after
            modulation).
        monitor: a :class:`gradmod.Monitor` handed to the context (records every block).
        context: instead of the arguments above, a function ``(module, optimizer) ->
            ModulationContext`` that builds the context (``optimizer`` is ``None`` with
            ``act="gradient"``); the callback still sets its ``grad_scaler``.

    Attributes:
        ctx: the context, once fitting started (``None`` before).
    """

    def __init__(
        self,
        classifiers: Classifiers | None = None,
        *,
        encoders: Mapping[str, EncoderSpec] | None = None,
        method: Method | None = None,
        fusion: FusionSpec | None = None,
        mode: Mode | None = None,
        act: Act = "update",
        allow_frozen: bool = False,
        optimizer_index: int = 0,
        log: bool = True,
        monitor: Monitor | None = None,
        context: Callable[[pl.LightningModule, torch.optim.Optimizer | None], ModulationContext]
        | None = None,
    ) -> None:
        super().__init__()
        if act not in ("gradient", "update"):
            raise ConfigurationError([f"act must be 'gradient' or 'update'; got {act!r}"])
        self.classifiers = classifiers
        self.encoders = encoders
        self.method = method
        self.fusion = fusion
        self.mode = mode
        self.act: Act = act
        self.allow_frozen = allow_frozen
        self.optimizer_index = optimizer_index
        self.log = log
        self.monitor = monitor
        self.context = context
        self.ctx: ModulationContext | None = None
        self._inputs: tuple[Mapping[str, Tensor], Tensor] | None = None
        self._block = contextlib.ExitStack()
        self._active = False
        self._boundary = True
        self._weight = 1.0
        self._pending_state: dict[str, Any] | None = None
        self._ignored: list[str] | None = None

    # --------------------------------------------------------------------------- set-up
    def _heads(self, module: pl.LightningModule) -> dict[str, nn.Module] | None:
        spec = self.classifiers
        if spec is None:
            return None
        if isinstance(spec, str):
            found = module.get_submodule(spec)  # a ModuleDict of heads
            if not isinstance(found, nn.ModuleDict):
                raise ConfigurationError(
                    [f"classifiers={spec!r} names a {type(found).__name__}, not a ModuleDict"]
                )
            return dict(found.items())
        if isinstance(spec, nn.ModuleDict):
            return dict(spec.items())
        return {
            name: module.get_submodule(head) if isinstance(head, str) else head
            for name, head in spec.items()
        }

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ConfigurationError(
                [
                    "the Modulation callback follows Lightning's automatic optimization; with "
                    "manual optimization use the plain API inside training_step: "
                    "`with ctx(features=..., targets=...): self.manual_backward(loss)`"
                ]
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise ConfigurationError(
                [
                    f"{type(trainer.strategy).__name__} accumulates gradients itself, out of "
                    "gradmod's sight: use a strategy that leaves accumulation to Lightning "
                    "(ddp, single device)"
                ]
            )
        heads = self._heads(pl_module) if self.context is None else None
        method = self.method
        trains_heads = method is None or method.needs().trains_classifiers
        if heads and trains_heads and trainer.world_size > 1:
            # DDP would wait for gradients the method adds after backward: leave the heads out of
            # its reduction (DDP reads this attribute when it wraps the module, right after
            # setup; it is removed again in on_fit_start). gradmod averages them itself.
            owned = {id(p) for h in heads.values() for p in h.parameters()}
            self._ignored = [n for n, p in pl_module.named_parameters() if id(p) in owned]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                pl_module, self._ignored
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ignored is not None and hasattr(pl_module, "_ddp_params_and_buffers_to_ignore"):
            del pl_module._ddp_params_and_buffers_to_ignore  # DDP has read it: nothing stays
        optimizer = None
        if self.act == "update":
            if len(trainer.optimizers) <= self.optimizer_index:
                raise ConfigurationError(
                    [
                        f"act='update' needs the trainer's optimizer #{self.optimizer_index}, but "
                        f"configure_optimizers returned {len(trainer.optimizers)}"
                    ]
                )
            optimizer = trainer.optimizers[self.optimizer_index]
        if self.ctx is not None:
            self.ctx.close()
        if self.context is not None:
            ctx = self.context(pl_module, optimizer)
        else:
            ctx = ModulationContext(
                pl_module,
                self._heads(pl_module),
                encoders=self.encoders,
                method=self.method,
                fusion=self.fusion,
                mode=self.mode,
                allow_frozen=self.allow_frozen,
                act=self.act,
                optimizer=optimizer,
                monitor=self.monitor,
            )
        ctx.grad_scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._pending_state is not None:
            ctx.load_state_dict(self._pending_state)
            self._pending_state = None
        self.ctx = ctx

    # ----------------------------------------------------------------------------- steps
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ctx is not None:
            self.ctx.set_epoch(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        n = trainer.accumulate_grad_batches
        done = batch_idx + 1
        # Lightning steps after every n-th batch and after the last batch of the epoch: known
        # by count for a sized loader, and by its fetcher (which looks one batch ahead) for an
        # unsized one (an IterableDataset: num_training_batches is inf)
        self._boundary = (
            done % n == 0 or done == trainer.num_training_batches or _is_last_batch(trainer)
        )
        self._weight = 1.0 / n  # Lightning divides the loss by n
        self._inputs = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self.ctx is None:
            return
        if self._inputs is None:
            raise StepError(
                "the Modulation callback got no inputs for this step: call "
                "gradmod.integrations.lightning.step_inputs(self, features=..., targets=...) in "
                "training_step"
            )
        features, targets = self._inputs
        self._inputs = None
        self._block.enter_context(
            self.ctx(features, targets, boundary=self._boundary, weight=self._weight)
        )
        self._active = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._block.close()  # a clean exit: the method's gradients land, its state advances
        if self.log and self.ctx is not None:
            self._log(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._active:
            self._active = False
            self._block.__exit__(type(exception), exception, exception.__traceback__)
            self._block = contextlib.ExitStack()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._active:  # never left cleanly: leave as after an error (nothing lands)
            self._active = False
            err = RuntimeError("fit ended inside the gradmod block")
            self._block.__exit__(RuntimeError, err, None)
            self._block = contextlib.ExitStack()

    def _log(self, pl_module: pl.LightningModule) -> None:
        assert self.ctx is not None
        values: dict[str, Tensor] = {}
        k = self.ctx.coefficients.float()
        for i, name in enumerate(self.ctx.names):
            values[f"gradmod/coefficient/{name}"] = k[i]
        names = self.ctx.names
        for key, score in self.ctx.scores.items():
            # laid out as the Monitor's columns: per modality for [M], one value for a single
            # number, by index otherwise
            s = score.detach().float().reshape(-1)
            if s.numel() == len(names):
                values.update({f"gradmod/{key}/{n}": s[i] for i, n in enumerate(names)})
            elif s.numel() == 1:
                values[f"gradmod/{key}"] = s[0]
            else:
                values.update({f"gradmod/{key}/{i}": v for i, v in enumerate(s)})
        if self.ctx.monitor is not None and len(self.ctx.monitor):
            for key, value in self.ctx.monitor.latest().items():
                if key.startswith("grad_norm"):
                    values[f"gradmod/{key}"] = value.float()
        pl_module.log_dict(values, on_step=True, on_epoch=False)

    # ---------------------------------------------------------------------- checkpoints
    @property
    def state_key(self) -> str:
        """The callback's entry in a checkpoint's ``callbacks``: ``"gradmod.Modulation"``."""
        return "gradmod.Modulation"

    def state_dict(self) -> dict[str, Any]:
        if self.ctx is None:
            return {"context": self._pending_state or {}}
        return {"context": self.ctx.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict.get("context", {}))
        if self.ctx is not None:
            self.ctx.load_state_dict(state)
        else:  # restored before fitting starts: loaded into the context when it is built
            self._pending_state = state


def _is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning's training loop knows the current batch is the epoch's last (set before
    ``on_train_batch_start``)."""
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))
