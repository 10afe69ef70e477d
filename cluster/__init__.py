"""Starting splitserve: the ``splitserve`` command line (``cli.main``) and, later, Ray.

Will also hold the local embedded or existing Ray cluster, placement groups, worker-group actors
and ``ray up`` cluster configs (not written yet).
"""

# The folder is installed as `splitserve.cluster` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, which is on sys.path) its modules would load as second
# copies, whose classes are not `splitserve.cluster`'s: refused. The bare import itself loads
# nothing and does not raise, since libraries probe top-level names by importing them
# (transformers imports `kernels`, looking for Hugging Face's package of that name, on every
# model load); any use of it raises, a submodule's import too (it looks up `__path__`).
if __name__ != "splitserve.cluster":
    del __path__

    def __getattr__(attr: str):
        error = ImportError if attr == "__path__" else AttributeError
        raise error(f"import splitserve.cluster, not {__name__}: this folder is the splitserve.cluster package "
                    "(installed by `make install` or `pip install -e .`)")
