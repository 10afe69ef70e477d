"""Starting splitserve: the ``splitserve`` command line (``cli.main``) and, later, Ray.

Will also hold the local embedded or existing Ray cluster, placement groups, worker-group actors
and ``ray up`` cluster configs (not written yet).
"""

# The folder is installed as `splitserve.cluster` (pyproject.toml's package-dir); imported by its
# bare name from the repository root it would load second copies of its modules: refused, or
# handed to another distribution's package of that name (splitserve._bare_import).
if __name__ != "splitserve.cluster":
    from splitserve._bare_import import stand_aside

    stand_aside(globals(), "splitserve.cluster")
