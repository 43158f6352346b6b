"""Equivariant networks on gradients and low-rank weights.

``symmetry_spec(model)`` derives which axes of which parameters share a neuron permutation;
``GradMetaNet.for_model(model, readout=..., variant="base"|"plusplus")`` builds a network on a
``GradientSet`` that is exactly equivariant to those permutations and invariant to data order.
"""
from ._layers import (NEURON_ATTENTIONS, PRODUCTS, AttentionBlock, BilinearReadout, DataPool, GeluReadout,
                      NeuronDeepSets, ProductReadout, SetNeuronLayer, linear_attention)
from ._baselines import AveragedGradientNet, FlatFactorMLP, PerParamDeepSets
from ._factor_pair import (FactorPairHead, FactorPairLinear, FactorPairNet, GLGate, gradient_factor_pairs,
                           pair_product, singular_value_features)
from ._inputs import NeuronLayout
from ._models import GradMetaNet, GradMetaNetPlusPlus, PooledGradMetaNet
from ._spec import LayerMap, Space, SymmetrySpec, SymmetrySpecError, register_spec, symmetry_spec
from . import _torch_spec  # noqa: E402,F401  (registers nn.TransformerEncoder(Layer) specs)

__all__ = ["symmetry_spec", "register_spec", "SymmetrySpec", "Space", "LayerMap", "SymmetrySpecError", "NeuronLayout",
           "GradMetaNet", "PooledGradMetaNet", "GradMetaNetPlusPlus", "SetNeuronLayer", "DataPool", "NeuronDeepSets",
           "AttentionBlock", "ProductReadout", "GeluReadout", "BilinearReadout", "PRODUCTS",
           "NEURON_ATTENTIONS", "linear_attention",
           "PerParamDeepSets", "FlatFactorMLP", "AveragedGradientNet",
           "FactorPairLinear", "GLGate", "FactorPairHead", "FactorPairNet", "pair_product",
           "singular_value_features", "gradient_factor_pairs"]
