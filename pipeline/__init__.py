"""How stages run: config, run directory, executors, resume, catalog, report and the CLI."""
