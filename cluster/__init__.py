"""Starting splitserve: the ``splitserve`` command line (``cli.main``) and, later, Ray.

Will also hold the local embedded or existing Ray cluster, placement groups, worker-group actors
and ``ray up`` cluster configs (not written yet).
"""
