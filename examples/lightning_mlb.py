"""gradmod in a lightning.Trainer: one callback, one line in training_step.

The recommended configuration (gradmod.balanced(), on the trainer's optimizer's update) on a
two-modality late-fusion model whose audio shows the class clearly and whose video only
faintly. The callback puts the gradmod block around Lightning's backward and follows the
trainer: accumulation, precision, checkpoints, logging. Prints the coefficients after each
epoch: the strong modality is slowed (k < 1), the weak one boosted (k > 1).
"""

import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradmod.integrations.lightning import Modulation, step_inputs

warnings.filterwarnings("ignore", module="lightning")  # its tips on workers and loggers
torch.manual_seed(0)


class LateFusion(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(30, 32), nn.ReLU())
        self.head = nn.Linear(64, 5)
        # one unimodal head per modality; the callback leaves them out of DDP's reduction
        self.heads = nn.ModuleDict({m: nn.Linear(32, 5) for m in ("audio", "video")})

    def training_step(self, batch, batch_idx):
        xa, xv, y = batch
        feats = {"audio": self.audio(xa), "video": self.video(xv)}
        step_inputs(self, features=feats, targets=y)  # the one line gradmod needs
        return F.cross_entropy(self.head(torch.cat([feats["audio"], feats["video"]], 1)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PrintCoefficients(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        ctx = modulation.ctx
        print(
            "k =",
            {n: round(k, 3) for n, k in zip(ctx.names, ctx.coefficients.tolist(), strict=True)},
        )


y = torch.randint(0, 5, (1024,))
xa = torch.randn(1024, 20) + F.pad(3.0 * F.one_hot(y, 5), (0, 15))  # a clear signal
xv = torch.randn(1024, 30) + F.pad(0.5 * F.one_hot(y, 5), (0, 25))  # a faint one
data = DataLoader(TensorDataset(xa, xv, y), batch_size=64, shuffle=True)

# Encoders default to the LightningModule's submodules named like the head keys; the method
# to gradmod.balanced(). Add precision="bf16-mixed", accumulate_grad_batches=...,
# strategy="ddp", ... as usual: the callback follows them.
modulation = Modulation(classifiers="heads")
trainer = pl.Trainer(
    max_epochs=4,
    accelerator="cpu",
    callbacks=[modulation, PrintCoefficients()],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(LateFusion(), data)
