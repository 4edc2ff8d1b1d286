"""plangen: writes pruning plans from a model.

It reads a checkpoint (config.json and safetensors headers for the `model`
block; the weights and calibration data for importance scores) and emits plan
text that `plancc` checks and applies. It depends on `compiler` (the plan IR,
the architecture table, the canonical printer) and never the other way round,
so the compiler stays usable without torch.

Commands (see `plangen --help`): `header` prints a checkpoint's model block,
`fetch-demo` builds the SmolLM2-135M-Instruct demo checkpoint.
"""
