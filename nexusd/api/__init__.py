"""The local API: the records on the Unix socket between the CLI and its daemon (`records`),
the daemon's side (`server`) and the CLI's side (`client`)."""
