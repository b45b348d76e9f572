"""AGM: Shapley mono-modal responses, and their gradients rescaled by AGM's coefficients.

The responses phi_m split the fused logits between the modalities (missing modalities set to
zero, 2**M - 1 passes of the fusion head). Train on their sum and hand them to the context.
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


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU()) for m, x in inputs.items()}
        )
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    def fuse(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([feats["audio"], feats["video"]], 1))


model = Net()
ctx = gradmod.ModulationContext(
    model, encoders={"audio": "enc.audio", "video": "enc.video"}, method=gradmod.AGM(alpha=1.0)
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for epoch in range(5):
    for idx in torch.randperm(n).split(64):
        feats = {m: model.enc[m](x[idx]) for m, x in inputs.items()}
        phi = gradmod.functional.shapley_responses(model.fuse, feats, module=model.head)
        loss = F.cross_entropy(sum(phi.values()), y[idx])  # the sum is the fused output
        with ctx(features=phi, targets=y[idx]):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"epoch {epoch}: k = {dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))}")
