"""No setting tried twice: each trial's sampler seeded from the study, repeats skipped.

A sampler seeded once per process draws the same sequence in every process that opens
the study with that seed: a resumed search, a second terminal on the same directory, or
a PostgreSQL worker on another machine tried again the settings the first had tried.
``PerTrialSeed`` seeds each trial's sampler from the study's seed and the trial's number,
which the database hands out once per study, so no two trials share a stream, and a search
run again from scratch with its seed draws what it drew before.

A sampler may still propose a setting that a trial already has (a small discrete space,
an enqueued seed, TPE settling on a corner): ``repeats`` finds it, and the worker skips
the trial before it trains (as Optuna's ``GridSampler`` and ``BruteForceSampler`` pass
over the points that are taken).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["PerTrialSeed", "repeats", "trial_seed"]


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s sampler in a study seeded ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeed(optuna.samplers.BaseSampler):
    """A sampler that builds a fresh inner sampler for each trial, seeded with
    ``trial_seed(seed, trial.number)``; every other call goes to it. The samplers it
    wraps (TPE, random, grid) keep no state between trials but their random generator:
    what they learn, they read from the study's trials."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    @property
    def inner(self) -> optuna.samplers.BaseSampler:
        """The sampler of the current trial."""
        return self._inner

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def repeats(trials: Iterable[FrozenTrial], trial: optuna.Trial) -> int | None:
    """The number of an earlier one of ``trials`` (a study's search trials) that tried
    exactly ``trial``'s setting (finished, or running in another worker), else None. Of
    two trials that drew one setting at once, the earlier one runs it."""
    params = trial.params
    for other in trials:
        if (
            other.number < trial.number
            and other.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            and other.params == params
        ):
            return int(other.number)
    return None
