"""Experiments: the tasks that ``gradmeta run tasks/<spec>.toml`` executes, their plots and studies.

This package imports the library (``gradmeta.grads``, ``nn``, ``curvature``, ``lopt``, ``inr``,
``lora``, ``data``) and is never imported by it. Importing it registers every built-in task in
:data:`gradmeta.specs.TASKS`:

* ``grads`` -- ``gradients_digits``: gradient statistics along training of a digits MLP;
* ``nn`` -- ``nn_capability``: what GradMetaNet can represent that averaged gradients cannot;
* ``curvature`` -- ``curvature_learned`` / ``curvature_learned_trace``: learned Fisher estimators;
* ``lopt`` -- ``lopt_meta_train`` / ``lopt_eval``: meta-training and evaluating learned optimizers;
* ``inr`` -- ``inr_editing``: INR zoos and editors;
* ``lora`` -- ``lora_zoo`` / ``lora_predict``: a LoRA zoo and predicting its properties.
"""
from . import curvature, grads, inr, lopt, lora, nn  # noqa: F401  (each registers its tasks)

__all__ = ["grads", "nn", "curvature", "lopt", "inr", "lora"]
