"""kdsearch: AutoML for knowledge distillation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdsearch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
