"""Use a trained model: load it from a run or an exported folder and ask it counterfactual questions.

``CounterfactualModel.from_pretrained(path)`` and ``model.counterfactual(images, do={"cpa_mid": "+20"})``
are the Python surface; the ``counterfactual``, ``augment``, ``export-model`` and ``explore``
commands are built on them. See docs/use.md.
"""

from causalimg.api.bundle import ModelVersionError, export_model
from causalimg.api.model import CounterfactualModel, CounterfactualResult, Factual

__all__ = ["CounterfactualModel", "CounterfactualResult", "Factual", "ModelVersionError", "export_model"]
