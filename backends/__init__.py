"""scanlib's built-in backends, one subpackage each (installed as ``scanlib_backends``).

Each subpackage's ``__init__`` defines its Backend class with only torch imported; kernels and
their packages (numba, triton, cupy, the compiled library) load on first use.
"""
