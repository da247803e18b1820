"""Ways to run the fedlora apps: a local ``flwr run`` simulation and the in-process grid."""
