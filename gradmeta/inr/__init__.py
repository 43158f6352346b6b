"""INR editing: SIRENs, batched fitting, zoos, image edits and equivariant editors.

* :class:`Siren` / :func:`siren_apply`: the INR as a module and as a pure function on
  ``{name: tensor}`` parameters (a leading axis = a stack of INRs);
* :func:`fit_inrs`: fit many INRs at once (``vmap`` over stacked parameters, per-INR Adam);
* :func:`build_zoo` / :func:`load_zoo`: zoos as safetensors shards + ``index.json`` (resume,
  ``torchrun`` sharding, corrupt shards named);
* :data:`EDITS` / :func:`register_edit`: image → image edits (dilation, erosion, contrast);
* :func:`inr_gradient_set`: the gradient set of an INR at fixed random coordinates;
* :class:`INREditor` and :func:`edit`: equivariant editors predicting ``Δθ``;
  :func:`fit_editor` (rendered-image loss) and :func:`evaluate_editor` (held-out pixel MSE);
* the short path: :func:`fit` (one image -> ``Siren``), :func:`load_editor` (shipped or saved
  editors), ``editor(siren)``, ``siren.render(H, W)``, :func:`train_editor` (images -> editor).
"""
from ._api import FIT_LR, FIT_STEPS, fit, load_editor, shipped_editors, train_editor
from ._editors import EDITOR_FORMAT, FEATURES, PRODUCTS, INREditor, edit, parse_variant
from ._edits import EDITS, apply_edit, contrast, dilate, erode, get_edit, register_edit
from ._features import (FeatureSet, ProbeFactors, ProbeSet, factor_rms, gradient_factor_sets, inr_gradient_set,
                        probe_coordinates, probe_factor_sets, rescale_sets)
from ._fit import FitResult, fit_inrs, psnr, render
from ._siren import (DEFAULT_OMEGA0, Siren, pixel_grid, siren_apply, siren_init, siren_spec, stack_params,
                     unstack_params)
from ._train import evaluate_editor, fit_editor
from ._zoo import INRZoo, ZooError, build_zoo, load_zoo, write_shard, zoo_images

__all__ = [
    "fit", "load_editor", "shipped_editors", "train_editor", "FIT_STEPS", "FIT_LR", "EDITOR_FORMAT",
    "Siren", "siren_apply", "siren_init", "siren_spec", "pixel_grid", "stack_params", "unstack_params",
    "DEFAULT_OMEGA0", "fit_inrs", "FitResult", "psnr", "render",
    "INRZoo", "ZooError", "build_zoo", "load_zoo", "write_shard", "zoo_images",
    "EDITS", "register_edit", "get_edit", "apply_edit", "dilate", "erode", "contrast",
    "probe_coordinates", "inr_gradient_set", "ProbeSet", "ProbeFactors", "FeatureSet", "gradient_factor_sets",
    "probe_factor_sets", "factor_rms", "rescale_sets",
    "INREditor", "FEATURES", "PRODUCTS", "parse_variant", "edit", "fit_editor", "evaluate_editor",
]
