"""The writer agent of the default mesh."""
