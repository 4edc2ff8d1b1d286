"""The executor: applies a checked plan to a checkpoint (streaming), loads
heterogeneous results, restores originals from bundles, evaluates."""
