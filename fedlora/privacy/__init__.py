"""Differential privacy core: accounting, sample-level DP-SGD on clients, user-level DP at the server.

Pure functions over tensors, arrays and dicts; the ClientApp, the strategies and the
ServerApp call them and only move their inputs and outputs around.
"""
