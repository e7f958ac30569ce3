"""twistd plugin: ``twistd sagecell``. Names the tap as a string: --help imports nothing heavy."""

from twisted.application.service import ServiceMaker

sagecell = ServiceMaker(
    "sagecell",
    "sagecell_tw.tap",
    "A live code cell server: sandboxed IPython kernels forked from a warm master.",
    "sagecell",
)
