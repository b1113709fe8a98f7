"""The orders agent of the default mesh."""
