"""OPM: drop the dominant modality's features in the forward, for part of the batch.

Two synthetic modalities: "audio" is clean and dominates, "video" is noisy. OPM reads unimodal
logits off the fusion head (ONE nn.Linear over the concatenated features), and in every training
forward zeroes the audio features of a random subset of the batch (probability q, with
probability p_exe per step), so the fused head must also learn from video. ``ctx.prepare``
returns the features the fusion head consumes; the block still gets the encoder outputs.
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
    method=gradmod.OPM(q_base=0.5, lam=0.5, p_exe=0.7, seed=0),  # the official values
    fusion="head",  # features are concatenated in the order of `encoders`
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def fuse(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    return model["head"](torch.cat([feats["audio"], feats["video"]], 1))


for epoch in range(4):
    for idx in torch.randperm(n).split(64):
        feats = {"audio": encoders["audio"](audio[idx]), "video": encoders["video"](video[idx])}
        logits = fuse(ctx.prepare(feats, y[idx]))  # OPM drops here (training only)
        with ctx(features=feats, targets=y[idx]):
            F.cross_entropy(logits, y[idx]).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = ctx.state_dict()
    q = dict(zip(ctx.names, state["last_drop_probability"].tolist(), strict=True))
    dropped = dict(zip(ctx.names, state["dropped"].tolist(), strict=True))
    print(f"epoch {epoch}: q = {q} dropped = {dropped}")

model.eval()  # evaluation: prepare hands the features back untouched
with torch.no_grad():
    feats = {"audio": encoders["audio"](audio), "video": encoders["video"](video)}
    same = all(v is feats[k] for k, v in ctx.prepare(feats, y).items())
    accuracy = (fuse(feats).argmax(1) == y).float().mean().item()
print(f"eval: unchanged = {same}, accuracy = {accuracy:.3f}")
