"""Real local meshes of daemon processes on 127.0.0.1 (`cluster`), used by `nexusd demo`
(`demo`), the e2e tests and the benchmarks."""
