"""Learned curvature estimators (studies): Fisher diagonal of SIRENs, Fisher trace of digits MLPs.

Tasks ``curvature_learned`` and ``curvature_learned_trace``; the models and datasets live in
:mod:`.learned_fisher` and :mod:`.learned_trace`.
"""
from .tasks import curvature_learned, curvature_learned_trace

__all__ = ["curvature_learned", "curvature_learned_trace"]
