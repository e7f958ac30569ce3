"""sagecell_tw: a live-code-cell server on Twisted, with forked sandboxed IPython kernels."""

__version__ = "0.1.0"
