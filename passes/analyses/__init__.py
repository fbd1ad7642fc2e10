"""Built-in analyses; importing this package registers them."""

from optc.passes.analyses import activation_stats, graph_stats, hessian  # noqa: F401
