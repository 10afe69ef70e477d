"""Starting splitserve: the ``splitserve`` command line (``cli.main``) and, later, Ray.

Will also hold the local embedded or existing Ray cluster, placement groups, worker-group actors
and ``ray up`` cluster configs (not written yet).
"""

# The folder is installed as `splitserve.cluster` (pyproject.toml's package-dir). Imported by its
# bare name (from the repository root, where the folder is on sys.path) it would load a second
# copy of every module, whose classes are not `splitserve.cluster`'s: refuse, and say how.
if __name__ != "splitserve.cluster":
    raise ImportError(f"import splitserve.cluster, not {__name__}: this folder is the splitserve.cluster package "
                      "(installed by `make install` or `pip install -e .`)")
