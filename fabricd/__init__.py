"""fabricd: the data-loading fabric daemon (planner, source loaders, data constructors)."""

__version__ = "0.1.0"
