"""Studies run with Nestor: scripts that read the service's API and reproduce papers' claims."""
