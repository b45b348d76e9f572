"""The README's quickstart, as a script: the recommended configuration on a two-modality
late-fusion model whose audio shows the class clearly and whose video only faintly."""

import torch
import torch.nn.functional as F
from torch import nn

import gradmod

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


def batch(n=64):
    y = torch.randint(0, 5, (n,))
    xa = torch.randn(n, 20) + F.pad(3.0 * F.one_hot(y, 5), (0, 15))  # a clear signal
    xv = torch.randn(n, 30) + F.pad(0.5 * F.one_hot(y, 5), (0, 25))  # a faint one
    return xa, xv, y


model = LateFusion()
# One unimodal head per modality, on the live encoder output: its loss joins the objective.
heads = {m: nn.Linear(32, 5) for m in ("audio", "video")}
head_params = [p for h in heads.values() for p in h.parameters()]
optimizer = torch.optim.Adam([*model.parameters(), *head_params], lr=1e-3)
# Encoders default to the model's submodules named like the head keys (model.audio, ...), and
# the method to gradmod.balanced(), the recommended configuration. Given the optimizer, the
# coefficients scale each modality's update, where Adam cannot cancel them.
ctx = gradmod.ModulationContext(model, heads, optimizer=optimizer)

for _ in range(100):
    xa, xv, y = batch()
    logits, feats = model(xa, xv)
    loss = F.cross_entropy(logits, y)
    with ctx(features=feats, targets=y):  # hooks exist only inside this block
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()

# the strong modality is slowed (k < 1), the weak one boosted (k > 1)
print({n: round(k, 3) for n, k in zip(ctx.names, ctx.coefficients.tolist(), strict=True)})
