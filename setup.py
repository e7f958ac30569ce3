"""Packaging for sagecell_tw. The twistd plugin ships as twisted/plugins/sagecell_plugin.py
(no twisted/plugins/__init__.py: that folder belongs to Twisted)."""

from setuptools import find_packages, setup

# --permalink-db postgresql://...: psycopg 3, the maintained successor of psycopg2 (which now gets
# fixes only), a DB-API 2.0 driver that twisted.enterprise.adbapi drives as it is; [binary] is its
# wheel with libpq inside, so no system library or compiler is needed. <4: a new major may change the API.
POSTGRESQL = ["psycopg[binary]>=3.2,<4"]

setup(
    name="sagecell_tw",
    version="0.1.0",
    description="A live code cell server: sandboxed IPython kernels forked from a warm master, on Twisted",
    python_requires=">=3.11",
    packages=find_packages(include=["sagecell_tw", "sagecell_tw.*"]) + ["twisted.plugins"],
    package_data={"sagecell_tw": ["static/*", "static/**/*"]},
    include_package_data=False,
    install_requires=[
        "twisted>=24.3",
        "autobahn>=24.4",
        "txzmq>=1.0",
        "pyzmq>=25",
        "service_identity>=24.1",
        "pyopenssl>=24",
        # ipython_kernel adapts ipykernel 7's and IPython 9's internals (the
        # master-made shell, no shell channel thread): newer majors need a look first
        "ipykernel>=7.4,<8",
        "ipython>=9,<10",
        "prometheus_client>=0.20",
    ],
    extras_require={
        # ipywidgets 8: interacts (Sage's @interact is built on it, and Python's
        # ipywidgets.interact); the fork server imports it once. 8.1's comm
        # protocol (2.1.0) is the one the widget's @jupyter-widgets packages speak.
        "scientific": ["numpy", "sympy", "matplotlib", "ipywidgets==8.1.*"],
        # Sage kernels (sage_kernel.py): the whole Sage library, ~4.3 GB, ~2 min
        # to install. kernel/sage.py adapts passagemath 10.8's Jupyter kernel.
        "sage": ["passagemath-standard==10.8.*"],
        "postgresql": POSTGRESQL,
        "test": ["pytest>=8", "pytest-timeout", "playwright", "websocket-client", "jupyter_client", "ruff", *POSTGRESQL],
    },
    entry_points={
        "console_scripts": ["sagecell-spawner=sagecell_tw.worker.spawner:main", "sagecell-keys=sagecell_tw.keys:main"]
    },
)
