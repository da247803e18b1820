"""Aggregation strategies: one package per method (its math, server part, client part), listed by
:mod:`fedlora.strategies.registry`; :mod:`fedlora.strategies.common` holds the math they share."""
