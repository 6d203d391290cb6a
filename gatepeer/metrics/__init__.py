"""Prometheus metrics for `gatepeer run`: collectors that read the agent, the kernel and the
packet path at scrape time, and the HTTP server that serves them.

Only the daemon imports this package (prometheus_client costs about 40 ms to import).
`sources` holds the provider interfaces and the live providers, `collectors` one collector per
concern, `server` the listener's lifecycle.
"""
