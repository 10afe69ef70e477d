"""KV-cache transmission between prefill and decode groups.

`plan` maps blocks between the two groups' (tp, pp) layouts, `messages` holds the commands,
events and names (`Side`, `TransportKind`, `Direction`) that cross process boundaries,
`transport` the pairwise links (NCCL, gloo, CUDA IPC, in-process), `wire` what both ends derive
alone (peer names, a transfer's messages, their tags and order), `buffer_pool` the staging
buffers. Each rank has an `agent`: its transport plus its side's part, the `sender` (layer-wise
sends during the prefill forward) or the `receiver` (receives written into the reserved blocks,
cancellation); `faults` wraps either for tests.
"""

# The folder is installed as `splitserve.kvtransfer` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, which is on sys.path) its modules would load as second
# copies, whose classes are not `splitserve.kvtransfer`'s: refused. The bare import itself loads
# nothing and does not raise, since libraries probe top-level names by importing them
# (transformers imports `kernels`, looking for Hugging Face's package of that name, on every
# model load); any use of it raises, a submodule's import too (it looks up `__path__`).
if __name__ != "splitserve.kvtransfer":
    del __path__

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import splitserve.kvtransfer, not {__name__}: this folder is the splitserve.kvtransfer package "
                    "(installed by `make install` or `pip install -e .`)")
