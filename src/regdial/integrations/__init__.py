"""regdial inside the trainers people already use.

``regdial.integrations.huggingface.HuggingFaceCallback`` for Hugging Face's ``Trainer`` and
``regdial.integrations.lightning.LightningCallback`` for Lightning's: the same setting,
every knob applied or refused with one line, a ``History`` per run, the diagnosis and
the report at the end, and a ``regdial.Trial`` to report to so that ``regdial.tune``
prunes runs of those trainers. Each module imports its trainer library, which is an
optional extra (``regdial[huggingface]``, ``regdial[lightning]``); nothing else in regdial
imports them.
"""
