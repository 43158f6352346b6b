"""Per-example losses for Hugging Face style outputs (any object with ``.logits``, a tuple whose
first item is the logits, or a logits tensor)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in {type(outputs).__name__}: expected a tensor, an object with "
                    ".logits or a tuple whose first item is the logits")


def causal_lm_losses(outputs, labels: torch.Tensor, ignore_index: int = -100, shift: bool = True) -> torch.Tensor:
    """``(B,)`` next-token cross-entropy of each example, averaged over its own labelled tokens.

    Args:
        outputs: logits ``(B, T, V)`` (or an output object / tuple holding them).
        labels: ``(B, T)`` token ids; positions equal to ``ignore_index`` (``-100``, as in Hugging Face,
            e.g. padding) do not count. An example without labelled tokens has loss 0.
        shift: predict ``labels[:, t + 1]`` from position ``t`` (Hugging Face's convention when
            ``labels = input_ids``); ``False`` if the labels are already aligned with the logits.

    Note: Hugging Face's own loss averages over all labelled tokens of the batch; per-example
    gradients need each example's loss alone, so here each example is averaged over its tokens.
    """
    logits = _logits(outputs)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                          reduction="none").view(labels.shape)
    count = (labels != ignore_index).sum(1).clamp(min=1)
    return tok.sum(1) / count.to(tok.dtype)


def sequence_classification_losses(outputs, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-example loss of a sequence classifier: cross-entropy for integer ``labels (B,)``,
    squared error for float labels with one output (regression, as Hugging Face does for ``num_labels=1``)."""
    logits = _logits(outputs)
    if labels.is_floating_point():
        return (logits.reshape(labels.shape[0], -1) - labels.reshape(labels.shape[0], -1)).square().sum(1)
    return F.cross_entropy(logits, labels, reduction="none")
