"""Fitting and judging predictors offline: ``train`` (a ladder of predictors from a trace
dataset), ``evaluate``, ``metrics`` (pure numpy) and ``cachesim`` (cache replay)."""
