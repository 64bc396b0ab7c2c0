"""The dial: find the right strengths from validation results.

=============  ==================================================================================
module         what it holds
=============  ==================================================================================
space          ``Space``: the knobs a search may turn and how far (``Range``)
budget         ``Budget``: epochs, trials or minutes
trial          ``Trial``: one setting being tried; ``report`` each epoch (``optuna.TrialPruned`` when stopped)
objective      what a trial trains: regdial's ``fit`` (``FitObjective``) or your code (``UserObjective``)
path           the warm-started regularization path
study          the Optuna study: storage, sampler, pruner, heartbeats, budget, the path's claim
online         ``OnlineController``: the dial turned from inside one run, from the curves
hypergradient  ``HypergradientController``: the differentiable knobs turned by their validation gradient
search         ``Search``: the inputs, the directory, the study's identity; hands off to:
strategies     how each strategy spends the budget
workers        the trial loop on the shared study, in this process or spawned ones
choice         the one-standard-error choice, range extension, notes (pure functions of trials)
finish         retraining, the baseline on the test split, the result files
result         ``TuneResult`` and its files
=============  ==================================================================================

The dial imports the training layer and nothing of the reports or the command line.
``regdial.tune`` (the front end) builds a search from a task, a model and its data, or
an objective, runs it and writes its report. Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from regdial._lazy import lazy

if TYPE_CHECKING:
    from regdial.dial.budget import Budget as Budget
    from regdial.dial.hypergradient import HypergradientController as HypergradientController
    from regdial.dial.objective import FitObjective as FitObjective
    from regdial.dial.objective import UserObjective as UserObjective
    from regdial.dial.online import OnlineController as OnlineController
    from regdial.dial.options import STRATEGIES as STRATEGIES
    from regdial.dial.result import TuneResult as TuneResult
    from regdial.dial.search import Search as Search
    from regdial.dial.space import Range as Range
    from regdial.dial.space import Space as Space
    from regdial.dial.trial import Trial as Trial

__getattr__, __dir__, LAZY = lazy(globals())
__all__ = [*LAZY]
