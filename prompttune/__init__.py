"""prompttune: compare prompt-tuning methods over frozen vision and vision-language backbones.

Kept import-light on purpose: a ``.pth`` hook imports :mod:`prompttune._tvshim` at every
interpreter start in the project's virtual environment.
"""

__version__ = "0.1.0"
