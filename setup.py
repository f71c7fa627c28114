"""Only the optional C extension lives here; everything else is in setup.cfg.

tosi_tools._filewriter (a C thread that creates small files while Python parses
the layer) needs a C compiler and Python's headers; without them the build goes
on and tosi writes every file from Python (see tosi_tools/filewriter.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("tosi_tools._filewriter", ["tosi_tools/_filewriter.c"], optional=True),
    Extension("tosi_tools._tarheader", ["tosi_tools/_tarheader.c"], optional=True),
])
