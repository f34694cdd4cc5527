"""The package version, in a leaf module: the modules that stamp it into files and Hub
commits import it from here rather than from the package ``__init__``, which imports them."""

__version__ = "0.1.0"
