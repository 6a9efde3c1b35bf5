"""Caches: the decoded image store, the teacher's tokens, and their administration (cap, eviction, locks)."""
