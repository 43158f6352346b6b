"""Learned optimization, split as in learned_optimization.

* **tasks** -- functional inner problems: :func:`digits_mlp` (embedded, default),
  :func:`image_mlp` (8×8 Fashion-MNIST / CIFAR-10 / CIFAR-100 from local files), :func:`char_lm`
  (2-block transformer on the stdlib-docstring corpus), :class:`QuadraticTask`;
* **optimizers** -- hand-designed baselines as ``init``/``update`` pairs with named state:
  :func:`sgdm`, :func:`adam`, the Adam learning-rate sweep :data:`ADAM_LRS`;
* **learned optimizers** -- every one a :class:`LearnedRule` (``init_meta`` / ``init`` / ``update`` /
  ``step``): :class:`PerParamMLP` (residual form: untrained = SGD with momentum),
  :class:`GradMetaNetLO` (the same plus a GradMetaNet / GradMetaNet++ branch on the gradient set),
  :class:`WeightSpaceLO` (the same plus a weight-space equivariant branch on θ and the mean gradient),
  :class:`GradientStatsLO` (the baseline whose branch is two fixed statistics of the gradient set,
  :func:`gradient_set_statistics`; :func:`pretrain_branch` fits a GradMetaNet branch to them),
  :class:`GeneralistRule` (Adam's direction with a bounded learned correction and a learned
  schedule over training progress, with ``lr_free`` a step size estimated during the run from the
  distance travelled; exactly still at zero gradient);
* **outer trainers** -- :class:`GradientEstimator` s: :class:`PES`, :class:`ES` (:func:`es_grad`),
  :class:`TruncatedBackprop` (``torch.func`` or ``higher``), split over ``torchrun`` ranks with
  :func:`comm_from_env`; ``fixed=`` names meta-parameters they hold fixed (e.g. a rule's MLP part
  while its branch is meta-trained on top of it);
* **evaluation** -- :func:`train_curves` (vectorised over seeds and learning rates),
  :func:`learned_curves`,
  :func:`step_reduction`, :func:`step_times`;
* **meta-training from Python** -- :func:`meta_train` (progress, atomic checkpoints, resume) and
  :func:`evaluate` (against lr-tuned Adam), built on :class:`MetaTraining`;
* **user API** -- :class:`LearnedOptimizer`, a ``torch.optim.Optimizer`` that reads ``p.grad`` and
  loads a shipped checkpoint by default; :class:`GradientSetOptimizer` for rules built on the
  model's structure (its closure returns the batch; ``from_checkpoint`` rebuilds a saved rule for
  an MLP of any size).

Meta-training and evaluation run as ``gradmeta run tasks/lopt_digits.toml`` and
``gradmeta run tasks/lopt_eval_digits.toml`` (tasks in :mod:`gradmeta.experiments.lopt`). On a CPU,
call :func:`gradmeta.keep_freed_cpu_memory` once in your own process (the ``gradmeta`` command
does): PES iterations and ``LearnedOptimizer`` steps allocate tensors of a few MiB every step, and
reusing freed memory made them 1.2–1.9× faster in the benchmarks.
"""
from ._baselines import ADAM_LRS, SGDM_LRS, AdamState, Optimizer, SGDMState, adam, sgdm
from ._distributed import Comm, LocalComm, ProcessGroupComm, comm_from_env
from ._gmn import GMNState, GradientStatsLO, GradMetaNetLO, RelativeNeuronIds, WeightSpaceLO, gradient_set_statistics
from ._pretrain import pretrain_branch
from ._evaluate import learned_curves, step_reduction, step_times, train_curves
from ._meta import MetaTraining, evaluate, meta_train
from ._learned import DECAYS, TIMESCALES, LOState, PerParamMLP, rms_normalise
from ._generalist import GeneralistRule
from ._rule import LearnedRule
from ._gs_optim import GradientSetOptimizer
from ._optim import DEFAULT_CHECKPOINT, NAMED_CHECKPOINTS, LearnedOptimizer, checkpoint_horizon, load_checkpoint, save_checkpoint
from ._outer import ES, PES, GradientEstimator, TruncatedBackprop, es_grad, meta_loss, unroll
from ._tasks import (TASK_NAMES, ClassificationTask, LanguageModelTask, ModuleTask, QuadraticTask, SupervisedTask,
                     Task, char_lm, check_task, digits_mlp, image_mlp, load_task, make_task)

__all__ = [
    "Task", "ModuleTask", "SupervisedTask", "ClassificationTask", "LanguageModelTask", "QuadraticTask",
    "digits_mlp", "image_mlp", "char_lm", "make_task", "load_task", "check_task", "TASK_NAMES",
    "Optimizer", "SGDMState", "AdamState", "sgdm", "adam", "ADAM_LRS", "SGDM_LRS",
    "LearnedRule", "PerParamMLP", "LOState", "rms_normalise", "DECAYS", "TIMESCALES", "GradMetaNetLO", "GMNState", "WeightSpaceLO", "GradientStatsLO",
    "gradient_set_statistics", "pretrain_branch",
    "RelativeNeuronIds",
    "unroll", "meta_loss", "GradientEstimator", "PES", "ES", "es_grad", "TruncatedBackprop",
    "Comm", "LocalComm", "ProcessGroupComm", "comm_from_env",
    "LearnedOptimizer", "GradientSetOptimizer", "save_checkpoint", "load_checkpoint", "checkpoint_horizon",
    "DEFAULT_CHECKPOINT", "NAMED_CHECKPOINTS", "GeneralistRule",
    "MetaTraining", "meta_train", "evaluate",
    "train_curves", "learned_curves", "step_reduction", "step_times",
]
