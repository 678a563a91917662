"""The version of loracuda (read by setup.py; one place to change it)."""

__version__ = "0.1.0"
