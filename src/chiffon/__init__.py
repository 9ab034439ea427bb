"""Chiffon: a fleet of GPU desktops as one capacity-aware pool."""

__version__ = "0.1.0"
