"""The Fashion-MNIST learned-optimizer table: ``benchmarks/lopt_table.py`` with its default table spec,
``tasks/lopt_fmnist_table.toml`` (same arguments).

    python benchmarks/lopt_fmnist_table.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lopt_table import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
