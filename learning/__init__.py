"""Private, compressed local learning in JAX (DESIGN.md "Learning")."""
