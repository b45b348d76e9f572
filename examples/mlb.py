"""MLB: unimodal heads in the objective (multi-loss), balanced by MLB's coefficients.

Your loss stays the fused cross-entropy: gradmod adds each head's loss gradient to its live
encoder output inside backward, and trains the heads. Swap in gradmod.MultiLoss() for plain
multi-loss, or add CGGM's direction loss with direction=0.2 (heads ending in the fusion head's
shape, fusion="head").
"""

import torch
import torch.nn.functional as F
from torch import nn

import gradmod

torch.manual_seed(0)
n, classes = 512, 4
y = torch.randint(0, classes, (n,))
inputs = {
    "audio": F.one_hot(y, classes).float() @ torch.randn(classes, 16) + 0.3 * torch.randn(n, 16),
    "video": F.one_hot(y, classes).float() @ torch.randn(classes, 24) + 2.0 * torch.randn(n, 24),
}
encoders = nn.ModuleDict(
    {m: nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU()) for m, x in inputs.items()}
)
model = nn.ModuleDict({"enc": encoders, "head": nn.Linear(64, classes)})
heads = {m: nn.Linear(32, classes) for m in inputs}  # one unimodal head per modality

ctx = gradmod.ModulationContext(
    model,
    heads,
    encoders={"audio": "enc.audio", "video": "enc.video"},
    method=gradmod.MLB(alpha=0.8, scale="official"),  # also scale heads and fusion slices
    fusion="head",
)
optimizer = torch.optim.Adam([*model.parameters(), *ctx.classifier_parameters()], lr=1e-3)

for epoch in range(5):
    for idx in torch.randperm(n).split(64):
        feats = {m: encoders[m](x[idx]) for m, x in inputs.items()}
        loss = F.cross_entropy(
            model["head"](torch.cat([feats["audio"], feats["video"]], 1)), y[idx]
        )
        with ctx(features=feats, targets=y[idx]):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"epoch {epoch}: k = {dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))}")
