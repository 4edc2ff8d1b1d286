"""`plancc heal`: recover what pruning cost, on the artifacts `plancc apply` wrote.

  options (`options`) → training windows from the calibration pool (`data`) →
  per stage: its base model (`stages`: A, then A with bundle B's layers back,
  ...) → a LoRA adapter or full fine-tuning (`lora`) trained by `train` on the
  LM loss or distilled from the original (`loss`) → merged and written beside
  its adapter and manifest (`stages`) → the perplexity table (`report`).

The bundles are only read: `plancc restore --upto all` on the unhealed output
stays bit-exact.
"""
