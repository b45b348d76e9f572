"""InfoReg: hold the prime modality back while the encoders acquire information fastest.

Two synthetic modalities: "audio" is clean and leads, "video" is noisy. The fusion head is ONE
nn.Linear over the concatenated features, from which InfoReg reads the unimodal logits (their
cross-entropies join the objective). While the acquisition rate of the epoch is above 0.05 (the
"prime learning window"), the leading modality's encoder is pulled toward its weights at the
start of the epoch with strength beta; once the information acquired per epoch stops growing,
the window closes and beta is 0. Printed per epoch: the rate and the mean beta of each modality.
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
    method=gradmod.InfoReg(window=3),  # the rate's moving sum over 3 epochs (official: 10)
    fusion="head",  # features are concatenated in the order of `encoders`
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for epoch in range(6):
    ctx.set_epoch(epoch)  # required: the anchor and the window count epochs
    betas = []
    for idx in torch.randperm(n).split(64):
        feats = {"audio": encoders["audio"](audio[idx]), "video": encoders["video"](video[idx])}
        loss = F.cross_entropy(
            model["head"](torch.cat([feats["audio"], feats["video"]], 1)), y[idx]
        )
        with ctx(features=feats, targets=y[idx]):
            loss.backward()
        betas.append(ctx.scores["beta"])
        optimizer.step()
        optimizer.zero_grad()
    rate = [round(r, 3) for r in ctx.scores["rate"].tolist()]
    beta = torch.stack(betas).mean(0).tolist()
    print(
        f"epoch {epoch}: rate = {dict(zip(ctx.names, rate, strict=True))}, "
        f"beta = {dict(zip(ctx.names, beta, strict=True))}"
    )
