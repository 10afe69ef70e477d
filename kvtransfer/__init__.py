"""KV-cache transmission between prefill and decode groups.

`plan` maps blocks between the two groups' (tp, pp) layouts, `messages` holds the commands,
events and names (`Side`, `TransportKind`, `Direction`) that cross process boundaries,
`transport` the pairwise links (NCCL, gloo, CUDA IPC, in-process), `wire` what both ends derive
alone (peer names, a transfer's messages, their tags and order), `buffer_pool` the staging
buffers. Each rank has an `agent`: its transport plus its side's part, the `sender` (layer-wise
sends during the prefill forward) or the `receiver` (receives written into the reserved blocks,
cancellation); `faults` wraps either for tests.
"""

# The folder is installed as `splitserve.kvtransfer` (pyproject.toml's package-dir); imported by its
# bare name from the repository root it would load second copies of its modules: refused, or
# handed to another distribution's package of that name (splitserve._bare_import).
if __name__ != "splitserve.kvtransfer":
    from splitserve._bare_import import stand_aside

    stand_aside(globals(), "splitserve.kvtransfer")
