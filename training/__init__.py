"""Training a model in its compressed form: `kvexport uptrain` (installed as kvexport.training)."""

from .uptrain import UptrainSettings, run_uptrain

__all__ = ["UptrainSettings", "run_uptrain"]
