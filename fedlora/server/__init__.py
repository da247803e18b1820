"""The ServerApp: build the initial adapter, run the strategy, evaluate, write the run directory."""
