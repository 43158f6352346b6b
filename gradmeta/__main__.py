"""``python -m gradmeta ...`` (and ``torchrun -m gradmeta ...``): the ``gradmeta`` command."""
import sys

from .cli import entry

sys.exit(entry())
