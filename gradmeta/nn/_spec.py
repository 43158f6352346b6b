"""Symmetry specs: which axes of which parameters share one neuron permutation.

A spec lists *neuron spaces* (a set of neurons that one permutation acts on, or a fixed set such
as the input pixels), which spaces index every axis of every parameter, and which spaces index the
factors ``A`` (inputs) and ``Δ`` (backprops) of every collected layer. An axis may be a
concatenation of spaces (the rows of an attention projection are the dims of head 0, then head
1, ...), so permuting "inside each head" while keeping heads in place is expressed exactly.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

# Modules / functions that act elementwise (so they commute with any neuron permutation).
_ELEMENTWISE_MODULES = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU,
                        nn.Softplus, nn.Identity, nn.Dropout, nn.Mish, nn.Hardtanh, nn.SELU)
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, torch.sin, torch.nn.functional.relu,
                          torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.tanh,
                          torch.nn.functional.sigmoid, torch.nn.functional.leaky_relu,
                          torch.nn.functional.dropout, torch.nn.functional.elu, torch.nn.functional.softplus}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "sin"}


class SymmetrySpecError(ValueError):
    """The symmetry of a model could not be derived, or a spec does not match a model."""


@dataclass(frozen=True)
class Space:
    """One set of neurons.

    Attributes:
        name: unique name, e.g. ``"level1"`` or ``"blocks.0.ffn"``.
        size: number of neurons.
        permutable: whether a permutation acts on it (hidden units) or not (inputs, outputs, heads' slots).
        position: integer id fed to the sinusoidal *layer id* encoding (the MLP level ``l``,
            the block index of a transformer space).
        kind: role of the neurons (``"input"``, ``"hidden"``, ``"output"`` for MLPs; ``"resid"``,
            ``"ffn"``, ``"qk"``, ``"vo"``, ... for transformers); each kind has its own input embedding.
        group: a second fixed id (the head index of a per-head space).
    """

    name: str
    size: int
    permutable: bool
    position: int = 0
    kind: str = "hidden"
    group: int = 0


@dataclass(frozen=True)
class LayerMap:
    """A collected layer and the neuron spaces its factors are indexed by.

    ``backprops`` ``Δ (B, T, d_out)`` are indexed by ``out_spaces`` concatenated, ``activations``
    ``A (B, T, d_in)`` by ``in_spaces`` concatenated.
    """

    module: str
    out_spaces: tuple[str, ...]
    in_spaces: tuple[str, ...]
    weight: str | None = None
    bias: str | None = None


@dataclass(frozen=True)
class SymmetrySpec:
    """Frozen, printable permutation symmetry of one architecture.

    Attributes:
        spaces: every neuron space.
        params: ``(param_name, axes)`` with ``axes[k]`` the tuple of spaces concatenated along
            axis ``k`` of that parameter (named as in ``model.named_parameters()``).
        layers: the factor layout of every collected layer (forward order).
        arch: ``"mlp"``, ``"transformer"`` or ``"custom"``.

    A hand-written spec for a 3-layer custom MLP ``fc1: 4->8, fc2: 8->8, fc3: 8->2``::

        S = gm.nn.SymmetrySpec
        spec = S.chain({"fc1": (4, 8), "fc2": (8, 8), "fc3": (8, 2)})
    """

    spaces: tuple[Space, ...]
    params: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]
    layers: tuple[LayerMap, ...]
    arch: str = "custom"

    def __post_init__(self):
        names = [s.name for s in self.spaces]
        if len(set(names)) != len(names):
            raise SymmetrySpecError(f"duplicate space names in spec: {names}")
        known = set(names)
        for pname, axes in self.params:
            for ax in axes:
                bad = [s for s in ax if s not in known]
                if bad:
                    raise SymmetrySpecError(f"parameter {pname!r} uses unknown spaces {bad}")
        for lm in self.layers:
            bad = [s for s in lm.out_spaces + lm.in_spaces if s not in known]
            if bad:
                raise SymmetrySpecError(f"layer {lm.module!r} uses unknown spaces {bad}")

    # ----------------------------------------------------------------------------- queries
    def space(self, name: str) -> Space:
        """The space called ``name``."""
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no space {name!r}; spaces: {[s.name for s in self.spaces]}")

    @property
    def param_axes(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        """``{param_name: axes}``."""
        return dict(self.params)

    def axis_size(self, axis: tuple[str, ...]) -> int:
        return sum(self.space(s).size for s in axis)

    def check(self, model: nn.Module) -> None:
        """Raise ``SymmetrySpecError`` if the parameter shapes of ``model`` do not match the spec."""
        named = dict(model.named_parameters())
        for pname, axes in self.params:
            if pname not in named:
                raise SymmetrySpecError(f"spec parameter {pname!r} is not a parameter of {type(model).__name__}")
            want = tuple(self.axis_size(a) for a in axes)
            if tuple(named[pname].shape) != want:
                raise SymmetrySpecError(
                    f"parameter {pname!r} has shape {tuple(named[pname].shape)}, spec says {want} from {axes}")

    # ----------------------------------------------------------------------------- transforms
    def random_permutations(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{space_name: perm}`` with a random permutation for every permutable space."""
        return {s.name: torch.randperm(s.size, generator=generator) for s in self.spaces if s.permutable}

    def axis_index(self, axis: tuple[str, ...], perms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Index tensor that permutes an axis made of ``axis`` spaces (identity on the others)."""
        out, off = [], 0
        for s in axis:
            n = self.space(s).size
            p = perms.get(s)
            out.append((p if p is not None else torch.arange(n)) + off)
            off += n
        return torch.cat(out)

    def permute(self, tensors: dict[str, torch.Tensor], perms: dict[str, torch.Tensor],
                leading: int = 0) -> dict[str, torch.Tensor]:
        """Apply ``perms`` to a ``{param_name: tensor}`` dict (e.g. a state dict or a gradient).

        ``new[..., i, ...] = old[..., perm[i], ...]`` on every permuted axis; ``leading`` axes
        (a batch of gradients, say) are left alone; names not in the spec are returned unchanged.
        """
        axes_of = self.param_axes
        out = {}
        for name, t in tensors.items():
            for k, ax in enumerate(axes_of.get(name, ())):
                t = t.index_select(leading + k, self.axis_index(ax, perms).to(t.device))
            out[name] = t
        return out

    # ----------------------------------------------------------------------------- printing
    def __str__(self) -> str:
        lines = [f"SymmetrySpec(arch={self.arch!r})", "  spaces:"]
        for s in self.spaces:
            kind = "permuted" if s.permutable else "fixed"
            lines.append(f"    {s.name:<28} {s.size:>6}  {kind:<8} kind={s.kind} position={s.position}"
                         + (f" group={s.group}" if s.group else ""))
        lines.append("  parameters:")
        for pname, axes in self.params:
            shown = " x ".join("+".join(a) if len(a) <= 3 else f"{a[0]}+...+{a[-1]} ({len(a)})" for a in axes)
            lines.append(f"    {pname:<28} [{shown}]")
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- builders
    @staticmethod
    def chain(layers: dict[str, tuple[int, int]], biases: bool | dict[str, bool] = True) -> "SymmetrySpec":
        """Spec of an MLP given as an ordered ``{linear_module_name: (d_in, d_out)}`` chain.

        Levels ``0..L``: level 0 (inputs) and level L (outputs) are fixed, hidden levels permuted.
        """
        names = list(layers)
        if not names:
            raise SymmetrySpecError("an MLP chain needs at least one linear layer")
        widths = [layers[names[0]][0]]
        for n in names:
            d_in, d_out = layers[n]
            if d_in != widths[-1]:
                raise SymmetrySpecError(
                    f"layer {n!r} takes {d_in} inputs but the previous level has {widths[-1]} neurons")
            widths.append(d_out)
        L = len(names)
        spaces = tuple(Space(f"level{l}", w, 0 < l < L, l,
                             "input" if l == 0 else "output" if l == L else "hidden")
                       for l, w in enumerate(widths))
        params, maps = [], []
        for l, n in enumerate(names, start=1):
            has_b = biases if isinstance(biases, bool) else biases.get(n, True)
            params.append((f"{n}.weight", ((f"level{l}",), (f"level{l-1}",))))
            if has_b:
                params.append((f"{n}.bias", ((f"level{l}",),)))
            maps.append(LayerMap(n, (f"level{l}",), (f"level{l-1}",), f"{n}.weight",
                                 f"{n}.bias" if has_b else None))
        return SymmetrySpec(spaces, tuple(params), tuple(maps), "mlp")

    @property
    def widths(self) -> list[int]:
        """Level widths ``d_0..d_L`` (MLP specs only)."""
        if self.arch != "mlp":
            raise SymmetrySpecError(f"widths are defined for MLP specs, this one is {self.arch!r}")
        return [s.size for s in self.spaces]


_SPEC_BUILDERS: dict[type, Callable[[nn.Module], SymmetrySpec]] = {}


def register_spec(cls: type, builder: Callable[[nn.Module], SymmetrySpec]) -> None:
    """Make :func:`symmetry_spec` use ``builder(model)`` for instances of ``cls`` (and its subclasses).

    Architectures whose symmetry cannot be traced as an MLP chain (transformers, custom blocks)
    register a builder once, next to the class; the most specific registered class wins.
    """
    if not isinstance(cls, type) or not callable(builder):
        raise TypeError("register_spec(cls, builder) needs a class and a callable builder(model) -> SymmetrySpec")
    _SPEC_BUILDERS[cls] = builder


def symmetry_spec(model: nn.Module) -> SymmetrySpec:
    """Derive the neuron-permutation symmetry of ``model``.

    Supported: classes registered with :func:`register_spec` (e.g. ``gradmeta.models.GPT``; Hugging
    Face ``GPT2LMHeadModel`` and ``LlamaForCausalLM``, see ``gradmeta.nn._hf_spec``; torch's
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``, see ``gradmeta.nn._torch_spec``) and
    MLPs (``nn.Sequential`` or any module whose traced forward is a chain of ``nn.Linear`` and
    elementwise activations). Anything else raises ``SymmetrySpecError`` saying what failed; write
    a ``SymmetrySpec`` by hand (``SymmetrySpec.chain`` for custom MLPs) and pass it as ``spec=`` to
    the models, or register a builder for the class.
    """
    from ._hf_spec import register_loaded_hf_specs
    register_loaded_hf_specs()      # Hugging Face GPT-2 / Llama, if transformers is loaded
    for cls in type(model).__mro__:
        if cls in _SPEC_BUILDERS:
            return _SPEC_BUILDERS[cls](model)
    return SymmetrySpec.chain(*_trace_mlp_chain(model))


def _trace_mlp_chain(model: nn.Module) -> tuple[dict[str, tuple[int, int]], dict[str, bool]]:
    where = f"{type(model).__name__}"
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - fx raises many types
        raise SymmetrySpecError(
            f"could not trace {where} with torch.fx ({type(e).__name__}: {e}); write the spec by hand "
            "with gm.nn.SymmetrySpec.chain({...}) or SymmetrySpec(...)") from None
    modules = dict(model.named_modules())
    chain: dict[str, tuple[int, int]] = {}
    biases: dict[str, bool] = {}
    current = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise SymmetrySpecError(f"{where}: more than one input; only single-input MLP chains are derived")
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise SymmetrySpecError(f"{where}: the output is not the end of the layer chain")
            continue
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if tensor_args != [current]:
            raise SymmetrySpecError(
                f"{where}: node {node.name!r} ({node.op} {node.target}) does not continue a single chain "
                "(skip connections or multi-input ops are not an MLP)")
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.Linear):
                chain[node.target] = (m.in_features, m.out_features)
                biases[node.target] = m.bias is not None
            elif not isinstance(m, _ELEMENTWISE_MODULES):
                raise SymmetrySpecError(
                    f"{where}: module {node.target!r} ({type(m).__name__}) is neither nn.Linear nor a known "
                    "elementwise activation, so its neuron symmetry cannot be derived")
        elif not ((node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS)
                  or (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)):
            raise SymmetrySpecError(f"{where}: operation {node.op} {node.target} is not elementwise")
        current = node
    if not chain:
        raise SymmetrySpecError(f"{where}: no nn.Linear layers found")
    if len(set(chain)) != len([n for n in graph.nodes if n.op == "call_module" and n.target in chain]):
        raise SymmetrySpecError(f"{where}: a Linear module is applied twice (weight sharing)")
    owned = {f"{n}.{k}" for n in chain for k in ("weight", "bias")}
    extra = [n for n, _ in model.named_parameters() if n not in owned]
    if extra:
        raise SymmetrySpecError(f"{where}: parameters {extra} are outside the Linear chain")
    return chain, biases
