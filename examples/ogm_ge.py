"""OGM-GE: slow the dominant modality, read off a linear fusion head, plus GE noise.

Two synthetic modalities: "audio" is clean and dominates, "video" is noisy. The fusion head is
ONE nn.Linear over the concatenated features, so OGM-GE can split it into unimodal logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

import gradmod

torch.manual_seed(0)
n, classes = 512, 4
y = torch.randint(0, classes, (n,))
audio = F.one_hot(y, classes).float() @ torch.randn(classes, 16) + 0.3 * torch.randn(n, 16)
video = F.one_hot(y, classes).float() @ torch.randn(classes, 24) + 2.0 * torch.randn(n, 24)

encoders = nn.ModuleDict(
    {
        "audio": nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
        "video": nn.Sequential(nn.Linear(24, 32), nn.ReLU()),
    }
)
model = nn.ModuleDict({"enc": encoders, "head": nn.Linear(64, classes)})

ctx = gradmod.ModulationContext(
    model,
    encoders={"audio": "enc.audio", "video": "enc.video"},
    method=gradmod.OGMGE(alpha=0.5, window=(0, 5), seed=0),  # modulate epochs 0-5 only
    fusion="head",  # features are concatenated in the order of `encoders`
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for epoch in range(8):
    ctx.set_epoch(epoch)
    for idx in torch.randperm(n).split(64):
        feats = {"audio": encoders["audio"](audio[idx]), "video": encoders["video"](video[idx])}
        loss = F.cross_entropy(
            model["head"](torch.cat([feats["audio"], feats["video"]], 1)), y[idx]
        )
        with ctx(features=feats, targets=y[idx]):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"epoch {epoch}: k = {dict(zip(ctx.names, ctx.coefficients.tolist(), strict=True))}")
