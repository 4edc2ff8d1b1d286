"""The plan compiler: parse → typed IR → validation passes → resolved plan.

Modules, in pipeline order: `parse` (lark grammar → IR), `ir`, `facts` (the
model block), `passes` (one function per invariant), `resolve` (per-layer
decisions), `cost` and `report` (the cost model), `fmt` (canonical printer),
`diff` (semantic difference), `architectures` (the one table of tensor
layouts), `checkpoint` (config and safetensors headers, no torch), `sidecar`
(score tables). Knows nothing about torch weights.
"""
