"""Integrations with the frameworks users train with.

* :mod:`gradmod.integrations.lightning` — a ``lightning.Trainer`` callback (extra
  ``gradmod[lightning]``).
* :mod:`gradmod.integrations.accelerate` — Hugging Face Accelerate (extra
  ``gradmod[accelerate]``).

Each module imports its framework on import; ``import gradmod`` never does.
"""
