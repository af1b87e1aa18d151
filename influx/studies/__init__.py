"""The studies: each composes influx's pieces into a question with a result object.

* :mod:`influx.studies.fragility`: influence vs leave-one-out over depth, width and weight
  decay (Basu, Pope and Feizi 2021).
* :mod:`influx.studies.gap_study`: the five-gap decomposition (:mod:`influx.gaps`) over width
  and training time (Bae et al. 2022). ``influx.studies.gaps`` is its deprecated former name.
* :mod:`influx.studies.mislabel`: finding flipped labels by self-influence and baselines.
* :mod:`influx.studies.lds`: linear datamodeling score of every attribution method against
  subset retraining, with cost.

Each module has ``run(config) -> Result``, a frozen ``Config`` dataclass with defaults
and a ``quick()`` preset; results have ``to_dict()`` (JSON-ready), ``to_markdown()``
(also ``str()``) and ``plot(path)``. Studies compute in float64 by default, scoped with
``jax.enable_x64`` (the caller's global JAX configuration is left alone).

The studies are influx's research harness: they need the ``studies`` extra
(``pip install "influx[studies]"``: scikit-learn for the bundled data sets, matplotlib for
the plots, tqdm for progress bars), which the library itself does not. Importing them
loads none of the three; running them does.
"""

import sys as _sys

from influx.studies import fragility, gap_study, lds, mislabel
from influx.studies.fragility import FragilityConfig, FragilityResult
from influx.studies.gap_study import GapsConfig, GapsResult
from influx.studies.lds import LDSConfig, LDSResult
from influx.studies.mislabel import MislabelConfig, MislabelResult

__all__ = [
    "FragilityConfig",
    "FragilityResult",
    "GapsConfig",
    "GapsResult",
    "LDSConfig",
    "LDSResult",
    "MislabelConfig",
    "MislabelResult",
    "fragility",
    "gap_study",
    "gaps",
    "lds",
    "mislabel",
]

# deprecated alias (one release): the study module was ``influx.studies.gaps``, easy to confuse
# with the library's ``influx.gaps``
gaps = gap_study
_sys.modules.setdefault("influx.studies.gaps", gap_study)
