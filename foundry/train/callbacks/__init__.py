"""Everything that happens between training steps, as callbacks (OLMo-core's shape).

The loop (foundry/train/trainer.py) only trains; these observe it, in this order:

- ``Throughput``: tokens/s (data wait included), the data wait itself, MFU.
- ``Logging``: the train record every ``log_interval`` to metrics.jsonl, the console and W&B.
- ``Evaluation``: held-out loss (per eval stream) every ``eval_interval``.
- ``Checkpointing``: the save policy (``save_interval``, the end, preemption) and the one per-step
  agreement between ranks on stopping.

A run adds its own with ``callbacks: [module:Class, path/to/file.py:Class]`` in the YAML or the
``FOUNDRY_CALLBACKS`` environment variable (comma-separated, same forms): each is built with no
arguments and gets the same hooks.
"""

from foundry.train.callbacks.base import Callback, CallbackList, StepOutcome, load_callback

__all__ = ["Callback", "CallbackList", "StepOutcome", "load_callback"]
