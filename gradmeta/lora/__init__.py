"""Learning on LoRA adapters: PEFT adapter I/O, LoRA datasets, GL(r)-invariant models and baselines.

* :func:`load_adapter` reads a PEFT adapter folder into an :class:`Adapter`, a mapping
  ``module name -> LoraFactors`` with ``U`` (n×r), ``V`` (m×r), ``scale`` and ``delta()``
  (equal to PEFT's ``get_delta_weight``);
* :class:`LoraDataset` finds and checks every adapter under a folder, with labels from a CSV;
* :func:`stack_factors` batches adapters of any rank (zero-padded, scale folded into ``U``).
"""
from ._adapter import (CONFIG_FILE, DIFFUSERS_COMPONENTS, WEIGHT_FILES, Adapter, AdapterFormatError, LoraFactors,
                       list_adapters, load_adapter, natural_key)
from ._dataset import AdapterMismatchError, LoraDataset, check_compatible, find_adapter_folders, stack_factors

__all__ = [
    "load_adapter", "list_adapters", "Adapter", "LoraFactors", "AdapterFormatError", "natural_key",
    "LoraDataset", "AdapterMismatchError", "find_adapter_folders", "check_compatible", "stack_factors",
    "CONFIG_FILE", "WEIGHT_FILES", "DIFFUSERS_COMPONENTS",
]
