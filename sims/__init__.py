"""Simulations, benchmarks, dashboards and the ``fedchain`` command line."""
