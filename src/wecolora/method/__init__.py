"""The method: student plans, weight-copied students, low-rank adapters, block search and the distillation losses."""
