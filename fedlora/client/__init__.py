"""The ClientApp: receive the global adapter, train locally, reply with the update."""
