"""Hydra launcher plugin `hsm_distributed`: the thin adapter over `hsm_core`."""

__version__ = "0.1.0"
