"""Prescient: a predictive scheduler for LLM serving clusters, and its simulator."""

__version__ = "0.1.0"
