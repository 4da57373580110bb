"""Build script for the one C extension, ``dcache.lru._entry`` (metadata lives in setup.cfg).

The extension is optional: where no C compiler is at hand the install goes
on without it and the LRU uses its pure-Python ``Entry`` (docs/DECISIONS.md,
"Memory per key").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dcache.lru._entry",
            ["dcache/lru/_entry.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        )
    ]
)
