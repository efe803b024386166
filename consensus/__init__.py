"""Ledger: transactions, blocks, RFC 6962 Merkle trees, block stores, PBFT, contracts."""
