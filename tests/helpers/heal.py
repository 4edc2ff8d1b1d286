"""What the heal tests prune and the options a quick `plancc heal` runs with."""

# A 6-layer tiny Llama pruned to 3 layers (bundles B and C) and one narrowed MLP.
DEPTH = "drop layers 1, 3..4\nbundle B layers 1\nbundle C layers 3..4\nmlp layers 0 width 32\n"
# Short windows, few of them, one epoch: seconds on a CPU.
QUICK = ["--seqlen", "32", "--max-windows", "8", "--epochs", "1", "--grad-accum", "2", "--quiet"]
