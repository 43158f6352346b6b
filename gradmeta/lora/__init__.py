"""Learning on LoRA adapters: PEFT adapter I/O, LoRA datasets, GL(r)-invariant models and baselines.

* :func:`load_adapter` reads a PEFT adapter folder, a diffusers or a kohya / A1111 file into an
  :class:`Adapter`, a mapping ``module name -> LoraFactors`` with ``U`` (n×r), ``V`` (m×r), ``scale`` and ``delta()``
  (equal to PEFT's ``get_delta_weight``);
* :class:`LoraDataset` finds and checks every adapter under a folder, with labels from a CSV;
* :func:`stack_factors` batches adapters of any rank (zero-padded, scale folded into ``U``);
* :class:`GLNet`: a ``GL(r)^L``-invariant, rank-agnostic model built from the factor-pair layers
  of :mod:`gradmeta.nn`; baselines :class:`FactorMLP`, :class:`DenseMLP`, :class:`SVDMLP`,
  :class:`ProcrustesMLP`, :class:`LayerTransformer`; :func:`save_model` / :func:`load_model`;
* :func:`train` (validation split, model selection, device) on your own labels and :func:`predict`;
* :func:`canonical_svd` / :func:`canonical_adapter` (sign-fixed SVD form), :func:`procrustes_align`,
  :func:`random_gl`.
"""
from ._adapter import Adapter, AdapterFormatError, LoraFactors, natural_key
from ._formats import load_lora_file
from ._load import CONFIG_FILE, DIFFUSERS_COMPONENTS, WEIGHT_FILES, list_adapters, load_adapter
from ._baselines import DenseMLP, FactorMLP, LayerTransformer, ProcrustesMLP, SVDMLP
from ._canonical import canonical_adapter, canonical_svd, procrustes_align, random_gl
from ._dataset import (AdapterMismatchError, LabelError, LoraDataset, check_compatible, find_adapter_folders,
                       stack_factors)
from ._models import MODELS, AdapterModel, GLNet, load_model, save_model
from ._select import SELECTION_RULES, excess_over_best, select_variant
from ._train import MODEL_ALIASES, TrainResult, predict, train

__all__ = [
    "load_adapter", "load_lora_file", "list_adapters", "Adapter", "LoraFactors", "AdapterFormatError", "natural_key",
    "LoraDataset", "AdapterMismatchError", "LabelError", "find_adapter_folders", "check_compatible", "stack_factors",
    "AdapterModel", "GLNet", "FactorMLP", "DenseMLP", "SVDMLP", "ProcrustesMLP", "LayerTransformer", "MODELS",
    "save_model", "load_model", "select_variant", "excess_over_best", "SELECTION_RULES", "train", "predict", "TrainResult", "MODEL_ALIASES",
    "canonical_svd", "canonical_adapter", "procrustes_align", "random_gl",
    "CONFIG_FILE", "WEIGHT_FILES", "DIFFUSERS_COMPONENTS",
]
