"""MMPareto: each encoder's fused-loss and unimodal-loss gradients integrated without conflict.

Your loss stays the fused cross-entropy. Inside the block, gradmod computes each unimodal
head's loss gradient on its encoder, stashes the fused loss's encoder gradients during your
backward, and replaces them by MMPareto's combination: the plain sum where the two agree, the
min-norm common descent direction (raised to the sum's magnitude) where they conflict. The
heads are trained too (give ctx.classifier_parameters() to the optimizer). Prints, per epoch,
the share of steps where each encoder's two gradients conflicted and the fused accuracy.
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
    "video": F.one_hot(y, classes).float() @ torch.randn(classes, 24) + 4.0 * torch.randn(n, 24),
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
    method=gradmod.MMPareto(),  # MMPareto(rescale="tensor", policy="official"): as the paper's code
)
# the official runs use SGD with momentum
optimizer = torch.optim.SGD(
    [*model.parameters(), *ctx.classifier_parameters()], lr=0.02, momentum=0.9
)

for epoch in range(4):
    conflicts = torch.zeros(2)
    batches = torch.randperm(n).split(64)
    for idx in batches:
        feats = {m: encoders[m](x[idx]) for m, x in inputs.items()}
        loss = F.cross_entropy(
            model["head"](torch.cat([feats["audio"], feats["video"]], 1)), y[idx]
        )
        with ctx(features=feats, targets=y[idx]):
            loss.backward()
        conflicts += ctx.scores["conflict"].float()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        feats = {m: encoders[m](x) for m, x in inputs.items()}
        logits = model["head"](torch.cat([feats["audio"], feats["video"]], 1))
        accuracy = (logits.argmax(1) == y).float().mean().item()
    share = dict(zip(ctx.names, (conflicts / len(batches)).tolist(), strict=True))
    print(f"epoch {epoch}: conflict = {share}, accuracy = {accuracy:.3f}")
