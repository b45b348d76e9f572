"""The integrations, measured: a real ``lightning.Trainer`` per setting against the hand-written
plain gradmod loop (max parameter difference after 2 epochs, per method), and the plain loop's
``GradScaler`` cases, printed as Markdown rows.

Run: ``python benchmarks/integrations.py`` (about a minute on 2 cores). It reuses the test
suite's Lightning harness (``tests/_lightning_common.py``: the module, the data and the plain
loop written from Lightning's documented order of operations).
"""

from __future__ import annotations

import logging
import pathlib
import sys
import tempfile
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from _lightning_common import (
    METHODS,
    Net,
    Setting,
    callback,
    dataset,
    loader,
    max_diff,
    plain_run,
    trainer,
)

import gradmod

SETTINGS = {
    "plain": Setting(),
    "bf16-mixed": Setting(precision="bf16"),
    "fp16 + GradScaler (MixedPrecision plugin)": Setting(precision="fp16"),
    "accumulate_grad_batches=2": Setting(accumulate=2),
    "gradient_clip_val=0.05": Setting(clip=0.05),
}


def row(label: str, cells: list[str]) -> None:
    print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    row("setting (max parameter difference to the plain loop)", list(METHODS))
    print("|" + " --- |" * (len(METHODS) + 1))
    for label, s in SETTINGS.items():
        cells = []
        for m in METHODS:
            net = Net(m)
            trainer(callback(m), s).fit(net, loader(dataset()))
            cells.append(f"{max_diff(net, plain_run(m, s, model=Net(m))):.1e}")
        row(f"Lightning, {label}", cells)
    cells = []
    for m in METHODS:
        ckpt = pathlib.Path(tempfile.mkdtemp()) / "epoch1.ckpt"
        first = trainer(callback(m), Setting(), epochs=1)
        first.fit(Net(m), loader(dataset()))
        first.save_checkpoint(ckpt)
        resumed = Net(m, seed=123)
        trainer(callback(m), Setting()).fit(resumed, loader(dataset()), ckpt_path=ckpt)
        cells.append(f"{max_diff(resumed, plain_run(m, Setting(), model=Net(m))):.1e}")
    row("Lightning, resume from a checkpoint", cells)
    row(
        "plain loop, `with ctx: scaler.scale(loss).backward()` vs no scaler",
        [
            f"{max_diff(plain_run(m, Setting(scaler=True)), plain_run(m, Setting())):.1e}"
            for m in METHODS
        ],
    )
    cells = []
    for m in METHODS:
        try:
            plain_run(m, Setting(scaler=True, give_scaler=False))
            cells.append("not detected (float32, gradient level, no optimizer=)")
        except gradmod.StepError:
            cells.append("StepError before the step")
    row("plain loop, the scaler not given to the context", cells)


if __name__ == "__main__":
    main()
