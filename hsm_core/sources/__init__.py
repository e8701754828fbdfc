"""Compute sources: the machines jobs run on."""
