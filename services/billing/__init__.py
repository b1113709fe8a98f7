"""The billing agent of the default mesh."""
