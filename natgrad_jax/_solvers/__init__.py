"""Solvers: how a Fisher is stored, averaged over steps and solved against."""
