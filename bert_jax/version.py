"""The one place the version is written (setup.py reads this file, prepare-data records it)."""

__version__ = "0.1.0"
