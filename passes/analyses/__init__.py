"""Built-in analyses; importing this package registers them."""

from optc.passes.analyses import graph_stats  # noqa: F401
