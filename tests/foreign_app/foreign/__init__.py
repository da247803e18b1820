"""A foreign app that leaves markers wherever its code runs."""
