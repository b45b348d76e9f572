"""MLB (the recommended gradmod.balanced(), on the update level) in a Hugging Face Accelerate loop.

modulator.backward(loss, features=..., targets=...) replaces accelerator.backward(loss): it
enters the context with boundary=accelerator.sync_gradients,
weight=1/accelerator.gradient_accumulation_steps and the accelerator's GradScaler (fp16).
The heads gradmod trains stay outside the prepared model. Runs as is (one process, bf16
autocast), and on 2 CPU processes with
`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_mlb.py`.
"""

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradmod
from gradmod.integrations.accelerate import Modulator

torch.manual_seed(0)


class LateFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(30, 32), nn.ReLU())
        self.head = nn.Linear(64, 5)

    def forward(self, xa, xv):
        feats = {"audio": self.audio(xa), "video": self.video(xv)}
        return self.head(torch.cat([feats["audio"], feats["video"]], dim=1)), feats


n = 512
y = torch.randint(0, 5, (n,))
xa = torch.randn(n, 20) + F.pad(3.0 * F.one_hot(y, 5), (0, 15))  # a clear signal
xv = torch.randn(n, 30) + F.pad(0.5 * F.one_hot(y, 5), (0, 25))  # a faint one
loader = DataLoader(TensorDataset(xa, xv, y), batch_size=32, shuffle=True)

accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision="bf16")
model = LateFusion()
# Heads outside the model, not passed to prepare(): gradmod trains them (and averages their
# gradients over processes) itself.
heads = {m: nn.Linear(32, 5).to(accelerator.device) for m in ("audio", "video")}
head_params = [p for h in heads.values() for p in h.parameters()]
optimizer = torch.optim.Adam([*model.parameters(), *head_params], lr=1e-3)
ctx = gradmod.ModulationContext(model, heads, optimizer=optimizer)  # before prepare()
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
modulator = Modulator(accelerator, ctx)

for epoch in range(3):
    for xa_b, xv_b, y_b in loader:
        with accelerator.accumulate(model):
            logits, feats = model(xa_b, xv_b)  # bf16: fp32 copies, handed to gradmod as they are
            modulator.backward(F.cross_entropy(logits, y_b), features=feats, targets=y_b)
            optimizer.step()
            optimizer.zero_grad()
    k = dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))
    accelerator.print(f"epoch {epoch}: k = {k}")
