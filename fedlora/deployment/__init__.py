"""Deployment tooling: the command lines of a SuperLink/SuperNode federation, compose files, loopback test bed."""
