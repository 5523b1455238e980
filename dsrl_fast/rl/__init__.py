"""RL logic: advantages, the algorithms' phases, the marginal guard, step samples."""
