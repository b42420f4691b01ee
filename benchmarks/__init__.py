"""Benchmarks and load tools (overhead side by side, the proxy step, load and soak) and, in
``distillation``, the evaluation of what λ buys. They depend on the library (``server``,
``proxy_worker``), never on the tests."""
