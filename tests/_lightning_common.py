"""A LightningModule, its data, and the hand-written plain-loop gradmod run it must equal.

Shared by tests/test_lightning.py and the 2-process DDP script tests/lightning_ddp_run.py. The
reference loop is written from Lightning's documented order of operations (training_step under
the precision's autocast, the loss divided by ``accumulate_grad_batches``, backward, unscale,
clip, step, zero_grad), not from the callback's code.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gradmod
from gradmod.integrations.lightning import Modulation, step_inputs

NAMES = ("a", "b")
DIMS = {"a": 5, "b": 4}
FEAT, CLASSES = 4, 3
METHODS = ("mlb", "balanced", "cggm", "ogm-ge")


def dataset(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, DIMS["a"], generator=g)
    xb = torch.randn(n, DIMS["b"], generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    xa[:, 0] += y.float()  # modality a is informative
    return TensorDataset(xa, xb, y)


def loader(ds: TensorDataset, batch: int = 8) -> DataLoader[tuple[Tensor, ...]]:
    return DataLoader(ds, batch_size=batch, shuffle=False)


def heads_for(method: str) -> nn.ModuleDict | None:
    if method == "ogm-ge":
        return None
    if method == "cggm":  # the direction loss needs heads ending in the fusion weight's shape
        return nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(FEAT, 2 * FEAT), nn.Tanh(), nn.Linear(2 * FEAT, CLASSES))
                for n in NAMES
            }
        )
    return nn.ModuleDict({n: nn.Linear(FEAT, CLASSES) for n in NAMES})


class Net(pl.LightningModule):
    """Two MLP encoders, a linear fusion head on their concatenation, unimodal heads."""

    def __init__(self, method: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.method_name = method
        self.enc = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(DIMS[n], 6), nn.Tanh(), nn.Linear(6, FEAT)) for n in NAMES}
        )
        self.head = nn.Linear(2 * FEAT, CLASSES)
        heads = heads_for(method)
        if heads is not None:
            self.heads = heads

    def forward(self, xa: Tensor, xb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.features(xa, xb)
        return self.fuse(feats), feats

    def features(self, xa: Tensor, xb: Tensor) -> dict[str, Tensor]:
        return {"a": self.enc["a"](xa), "b": self.enc["b"](xb)}

    def fuse(self, feats: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats["a"], feats["b"]], dim=1))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        xa, xb, y = batch
        feats = self.features(xa, xb)
        step_inputs(self, features=feats, targets=y)
        return F.cross_entropy(self.fuse(feats), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def method_of(name: str) -> gradmod.Method:
    return {
        "mlb": lambda: gradmod.MLB(alpha=0.8),  # scale="official": a column block of the head
        "balanced": gradmod.balanced,
        "cggm": lambda: gradmod.CGGM(rho=1.0, lam=0.1),
        "ogm-ge": lambda: gradmod.OGMGE(alpha=0.5, seed=3),
    }[name]()


def context_args(name: str) -> dict[str, object]:
    """What both runs give the context, by method (MLB's official preset scales a column block
    of the fusion weight, which has no per-modality update: gradient level)."""
    args: dict[str, object] = {"encoders": {n: f"enc.{n}" for n in NAMES}}
    if name in ("mlb", "cggm", "ogm-ge"):
        args["fusion"] = "head"
    args["act"] = "gradient" if name == "mlb" else "update"
    return args


def callback(name: str, log: bool = False) -> Modulation:
    args = context_args(name)
    return Modulation(
        "heads" if name != "ogm-ge" else None,
        method=method_of(name),
        log=log,
        **args,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Setting:
    precision: str | None = None  # None, "bf16", "fp16"
    accumulate: int = 1
    clip: float | None = None
    scaler: bool = False  # a GradScaler on a float32 loss (fp16 always has one)
    give_scaler: bool = True  # hand the scaler to the context (False: the user forgot)


def batches(ds: TensorDataset, batch: int, epochs: int) -> Iterator[tuple[int, int, list[Tensor]]]:
    for epoch in range(epochs):
        for i, b in enumerate(loader(ds, batch)):
            yield epoch, i, b


def plain_run(
    name: str,
    setting: Setting,
    epochs: int = 2,
    ds: TensorDataset | None = None,
    batch: int = 8,
    model: Net | None = None,
) -> Net:
    """The hand-written training loop that a Lightning run with the callback must equal."""
    ds = ds if ds is not None else dataset()
    net = model if model is not None else Net(name)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    heads = dict(net.heads.items()) if name != "ogm-ge" else None
    args = context_args(name)
    ctx = gradmod.ModulationContext(
        net,
        heads,
        method=method_of(name),
        optimizer=opt if args.pop("act") == "update" else None,
        act=None,
        **args,  # type: ignore[arg-type]
    )
    use_scaler = setting.precision == "fp16" or setting.scaler
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_scaler else None
    ctx.grad_scaler = scaler if setting.give_scaler else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting.precision or "")
    n = setting.accumulate
    count = len(loader(ds, batch))
    for epoch, i, (xa, xb, y) in batches(ds, batch, epochs):
        if i == 0:
            ctx.set_epoch(epoch)
        boundary = (i + 1) % n == 0 or i + 1 == count
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            feats = net.features(xa, xb)
            loss = F.cross_entropy(net.fuse(feats), y)
        loss = loss / n
        with ctx(feats, y, boundary=boundary, weight=1.0 / n):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if not boundary:
            continue
        if scaler is not None:
            scaler.unscale_(opt)
        if setting.clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), setting.clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    ctx.close()
    return net


def max_diff(a: nn.Module, b: nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return max(float((pa[k].detach() - pb[k].detach()).abs().max()) for k in pa)


def fresh(net: Net) -> Net:
    return copy.deepcopy(net)


def trainer(
    cb: Modulation, setting: Setting | None = None, epochs: int = 2, **kw: object
) -> pl.Trainer:
    setting = setting if setting is not None else Setting()
    plugins: list[MixedPrecision] = []
    precision: str | None = None
    if setting.precision == "fp16":
        # explicit: on the CPU, precision="16-mixed" silently becomes bf16
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    elif setting.precision == "bf16":
        precision = "bf16-mixed"
    return pl.Trainer(
        callbacks=[cb],
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accumulate_grad_batches=setting.accumulate,
        gradient_clip_val=setting.clip,
        plugins=plugins or None,
        **({"precision": precision} if precision else {}),
        **kw,  # type: ignore[arg-type]
    )
