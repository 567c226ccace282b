"""Build the compiled core.

Metadata lives in pyproject.toml; this file only declares the Cython extension. The generated C
is not committed: it is produced from natskv/_core.pyx at build time (Cython is a build requirement).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("natskv._core", ["natskv/_core.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level="3",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
