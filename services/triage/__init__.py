"""The triage agent of the default mesh."""
