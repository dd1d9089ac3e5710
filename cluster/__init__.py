"""imagine's cluster side: config, storage, jobs, launcher, CLI and client (no torch at import)."""
