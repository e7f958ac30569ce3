"""sagecell_tw: a live-code-cell server on Twisted, with forked sandboxed IPython kernels."""

import os

__version__ = "0.1.0"

#: the directory that holds this package: the PYTHONPATH with which a child
#: process (the spawner, the zygote) imports this very copy of it
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
