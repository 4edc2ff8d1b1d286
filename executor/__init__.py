"""The executor: applies a checked plan to a checkpoint (streaming), loads
heterogeneous results, restores originals from bundles, evaluates.

`executor.load(path)` loads any `plancc apply` or `plancc restore` result.
"""

from executor.loader import load

__all__ = ["load"]
