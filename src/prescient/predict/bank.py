"""One step-time model per instance, or one shared by all: the plumbing both model kinds share.

`ModelBank` keys models by instance id (or by one shared key, as upstream's single predictor),
feeds them profiling samples, refits them at the end of each status poll, and hands the prefill
replay per-row quadratic coefficients. A subclass says how to make a model, feed it a sample,
refit it, and read its coefficients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np


class ProfilingSampleLike(Protocol):
    """What a profiling sample carries (`prescient.cms.view.ProfilingSample` satisfies it)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def num_scheduled_prefill_tokens(self) -> int: ...

    @property
    def step_duration_ms(self) -> float: ...


class _Model(Protocol):
    @property
    def fitted(self) -> bool: ...


M = TypeVar("M", bound=_Model)


class ModelBank(Generic[M]):
    """Models by instance id (or one shared); subclasses provide the four model hooks."""

    _SHARED_KEY = ""

    def __init__(self, *, shared: bool) -> None:
        self._shared = shared
        self._models: dict[str, M] = {}

    # ---- hooks ---------------------------------------------------------------------------

    def _new_model(self) -> M:
        raise NotImplementedError

    def _feed(self, model: M, sample: ProfilingSampleLike) -> bool:
        """Add the sample; True if it reset the model (drift)."""
        raise NotImplementedError

    def _refit(self, model: M) -> bool:
        """Refit if the model needs it; True if it did."""
        raise NotImplementedError

    def _coefficients(self, model: M) -> tuple[float, float, float]:
        """`(a, b, c)` of the step time `a x^2 + b x + c` ms over prefill tokens `x`."""
        raise NotImplementedError

    # ---- the bank ------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        return self._shared

    def _key(self, instance_id: str) -> str:
        return self._SHARED_KEY if self._shared else instance_id

    def add(self, sample: ProfilingSampleLike) -> bool:
        """Feed one sample to its instance's model (or the shared one); True on a drift reset."""
        key = self._key(sample.instance_id)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self._new_model()
        return self._feed(model, sample)

    def add_all(self, samples: Iterable[ProfilingSampleLike]) -> int:
        """Feed samples in order; returns how many triggered a drift reset."""
        return sum(self.add(sample) for sample in samples)

    def maybe_refit_all(self) -> int:
        """Refit every model that needs it (end of a status loop); returns how many."""
        return sum(self._refit(m) for m in self._models.values())

    def get(self, instance_id: str) -> M | None:
        """The instance's model (the shared one in shared mode) if fitted, else None."""
        model = self._models.get(self._key(instance_id))
        return model if model is not None and model.fitted else None

    def coefficient_arrays(self, instance_ids: Sequence[str]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(a, b, c)` arrays aligned with `instance_ids`, NaN where no fitted model.

        This is the input `predict_computed_prefill_tokens` expects.
        """
        coef = np.full((len(instance_ids), 3), np.nan)
        for row, instance_id in enumerate(instance_ids):
            model = self.get(instance_id)
            if model is not None:
                coef[row] = self._coefficients(model)
        return coef[:, 0], coef[:, 1], coef[:, 2]

    def reset(self, instance_id: str | None = None) -> None:
        """Drop the samples of one instance, or of all with None.

        Raises:
            ValueError: an instance id in shared mode, where samples are not kept per instance.
        """
        if instance_id is None:
            self._models.clear()
        elif self._shared:
            raise ValueError("a shared bank keeps no per-instance samples; "
                             "call reset() without an instance id")
        else:
            self._models.pop(instance_id, None)
