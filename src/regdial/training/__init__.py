"""Training: ``fit`` a model under one setting and record its ``History``.

=============  ==============================================================================
module         what it holds
=============  ==============================================================================
fit            ``fit``: the loop, checkpoints, exact resume, Ctrl-C, divergence, DDP
options        ``RunOptions``: the one table of training options (epochs, lr, device...)
source         where batches come from: a ``Dataset``'s tensors or the user's loaders
batches        tuples, dicts with ``labels``, adapters; the model's logits
metrics        ``evaluate``: loss, accuracy or RMSE with standard errors, user metrics
history        ``History``: one row per epoch, CSV and JSON
logs           Lightning ``metrics.csv`` and Hugging Face ``trainer_state.json`` as a History
checkpoint     nested state as safetensors + JSON, written atomically, read back checked
devices        device choice, mixed precision, random states
distributed    data-parallel training under torchrun
progress       the progress bar and Ctrl-C
tasks          the built-in tasks (``Dataset``, ``TASKS``)
data           ``load_data``: the user's ``.npz``/``.csv`` files, checked
models         the built-in models, sized from the data
=============  ==============================================================================

Nothing here imports the dial or the reports. Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regdial._lazy import lazy

if TYPE_CHECKING:
    from regdial.training.data import load_data as load_data
    from regdial.training.fit import fit as fit
    from regdial.training.history import History as History
    from regdial.training.metrics import evaluate as evaluate
    from regdial.training.models import build_model as build_model
    from regdial.training.options import RunOptions as RunOptions
    from regdial.training.tasks import TASKS as TASKS
    from regdial.training.tasks import Dataset as Dataset
    from regdial.training.tasks import load_task as load_task

__getattr__, __dir__, LAZY = lazy(globals())
__all__ = [*LAZY]
