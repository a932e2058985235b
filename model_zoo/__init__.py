"""Model builders used by the tests and benchmarks (installed as ``turbo_fx.model_zoo``)."""
