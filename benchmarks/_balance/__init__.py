"""Helpers of ``benchmarks/balance.py`` ("Does balancing help?"), one job per module.

* :mod:`.data`: the settings (UCI Multiple Features view sets, the synthetic competition sets).
* :mod:`.models`: late-fusion model, unimodal heads, CGGM classifiers, share logits.
* :mod:`.methods`: the registry of compared method variants (the extension point).
* :mod:`.train`: one training run, linear probes, traces, one (setting, optimizer, seed) job.
* :mod:`.stats`: mean/sd, paired t test (scipy), gap closed, coefficient statistics.
* :mod:`.report`: the Markdown summary.
* :mod:`.plots`: the PNG figures.
"""
