"""The researcher agent of the default mesh."""
