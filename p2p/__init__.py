"""Peer-to-peer runtime: identities, the signed wire format, transports,
the node actor and gossip. Knows nothing of blocks, OIDs or models."""
