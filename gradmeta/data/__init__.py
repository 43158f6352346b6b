"""Data without downloads.

* the scikit-learn digits, shipped inside scikit-learn (:func:`load_digits`);
* MNIST / Fashion-MNIST IDX files and CIFAR-10/100 python pickles from a directory you
  provide (:func:`load_mnist`, :func:`load_fashion_mnist`, :func:`load_cifar10`,
  :func:`load_cifar100`, :func:`load_cifar`, or :func:`load_dataset` by name), and
  :func:`downsample_flatten` for the 8×8 flattened inputs of the learned-optimizer tasks;
* a character-level corpus built at run time from the standard library's docstrings
  (:func:`stdlib_docstring_corpus`), with a :class:`CharTokenizer` and a deterministic
  train/validation split, and :func:`lm_batches` for next-character training windows.

Every image set comes back as :class:`ImageData`: images ``(N, C, H, W)`` float in ``[0, 1]``,
labels int64 ``(N,)``.
"""
from ._cifar import load_cifar, load_cifar10, load_cifar100, read_cifar_pickle
from ._errors import DataFormatError, MissingDataError
from ._idx import load_fashion_mnist, load_mnist, read_idx
from ._images import ImageData, load_digits, stratified_split
from ._registry import DATASETS, load_dataset
from ._tensors import downsample_flatten, lm_batches
from ._text import DEFAULT_MODULES, CharTokenizer, TextCorpus, stdlib_docstring_corpus

__all__ = [
    "ImageData",
    "load_dataset",
    "DATASETS",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar",
    "load_cifar10",
    "load_cifar100",
    "read_idx",
    "read_cifar_pickle",
    "stratified_split",
    "downsample_flatten",
    "CharTokenizer",
    "TextCorpus",
    "stdlib_docstring_corpus",
    "lm_batches",
    "DEFAULT_MODULES",
    "MissingDataError",
    "DataFormatError",
]
