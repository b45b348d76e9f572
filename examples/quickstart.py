"""The README's quickstart, as a script: CGGM on a two-modality late-fusion model."""

import torch
import torch.nn.functional as F
from torch import nn

import gradmod


class LateFusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(30, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, xa, xv):
        feats = {"audio": self.audio(xa), "video": self.video(xv)}
        return self.head(torch.cat([feats["audio"], feats["video"]], dim=1)), feats


model = LateFusion()
# One unimodal classifier per modality, fed the detached encoder output. Its last layer has the
# shape of the fusion head's last layer, which CGGM's direction loss compares it with.
classifiers = {
    m: nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)) for m in ("audio", "video")
}
# Encoders default to the model's submodules named like the classifier keys (model.audio, ...).
ctx = gradmod.ModulationContext(
    model, classifiers, method=gradmod.CGGM(rho=1.3, lam=0.2), fusion="head"
)
optimizer = torch.optim.Adam([*model.parameters(), *ctx.classifier_parameters()], lr=1e-3)

for _ in range(50):
    xa, xv, y = torch.randn(64, 20), torch.randn(64, 30), torch.randint(0, 5, (64,))
    logits, feats = model(xa, xv)
    loss = F.cross_entropy(logits, y)
    with ctx(features=feats, targets=y):  # hooks exist only inside this block
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
    optimizer.step()
    optimizer.zero_grad()

print(dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True)))
