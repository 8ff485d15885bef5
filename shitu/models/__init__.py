"""Recognition models: the plugin-facing spec (:class:`ModelSpec`) and shared model code.

Importing this package must stay cheap (no JAX): specs name their builders as ``"module:function"``
strings that are imported only when a model is built.
"""

from shitu.models.spec import AugmentThenNormalize, ImportReport, ModelSpec, TrainingRecipe

__all__ = ["AugmentThenNormalize", "ImportReport", "ModelSpec", "TrainingRecipe"]
